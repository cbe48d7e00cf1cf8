"""Outlier keeping: a few input channels in float16, the rest in RTN's integer format.

Transformer activations have a handful of input channels whose magnitude is many times the
others'. Their share of a quantised layer's output error is as large as their share of the
activation energy, so keeping them exact removes most of the error at little cost (the
decomposition of LLM.int8 and SpQR, with the outliers chosen per input channel).

* Channel choice (calibration): ``score_j = ||X[:, j]|| * ||W[:, j]||``, the activation norm
  of input ``j`` times its weight column's norm (Wanda's saliency, summed over a column).
  The ``k = max(1, round(fraction * cols))`` highest are kept; ties go to the lower index.
* The rest: the weight with the kept columns set to zero, quantised by RTN or by GPTQ (with
  the Hessian's kept rows and columns zeroed, so that GPTQ treats them as dead inputs). Group
  scales are thus fitted without the outliers, and the kept columns' codes decode to zero.
* Storage: a bias-free ``QuantizedLinear`` (RTN's bytes and kernels) as child ``quantized``,
  the sorted kept indices (int16, int32 beyond 32767 inputs), their float16 columns
  ``[rows, k]`` and the bias.

Observers: GPTQ needs the full Hessian, and shares the layer's with the ``gptq`` method's
options. RTN needs only its diagonal, so it takes a per-channel sum of squares: ``cols``
numbers instead of ``cols**2`` (470 MiB at 11008 inputs) and a product per token that is
linear in the width, not quadratic. ``convert`` accepts either for RTN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ClassVar

import torch
from torch import nn

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
from methods.errors import OptionError
from methods.gptq import GPTQOption
from methods.gptq_solver import gptq_quantize
from methods.observers import SHARED, ChannelObserver, HessianObserver
from methods.quantized import QuantizedLinear
from methods.registry import get_method, register
from methods.rtn import QuantOption, check_quant_option, quant_cost
from methods.weight_only import WeightOnlyLinear

BASES = ("gptq", "rtn")
MAX_FRACTION = 0.5
INT16_MAX_COLS = 32767
_FP16_MAX = 65504.0
# (base, bits, group size, fraction): all asymmetric; the outliers matter most at low bits
GRID = (
    ("rtn", 4, 128, 0.01),
    ("rtn", 3, 64, 0.01),
    ("rtn", 2, 32, 0.02),
    ("gptq", 3, 64, 0.01),
    ("gptq", 2, 32, 0.02),
)
# for widths no grid group divides
FALLBACK_GRID = (("rtn", 4, None, 0.01), ("gptq", 4, None, 0.01))


def _percent(fraction: Any) -> str:
    """``fraction`` in percent, with every digit its float's shortest form has (unique)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        return str(fraction)
    if not math.isfinite(fraction):
        return str(fraction)
    return format(Decimal(repr(float(fraction))).scaleb(2).normalize(), "f")


@dataclass(frozen=True)
class OutlierOption(Option):
    """The ``fraction`` of input channels that matter most kept in float16; the rest in
    ``bits``-bit codes fitted by ``base`` (``"rtn"`` or ``"gptq"``)."""

    method: ClassVar[str] = "outliers"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    fraction: float = 0.01
    base: str = "rtn"

    @property
    def label(self) -> str:
        group = "ch" if self.group_size is None else f"g{self.group_size}"
        prefix = "int" if self.base == "rtn" else str(self.base)
        sym = "sym" if self.symmetric else "asym"
        return f"{prefix}{self.bits}-{group}-{sym}+o{_percent(self.fraction)}%"

    def kept(self, cols: int) -> int:
        """Number of input channels kept in float16."""
        return min(cols, max(1, round(self.fraction * cols)))

    def storage(self) -> QuantOption:
        """The RTN option of the quantised part."""
        return QuantOption(self.bits, self.group_size, self.symmetric)

    def gptq(self) -> GPTQOption:
        """The GPTQ option that fits the quantised part (``base == "gptq"``)."""
        return GPTQOption(self.bits, self.group_size, self.symmetric, act_order=True)


def index_dtype(cols: int) -> torch.dtype:
    return torch.int16 if cols <= INT16_MAX_COLS else torch.int32


def channel_sumsq(observer: Observer) -> torch.Tensor:
    """Per-channel sum of squares of the inputs (float64, CPU) from either observer."""
    if isinstance(observer, ChannelObserver):
        return observer.sumsq.clone()
    assert isinstance(observer, HessianObserver) and observer.xtx is not None
    return observer.xtx.diagonal().to(device="cpu", dtype=torch.float64)


def select_channels(sumsq: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, ascending) of the ``k`` inputs with the highest
    ``||X[:, j]|| * ||W[:, j]||``; among equal scores the lower index wins."""
    activation = sumsq.to(torch.float64).clamp_min(0).sqrt()
    column = weight.detach().to(device="cpu", dtype=torch.float64).norm(dim=0)
    order = torch.argsort(activation * column, descending=True, stable=True)
    return order[:k].sort().values


class OutlierLinear(WeightOnlyLinear, KeepsStoredFormat):
    """``y = quantized(x) + x[..., outlier_index] @ outlier_weight.T + bias``."""

    stored_buffers = ("outlier_index", "outlier_weight")

    def __init__(
        self,
        quantized: QuantizedLinear,
        kept: int,
        bias: bool = True,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        cols, rows = quantized.in_features, quantized.out_features
        self.quantized = quantized
        index = torch.arange(kept, dtype=index_dtype(cols), device=device)
        self.register_buffer("outlier_index", index)
        weight = torch.zeros(rows, kept, dtype=torch.float16, device=device)
        self.register_buffer("outlier_weight", weight)
        self._set_linear(cols, rows, bias, bias_dtype, device)

    def stored_weight_bytes(self) -> int:
        """Bytes that stand for the weight: the quantised part, indices and kept columns."""
        kept = [self.outlier_index, self.outlier_weight]
        return self.quantized.stored_weight_bytes() + sum(
            t.numel() * t.element_size() for t in kept
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective ``[rows, cols]`` weight (quantised part plus kept columns)."""
        weight = self.quantized.dequantize(dtype)
        weight[:, self.outlier_index.long()] += self.outlier_weight.to(dtype)
        return weight

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """The quantised part's product (its kernels included) plus the kept columns'."""
        y = self.quantized(x2)
        kept = x2.index_select(1, self.outlier_index.long())
        return torch.addmm(y, kept, self.outlier_weight.to(y.dtype).t())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kept={self.outlier_index.numel()}, bias={self.bias is not None}"
        )


class OutlierKeeping(Method):
    name: ClassVar[str] = "outliers"
    version: ClassVar[str] = "2"  # 2: the GPTQ base factors in one pass
    option_type: ClassVar[type[Option]] = OutlierOption

    def supports(self, shape: LayerShape) -> bool:
        return shape.kind == "linear"

    def check(self, shape: LayerShape, option: Option, layer: str = "layer") -> None:
        assert isinstance(option, OutlierOption)
        if shape.kind != "linear":
            raise OptionError(f"{layer}: outliers compresses linear layers only, not {shape.kind}")
        check_quant_option(shape, option, layer)  # type: ignore[arg-type]
        fraction = option.fraction
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not 0 < fraction <= MAX_FRACTION
        ):
            raise OptionError(
                f"{layer}: outlier fraction {fraction!r} is out of range; "
                f"allowed: a number in (0, {MAX_FRACTION}]"
            )
        if option.base not in BASES:
            raise OptionError(
                f"{layer}: outlier base {option.base!r} is unknown; allowed: {list(BASES)}"
            )

    def cost(self, shape: LayerShape, option: Option) -> Cost:
        assert isinstance(option, OutlierOption)
        quant = quant_cost(shape, option.storage())
        kept = option.kept(shape.cols)
        index_bytes = kept * torch.empty((), dtype=index_dtype(shape.cols)).element_size()
        kept_bytes = shape.rows * kept * 2
        return Cost(
            quant.weight_bytes + index_bytes + kept_bytes,
            shape.bias_bytes,
            quant.flops_per_token + 2 * shape.rows * kept,
        )

    def grid(self, shape: LayerShape) -> list[Option]:
        grid: list[Option] = [
            OutlierOption(bits, group, False, fraction, base)
            for base, bits, group, fraction in GRID
            if shape.cols % group == 0
        ]
        if grid:
            return grid
        return [
            OutlierOption(bits, group, False, fraction, base)
            for base, bits, group, fraction in FALLBACK_GRID
        ]

    def runtime_format(self, shape: LayerShape, option: Option) -> str:
        assert isinstance(option, OutlierOption)
        return get_method("rtn").runtime_format(shape, option.storage())

    def needs_calibration(self, option: Option) -> bool:
        return True

    def observer(self, module: nn.Module, option: Option) -> Observer | None:
        """GPTQ-based options: the layer's shared Hessian observer of the ``gptq`` method.
        RTN-based ones: a per-channel observer shared by the layer's options until fed."""
        assert isinstance(option, OutlierOption)
        if option.base == "gptq":
            return get_method("gptq").observer(module, option.gptq())
        cols = LayerShape.of(module).cols
        return SHARED.get(module, ChannelObserver, lambda: ChannelObserver(cols))

    def _check_observer(self, observer: Observer | None, option: OutlierOption, cols: int) -> None:
        wanted = (HessianObserver,) if option.base == "gptq" else (HessianObserver, ChannelObserver)
        if observer is None:
            raise OptionError(
                f"{option.label} needs calibration: an observer that saw the layer's inputs "
                "(none was given)"
            )
        if not isinstance(observer, wanted):
            raise OptionError(
                f"{option.label} needs calibration by a "
                + " or ".join(kind.__name__ for kind in wanted)
                + f", got {type(observer).__name__}"
            )
        if observer.tokens == 0:
            raise OptionError(f"{option.label} needs calibration: the observer saw no inputs")
        if observer.cols != cols:
            raise OptionError(
                f"{option.label}: the observer saw inputs of width {observer.cols}, "
                f"the layer takes {cols}"
            )

    @torch.no_grad()
    def convert(
        self, module: nn.Module, option: Option, observer: Observer | None = None
    ) -> nn.Module:
        assert isinstance(option, OutlierOption)
        shape = LayerShape.of(module)
        self.check(shape, option)
        self._check_observer(observer, option, shape.cols)
        assert observer is not None
        weight = finite_weight(module, option.label)
        sumsq = channel_sumsq(observer)
        if not torch.isfinite(sumsq).all():
            raise OptionError(f"{option.label}: the calibration inputs hold NaN or inf values")
        index = select_channels(sumsq, weight, option.kept(shape.cols)).to(weight.device)

        out = self.empty(shape, option, like=module)
        rest = weight.float().clone()
        rest[:, index] = 0.0
        if option.base == "gptq":
            assert isinstance(observer, HessianObserver)
            hessian = observer.hessian(torch.float64).to(weight.device)
            if not torch.isfinite(hessian).all():
                raise OptionError(f"{option.label}: the calibration inputs hold NaN or inf values")
            hessian[index, :] = 0.0
            hessian[:, index] = 0.0
            out.quantized.store(*gptq_quantize(rest, hessian, option.gptq(), option.label))
        else:
            out.quantized.load_weight(rest)
        out.outlier_index.copy_(index)
        out.outlier_weight.copy_(weight[:, index].float().clamp(-_FP16_MAX, _FP16_MAX))
        if out.bias is not None:
            out.bias.copy_(module.bias.detach())
        return out

    def empty(self, shape: LayerShape, option: Option, like: nn.Module | None = None) -> nn.Module:
        assert isinstance(option, OutlierOption)
        if shape.kind != "linear":
            raise OptionError(f"{option.label}: outliers compresses linear layers only")
        device = like.weight.device if like is not None else None
        dtype = dtype_from_name(shape.dtype)
        bare = LayerShape("linear", shape.rows, shape.cols, False, shape.dtype)
        quantized = get_method("rtn").empty(bare, option.storage(), like=like)
        assert isinstance(quantized, QuantizedLinear)
        return OutlierLinear(
            quantized, option.kept(shape.cols), shape.has_bias, bias_dtype=dtype, device=device
        )


register(OutlierKeeping())
