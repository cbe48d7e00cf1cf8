"""Modules that store quantised weights for real: packed codes plus float16 scales/offsets.

``QuantizedLinear`` runs torch's CPU int8 / int4 kernels when the call is small enough (see
:mod:`methods.kernels`) and a dequantising float matmul otherwise. ``QuantizedEmbedding``
decodes only the rows it looks up. Both hold nothing but their state: the bytes of
``state_dict()`` are the bytes the module occupies.
"""

from __future__ import annotations

import torch
from torch import nn

from methods import affine, kernels, workspace
from methods.base import KeepsStoredFormat
from methods.packing import pack_codes, packed_row_bytes, unpack_codes
from methods.weight_only import WeightOnlyLinear


class QuantizedStorage(KeepsStoredFormat):
    """Buffers ``codes``, ``scales`` and (asymmetric) ``offsets`` of a ``rows x cols`` weight.

    Codes of 8 bits are kept as int8 (``u - 128``) so the int8 kernel reads them directly;
    narrower codes are packed unsigned, eight codes to ``bits`` bytes. Dtype casts of the
    module leave them (and the float16 scales) as they are stored.
    """

    stored_buffers = ("codes", "scales", "offsets")

    def __init__(
        self,
        rows: int,
        cols: int,
        bits: int,
        group_size: int,
        symmetric: bool,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if cols % group_size:
            raise ValueError(f"group size {group_size} does not divide width {cols}")
        self.rows, self.cols = rows, cols
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        n_groups = cols // group_size
        if bits == 8:
            codes = torch.zeros(rows, cols, dtype=torch.int8, device=device)
        else:
            codes = torch.zeros(
                rows, packed_row_bytes(cols, bits), dtype=torch.uint8, device=device
            )
        self.register_buffer("codes", codes)
        self.register_buffer(
            "scales", torch.ones(rows, n_groups, dtype=torch.float16, device=device)
        )
        offsets = (
            None if symmetric else torch.zeros(rows, n_groups, dtype=torch.float16, device=device)
        )
        self.register_buffer("offsets", offsets)

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantise ``weight`` (rows x cols) round-to-nearest into this module's buffers."""
        groups = affine.group_view(weight.detach().float().contiguous(), self.group_size)
        scales, offsets = affine.fit_scales(groups, self.bits, self.symmetric)
        codes = affine.encode(groups, scales, offsets, self.bits).reshape(self.rows, self.cols)
        self.store(codes, scales, offsets)

    @torch.no_grad()
    def store(
        self, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None
    ) -> None:
        """Store unsigned codes ``[rows, cols]`` with their scales (and offsets)."""
        device = self.scales.device
        if self.bits == 8:
            packed = (codes.to(torch.int16) - 128).to(torch.int8)
        else:
            packed = pack_codes(codes.to(torch.uint8), self.bits)
        self.codes = packed.to(device).contiguous()
        self.scales = scales.to(torch.float16).to(device).contiguous()
        if not self.symmetric:
            self.offsets = offsets.to(torch.float16).to(device).contiguous()

    def _codes_for_scratch(self, device: torch.device) -> torch.Tensor:
        padded = -(-self.cols // 8) * 8
        buffer = workspace.scratch("codes", self.rows * padded, torch.uint8, device)
        return unpack_codes(self.portable_codes(), self.bits, self.cols, out=buffer)

    def stored_weight_bytes(self) -> int:
        """Bytes that stand for the weight: codes, scales and offsets."""
        tensors = [self.codes, self.scales, self.offsets]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def portable_codes(self) -> torch.Tensor:
        """The stored codes in the portable layout (subclasses may keep a kernel layout)."""
        return self.codes

    def unsigned_codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Unsigned codes ``[r, cols]`` of all rows, or of the rows indexed by ``rows``."""
        codes = self.portable_codes()
        if rows is not None:
            codes = codes[rows]
        if self.bits == 8:
            return (codes.to(torch.int16) + 128).to(torch.uint8)
        return unpack_codes(codes, self.bits, self.cols)

    def dequantize(
        self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The float weight the codes stand for (``[r, cols]``), freshly allocated."""
        codes = self.unsigned_codes(rows)
        scales = self.scales if rows is None else self.scales[rows]
        offsets = self.offsets
        if offsets is not None and rows is not None:
            offsets = offsets[rows]
        groups = affine.group_view(codes, self.group_size)
        return affine.decode(groups, scales, offsets, self.bits, dtype).reshape(codes.shape)

    def scratch_needs(self, dtype: torch.dtype) -> dict[str, int]:
        """Bytes of each scratch slot a forward pass may grow (see methods/workspace.py)."""
        size = torch.empty(0, dtype=dtype).element_size()
        needs = {"weight": self.rows * self.cols * size}
        if self.bits < 8:
            needs["codes"] = self.rows * (-(-self.cols // 8) * 8)
        return needs

    def dequantize_scratch(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole float weight, written into this thread's scratch buffer (valid until
        the next call); equal to :meth:`dequantize` element for element."""
        device = self.codes.device
        weight = workspace.scratch("weight", self.rows * self.cols, dtype, device)
        weight = weight.view(self.rows, self.cols)
        shift = 0
        if self.bits == 8:
            weight.copy_(self.codes)  # int8 codes are u - 128: symmetric weights need no shift
            if not self.symmetric:
                weight.add_(128)
        else:
            weight.copy_(self._codes_for_scratch(device))
            shift = affine.levels(self.bits) // 2 if self.symmetric else 0
        groups = weight.view(self.rows, -1, self.group_size)
        if shift:
            groups.sub_(shift)
        groups.mul_(self.scales.to(dtype).unsqueeze(-1))
        if self.offsets is not None:
            groups.add_(self.offsets.to(dtype).unsqueeze(-1))
        return weight

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return (
            f"rows={self.rows}, cols={self.cols}, bits={self.bits}, "
            f"group_size={self.group_size}, {kind}"
        )


class QuantizedLinear(WeightOnlyLinear, QuantizedStorage):
    """A linear layer with quantised weight storage and a float bias; runs the int8 / int4
    kernels where they apply."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        symmetric: bool,
        bias: bool = True,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(out_features, in_features, bits, group_size, symmetric, device)
        self._set_linear(in_features, out_features, bias, bias_dtype, device)
        self._kernel_layout = False

    @property
    def int4_kernel_group(self) -> int | None:
        """Group size the int4 kernel runs this layer with, or ``None`` if it cannot."""
        if self.bits != 4:
            return None
        return kernels.int4_group_for(self.rows, self.cols, self.group_size)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 W^T``: by the int8 or int4 kernel where it applies, else dequantised."""
        tokens = x2.shape[0]
        if (
            self.bits == 8
            and self.symmetric
            and self.group_size == self.cols
            and kernels.int8_kernel_usable(x2.device, tokens, self.cols)
        ):
            return self._int8_forward(x2)
        if (group := self.int4_kernel_group) and kernels.int4_kernel_usable(
            x2.device, tokens, self.rows, self.cols, group
        ):
            return self._int4_forward(x2, group)
        return super().matmul(x2)

    def _int8_forward(self, x2: torch.Tensor) -> torch.Tensor:
        # symmetric only: an offset would be added as sum(x) * (m + 128 s), a large term that
        # cancels against the kernel's output only up to bfloat16 rounding
        return kernels.int8_matmul(x2, self.codes, self.scales[:, 0])

    def _int4_forward(self, x2: torch.Tensor, group: int) -> torch.Tensor:
        if not self._kernel_layout:
            self.codes = kernels.to_int4_kernel_layout(self.codes, self.rows, self.cols)
            self._kernel_layout = True
        repeat = self.group_size // group
        scales = self.scales.float().repeat_interleave(repeat, dim=1)
        if self.offsets is None:
            zeros = torch.zeros_like(scales)
        else:
            zeros = self.offsets.float().repeat_interleave(repeat, dim=1) + 8 * scales
        scales_and_zeros = torch.stack((scales.t(), zeros.t()), dim=-1).contiguous()
        return kernels.int4_matmul(x2, self.codes, group, scales_and_zeros)

    def store(
        self, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None
    ) -> None:
        self._kernel_layout = False
        super().store(codes, scales, offsets)

    def portable_codes(self) -> torch.Tensor:
        if self._kernel_layout:
            return kernels.from_int4_kernel_layout(self.codes, self.rows, self.cols)
        return self.codes

    def _codes_for_scratch(self, device: torch.device) -> torch.Tensor:
        if self._kernel_layout:
            return kernels.int4_codes_from_kernel_layout(self.codes, self.rows, self.cols)
        return super()._codes_for_scratch(device)

    def _to_portable_layout(self) -> None:
        if self._kernel_layout:
            self.codes = kernels.from_int4_kernel_layout(self.codes, self.rows, self.cols)
            self._kernel_layout = False

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._kernel_layout:
            destination[prefix + "codes"] = self.portable_codes()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        self._to_portable_layout()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        self._to_portable_layout()
        return super()._apply(fn, recurse)


class RowLookup(nn.Module):
    """Mixin for embedding tables stored row-decodable (a ``dequantize(dtype, rows=...)``
    method): a lookup decodes only the rows it needs, in the dtype the module was cast to
    (the stored buffers keep their format)."""

    num_embeddings: int
    embedding_dim: int
    padding_idx: int | None
    output_dtype: torch.dtype

    def scratch_needs(self, dtype: torch.dtype) -> dict[str, int]:
        """None: a lookup decodes its rows into a fresh tensor."""
        return {}

    def _set_table(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, dtype: torch.dtype
    ) -> None:
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.output_dtype = dtype

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.output_dtype, device=self.scales.device))
        self.output_dtype = probe.dtype
        return self

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        rows = self.dequantize(self.output_dtype, rows=indices.reshape(-1))
        return rows.reshape(*indices.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, " + super().extra_repr()


class QuantizedEmbedding(RowLookup, QuantizedStorage):
    """An embedding table with quantised rows; a lookup decodes only the rows it needs."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bits: int,
        group_size: int,
        symmetric: bool,
        padding_idx: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, bits, group_size, symmetric, device)
        self._set_table(num_embeddings, embedding_dim, padding_idx, dtype)
