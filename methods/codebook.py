"""Code-book (non-uniform) weight quantisation: k-bit indices into a table of levels.

Each row is cut into groups of ``group_size`` consecutive weights; a group keeps one float16
absmax scale ``s`` and, per weight, the index ``u`` of the table level nearest to ``w / s``,
so that ``w ~ table[u] * s`` (the block-wise NF4 layout of QLoRA, without double
quantisation). Three tables, all within ``[-1, 1]``:

* ``nf`` (NormalFloat, 2 to 4 bits): levels at quantiles of N(0, 1), each holding an equal
  share of its mass, with 0 exactly representable;
* ``fp`` (4 bits): the FP4 E2M1 values divided by 6, 15 levels (-0 is dropped, code 15 is
  never written);
* ``lloyd`` (2 to 4 bits): a table fitted to this layer's scaled weights by Lloyd's algorithm
  (1-D k-means), stored with the layer as a float16 buffer ``table``.

The ``nf`` and ``fp`` tables are constants of the format: they are not stored per layer.
Needs no calibration. Linear layers rebuild the float weight on each call ("dequantize");
embeddings decode only the rows they look up. The tables and the encoding against them are
computed in :mod:`methods.codebook_levels`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from methods import workspace
from methods.base import (
    Cost,
    KeepsStoredFormat,
    LayerShape,
    Method,
    Observer,
    Option,
    dtype_from_name,
    finite_weight,
)
from methods.codebook_levels import (
    fixed_levels,
    group_scales,
    lloyd_levels,
    nearest_codes,
    normalise,
)
from methods.errors import OptionError
from methods.packing import pack_codes, packed_row_bytes, unpack_codes
from methods.quantized import RowLookup
from methods.registry import register
from methods.weight_only import WeightOnlyLinear

ALLOWED_BITS = {"nf": (2, 3, 4), "fp": (4,), "lloyd": (2, 3, 4)}
STORED_TABLE = frozenset({"lloyd"})
# The default search grid: (format, bits, group size); options whose group does not divide
# the width are left out.
GRID = (
    ("nf", 4, 64),
    ("fp", 4, 64),
    ("lloyd", 4, 64),
    ("nf", 3, 64),
    ("lloyd", 3, 64),
    ("lloyd", 2, 32),
)


@dataclass(frozen=True)
class CodebookOption(Option):
    """``bits``-bit indices into the ``format`` table, one float16 absmax scale per group."""

    method: ClassVar[str] = "codebook"
    format: str = "nf"
    bits: int = 4
    group_size: int = 64

    @property
    def label(self) -> str:
        return f"{self.format}{self.bits}-g{self.group_size}"

    @property
    def stores_table(self) -> bool:
        return self.format in STORED_TABLE


# --- modules -------------------------------------------------------------------------------


class CodebookStorage(KeepsStoredFormat):
    """Buffers ``codes`` (packed indices), ``scales`` (float16, one per group) and, for a
    fitted format, ``table`` (float16 levels) of a ``rows x cols`` weight."""

    stored_buffers = ("codes", "scales", "table")

    def __init__(
        self,
        rows: int,
        cols: int,
        fmt: str,
        bits: int,
        group_size: int,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if cols % group_size:
            raise ValueError(f"group size {group_size} does not divide width {cols}")
        self.rows, self.cols = rows, cols
        self.format, self.bits, self.group_size = fmt, bits, group_size
        packed = torch.zeros(rows, packed_row_bytes(cols, bits), dtype=torch.uint8, device=device)
        self.register_buffer("codes", packed)
        scales = torch.ones(rows, cols // group_size, dtype=torch.float16, device=device)
        self.register_buffer("scales", scales)
        table = None
        if fmt in STORED_TABLE:
            table = torch.zeros(1 << bits, dtype=torch.float16, device=device)
        self.register_buffer("table", table)

    def levels(self) -> torch.Tensor:
        """The table the codes index (float32, ascending, on the buffers' device)."""
        if self.table is not None:
            return self.table.float()
        return fixed_levels(self.format, self.bits).to(self.scales.device)

    def lookup_table(self, dtype: torch.dtype) -> torch.Tensor:
        """The levels in ``dtype``, padded to ``2**bits`` entries (FP4 leaves code 15 unused:
        it reads as the last level), so that no stored code can index past the table."""
        levels = self.levels().to(dtype)
        missing = (1 << self.bits) - levels.numel()
        return torch.cat([levels, levels[-1:].expand(missing)]) if missing else levels

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantise ``weight`` (rows x cols) into this module's buffers (fitting the table
        first for a fitted format)."""
        weight = weight.detach().float()
        scales = group_scales(weight, self.group_size)
        values = normalise(weight, scales)
        if self.table is not None:
            self.table = lloyd_levels(values, 1 << self.bits).to(torch.float16).to(self.table)
        codes = nearest_codes(values, self.levels().to(values.device))
        device = self.scales.device
        self.codes = pack_codes(codes, self.bits).to(device).contiguous()
        self.scales = scales.to(device).contiguous()

    def stored_weight_bytes(self) -> int:
        """Bytes that stand for the weight: codes, scales and a stored table."""
        tensors = [self.codes, self.scales, self.table]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def dequantize(
        self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The float weight the codes stand for (``[r, cols]``), freshly allocated."""
        packed = self.codes if rows is None else self.codes[rows]
        scales = self.scales if rows is None else self.scales[rows]
        codes = unpack_codes(packed, self.bits, self.cols)
        weight = self.lookup_table(dtype)[codes.long()]
        groups = weight.view(codes.shape[0], -1, self.group_size)
        return groups.mul_(scales.to(dtype).unsqueeze(-1)).view(codes.shape)

    def scratch_needs(self, dtype: torch.dtype) -> dict[str, int]:
        """Bytes of each scratch slot a forward pass may grow (see methods/workspace.py)."""
        numel = self.rows * self.cols
        return {
            "codes": self.rows * (-(-self.cols // 8) * 8),
            "codebook-index": 4 * numel,
            "weight": numel * torch.empty(0, dtype=dtype).element_size(),
        }

    def dequantize_scratch(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole float weight, written into this thread's scratch buffers (valid until
        the next call); equal to :meth:`dequantize` element for element."""
        device = self.codes.device
        numel = self.rows * self.cols
        padded = -(-self.cols // 8) * 8
        buffer = workspace.scratch("codes", self.rows * padded, torch.uint8, device)
        codes = unpack_codes(self.codes, self.bits, self.cols, out=buffer)
        index = workspace.scratch("codebook-index", numel, torch.int32, device)
        index.view(self.rows, self.cols).copy_(codes)
        weight = workspace.scratch("weight", numel, dtype, device)
        torch.index_select(self.lookup_table(dtype), 0, index, out=weight)
        groups = weight.view(self.rows, -1, self.group_size)
        groups.mul_(self.scales.to(dtype).unsqueeze(-1))
        return weight.view(self.rows, self.cols)

    def extra_repr(self) -> str:
        return (
            f"rows={self.rows}, cols={self.cols}, format={self.format}, bits={self.bits}, "
            f"group_size={self.group_size}"
        )


class CodebookLinear(WeightOnlyLinear, CodebookStorage):
    """A linear layer with code-book weight storage and a float bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: str,
        bits: int,
        group_size: int,
        bias: bool = True,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(out_features, in_features, fmt, bits, group_size, device)
        self._set_linear(in_features, out_features, bias, bias_dtype, device)


class CodebookEmbedding(RowLookup, CodebookStorage):
    """An embedding table with code-book rows; a lookup decodes only the rows it needs."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        fmt: str,
        bits: int,
        group_size: int,
        padding_idx: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, fmt, bits, group_size, device)
        self._set_table(num_embeddings, embedding_dim, padding_idx, dtype)


# --- the method ----------------------------------------------------------------------------


def check_codebook_option(shape: LayerShape, option: CodebookOption, layer: str) -> None:
    """Validation of format, bit width and group size."""
    if shape.kind not in ("linear", "embedding"):
        raise OptionError(f"{layer}: codebook quantises linear and embedding layers only")
    if option.format not in ALLOWED_BITS:
        raise OptionError(
            f"{layer}: format {option.format!r} is not a codebook format; "
            f"allowed: {', '.join(repr(f) for f in ALLOWED_BITS)}"
        )
    allowed = ALLOWED_BITS[option.format]
    if option.bits not in allowed:
        raise OptionError(
            f"{layer}: {option.bits} bits is not allowed for the {option.format!r} format "
            f"of codebook; allowed: {list(allowed)}"
        )
    group = option.group_size
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0 or shape.cols % group:
        divisors = [g for g in range(8, shape.cols + 1) if shape.cols % g == 0][:10]
        raise OptionError(
            f"{layer}: group size {group} does not divide the layer width {shape.cols}; "
            f"allowed: a divisor of {shape.cols}, e.g. " + ", ".join(str(g) for g in divisors)
        )


class Codebook(Method):
    """Code-book quantisation. The error bound is the default one for ``bits``: a table
    fitted to the weights only beats a uniform grid by a constant factor (on Gaussian
    layers the measured errors are 0.43 to 0.56 of it)."""

    name: ClassVar[str] = "codebook"
    option_type: ClassVar[type[Option]] = CodebookOption

    def supports(self, shape: LayerShape) -> bool:
        return shape.kind in ("linear", "embedding")

    def check(self, shape: LayerShape, option: Option, layer: str = "layer") -> None:
        assert isinstance(option, CodebookOption)
        check_codebook_option(shape, option, layer)

    def cost(self, shape: LayerShape, option: Option) -> Cost:
        """Packed codes + float16 scales (+ a float16 table of ``2**bits`` levels) + bias."""
        assert isinstance(option, CodebookOption)
        code_bytes = shape.rows * packed_row_bytes(shape.cols, option.bits)
        scale_bytes = shape.rows * (shape.cols // option.group_size) * 2
        table_bytes = 2 * (1 << option.bits) if option.stores_table else 0
        flops = 2 * shape.rows * shape.cols if shape.kind == "linear" else 0
        return Cost(code_bytes + scale_bytes + table_bytes, shape.bias_bytes, flops)

    def grid(self, shape: LayerShape) -> list[Option]:
        return [
            CodebookOption(fmt, bits, group) for fmt, bits, group in GRID if shape.cols % group == 0
        ]

    def convert(
        self, module: nn.Module, option: Option, observer: Observer | None = None
    ) -> nn.Module:
        assert isinstance(option, CodebookOption)
        shape = LayerShape.of(module)
        self.check(shape, option)
        weight = finite_weight(module, option.label)
        out = self.empty(shape, option, like=module)
        out.load_weight(weight)
        if isinstance(out, CodebookLinear) and out.bias is not None:
            out.bias.copy_(module.bias.detach())
        return out

    def empty(self, shape: LayerShape, option: Option, like: nn.Module | None = None) -> nn.Module:
        assert isinstance(option, CodebookOption)
        device = like.weight.device if like is not None else None
        dtype = dtype_from_name(shape.dtype)
        fmt, bits, group = option.format, option.bits, option.group_size
        if shape.kind == "linear":
            return CodebookLinear(
                shape.cols,
                shape.rows,
                fmt,
                bits,
                group,
                bias=shape.has_bias,
                bias_dtype=dtype,
                device=device,
            )
        padding_idx = getattr(like, "padding_idx", None)
        return CodebookEmbedding(
            shape.rows, shape.cols, fmt, bits, group, padding_idx, dtype=dtype, device=device
        )


register(Codebook())
