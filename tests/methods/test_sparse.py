"""SparseLinear: bitmask and N:M pattern storage, exact bytes, decoding and round trips."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from methods import affine
from methods.sparse import (
    SparseLinear,
    decode_pattern,
    encode_pattern,
    pattern_bits,
    sparse_weight_bytes,
)

NM_PATTERNS = [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (7, 8), (3, 6), (2, 5)]


def state_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def random_mask(rows: int, cols: int, group: int, keep: int, seed: int = 0) -> torch.Tensor:
    """A bool mask keeping ``keep`` random places of every ``group`` columns of each row."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(rows, cols // group, group, generator=generator)
    order = noise.argsort(dim=-1)[..., :keep]
    mask = torch.zeros(rows, cols // group, group, dtype=torch.bool)
    return mask.scatter_(-1, order, True).reshape(rows, cols)


@pytest.mark.parametrize(("n", "m"), NM_PATTERNS)
def test_every_kept_set_encodes_to_a_distinct_index_and_back(n: int, m: int) -> None:
    sets = list(itertools.combinations(range(m), n))
    mask = torch.zeros(len(sets), m, dtype=torch.bool)
    for k, kept in enumerate(sets):
        mask[k, list(kept)] = True
    codes = encode_pattern(mask, n, m)
    assert codes.shape == (len(sets), 1)
    assert codes[:, 0].tolist() == list(range(len(sets)))  # lexicographic order of the sets
    assert int(codes.max()) < 2 ** pattern_bits(n, m)
    assert torch.equal(decode_pattern(codes, n, m), mask)
    # all the sets along one row (several groups per row) round trip as well
    row = mask.reshape(1, -1)
    assert torch.equal(decode_pattern(encode_pattern(row, n, m), n, m), row)


def test_pattern_index_widths() -> None:
    assert pattern_bits(2, 4) == 3  # 6 sets
    assert pattern_bits(4, 8) == 7  # 70 sets
    assert pattern_bits(1, 2) == 1
    assert pattern_bits(1, 4) == 2
    assert pattern_bits(2, 8) == 5  # 28 sets


@pytest.mark.parametrize("bad", [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
def test_a_mask_that_breaks_the_pattern_is_refused(bad: list[int]) -> None:
    mask = torch.tensor([[1, 0, 1, 0, *bad]], dtype=torch.bool)
    with pytest.raises(ValueError, match="exactly 2 in every 4"):
        encode_pattern(mask, 2, 4)


# (in, out, keep, block, nm, bits, symmetric): odd widths, partial bytes, every value format
LAYOUTS = [
    (64, 48, 32, 64, None, 16, False),
    (36, 5, 7, 12, None, 16, False),
    (36, 5, 5, 12, None, 3, False),
    (20, 3, 1, 10, None, 5, True),
    (44, 7, 9, 11, None, 8, False),
    (36, 5, 0, 12, (3, 6), 16, False),
    (24, 4, 0, 24, (4, 8), 4, True),
    (40, 9, 0, 20, (2, 4), 2, False),
    (30, 2, 0, 10, (2, 5), 7, False),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_bytes_of_the_state_are_the_formula(layout: tuple) -> None:
    cols, rows, keep, block, nm, bits, symmetric = layout
    for bias in (True, False):
        layer = SparseLinear(cols, rows, keep, block, nm, bits, symmetric, bias=bias)
        weight = sparse_weight_bytes(rows, cols, keep, block, nm, bits, symmetric)
        assert layer.stored_weight_bytes() == weight
        assert state_bytes(layer) == weight + (4 * rows if bias else 0)


def test_byte_formula_by_hand() -> None:
    # 2:4 of 384 columns, float16: 96 indices of 3 bits (36 bytes) + 192 values per row
    assert sparse_weight_bytes(10, 384, 0, 64, (2, 4), 16, False) == 10 * (36 + 384)
    # 50% of 64 columns, int4 asym: 8 mask bytes + 32 codes (16 bytes) + scale and offset
    assert sparse_weight_bytes(1, 64, 32, 64, None, 4, False) == 8 + 16 + 4
    # 4:8 of 24 columns, 3 bits symmetric: 3 indices of 7 bits (7 bytes) + 12 codes (6 bytes)
    assert sparse_weight_bytes(1, 24, 0, 24, (4, 8), 3, True) == 7 + 6 + 2


def layout_and_mask(layout: tuple) -> tuple[SparseLinear, torch.Tensor, torch.Tensor]:
    cols, rows, keep, block, nm, bits, symmetric = layout
    layer = SparseLinear(cols, rows, keep, block, nm, bits, symmetric)
    group, kept = nm[::-1] if nm else (block, keep)
    mask = random_mask(rows, cols, group, kept)
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    return layer, mask, weight


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_stored_weight_is_the_masked_weight(layout: tuple) -> None:
    layer, mask, weight = layout_and_mask(layout)
    layer.load_pruned(mask, weight)
    assert torch.equal(layer.kept_mask(), mask)
    dense = layer.dequantize()
    assert torch.all(dense[~mask] == 0)
    if not layer.quantized:
        assert torch.equal(dense[mask], weight[mask].half().float())
        return
    # codes: round to nearest with scales fitted per row and block on the kept values only
    kept = weight[mask].reshape(layer.rows, -1, layer.keep)
    scales, offsets = affine.fit_scales(kept, layer.bits, layer.symmetric)
    assert torch.equal(layer.scales, scales)
    codes = affine.encode(kept, scales, offsets, layer.bits)
    expected = affine.decode(codes, scales, offsets, layer.bits).reshape(layer.rows, -1)
    assert torch.equal(dense[mask].reshape(layer.rows, -1), expected)
    # within half a step, up to the float16 rounding of scales and offsets
    slack = layer.scales.float() * 0.51
    if layer.offsets is not None:
        slack = slack + layer.offsets.float().abs() * 2.0**-10
    slack = slack.repeat_interleave(layer.keep, dim=1) + 1e-6
    assert torch.all((dense[mask] - weight[mask]).abs().reshape(layer.rows, -1) <= slack)


@pytest.mark.parametrize("layout", LAYOUTS[:3] + LAYOUTS[5:7], ids=str)
def test_forward_is_the_dense_matmul_and_survives_a_round_trip(layout: tuple) -> None:
    layer, mask, weight = layout_and_mask(layout)
    layer.load_pruned(mask, weight)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 3, layer.in_features)
    expected = F.linear(x, layer.dequantize(), layer.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    blob = save_safetensors(layer.state_dict())
    cols, rows, keep, block, nm, bits, symmetric = layout
    restored = SparseLinear(cols, rows, keep, block, nm, bits, symmetric)
    restored.load_state_dict(load_safetensors(blob), strict=True)
    assert save_safetensors(restored.state_dict()) == blob
    assert torch.equal(restored(x), layer(x))


def test_dtype_casts_leave_the_stored_format_alone() -> None:
    layer, mask, weight = layout_and_mask(LAYOUTS[6])
    layer.load_pruned(mask, weight)
    before = {k: v.clone() for k, v in layer.state_dict().items() if k != "bias"}
    layer.double()
    assert layer.bias.dtype == torch.float64
    for name, value in before.items():
        assert torch.equal(getattr(layer, name), value), name
    out = layer(torch.randn(4, layer.in_features, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_a_mask_with_the_wrong_counts_is_refused() -> None:
    layer = SparseLinear(16, 2, 4, 8)
    mask = random_mask(2, 16, 8, 4)
    mask[0, 0] = not mask[0, 0]
    with pytest.raises(ValueError, match="keep 4 of every 8"):
        layer.load_pruned(mask, torch.randn(2, 16))
    with pytest.raises(ValueError, match="bool"):
        layer.store(mask.float(), torch.randn(2, 8))


def test_scratch_weight_equals_the_fresh_one() -> None:
    layer, mask, weight = layout_and_mask(LAYOUTS[2])
    layer.load_pruned(mask, weight)
    fresh = layer.dequantize()
    assert torch.equal(layer.dequantize_scratch(torch.float32), fresh)
