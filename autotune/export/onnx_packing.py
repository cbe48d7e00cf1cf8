"""Compressed codes in the layouts ONNX Runtime's quantised kernels read.

Which kernel block a layer's groups map to (MatMulNBits for linear layers,
GatherBlockQuantized for embeddings), the container width its codes are held in (2, 4 or 8
bits), codes packed along rows first code in the low bits, whole zero points recovered from
autotune's offsets, and :class:`Blocked`, a layer's codes, scales and zero points in the block
layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autotune.export.base import ExportError
from methods import affine
from methods.quantized import QuantizedEmbedding, QuantizedLinear

MAX_BLOCK = 128  # block of a per-channel layer (its scale repeated per block)
EMBEDDINGS_HELD = (
    "keep embeddings in float, or quantise them per channel (width a multiple of 16) or in "
    "groups of a multiple of 16"
)


def container_bits(bits: int) -> int:
    """The kernel's bit width that holds ``bits``-bit codes: 2, 4 or 8."""
    return 2 if bits == 2 else 4 if bits <= 4 else 8


def _largest_power_of_two_divisor(n: int) -> int:
    return n & -n


def linear_block(cols: int, group: int) -> int | None:
    """MatMulNBits block of a ``cols``-wide layer with groups of ``group`` (``cols`` for one
    per row), or ``None`` when its groups need DequantizeLinear."""
    if group == cols:
        divisor = min(_largest_power_of_two_divisor(cols), MAX_BLOCK)
        if divisor >= 16:
            return divisor
        return min(MAX_BLOCK, max(16, 1 << (cols - 1).bit_length()))
    divisor = _largest_power_of_two_divisor(group)
    return divisor if divisor >= 16 else None


def embedding_block(cols: int, group: int) -> int | None:
    """GatherBlockQuantized block (it must divide the width), or ``None``."""
    if group == cols:
        divisor = min(_largest_power_of_two_divisor(cols), MAX_BLOCK)
    else:
        divisor = _largest_power_of_two_divisor(group)
    return divisor if divisor >= 16 else None


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """``[rows, cols]`` codes below ``2**bits`` packed along each row, first code in the low
    bits (``cols`` a multiple of ``8 // bits``)."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    per = 8 // bits
    rows, cols = codes.shape
    parts = codes.reshape(rows, cols // per, per).astype(np.uint8)
    out = np.zeros((rows, cols // per), dtype=np.uint8)
    for i in range(per):
        out |= parts[:, :, i] << np.uint8(bits * i)
    return out


def _pad_columns(array: np.ndarray, cols: int) -> np.ndarray:
    if array.shape[1] == cols:
        return array
    padded = np.zeros((array.shape[0], cols), dtype=array.dtype)
    padded[:, : array.shape[1]] = array
    return padded


def whole_zero_points(module: QuantizedLinear | QuantizedEmbedding, name: str) -> np.ndarray:
    """``[rows, groups]`` zero points: ``2**(bits-1)`` when symmetric, else the whole ``z``
    whose ``-z * scale`` rounded to float16 is the stored offset (``round(-offset / scale)`` or
    a neighbour, where float16 rounding blurs a tiny offset)."""
    scales = module.scales.detach().cpu().float()
    if module.symmetric:
        return np.full(tuple(scales.shape), 1 << (module.bits - 1), dtype=np.uint8)
    zero = affine.whole_zero_points(module.scales, module.offsets, module.bits)
    if zero is None:
        raise ExportError(
            f"--format onnx cannot hold layer {name!r}: its asymmetric offsets are not "
            f"whole zero points (-z * scale, z in 0..{(1 << module.bits) - 1})"
        )
    return zero.numpy()


@dataclass
class Blocked:
    """One layer's codes in MatMulNBits' layout: ``codes`` ``[rows, blocks, block * bits / 8]``,
    float32 ``scales`` ``[rows, blocks]``, packed ``zero_points`` (``None``: the default
    ``2**(bits-1)``)."""

    bits: int
    block: int
    stored_bits: int
    group: int
    cols: int
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def blocks(self) -> int:
        return self.codes.shape[1]

    @property
    def label(self) -> str:
        """E.g. ``4-bit block 32``, ``8-bit block 128 (per-channel)``, ``4-bit block 16
        (3-bit codes, group 48)``."""
        notes = []
        if self.stored_bits != self.bits:
            notes.append(f"{self.stored_bits}-bit codes")
        if self.group == self.cols:
            notes.append("per-channel")
        elif self.group != self.block:
            notes.append(f"group {self.group}")
        extra = f" ({', '.join(notes)})" if notes else ""
        return f"{self.bits}-bit block {self.block}{extra}"


def blocked_codes(module: QuantizedLinear | QuantizedEmbedding, name: str, block: int) -> Blocked:
    """``module``'s codes, scales and zero points in MatMulNBits' block layout (each block
    inside one group, so it repeats its group's scale and zero point)."""
    rows, cols, bits, group = module.rows, module.cols, module.bits, module.group_size
    wide = container_bits(bits)
    blocks = -(-cols // block)
    groups_of = (np.arange(blocks) * block) // group
    codes = _pad_columns(module.unsigned_codes().cpu().numpy(), blocks * block)
    packed = pack_rows(codes, wide).reshape(rows, blocks, block * wide // 8)
    scales = module.scales.detach().cpu().float().numpy()[:, groups_of]
    zero_points = None
    if not (module.symmetric and bits == wide):
        zeros = whole_zero_points(module, name)[:, groups_of]
        per = 8 // wide
        zero_points = pack_rows(_pad_columns(zeros, -(-blocks // per) * per), wide)
    return Blocked(
        wide, block, bits, group, cols, packed, np.ascontiguousarray(scales), zero_points
    )
