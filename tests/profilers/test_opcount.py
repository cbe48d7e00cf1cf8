"""What a model computes outside its compressible layers (profilers.opcount)."""

from __future__ import annotations

import copy

import pytest
import torch
from profiler_helpers import Batch, make_batch
from torch import nn

from profilers.opcount import rest_of_model
from profilers.roofline import RestOfModel


def linears(model: nn.Module) -> list[nn.Linear]:
    return [module for module in model.modules() if isinstance(module, nn.Linear)]


def linear_flops(model: nn.Module, inputs: Batch) -> int:
    """2 * in * out per input row of every nn.Linear, rows counted while the model runs."""
    total = 0

    def hook(module: nn.Linear, args: tuple[torch.Tensor, ...]) -> None:
        nonlocal total
        rows = args[0].numel() // module.in_features
        total += 2 * module.in_features * module.out_features * rows

    handles = [layer.register_forward_pre_hook(hook) for layer in linears(model)]
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total


class MatmulModel(nn.Module):
    """``relu(x @ w1) @ w2``, written with torch.mm or with the ``@`` operator."""

    def __init__(self, use_mm: bool) -> None:
        super().__init__()
        self.use_mm = use_mm
        self.w1 = nn.Parameter(torch.randn(8, 16))
        self.w2 = nn.Parameter(torch.randn(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_mm:
            return torch.mm(torch.relu(torch.mm(x, self.w1)), self.w2)
        return torch.relu(x @ self.w1) @ self.w2


@pytest.fixture
def inputs() -> Batch:
    return make_batch(2, 8, padded=2)


def test_counts_ops_and_activation_bytes_of_bert(bert: nn.Module, inputs: Batch) -> None:
    rest = rest_of_model(bert, inputs, [])
    assert isinstance(rest, RestOfModel)
    assert rest.ops > 0
    assert rest.activation_bytes > 0
    assert rest.flops >= 0
    assert rest.dtype == "float32"


def test_excluding_layers_leaves_their_ops_and_bytes_out(bert: nn.Module, inputs: Batch) -> None:
    everything = rest_of_model(bert, inputs, [])
    rest = rest_of_model(bert, inputs, linears(bert))
    assert 0 < rest.ops < everything.ops
    assert 0 < rest.activation_bytes < everything.activation_bytes
    some = rest_of_model(bert, inputs, linears(bert)[:3])
    assert rest.ops < some.ops < everything.ops


def test_nested_exclusions_count_like_the_outer_one(bert: nn.Module, inputs: Batch) -> None:
    block = bert.encoder.layer[0]
    outer = rest_of_model(bert, inputs, [block])
    nested = rest_of_model(bert, inputs, [block, *linears(block)])
    assert nested == outer
    assert outer.ops < rest_of_model(bert, inputs, []).ops


def test_counting_leaves_no_hooks_and_does_not_change_the_output(
    bert: nn.Module, inputs: Batch
) -> None:
    with torch.inference_mode():
        before = bert(**inputs).last_hidden_state
    rest_of_model(bert, inputs, linears(bert))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in bert.modules())
    with torch.inference_mode():
        assert torch.equal(bert(**inputs).last_hidden_state, before)


def test_counts_depend_on_the_shapes_not_on_the_weights(bert: nn.Module, inputs: Batch) -> None:
    """A copy with other weights (and the same shapes) counts the same; a longer input runs
    the same operators on more activation bytes."""
    counted = rest_of_model(bert, inputs, linears(bert))
    other = copy.deepcopy(bert)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.normal_(0.0, 0.5)
    assert rest_of_model(other, inputs, linears(other)) == counted
    longer = rest_of_model(bert, make_batch(2, 16, padded=2), linears(bert))
    assert longer.ops == counted.ops and longer.activation_bytes > counted.activation_bytes


def test_dtype_is_that_of_the_weights(bert: nn.Module, inputs: Batch) -> None:
    assert rest_of_model(bert, inputs, []).dtype == "float32"
    bert.to(torch.bfloat16)
    assert rest_of_model(bert, inputs, []).dtype == "bfloat16"


def test_flops_of_primitive_matmuls_are_counted() -> None:
    model = MatmulModel(use_mm=True)
    rest = rest_of_model(model, {"x": torch.randn(5, 8)}, [])
    assert rest.flops == 2 * 5 * 8 * 16 + 2 * 5 * 16 * 4


def test_flops_of_the_matmul_operator_are_counted() -> None:
    model = MatmulModel(use_mm=False)
    rest = rest_of_model(model, {"x": torch.randn(5, 8)}, [])
    assert rest.flops == 2 * 5 * 8 * 16 + 2 * 5 * 16 * 4


def test_excluding_the_linears_removes_exactly_their_flops(bert: nn.Module, inputs: Batch) -> None:
    everything = rest_of_model(bert, inputs, [])
    rest = rest_of_model(bert, inputs, linears(bert))
    expected = linear_flops(bert, inputs)
    assert everything.flops > rest.flops
    assert everything.flops - rest.flops == pytest.approx(expected, rel=0.01)
