"""Round-to-nearest weight-only quantisation (RTN): the baseline integer format.

Symmetric or asymmetric, one group per row (``group_size=None``) or groups of 32/64/128
along the row, 2 to 8 bits, for ``nn.Linear`` and ``nn.Embedding``. Needs no calibration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from methods import affine
from methods.base import (
    Cost,
    LayerShape,
    Method,
    Observer,
    Option,
    dtype_from_name,
    finite_weight,
)
from methods.errors import OptionError
from methods.kernels import int4_group_for, int8_layout_ok
from methods.packing import packed_row_bytes
from methods.quantized import QuantizedEmbedding, QuantizedLinear
from methods.registry import register

# The default search grid: 8-bit per row and in groups of 128 (per row alone lost to 8-bit
# groups of 128 at 8.2 bits per weight on the demo: benchmarks/peers.py); 4-bit per row and in
# groups; 3- and 2-bit only in groups (one scale per row is too coarse there). Any valid
# option can still be written in a plan by hand.
GRID = {8: (None, 128), 4: (None, 128, 64, 32), 3: (128, 64, 32), 2: (64, 32)}
ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8)


@dataclass(frozen=True)
class QuantOption(Option):
    """``bits``-bit codes, one float16 scale (and offset if asymmetric) per group."""

    method: ClassVar[str] = "rtn"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False

    @property
    def label(self) -> str:
        group = "ch" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits}-{group}-{'sym' if self.symmetric else 'asym'}"

    def effective_group(self, cols: int) -> int:
        return cols if self.group_size is None else self.group_size


def check_quant_option(shape: LayerShape, option: QuantOption, layer: str) -> None:
    """Shared validation of bit width and group size for integer formats."""
    if shape.kind not in ("linear", "embedding"):
        raise OptionError(f"{layer}: {option.method} quantises linear and embedding layers only")
    if option.bits not in ALLOWED_BITS:
        raise OptionError(
            f"{layer}: {option.bits} bits is not allowed for {option.method}; "
            f"allowed: {list(ALLOWED_BITS)}"
        )
    group = option.group_size
    if group is not None and (not isinstance(group, int) or group <= 0 or shape.cols % group):
        divisors = [g for g in range(8, shape.cols + 1) if shape.cols % g == 0][:10]
        raise OptionError(
            f"{layer}: group size {group} does not divide the layer width {shape.cols}; "
            f"allowed: null (one group per row) or a divisor of {shape.cols}, e.g. "
            + ", ".join(str(g) for g in divisors)
        )


def quant_cost(shape: LayerShape, option: QuantOption) -> Cost:
    """Exact bytes of codes + float16 scales (+ offsets) + bias, and FLOPs per token."""
    group = option.effective_group(shape.cols)
    n_groups = shape.cols // group
    code_bytes = shape.rows * packed_row_bytes(shape.cols, option.bits)
    scale_bytes = shape.rows * n_groups * 2 * (1 if option.symmetric else 2)
    flops = 2 * shape.rows * shape.cols if shape.kind == "linear" else 0
    return Cost(code_bytes + scale_bytes, shape.bias_bytes, flops)


class RoundToNearest(Method):
    name: ClassVar[str] = "rtn"
    version: ClassVar[str] = "2"  # 2: asymmetric offsets aligned to a whole zero point
    option_type: ClassVar[type[Option]] = QuantOption

    def supports(self, shape: LayerShape) -> bool:
        return shape.kind in ("linear", "embedding")

    def check(self, shape: LayerShape, option: Option, layer: str = "layer") -> None:
        assert isinstance(option, QuantOption)
        check_quant_option(shape, option, layer)

    def cost(self, shape: LayerShape, option: Option) -> Cost:
        assert isinstance(option, QuantOption)
        return quant_cost(shape, option)

    def grid(self, shape: LayerShape) -> list[Option]:
        return [
            QuantOption(bits, group, symmetric)
            for bits, groups in GRID.items()
            for group in groups
            if group is None or shape.cols % group == 0
            for symmetric in (True, False)
        ]

    def runtime_format(self, shape: LayerShape, option: Option) -> str:
        assert isinstance(option, QuantOption)
        per_row = option.effective_group(shape.cols) == shape.cols
        if option.bits == 8 and per_row and option.symmetric and int8_layout_ok(shape.cols):
            return "int8_weight_only"
        if (
            option.bits == 4
            and int4_group_for(shape.rows, shape.cols, option.effective_group(shape.cols))
            is not None
        ):
            return "int4_weight_only"
        return "dequantize"

    def convert(
        self, module: nn.Module, option: Option, observer: Observer | None = None
    ) -> nn.Module:
        assert isinstance(option, QuantOption)
        shape = LayerShape.of(module)
        self.check(shape, option)
        weight = finite_weight(module, option.label)
        out = self.empty(shape, option, like=module)
        out.load_weight(weight)
        if isinstance(out, QuantizedLinear) and out.bias is not None:
            out.bias.copy_(module.bias.detach())
        return out

    def simulated_weight(
        self,
        module: nn.Module,
        option: Option,
        observer: Observer | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        assert isinstance(option, QuantOption)
        shape = LayerShape.of(module)
        self.check(shape, option)
        weight = finite_weight(module, option.label)
        if rows is not None:  # each row's groups are its own: a row alone rounds alike
            weight = weight[rows]
        group = option.effective_group(shape.cols)
        return affine.round_trip(weight, group, option.bits, option.symmetric)

    def empty(self, shape: LayerShape, option: Option, like: nn.Module | None = None) -> nn.Module:
        assert isinstance(option, QuantOption)
        device = like.weight.device if like is not None else None
        group = option.effective_group(shape.cols)
        dtype = dtype_from_name(shape.dtype)
        if shape.kind == "linear":
            return QuantizedLinear(
                shape.cols,
                shape.rows,
                option.bits,
                group,
                option.symmetric,
                bias=shape.has_bias,
                bias_dtype=dtype,
                device=device,
            )
        padding_idx = getattr(like, "padding_idx", None)
        return QuantizedEmbedding(
            shape.rows,
            shape.cols,
            option.bits,
            group,
            option.symmetric,
            padding_idx=padding_idx,
            dtype=dtype,
            device=device,
        )


register(RoundToNearest())
