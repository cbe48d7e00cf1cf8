"""A model's fingerprint: its structure (names, shapes, dtypes) and a hash of its weights."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def fingerprint(
    model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]] | None = None
) -> dict[str, Any]:
    """``{"structure": sha256, "weights": sha256, "tensors": n, "parameters": n}``.

    The weights are hashed from ``model.state_dict()``, or from ``tensors`` (the same names
    and values in the same order, e.g. read one at a time from a checkpoint while the model's
    parameters are on the ``meta`` device)."""
    state = model.state_dict()
    layout = [
        [name, list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in state.items()
    ]
    structure = hashlib.sha256(json.dumps(layout).encode()).hexdigest()
    weights = hashlib.sha256()
    for name, tensor in tensors if tensors is not None else state.items():
        weights.update(name.encode())
        data = tensor.detach().to("cpu").contiguous()
        weights.update(data.reshape(-1).view(torch.uint8).numpy())
    return {
        "structure": structure,
        "weights": weights.hexdigest(),
        "tensors": len(state),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def short(fp: dict[str, Any]) -> str:
    return f"{fp['structure'][:12]}/{fp['weights'][:12]}"


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("structure") == b.get("structure") and a.get("weights") == b.get("weights")
