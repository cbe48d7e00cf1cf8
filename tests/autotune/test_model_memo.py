"""A memo of results computed from a model: computed once per model and state."""

from __future__ import annotations

import gc

import torch
from torch import nn

from autotune.model_memo import ModelMemo


def test_a_result_is_computed_once_until_a_tensor_changes() -> None:
    memo: ModelMemo[int] = ModelMemo()
    calls: list[nn.Module] = []

    def compute(model: nn.Module) -> int:
        calls.append(model)
        return len(calls)

    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    assert memo.get(model, compute) == 1
    assert memo.get(model, compute) == 1
    with torch.no_grad():
        model[0].weight.add_(1.0)  # edited in place
    assert memo.get(model, compute) == 2
    model[1].bias = nn.Parameter(torch.ones(4))  # replaced
    assert memo.get(model, compute) == 3
    model.register_buffer("steps", torch.zeros(1))  # a new tensor
    assert memo.get(model, compute) == 4
    other = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    assert memo.get(other, compute) == 5  # each model its own
    assert memo.get(model, compute) == 4


def test_the_memo_goes_with_the_model() -> None:
    memo: ModelMemo[str] = ModelMemo()
    model = nn.Linear(2, 2)
    memo.get(model, lambda m: "kept")
    assert len(memo._kept) == 1
    del model
    gc.collect()
    assert len(memo._kept) == 0
