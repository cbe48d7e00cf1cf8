"""What the low-rank methods share: checks, costs, grid, error bound, storage and conversion."""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import ClassVar

import torch
from torch import nn

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
from methods.gptq_solver import work_dtype
from methods.lowrank.factorisations import balance
from methods.lowrank.modules import Float16Factor, LowRankLinear, QuantizedFactor
from methods.lowrank.options import ALLOWED_BITS, GRID, LowRankOption, factor_shapes
from methods.rtn import quant_cost

_FP16_MAX = 65504.0


def _common_divisors(a: int, b: int) -> list[int]:
    g = math.gcd(a, b)
    return [d for d in range(g, 0, -1) if g % d == 0]


class LowRank(Method):
    """Shared checks, costs, grid and storage of the low-rank methods."""

    name: ClassVar[str] = "svd"
    version: ClassVar[str] = "1"
    option_type: ClassVar[type[Option]] = LowRankOption
    # relative weight error of the method's optimum against the plain SVD's on Gaussian
    # weights and inputs (whose optimum is the plain SVD's)
    off_target: ClassVar[float] = 1.0

    def supports(self, shape: LayerShape) -> bool:
        return shape.kind == "linear"

    def check(self, shape: LayerShape, option: Option, layer: str = "layer") -> None:
        assert isinstance(option, LowRankOption)
        name = option.method
        if shape.kind != "linear":
            raise OptionError(f"{layer}: {name} factorises linear layers only, not {shape.kind}")
        rank, fraction = option.rank, option.fraction
        if (rank is None) == (fraction is None):
            raise OptionError(
                f"{layer}: {name} takes a rank or a fraction, got rank={rank!r} and "
                f"fraction={fraction!r}; allowed: exactly one of them (the other null)"
            )
        top = min(shape.rows, shape.cols)
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
            raise OptionError(f"{layer}: {name} rank {rank!r}; allowed: an integer 1..{top}")
        if rank is not None and not 1 <= rank <= top:
            raise OptionError(
                f"{layer}: {name} rank {rank} for a {shape.rows}x{shape.cols} weight; "
                f"allowed: 1..{top}"
            )
        if fraction is not None and (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not 0 < fraction <= 1
        ):
            raise OptionError(
                f"{layer}: {name} rank fraction {fraction!r}; allowed: a number in (0, 1]"
            )
        if option.bits not in ALLOWED_BITS:
            raise OptionError(
                f"{layer}: {option.bits} bits is not allowed for {name} factors; "
                f"allowed: {list(ALLOWED_BITS)}"
            )
        self._check_group(shape, option, layer)

    def _check_group(self, shape: LayerShape, option: LowRankOption, layer: str) -> None:
        group = option.group_size
        if group is None:
            return
        if option.bits == 16:
            raise OptionError(
                f"{layer}: group size {group!r} with {option.bits}-bit factors, which are not "
                "grouped; allowed: null"
            )
        rank = option.rank_for(shape)
        if (
            isinstance(group, bool)
            or not isinstance(group, int)
            or group <= 0
            or (shape.cols % group or rank % group)
        ):
            raise OptionError(
                f"{layer}: group size {group!r} of {option.label} must divide both the layer "
                f"width {shape.cols} and the rank {rank}; allowed: null (one group per row) or "
                + ", ".join(str(g) for g in _common_divisors(shape.cols, rank)[:10])
            )

    def cost(self, shape: LayerShape, option: Option) -> Cost:
        assert isinstance(option, LowRankOption)
        rank = option.rank_for(shape)
        first, second = factor_shapes(shape, rank)
        if option.bits == 16:
            weight = 2 * first.numel + 2 * second.numel
        else:
            storage = option.storage()
            weight = quant_cost(first, storage).weight_bytes
            weight += quant_cost(second, storage).weight_bytes
        return Cost(weight, shape.bias_bytes, 2 * rank * (shape.rows + shape.cols))

    def grid(self, shape: LayerShape) -> list[Option]:
        if not self.supports(shape):
            return []
        dense = 2 * shape.numel
        options = [self.option_type(fraction=f, bits=bits) for f, bits in GRID]
        return [o for o in options if self.cost(shape, o).weight_bytes < dense]

    def rebuilt_numel(self, shape: LayerShape, option: Option) -> int:
        """Integer factors are decoded, not the product: ``rank * (rows + cols)`` weights."""
        assert isinstance(option, LowRankOption)
        return option.rank_for(shape) * (shape.rows + shape.cols)

    def runtime_format(self, shape: LayerShape, option: Option) -> str:
        """Float16 factors: two dense matmuls (plus a cast of the small factors); integer
        factors: both decoded on each call (their kernels would run once per factor)."""
        assert isinstance(option, LowRankOption)
        return "dense" if option.bits == 16 else "dequantize"

    def error_bound(self, shape: LayerShape, option: Option) -> float:
        """Relative output error expected on Gaussian weights and inputs.

        Truncation: the ``r`` largest of ``min(m, n)`` squared singular values hold at least
        ``r / min(m, n)`` of any matrix's Frobenius energy, so the best rank-``r`` weight
        error is at most ``t = sqrt(1 - r / min(m, n))``; for i.i.d. Gaussian inputs the
        expected relative output error equals the relative weight error. Quantised factors
        add, per factor, a uniform quantiser's error ``q = 3 * 2**-bits`` of the kept part
        (at most all of ``W``); those errors are nearly orthogonal to the truncation error
        and to each other, so they add in quadrature: ``sqrt(t**2 + 2 q**2)``, plus 0.01 for
        the sampling noise of a few tokens. Calibrated variants aim at another optimum (the
        calibration inputs', or Fisher-weighted rows): ``off_target`` widens the bound for
        them. Capped at 1, the error of dropping the weight altogether.

        A Gaussian weight's spectrum is flat, so the worst case is nearly reached: measured
        errors are 0.5 to 0.95 of the bound (closest at rank 1/8), not the two thirds of a
        quantiser's.
        """
        assert isinstance(option, LowRankOption)
        rank = option.rank_for(shape)
        t = math.sqrt(max(0.0, 1.0 - rank / min(shape.rows, shape.cols)))
        q = 0.0 if option.bits == 16 else 3.0 * 2.0**-option.bits
        return min(1.0, self.off_target * math.sqrt(t * t + 2 * q * q) + 0.01)

    def empty(self, shape: LayerShape, option: Option, like: nn.Module | None = None) -> nn.Module:
        assert isinstance(option, LowRankOption)
        if shape.kind != "linear":
            raise OptionError(f"{option.label}: low-rank methods factorise linear layers only")
        device = like.weight.device if like is not None else None
        rank = option.rank_for(shape)
        dtype = dtype_from_name(shape.dtype)
        if option.bits == 16:
            first: nn.Module = Float16Factor(shape.cols, rank, device=device)
            second: nn.Module = Float16Factor(rank, shape.rows, shape.has_bias, dtype, device)
        else:
            storage = option.storage()
            first = QuantizedFactor(
                shape.cols,
                rank,
                option.bits,
                storage.effective_group(shape.cols),
                True,
                bias=False,
                device=device,
            )
            second = QuantizedFactor(
                rank,
                shape.rows,
                option.bits,
                storage.effective_group(rank),
                True,
                bias=shape.has_bias,
                bias_dtype=dtype,
                device=device,
            )
        return LowRankLinear(first, second)

    @torch.no_grad()
    def convert(
        self, module: nn.Module, option: Option, observer: Observer | None = None
    ) -> nn.Module:
        assert isinstance(option, LowRankOption)
        shape = LayerShape.of(module)
        self.check(shape, option)
        weight = finite_weight(module, option.label)
        work = weight.to(work_dtype(weight.device))
        left, right = self.factorise(work, option.rank_for(shape), option, observer)
        left, right = balance(left, right)
        if option.bits == 16 and max(float(left.abs().max()), float(right.abs().max())) > (
            _FP16_MAX
        ):
            raise OptionError(f"{option.label}: the factors exceed the float16 range")
        out = self.empty(shape, option, like=module)
        assert isinstance(out, LowRankLinear)
        out.first.load_weight(right.float())
        out.second.load_weight(left.float())
        if shape.has_bias:
            out.second.bias.copy_(module.bias.detach())
        return out

    @abstractmethod
    def factorise(
        self, weight: torch.Tensor, rank: int, option: LowRankOption, observer: Observer | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` of rank ``rank`` for ``weight`` [rows, cols] (in the work dtype)."""
