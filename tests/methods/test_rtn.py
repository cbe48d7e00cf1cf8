"""Tests of methods/rtn.py beyond the shared conformance suite."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch import nn

from methods import kernels
from methods.base import LayerShape
from methods.errors import OptionError
from methods.quantized import QuantizedEmbedding
from methods.registry import get_method
from methods.rtn import ALLOWED_BITS, QuantOption

RTN = get_method("rtn")
LAYER_NAME = "decoder.block.2.mlp.up"


def state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def kernel_calls(module: nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    called: list[str] = []
    for name in ("int8_matmul", "int4_matmul"):
        real = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *args, _n=name, _f=real: called.append(_n) or _f(*args)
        )
    module(x)
    return called


FORMAT_OF_KERNEL = {"int8_matmul": "int8_weight_only", "int4_matmul": "int4_weight_only"}


@pytest.mark.parametrize(
    "option",
    [
        QuantOption(8, None, True),
        QuantOption(4, None, False),
        QuantOption(4, 64, False),
        QuantOption(3, 64, True),
        QuantOption(8, 64, True),
    ],
    ids=lambda option: option.label,
)
def test_runtime_format_names_the_kernel_that_runs(
    option: QuantOption, policy: kernels.KernelPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    module = RTN.convert(layer, option)
    called = kernel_calls(module, torch.randn(3, 64), monkeypatch)
    expected = FORMAT_OF_KERNEL[called[0]] if called else "dequantize"
    assert RTN.runtime_format(LayerShape.of(layer), option) == expected


@pytest.mark.parametrize("bits", [1, 9, 16])
def test_check_names_the_allowed_bit_widths(bits: int) -> None:
    shape = LayerShape("linear", 48, 64)
    with pytest.raises(OptionError) as info:
        RTN.check(shape, QuantOption(bits, None, True), LAYER_NAME)
    message = str(info.value)
    assert message.startswith(LAYER_NAME)
    assert str(list(ALLOWED_BITS)) in message


@pytest.mark.parametrize("group", [0, -32, 48, 100])
def test_check_refuses_bad_group_sizes(group: int) -> None:
    shape = LayerShape("linear", 48, 64)
    with pytest.raises(OptionError, match=f"{LAYER_NAME}: group size {group} "):
        RTN.check(shape, QuantOption(4, group, True), LAYER_NAME)


def test_group_size_message_lists_a_group_size_that_is_allowed() -> None:
    shape = LayerShape("linear", 16, 48)
    with pytest.raises(OptionError) as info:
        RTN.check(shape, QuantOption(4, 32, True), LAYER_NAME)
    listed = [int(n) for n in re.findall(r"\d+", str(info.value).split("allowed", 1)[1])]
    accepted = []
    for group in listed:
        try:
            RTN.check(shape, QuantOption(4, group, True), LAYER_NAME)
            accepted.append(group)
        except OptionError:
            pass
    assert accepted, str(info.value)


@pytest.mark.parametrize("cols", [48, 64, 96, 384])
def test_grid_offers_only_valid_options(cols: int) -> None:
    shape = LayerShape("linear", 32, cols)
    grid = RTN.grid(shape)
    assert grid
    for option in grid:
        assert isinstance(option, QuantOption)
        RTN.check(shape, option, LAYER_NAME)
        assert dataclasses.replace(option, symmetric=not option.symmetric) in grid


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_convert_refuses_weights_that_are_not_finite(bad: float) -> None:
    layer = nn.Linear(64, 16)
    with torch.no_grad():
        layer.weight[3, 5] = bad
    with pytest.raises(OptionError, match="NaN or inf"):
        RTN.convert(layer, QuantOption(4, 32, False))


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_cost_counts_padded_rows(bits: int, symmetric: bool) -> None:
    """A width that is not a multiple of 8: packed rows are padded, and cost knows it."""
    torch.manual_seed(bits)
    for layer in (nn.Linear(36, 20), nn.Embedding(50, 36)):
        option = QuantOption(bits, 12, symmetric)
        module = RTN.convert(layer, option)
        assert RTN.cost(LayerShape.of(layer), option).bytes == state_bytes(module)


def test_embedding_keeps_padding_idx_and_dtype() -> None:
    layer = nn.Embedding(40, 32, padding_idx=3, dtype=torch.bfloat16)
    module = RTN.convert(layer, QuantOption(4, 32, True))
    assert isinstance(module, QuantizedEmbedding)
    assert module.padding_idx == 3
    out = module(torch.tensor([[3, 7]]))
    assert out.dtype == torch.bfloat16
    assert torch.all(out[0, 0] == 0)  # the padding row is zero and decodes to zeros


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 128])
def test_the_quantiser_bound_reads_the_range_of_gaussian_groups(
    group: int, symmetric: bool
) -> None:
    """``gaussian_range_rms`` (numerical integration) against sampled groups, and the bound's
    step model against RTN's error on a Gaussian weight at 4 bits."""
    from methods.base import QUANT_BOUND_MARGIN, gaussian_range_rms, quantizer_error_bound

    generator = torch.Generator().manual_seed(0)
    groups = torch.randn(20000, group, generator=generator, dtype=torch.float64)
    spread = 2 * groups.abs().amax(1) if symmetric else groups.amax(1) - groups.amin(1)
    assert gaussian_range_rms(group, symmetric) == pytest.approx(
        float(spread.pow(2).mean().sqrt()), rel=0.02
    )
    weight = torch.randn(256, 256, generator=generator)
    layer = nn.Linear(256, 256, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    option = QuantOption(4, group, symmetric)
    with torch.no_grad():
        decoded = RTN.convert(layer, option)(torch.eye(256)).t()  # row i: input e_i
    error = float((decoded - weight).norm() / weight.norm())
    expected = quantizer_error_bound(4, group, symmetric) / QUANT_BOUND_MARGIN
    assert error == pytest.approx(expected, rel=0.1)
