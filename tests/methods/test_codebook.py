"""Tests of methods/codebook.py beyond the shared conformance suite."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from scipy.stats import norm
from torch import nn
from transformers.pytorch_utils import Conv1D

from methods import QuantOption, get_method, option_from_dict
from methods.base import LayerShape
from methods.codebook import CodebookEmbedding, CodebookLinear, CodebookOption
from methods.codebook_levels import (
    fixed_levels,
    fp4_levels,
    lloyd_levels,
    nearest_codes,
    normal_float_levels,
)
from methods.errors import OptionError
from methods.packing import packed_row_bytes, unpack_codes

CODEBOOK = get_method("codebook")
RTN = get_method("rtn")
LAYER_NAME = "decoder.block.2.mlp.up"

# The NF4 table as published with QLoRA (Dettmers et al. 2023, appendix E).
NF4_PUBLISHED = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def linear_with(weight: torch.Tensor, bias: bool = False) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def weight_error(module: CodebookLinear, layer: nn.Linear) -> float:
    weight = layer.weight.detach()
    return float((module.dequantize() - weight).norm() / weight.norm())


def output_error(module: nn.Module, layer: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        expected = layer(x)
        return float((module(x) - expected).norm() / expected.norm())


# --- tables --------------------------------------------------------------------------------


def test_nf4_table_is_the_published_one() -> None:
    levels = normal_float_levels(4)
    assert len(levels) == 16
    assert max(abs(a - b) for a, b in zip(levels, NF4_PUBLISHED, strict=True)) < 1e-4
    assert levels[0] == -1.0 and levels[-1] == 1.0
    assert levels.count(0.0) == 1


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_levels_are_equal_mass_quantiles_with_an_exact_zero(bits: int) -> None:
    levels = normal_float_levels(bits)
    half = 1 << (bits - 1)
    assert len(levels) == 1 << bits
    assert list(levels) == sorted(levels) and len(set(levels)) == len(levels)
    assert levels[0] == -1.0 and levels[-1] == 1.0 and 0.0 in levels
    assert sum(v > 0 for v in levels) == half and sum(v < 0 for v in levels) == half - 1
    # Undo the normalisation: the positive levels sit at evenly spaced probabilities.
    top = norm.ppf(1.0 - 0.5 * (1 / (2 << bits) + 1 / (2 * ((1 << bits) - 1))))
    positive = [norm.cdf(v * top) for v in levels if v > 0]
    steps = [b - a for a, b in zip([0.5, *positive], positive, strict=False)]
    assert max(steps) - min(steps) < 1e-9


def test_fp4_table_is_e2m1_over_six_with_one_zero() -> None:
    levels = fp4_levels()
    e2m1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    assert len(levels) == 15
    assert set(levels) == {s * v / 6 for v in e2m1 for s in (-1, 1)}
    assert levels[0] == -1.0 and levels[-1] == 1.0
    assert [math.copysign(1.0, v) for v in levels if v == 0] == [1.0]  # no -0


@pytest.mark.parametrize(
    "levels",
    [fixed_levels("nf", 2), fixed_levels("nf", 3), fixed_levels("nf", 4), fixed_levels("fp", 4)],
    ids=["nf2", "nf3", "nf4", "fp4"],
)
def test_encoding_picks_the_nearest_level(levels: torch.Tensor) -> None:
    values = torch.rand(4000, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2
    values = torch.cat([values, levels, (levels[1:] + levels[:-1]) / 2])  # exact and ties
    codes = nearest_codes(values, levels).long()
    distance = (values - levels[codes]).abs()
    brute = (values[:, None] - levels[None, :]).abs().min(dim=1).values
    assert torch.all(distance <= brute + 1e-7)  # a float32 midpoint may sit one ulp off


# --- Lloyd's algorithm ---------------------------------------------------------------------


def test_lloyd_finds_the_means_of_separated_clusters() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([-0.9, -0.2, 0.3, 0.8])
    sizes = [90, 160, 170, 80]  # unequal, so the quantile start is off centre
    values = torch.cat(
        [
            c + 0.01 * torch.randn(n, generator=generator)
            for c, n in zip(centres, sizes, strict=True)
        ]
    )
    levels = lloyd_levels(values, 4)
    parts = values.split(sizes)
    assert torch.allclose(levels, torch.stack([p.mean() for p in parts]), atol=1e-6)


def naive_lloyd(values: torch.Tensor, count: int, steps: int = 1000) -> torch.Tensor:
    """Textbook Lloyd: argmin assignment, cell means, from the same quantile start."""
    data = values.double().sort().values
    levels = data[((torch.arange(count) + 0.5) * len(data) / count).long()]
    for _ in range(steps):
        cells = (data[:, None] - levels[None, :]).abs().argmin(dim=1)
        means = torch.stack(
            [data[cells == k].mean() if (cells == k).any() else levels[k] for k in range(count)]
        )
        if torch.allclose(means, levels, rtol=0, atol=1e-12):
            break
        levels = means.sort().values
    return levels.float()


@pytest.mark.parametrize("count", [4, 8])
def test_lloyd_on_sorted_prefix_sums_equals_the_textbook_algorithm(count: int) -> None:
    values = torch.randn(3000, generator=torch.Generator().manual_seed(3)).clamp(-2.5, 2.5)
    assert torch.allclose(lloyd_levels(values, count), naive_lloyd(values, count), atol=1e-5)


def nearest_error(values: torch.Tensor, levels: torch.Tensor) -> float:
    return float((values - levels[nearest_codes(values, levels).long()]).pow(2).sum())


@pytest.mark.parametrize("count", [4, 8, 16])
def test_lloyd_ends_at_a_fixed_point_better_than_its_start(count: int) -> None:
    values = torch.distributions.Laplace(0.0, 0.2).sample((5000,)).clamp(-1, 1)
    levels = lloyd_levels(values, count)
    assert levels.shape == (count,) and torch.equal(levels, levels.sort().values)
    codes = nearest_codes(values, levels).long()
    for k in range(count):
        cell = values[codes == k]
        if cell.numel():
            assert abs(float(cell.mean()) - float(levels[k])) < 1e-5
    start = torch.quantile(values, (torch.arange(count) + 0.5) / count, interpolation="lower")
    assert nearest_error(values, levels) < 0.9 * nearest_error(values, start)


def test_lloyd_of_constant_data_is_finite() -> None:
    assert torch.equal(lloyd_levels(torch.zeros(100), 8), torch.zeros(8))
    assert torch.all(torch.isfinite(lloyd_levels(torch.ones(3), 16)))


# --- conversion ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [CodebookOption("nf", 4, 16), CodebookOption("fp", 4, 32), CodebookOption("lloyd", 3, 8)],
    ids=lambda o: o.label,
)
def test_converted_weight_is_the_nearest_level_times_the_group_absmax(
    option: CodebookOption,
) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 12)
    module = CODEBOOK.convert(layer, option)
    weight = layer.weight.detach().reshape(12, -1, option.group_size)
    absmax = weight.abs().amax(dim=-1)
    assert torch.equal(module.scales, absmax.to(torch.float16))
    levels = module.levels()
    codes = unpack_codes(module.codes, option.bits, 64).long().reshape(weight.shape)
    scaled = weight / module.scales.float().unsqueeze(-1)
    chosen = (scaled - levels[codes]).abs()
    best = (scaled.unsqueeze(-1) - levels).abs().min(dim=-1).values
    assert torch.allclose(chosen, best, atol=1e-6)
    expected = levels[codes] * module.scales.float().unsqueeze(-1)
    assert torch.equal(module.dequantize(), expected.reshape(12, 64))
    assert torch.equal(module.dequantize_scratch(torch.float32), module.dequantize())


def test_fp4_never_writes_code_15() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    module = CODEBOOK.convert(layer, CodebookOption("fp", 4, 64))
    assert int(unpack_codes(module.codes, 4, 64).max()) == 14


def gaussian_layer(rows: int = 128, cols: int = 256, seed: int = 0) -> nn.Linear:
    weight = 0.02 * torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return linear_with(weight)


def test_nf4_beats_rtn_int4_symmetric_at_the_same_group_size() -> None:
    layer = gaussian_layer()
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    nf4 = CODEBOOK.convert(layer, CodebookOption("nf", 4, 64))
    rtn = RTN.convert(layer, QuantOption(4, 64, symmetric=True))
    assert state_bytes(nf4) == state_bytes(rtn)
    nf4_error, rtn_error = output_error(nf4, layer, x), output_error(rtn, layer, x)
    assert nf4_error < 0.95 * rtn_error, (nf4_error, rtn_error)  # measured 0.092 vs 0.103


@pytest.mark.parametrize("distribution", ["laplace", "uniform"])
def test_lloyd3_beats_nf3_on_non_gaussian_weights(distribution: str) -> None:
    generator = torch.Generator().manual_seed(2)
    if distribution == "uniform":
        weight = torch.rand(128, 256, generator=generator) * 0.04 - 0.02
    else:
        weight = torch.distributions.Laplace(0.0, 0.02).sample((128, 256))
    layer = linear_with(weight)
    lloyd = CODEBOOK.convert(layer, CodebookOption("lloyd", 3, 64))
    nf = CODEBOOK.convert(layer, CodebookOption("nf", 3, 64))
    lloyd_error, nf_error = weight_error(lloyd, layer), weight_error(nf, layer)
    # measured: laplace 0.208 vs 0.233, uniform 0.125 vs 0.162
    assert lloyd_error < 0.95 * nf_error, (lloyd_error, nf_error)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lloyd_is_no_worse_than_nf_on_gaussian_weights(bits: int) -> None:
    layer = gaussian_layer()
    lloyd = CODEBOOK.convert(layer, CodebookOption("lloyd", bits, 64))
    nf = CODEBOOK.convert(layer, CodebookOption("nf", bits, 64))
    assert weight_error(lloyd, layer) < weight_error(nf, layer)


def test_zero_groups_decode_to_zero_and_huge_weights_stay_finite() -> None:
    weight = 0.02 * torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    weight[0, :32] = 0.0
    weight[1] = 0.0
    weight[2] *= 1e7  # beyond float16: the scale saturates
    for fmt, bits in (("nf", 4), ("fp", 4), ("lloyd", 2)):
        module = CODEBOOK.convert(linear_with(weight), CodebookOption(fmt, bits, 32))
        decoded = module.dequantize()
        assert torch.all(torch.isfinite(decoded)) and torch.all(torch.isfinite(module.scales))
        assert torch.all(decoded[0, :32] == 0) and torch.all(decoded[1] == 0)
        assert torch.all(torch.isfinite(module(torch.randn(3, 64))))


def test_an_all_zero_layer_converts_to_zeros() -> None:
    module = CODEBOOK.convert(linear_with(torch.zeros(8, 32)), CodebookOption("lloyd", 4, 32))
    assert torch.all(torch.isfinite(module.table))
    assert torch.equal(module(torch.randn(2, 32)), torch.zeros(2, 8))


def test_nan_weights_are_refused() -> None:
    layer = nn.Linear(32, 8)
    with torch.no_grad():
        layer.weight[3, 5] = math.nan
    with pytest.raises(OptionError, match="NaN"):
        CODEBOOK.convert(layer, CodebookOption("nf", 4, 32))


def test_conversion_leaves_the_layer_alone_and_is_deterministic() -> None:
    layer = gaussian_layer(32, 64)
    before = layer.weight.detach().clone()
    option = CodebookOption("lloyd", 4, 32)
    a, b = CODEBOOK.convert(layer, option), CODEBOOK.convert(layer, option)
    assert torch.equal(layer.weight, before)
    assert save_safetensors(a.state_dict()) == save_safetensors(b.state_dict())


def test_conv1d_is_quantised_like_the_equal_linear_layer() -> None:
    torch.manual_seed(0)
    conv = Conv1D(48, 64)
    with torch.no_grad():
        conv.weight.normal_(0.0, 0.02)
        conv.bias.normal_(0.0, 0.02)
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    option = CodebookOption("lloyd", 3, 32)
    a, b = CODEBOOK.convert(conv, option), CODEBOOK.convert(linear, option)
    assert save_safetensors(a.state_dict()) == save_safetensors(b.state_dict())
    x = torch.randn(5, 64)
    assert output_error(a, conv, x) < 0.3


# --- storage -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "option", "expected"),
    [
        # 40 codes of 3 bits: 15 bytes a row; 5 scales; a 16-byte table; float32 bias
        (lambda: nn.Linear(40, 6), CodebookOption("lloyd", 3, 8), 6 * 15 + 6 * 5 * 2 + 16 + 24),
        # 64 codes of 4 bits: 32 bytes a row; 2 scales; no table (a constant of the format)
        (lambda: nn.Linear(64, 10, bias=False), CodebookOption("nf", 4, 32), 10 * 32 + 10 * 4),
        (lambda: nn.Embedding(7, 96), CodebookOption("fp", 4, 96), 7 * 48 + 7 * 2),
        # 2-bit: 24 bytes a row for 96 codes; a float16 bias
        (
            lambda: nn.Linear(96, 3, dtype=torch.float16),
            CodebookOption("lloyd", 2, 32),
            3 * 24 + 3 * 3 * 2 + 8 + 6,
        ),
    ],
    ids=["lloyd3-linear", "nf4-nobias", "fp4-embedding", "lloyd2-half"],
)
def test_cost_is_the_exact_bytes(make, option: CodebookOption, expected: int) -> None:
    layer = make()
    shape = LayerShape.of(layer)
    cost = CODEBOOK.cost(shape, option)
    assert cost.bytes == expected
    module = CODEBOOK.convert(layer, option)
    assert state_bytes(module) == expected
    assert cost.weight_bytes == module.stored_weight_bytes()
    assert cost.weight_bytes == shape.rows * packed_row_bytes(shape.cols, option.bits) + (
        shape.rows * shape.cols // option.group_size * 2
        + (2 * (1 << option.bits) if option.format == "lloyd" else 0)
    )


def test_fixed_tables_are_not_stored() -> None:
    module = CODEBOOK.convert(nn.Linear(64, 8), CodebookOption("nf", 4, 64))
    assert set(module.state_dict()) == {"codes", "scales", "bias"}
    module = CODEBOOK.convert(nn.Embedding(5, 64), CodebookOption("lloyd", 4, 64))
    assert set(module.state_dict()) == {"codes", "scales", "table"}
    assert module.table.dtype == torch.float16 and module.table.shape == (16,)


def test_dtype_casts_keep_the_stored_format_and_outputs_follow_the_input() -> None:
    torch.manual_seed(0)
    module = CODEBOOK.convert(nn.Linear(64, 16), CodebookOption("lloyd", 4, 64))
    before = state_bytes(module)
    module = module.to(torch.bfloat16)
    assert state_bytes(module) == before - 16 * 2  # only the bias halves
    assert module.table.dtype == torch.float16 and module.scales.dtype == torch.float16
    assert module(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert module(torch.randn(2, 64)).dtype == torch.float32


def test_embedding_looks_up_decoded_rows_in_its_own_dtype() -> None:
    torch.manual_seed(0)
    table = nn.Embedding(50, 64, padding_idx=0, dtype=torch.bfloat16)
    module = CODEBOOK.convert(table, CodebookOption("nf", 4, 32))
    assert isinstance(module, CodebookEmbedding) and module.padding_idx == 0
    indices = torch.tensor([[3, 0, 49], [7, 7, 1]])
    out = module(indices)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 64)
    assert torch.equal(out, module.dequantize(torch.bfloat16)[indices])
    assert module.half()(indices).dtype == torch.float16


def test_round_trip_through_safetensors_into_an_empty_module() -> None:
    layer = gaussian_layer(16, 64)
    option = CodebookOption("lloyd", 2, 32)
    module = CODEBOOK.convert(layer, option)
    blob = save_safetensors(module.state_dict())
    restored = CODEBOOK.empty(LayerShape.of(layer), option)
    restored.load_state_dict(load_safetensors(blob), strict=True)
    x = torch.randn(3, 64)
    assert torch.equal(restored(x), module(x))


# --- options and refusals ------------------------------------------------------------------


def test_grid_is_small_valid_and_skips_groups_that_do_not_divide() -> None:
    shape = LayerShape("linear", 128, 768)
    grid = CODEBOOK.grid(shape)
    labels = [option.label for option in grid]
    assert len(grid) <= 6 and len(set(labels)) == len(labels)
    assert {"nf4-g64", "fp4-g64", "lloyd3-g64", "lloyd2-g32"} <= set(labels)
    for option in grid:
        CODEBOOK.check(shape, option, LAYER_NAME)
        assert option_from_dict(option.to_dict()) == option
    narrow = CODEBOOK.grid(LayerShape("linear", 128, 96))
    assert [option.label for option in narrow] == ["lloyd2-g32"]


def test_unknown_format_lists_the_formats() -> None:
    shape = LayerShape("linear", 8, 64)
    with pytest.raises(OptionError) as info:
        CODEBOOK.check(shape, CodebookOption("int", 4, 64), LAYER_NAME)
    message = str(info.value)
    assert LAYER_NAME in message and "'int'" in message
    assert "allowed: 'nf', 'fp', 'lloyd'" in message


@pytest.mark.parametrize(
    ("option", "allowed"),
    [(CodebookOption("fp", 3, 64), "[4]"), (CodebookOption("nf", 5, 64), "[2, 3, 4]")],
)
def test_bits_not_allowed_for_the_format_are_refused(option: CodebookOption, allowed: str) -> None:
    with pytest.raises(OptionError) as info:
        CODEBOOK.check(LayerShape("embedding", 8, 64), option, LAYER_NAME)
    message = str(info.value)
    assert LAYER_NAME in message and f"{option.bits} bits" in message
    assert message.endswith(f"allowed: {allowed}")


@pytest.mark.parametrize("group", [48, 0, -32])
def test_group_size_that_does_not_divide_the_width_is_refused(group: int) -> None:
    option = dataclasses.replace(CodebookOption(), group_size=group)
    with pytest.raises(OptionError) as info:
        CODEBOOK.check(LayerShape("linear", 8, 64), option, LAYER_NAME)
    message = str(info.value)
    assert LAYER_NAME in message and f"group size {group}" in message
    assert "allowed: a divisor of 64, e.g. 8, 16, 32, 64" in message
    with pytest.raises(OptionError):
        CODEBOOK.convert(nn.Linear(64, 8), option)


def test_needs_no_calibration_and_computes_by_dequantising() -> None:
    shape = LayerShape("linear", 8, 64)
    option = CodebookOption()
    assert option.label == "nf4-g64"
    assert not CODEBOOK.needs_calibration(option)
    assert CODEBOOK.observer(nn.Linear(64, 8), option) is None
    assert CODEBOOK.runtime_format(shape, option) == "dequantize"
    assert CODEBOOK.cost(shape, option).flops_per_token == 2 * 8 * 64
