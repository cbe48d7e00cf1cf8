"""A linear layer with a pruned weight stored for real: which weights are kept, and their values.

The weight ``[rows, cols]`` is cut into blocks of ``block`` consecutive input columns; every row
keeps the same number of weights in every block, so the storage is a pure function of the
layer's shape and the option. Buffers:

* ``mask`` (unstructured sparsity): one bit per weight, ``[rows, ceil(cols / 8)]`` uint8,
  packed with :func:`methods.packing.pack_codes` at 1 bit (first column in the lowest bit).
* ``pattern`` (N:M sparsity, N kept in every M consecutive columns): for each group of M
  columns the index of its kept set among the ``C(M, N)`` sets, in the lexicographic order of
  :func:`itertools.combinations` (for 2:4: ``{0,1}, {0,2}, {0,3}, {1,2}, {1,3}, {2,3}``),
  stored in ``ceil(log2 C(M, N))`` bits (3 for 2:4, 7 for 4:8), packed row by row.
* ``values``: the kept weights of each row in column order, either float16 ``[rows, kept]`` or
  ``bits``-bit codes ``[rows, packed_row_bytes(kept, bits)]`` with float16 ``scales`` (and,
  asymmetric, ``offsets``) ``[rows, cols / block]`` in the affine format of
  :mod:`methods.affine`, fitted per block on the kept values only.
* ``bias`` in the layer's dtype.

The forward pass rebuilds the dense weight in a scratch buffer and runs one float matmul
(:class:`methods.weight_only.WeightOnlyLinear`).
"""

from __future__ import annotations

import itertools
import math
from functools import cache

import torch

from methods import affine, workspace
from methods.base import KeepsStoredFormat, ceil_div
from methods.packing import pack_codes, packed_row_bytes, unpack_codes
from methods.weight_only import WeightOnlyLinear

FLOAT_BITS = 16  # ``bits`` value meaning "kept values stored as float16"


def pattern_bits(n: int, m: int) -> int:
    """Bits of one N:M group's index: ``ceil(log2 C(m, n))`` (at least 1)."""
    return max(1, math.ceil(math.log2(math.comb(m, n))))


@cache
def _pattern_tables(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sets, index)``: ``sets[k]`` is the bool ``[m]`` mask of the k-th kept set; ``index``
    maps a group's mask read as an m-bit integer (column i in bit i) to k, or -1 if invalid."""
    combos = list(itertools.combinations(range(m), n))
    sets = torch.zeros(len(combos), m, dtype=torch.bool)
    index = torch.full((1 << m,), -1, dtype=torch.int64)
    for k, combo in enumerate(combos):
        sets[k, list(combo)] = True
        index[sum(1 << i for i in combo)] = k
    return sets, index


def encode_pattern(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Kept-set indices ``[rows, cols / m]`` (int64) of an N:M bool mask ``[rows, cols]``."""
    rows, cols = mask.shape
    _, index = _pattern_tables(n, m)
    weights = 1 << torch.arange(m, device=mask.device)
    words = (mask.reshape(rows, cols // m, m).to(torch.int64) * weights).sum(dim=-1)
    codes = index.to(mask.device)[words]
    if bool((codes < 0).any()):
        raise ValueError(f"the mask does not keep exactly {n} in every {m} columns")
    return codes


def decode_pattern(codes: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Inverse of :func:`encode_pattern`: the bool mask ``[rows, groups * m]``."""
    sets, _ = _pattern_tables(n, m)
    return sets.to(codes.device)[codes.long()].reshape(codes.shape[0], -1)


class SparseLinear(WeightOnlyLinear, KeepsStoredFormat):
    """A pruned linear layer: every row keeps ``keep`` weights of each block of ``block``
    columns (unstructured, ``nm=None``) or ``n`` of every ``m`` columns (``nm=(n, m)``, where
    ``block`` is a multiple of ``m``); kept values are float16 (``bits=16``) or ``bits``-bit
    codes with a scale (and offset) per block and row."""

    stored_buffers = ("mask", "pattern", "values", "scales", "offsets")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        keep: int,
        block: int,
        nm: tuple[int, int] | None = None,
        bits: int = FLOAT_BITS,
        symmetric: bool = False,
        bias: bool = True,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        rows, cols = out_features, in_features
        if cols % block or (nm is not None and block % nm[1]):
            raise ValueError(f"block {block} must divide {cols} and be a multiple of M")
        if nm is not None:
            keep = block // nm[1] * nm[0]
        self.rows, self.cols, self.block, self.keep = rows, cols, block, keep
        self.nm, self.bits, self.symmetric = nm, bits, symmetric
        self.kept_per_row = cols // block * keep
        u8 = {"dtype": torch.uint8, "device": device}
        mask = pattern = None
        if nm is None:
            mask = torch.zeros(rows, packed_row_bytes(cols, 1), **u8)
        else:
            groups = cols // nm[1]
            pattern = torch.zeros(rows, packed_row_bytes(groups, pattern_bits(*nm)), **u8)
        self.register_buffer("mask", mask)
        self.register_buffer("pattern", pattern)
        scales = offsets = None
        if bits == FLOAT_BITS:
            values = torch.zeros(rows, self.kept_per_row, dtype=torch.float16, device=device)
        else:
            values = torch.zeros(rows, packed_row_bytes(self.kept_per_row, bits), **u8)
            f16 = {"dtype": torch.float16, "device": device}
            scales = torch.ones(rows, cols // block, **f16)
            offsets = None if symmetric else torch.zeros(rows, cols // block, **f16)
        self.register_buffer("values", values)
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)
        self._set_linear(in_features, out_features, bias, bias_dtype, device)

    @property
    def quantized(self) -> bool:
        return self.bits != FLOAT_BITS

    # --- storing ------------------------------------------------------------------------

    def check_mask(self, mask: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``mask`` keeps exactly what the layout promises."""
        if mask.shape != (self.rows, self.cols) or mask.dtype != torch.bool:
            raise ValueError(f"the mask must be bool [{self.rows}, {self.cols}]")
        if self.nm is not None:
            encode_pattern(mask, *self.nm)
            return
        counts = mask.reshape(self.rows, -1, self.block).sum(dim=-1)
        if bool((counts != self.keep).any()):
            raise ValueError(f"the mask must keep {self.keep} of every {self.block} columns")

    def kept_values(self, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The weights ``mask`` keeps, row by row in column order: ``[rows, kept]``."""
        return weight[mask].reshape(self.rows, self.kept_per_row)

    @torch.no_grad()
    def load_pruned(self, mask: torch.Tensor, weight: torch.Tensor) -> None:
        """Store the weights that ``mask`` keeps; quantised ones are rounded to nearest with
        scales fitted per block on the kept values."""
        self.check_mask(mask)
        values = self.kept_values(mask, weight.detach().float())
        if not self.quantized:
            self.store(mask, values)
            return
        groups = values.reshape(self.rows, -1, self.keep)
        scales, offsets = affine.fit_scales(groups, self.bits, self.symmetric)
        codes = affine.encode(groups, scales, offsets, self.bits).reshape(values.shape)
        self.store(mask, codes, scales, offsets)

    @torch.no_grad()
    def store(
        self,
        mask: torch.Tensor,
        values: torch.Tensor,
        scales: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
    ) -> None:
        """Store a bool ``mask`` and the kept ``values`` ``[rows, kept]`` (float, or unsigned
        codes with their scales and offsets ``[rows, cols / block]`` when quantised)."""
        self.check_mask(mask)
        device = self.values.device
        if self.nm is None:
            self.mask = pack_codes(mask.to(torch.uint8), 1).to(device)
        else:
            codes = encode_pattern(mask, *self.nm).to(torch.uint8)
            self.pattern = pack_codes(codes, pattern_bits(*self.nm)).to(device)
        if not self.quantized:
            self.values = values.to(torch.float16).to(device).contiguous()
            return
        self.values = pack_codes(values.to(torch.uint8), self.bits).to(device)
        self.scales = scales.to(torch.float16).to(device).contiguous()
        if not self.symmetric:
            self.offsets = offsets.to(torch.float16).to(device).contiguous()

    # --- reading ------------------------------------------------------------------------

    def stored_weight_bytes(self) -> int:
        """Bytes that stand for the weight: mask or pattern, values, scales and offsets."""
        tensors = (self.mask, self.pattern, self.values, self.scales, self.offsets)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def kept_mask(self) -> torch.Tensor:
        """The bool mask ``[rows, cols]`` of kept weights."""
        if self.nm is None:
            return unpack_codes(self.mask, 1, self.cols).bool()
        n, m = self.nm
        codes = unpack_codes(self.pattern, pattern_bits(n, m), self.cols // m)
        return decode_pattern(codes, n, m)

    def value_array(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The kept values ``[rows, kept]`` as floats (decoded when quantised)."""
        if not self.quantized:
            return self.values.to(dtype)
        codes = unpack_codes(self.values, self.bits, self.kept_per_row)
        groups = codes.reshape(self.rows, -1, self.keep)
        decoded = affine.decode(groups, self.scales, self.offsets, self.bits, dtype)
        return decoded.reshape(self.rows, self.kept_per_row)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight ``[rows, cols]`` with zeros at pruned places, freshly allocated."""
        weight = torch.zeros(self.rows, self.cols, dtype=dtype, device=self.values.device)
        return weight.masked_scatter_(self.kept_mask(), self.value_array(dtype))

    def scratch_needs(self, dtype: torch.dtype) -> dict[str, int]:
        """Bytes of each scratch slot a forward pass may grow (see methods/workspace.py)."""
        return {"weight": self.rows * self.cols * torch.empty(0, dtype=dtype).element_size()}

    def dequantize_scratch(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight in this thread's scratch buffer (valid until the next call)."""
        device = self.values.device
        weight = workspace.scratch("weight", self.rows * self.cols, dtype, device)
        weight = weight.view(self.rows, self.cols).zero_()
        return weight.masked_scatter_(self.kept_mask(), self.value_array(dtype))

    def extra_repr(self) -> str:
        kind = f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"keep={self.keep}"
        values = "float16" if not self.quantized else f"int{self.bits}"
        if self.quantized:
            values += "-sym" if self.symmetric else "-asym"
        return f"{self.linear_repr()}, {kind}, block={self.block}, values={values}"


def sparse_weight_bytes(
    rows: int,
    cols: int,
    keep: int,
    block: int,
    nm: tuple[int, int] | None,
    bits: int,
    symmetric: bool,
) -> int:
    """Bytes of a :class:`SparseLinear`'s weight buffers (everything but the bias)."""
    if nm is not None:
        keep = block // nm[1] * nm[0]
        index = rows * packed_row_bytes(cols // nm[1], pattern_bits(*nm))
    else:
        index = rows * ceil_div(cols, 8)
    kept = cols // block * keep
    if bits == FLOAT_BITS:
        return index + rows * kept * 2
    per_scale = 2 if symmetric else 4
    return index + rows * packed_row_bytes(kept, bits) + rows * (cols // block) * per_scale
