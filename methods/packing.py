"""Bit packing of integer codes into bytes, row by row.

Codes of ``b`` bits are packed in runs of eight: eight codes fill exactly ``b`` bytes,
little-endian (the first code in the lowest bits). For 4 bits that is the common layout of
two codes to a byte, low nibble first; for 2 bits four to a byte. Rows are padded with zero
codes to a multiple of eight, so a row of ``cols`` codes takes ``packed_row_bytes`` bytes.
"""

from __future__ import annotations

import torch

from methods.base import ceil_div

_CHUNK_CODES = 1 << 20  # codes packed at once: bounds the int64 temporaries (8 MB each)


def packed_row_bytes(cols: int, bits: int) -> int:
    """Bytes one packed row of ``cols`` codes occupies."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if bits == 8:
        return cols
    return ceil_div(cols, 8) * bits


def _chunk_rows(cols: int) -> int:
    """Rows handled at once so that a chunk holds about ``_CHUNK_CODES`` codes."""
    return max(1, _CHUNK_CODES // max(cols, 1))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 2-D uint8 tensor of codes in ``[0, 2**bits)`` into bytes, row by row."""
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise ValueError("codes must be a 2-D uint8 tensor")
    packed_row_bytes(codes.shape[1], bits)  # checks bits
    if bits < 8 and codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"codes must be below 2**{bits}, got {int(codes.max())}")
    if bits == 8:
        return codes.contiguous()
    rows, cols = codes.shape
    out = torch.empty(rows, packed_row_bytes(cols, bits), dtype=torch.uint8, device=codes.device)
    step = _chunk_rows(cols)
    for start in range(0, rows, step):
        out[start : start + step] = _pack_chunk(codes[start : start + step], bits)
    return out


def _pack_chunk(codes: torch.Tensor, bits: int) -> torch.Tensor:
    rows, cols = codes.shape
    padded = ceil_div(cols, 8) * 8
    if padded != cols:
        codes = torch.nn.functional.pad(codes, (0, padded - cols))
    runs = codes.reshape(rows, padded // 8, 8).to(torch.int64)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    value = (runs << shifts).sum(dim=-1, keepdim=True)
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    return ((value >> byte_shifts) & 0xFF).to(torch.uint8).reshape(rows, -1)


def unpack_codes(
    packed: torch.Tensor, bits: int, cols: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: a ``[rows, cols]`` uint8 tensor of codes.

    ``out`` (a contiguous uint8 tensor of at least ``rows * padded_cols`` elements, where
    ``padded_cols`` rounds ``cols`` up to a multiple of 8) receives the codes when given,
    so that no large temporary is allocated."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError("packed must be a 2-D uint8 tensor")
    if packed.shape[1] != packed_row_bytes(cols, bits):
        raise ValueError(
            f"packed rows hold {packed.shape[1]} bytes, expected "
            f"{packed_row_bytes(cols, bits)} for {cols} codes of {bits} bits"
        )
    if bits == 8:
        return packed
    rows = packed.shape[0]
    padded = ceil_div(cols, 8) * 8
    if out is None:
        out = torch.empty(rows * padded, dtype=torch.uint8, device=packed.device)
    codes = out[: rows * padded].view(rows, padded)
    if bits in (1, 2, 4):
        per_byte = 8 // bits
        mask = (1 << bits) - 1
        parts = [packed & mask] + [(packed >> (bits * i)) & mask for i in range(1, per_byte)]
        torch.stack(parts, dim=-1, out=codes.view(rows, -1, per_byte))
    else:
        step = _chunk_rows(padded)
        for start in range(0, rows, step):
            chunk = packed[start : start + step]
            codes[start : start + step] = _unpack_chunk(chunk, bits, padded)
    return codes[:, :cols]


def _unpack_chunk(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    rows = packed.shape[0]
    wide = torch.int32 if bits <= 3 else torch.int64
    groups = packed.reshape(rows, -1, bits).to(wide)
    value = groups[..., 0:1].clone()
    for j in range(1, bits):
        value |= groups[..., j : j + 1] << (8 * j)
    shifts = torch.arange(8, device=packed.device, dtype=wide) * bits
    codes = (value >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(rows, -1)[:, :cols]
