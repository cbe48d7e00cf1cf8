"""Tests of methods/packing.py: bit packing of integer codes, row by row."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from methods import packing
from methods.packing import pack_codes, packed_row_bytes, unpack_codes

ALL_BITS = list(range(1, 9))
# Widths that are multiples of 8 and widths that are not (padding is exercised).
WIDTHS = [1, 5, 7, 8, 13, 16, 24, 67]


def random_codes(rows: int, cols: int, bits: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (rows, cols), dtype=torch.uint8, generator=generator)


def padded_width(cols: int) -> int:
    return -(-cols // 8) * 8


@st.composite
def code_matrices(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    bits = draw(st.integers(1, 8))
    rows = draw(st.integers(1, 5))
    cols = draw(st.integers(1, 40))
    values = draw(
        st.lists(st.integers(0, (1 << bits) - 1), min_size=rows * cols, max_size=rows * cols)
    )
    codes = torch.tensor(values, dtype=torch.uint8).reshape(rows, cols)
    return codes, bits


@settings(max_examples=150, deadline=None, database=None, derandomize=True)
@given(code_matrices())
def test_round_trip_random(case: tuple[torch.Tensor, int]) -> None:
    codes, bits = case
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (codes.shape[0], packed_row_bytes(codes.shape[1], bits))
    assert torch.equal(unpack_codes(packed, bits, codes.shape[1]), codes)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("cols", WIDTHS)
def test_round_trip_every_width(bits: int, cols: int) -> None:
    codes = random_codes(6, cols, bits, seed=bits * 100 + cols)
    codes[0] = (1 << bits) - 1  # a row of the largest code: every bit of the run set
    codes[1] = 0
    packed = pack_codes(codes, bits)
    assert packed.shape[1] == packed_row_bytes(cols, bits)
    assert torch.equal(unpack_codes(packed, bits, cols), codes)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_row_bytes_follow_eight_codes_per_bits_bytes(bits: int) -> None:
    for runs in range(1, 5):
        assert packed_row_bytes(8 * runs, bits) == runs * bits
        # One more code starts a new run of eight (except at 8 bits: one byte per code).
        expected = 8 * runs + 1 if bits == 8 else (runs + 1) * bits
        assert packed_row_bytes(8 * runs + 1, bits) == expected


@pytest.mark.parametrize("bits", range(1, 8))
@pytest.mark.parametrize("cols", [1, 5, 13, 67])
def test_rows_are_padded_with_zero_codes(bits: int, cols: int) -> None:
    codes = random_codes(3, cols, bits, seed=cols)
    padded = torch.zeros(3, padded_width(cols), dtype=torch.uint8)
    padded[:, :cols] = codes
    assert torch.equal(pack_codes(codes, bits), pack_codes(padded, bits))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_runs_are_little_endian(bits: int) -> None:
    """Eight codes fill ``bits`` bytes, read as one little-endian integer whose lowest bits
    hold the first code."""
    codes = random_codes(4, 16, bits, seed=bits)
    packed = pack_codes(codes, bits)
    for row in range(codes.shape[0]):
        for run in range(2):
            run_bytes = packed[row, run * bits : (run + 1) * bits].tolist()
            value = int.from_bytes(bytes(run_bytes), "little")
            run_codes = codes[row, run * 8 : (run + 1) * 8].tolist()
            assert value == sum(code << (bits * i) for i, code in enumerate(run_codes))


def test_four_bit_layout_is_two_codes_per_byte_low_nibble_first() -> None:
    codes = random_codes(5, 24, 4, seed=4)
    expected = codes[:, 0::2] | (codes[:, 1::2] << 4)
    assert torch.equal(pack_codes(codes, 4), expected)


def test_two_bit_layout_is_four_codes_per_byte_lowest_first() -> None:
    codes = random_codes(3, 16, 2, seed=2)
    expected = (
        codes[:, 0::4] | (codes[:, 1::4] << 2) | (codes[:, 2::4] << 4) | (codes[:, 3::4] << 6)
    )
    assert torch.equal(pack_codes(codes, 2), expected)


def test_eight_bit_codes_are_stored_as_they_are() -> None:
    codes = random_codes(3, 13, 8)
    assert torch.equal(pack_codes(codes, 8), codes)
    assert torch.equal(unpack_codes(codes, 8, 13), codes)


@pytest.mark.parametrize("bits", range(1, 8))
@pytest.mark.parametrize("cols", [5, 16, 67])
def test_unpack_into_out_buffer_equals_fresh(bits: int, cols: int) -> None:
    rows = 4
    codes = random_codes(rows, cols, bits, seed=7 * bits + cols)
    packed = pack_codes(codes, bits)
    used = rows * padded_width(cols)
    sentinel = 0xAB
    buffer = torch.full((used + 9,), sentinel, dtype=torch.uint8)
    result = unpack_codes(packed, bits, cols, out=buffer)
    assert torch.equal(result, unpack_codes(packed, bits, cols))
    assert torch.equal(result, codes)
    # The codes live in the caller's buffer (no large temporary) and nothing past it changed.
    assert result.data_ptr() == buffer.data_ptr()
    assert torch.all(buffer[used:] == sentinel)


def test_unpack_reuses_a_dirty_buffer() -> None:
    buffer = torch.full((64,), 0xFF, dtype=torch.uint8)
    for seed in range(3):
        codes = random_codes(2, 30, 3, seed=seed)
        assert torch.equal(unpack_codes(pack_codes(codes, 3), 3, 30, out=buffer), codes)


@pytest.mark.parametrize(
    "codes",
    [
        torch.zeros(8, dtype=torch.uint8),  # 1-D
        torch.zeros(2, 2, 8, dtype=torch.uint8),  # 3-D
        torch.zeros(2, 8, dtype=torch.int32),  # not uint8
        torch.zeros(2, 8, dtype=torch.int8),
    ],
    ids=["1d", "3d", "int32", "int8"],
)
def test_pack_rejects_bad_tensors(codes: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="2-D uint8"):
        pack_codes(codes, 4)


@pytest.mark.parametrize("bits", [-1, 0, 9, 16])
def test_bad_bit_widths_are_rejected(bits: int) -> None:
    codes = torch.zeros(2, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="bits"):
        packed_row_bytes(8, bits)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(codes, bits)
    with pytest.raises(ValueError, match="bits"):
        unpack_codes(codes, bits, 8)


def test_unpack_rejects_bad_tensors() -> None:
    with pytest.raises(ValueError, match="2-D uint8"):
        unpack_codes(torch.zeros(4, dtype=torch.uint8), 4, 8)
    with pytest.raises(ValueError, match="2-D uint8"):
        unpack_codes(torch.zeros(2, 4, dtype=torch.int8), 4, 8)


@pytest.mark.parametrize(("bits", "cols", "width"), [(4, 8, 3), (4, 9, 4), (3, 16, 3), (8, 8, 7)])
def test_unpack_rejects_a_width_that_does_not_match(bits: int, cols: int, width: int) -> None:
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes(torch.zeros(2, width, dtype=torch.uint8), bits, cols)


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_rejects_codes_out_of_range(bits: int) -> None:
    codes = torch.zeros(1, 8, dtype=torch.uint8)
    codes[0, 0] = 1 << bits  # one past the largest code
    with pytest.raises(ValueError):
        pack_codes(codes, bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7])
def test_chunked_packing_equals_packing_in_one_go(bits: int, monkeypatch) -> None:
    """Large weights are packed a few rows at a time (bounded temporaries): same bytes."""
    codes = torch.randint(0, 1 << bits, (37, 40), generator=torch.Generator().manual_seed(bits))
    codes = codes.to(torch.uint8)
    whole = packing.pack_codes(codes, bits)
    monkeypatch.setattr(packing, "_CHUNK_CODES", 3 * 40 + 5)  # 3 rows per chunk
    assert torch.equal(packing.pack_codes(codes, bits), whole)
    assert torch.equal(packing.unpack_codes(whole, bits, 40), codes)
