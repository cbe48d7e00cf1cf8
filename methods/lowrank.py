"""Low-rank factorisation of linear layers: ``W ~ B A`` with ``A`` [rank, cols], ``B`` [rows, rank].

Three methods share one option type and one storage layout:

* ``svd``: the truncated SVD of ``W``, the best rank-``r`` approximation in Frobenius norm
  (Eckart–Young). No calibration.
* ``whitened_svd``: activation-aware, as in SVD-LLM. It minimises ``||X W^T - X (B A)^T||_F``
  over calibration inputs ``X``: with ``S`` the lower Cholesky factor of the dampened second
  moment ``H = 2 X^T X / n + d I`` (``d`` a fraction of the mean diagonal, raised while the
  factorisation fails), ``||X E^T||_F^2 ~ ||E S||_F^2``, so the optimum is the truncated SVD
  ``U_r Σ_r V_r^T`` of ``W S`` with ``S^-1`` applied on the right: ``A = Σ_r^½ V_r^T S^-1``
  (a triangular solve, no inverse), ``B = U_r Σ_r^½``.
* ``fisher_svd``: Fisher-weighted SVD (FWSVD, Hsu et al. 2022). Row ``i`` of ``W`` gets the
  importance ``I_i = sqrt(sum_j F_ij)`` from the weight's diagonal Fisher information ``F``;
  the truncated SVD of ``diag(I) W`` is unscaled on the left: ``B = diag(I)^-1 U_r Σ_r^½``.
  Rows whose importance is zero get a small floor.

Each component's scale is split evenly between the factors (``Σ^½`` on either side, then
each column of ``B`` and row of ``A`` brought to equal norms), so both factors have similar
ranges before they are stored: float16 (``bits=16``) or RTN integer codes (8 or 4 bits,
symmetric, one scale per row or per group along the row). Integer factors always run
dequantised (two float matmuls), the ``dequantize`` format: the CPU kernels would run once
per factor, a path no runtime format names.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
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
from methods.gptq import work_dtype
from methods.observers import SHARED, HessianObserver
from methods.quantized import QuantizedLinear
from methods.registry import register
from methods.rtn import QuantOption, quant_cost

ALLOWED_BITS = (16, 8, 4)
# (rank fraction, bits) of the default grid; options not smaller than the float16 layer are
# dropped. 4-bit factors at half rank cost about what 8-bit ones at a quarter do, and keep
# far more of a weight whose spectrum is flat.
GRID = ((0.25, 8), (0.125, 16), (0.25, 16), (0.5, 16), (0.5, 4))
DAMP = 0.01  # fraction of the mean Hessian diagonal added before the Cholesky factorisation
_MAX_DAMP_RETRIES = 4
FISHER_FLOOR = 1e-3  # smallest row importance, relative to the mean importance
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class LowRankOption(Option):
    """Rank ``rank``, or ``fraction`` of ``min(rows, cols)`` (exactly one of them set; give
    ``fraction=None`` with a rank); factors stored in float16 (``bits=16``) or as symmetric
    ``bits``-bit codes with one float16 scale per row (``group_size=None``) or per group."""

    method: ClassVar[str] = "svd"
    rank: int | None = None
    fraction: float | None = 0.25
    bits: int = 16
    group_size: int | None = None

    @property
    def label(self) -> str:
        size = f"{self.rank}" if self.rank is not None else f"{100 * (self.fraction or 0):g}%"
        label = f"{self.method}-r{size}"
        if self.bits != 16:
            label += f"+int{self.bits}"
            if self.group_size is not None:
                label += f"-g{self.group_size}"
        return label

    def rank_for(self, shape: LayerShape) -> int:
        """The rank used on a layer of this shape (a fraction is rounded half up)."""
        if self.rank is not None:
            return self.rank
        return max(1, math.floor((self.fraction or 0) * min(shape.rows, shape.cols) + 0.5))

    def storage(self) -> QuantOption:
        """The RTN option both factors are stored with (integer factors only)."""
        return QuantOption(self.bits, self.group_size, symmetric=True)


@dataclass(frozen=True)
class WhitenedSVDOption(LowRankOption):
    method: ClassVar[str] = "whitened_svd"


@dataclass(frozen=True)
class FisherSVDOption(LowRankOption):
    method: ClassVar[str] = "fisher_svd"


def factor_shapes(shape: LayerShape, rank: int) -> tuple[LayerShape, LayerShape]:
    """Shapes of ``A`` (``x -> x A^T``) and of ``B`` (``h -> h B^T + bias``)."""
    first = LayerShape("linear", rank, shape.cols, False, shape.dtype)
    second = LayerShape("linear", shape.rows, rank, shape.has_bias, shape.dtype)
    return first, second


# --- storage ------------------------------------------------------------------------------


class Float16Factor(KeepsStoredFormat):
    """``x -> x W^T (+ bias)`` with ``W`` stored as float16, cast to the input dtype on use."""

    stored_buffers = ("weight",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        weight = torch.zeros(out_features, in_features, dtype=torch.float16, device=device)
        self.register_buffer("weight", weight)
        bias_tensor = torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None
        self.register_buffer("bias", bias_tensor)

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor) -> None:
        self.weight = weight.to(torch.float16).to(self.weight.device).contiguous()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype)

    def stored_weight_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float16"


class QuantizedFactor(QuantizedLinear):
    """A factor in RTN's integer format that always computes by dequantising its weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize_scratch(x.dtype), bias)


class LowRankLinear(nn.Module):
    """``y = (x A^T) B^T + bias``: ``first`` holds ``A`` [rank, cols], ``second`` holds ``B``
    [rows, rank] and the bias. Its state is the two factors' state and nothing else."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.in_features, self.out_features = first.in_features, second.out_features
        self.rank = first.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` as stored, decoded to ``dtype``."""
        return self.second.dequantize(dtype), self.first.dequantize(dtype)

    def stored_weight_bytes(self) -> int:
        return self.first.stored_weight_bytes() + self.second.stored_weight_bytes()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


# --- factorisations -----------------------------------------------------------------------


def truncated_svd(
    matrix: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U_r Σ_r^½`` ([m, r]), ``Σ_r^½ V_r^T`` ([r, n]) and all singular values."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank], s


def balance(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale column ``k`` of ``left`` and row ``k`` of ``right`` to equal norms (their
    product is unchanged); components that are zero on either side stay as they are."""
    left_norm, right_norm = left.norm(dim=0), right.norm(dim=1)
    ok = (left_norm > 0) & (right_norm > 0)
    ratio = torch.where(ok, right_norm / torch.where(ok, left_norm, 1.0), 1.0)
    d = ratio.sqrt()
    return left * d, right / d[:, None]


def damped_cholesky(hessian: torch.Tensor, damp: float, label: str) -> torch.Tensor:
    """Lower Cholesky factor of ``H + d I``, ``d = damp * mean(diag H)``, raising ``damp``
    while the factorisation fails (all-zero inputs: ``d = damp``)."""
    mean_diag = float(hessian.diagonal().mean())
    scale = mean_diag if mean_diag > 0 else 1.0
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damps = [damp] + [max(damp, 0.01) * 10.0**k for k in range(1, _MAX_DAMP_RETRIES)]
    for fraction in damps:
        lower, info = torch.linalg.cholesky_ex(hessian + (fraction * scale) * eye)
        if int(info) == 0 and torch.isfinite(lower.diagonal()).all():
            return lower
    raise OptionError(
        f"{label}: the calibration second moment is not positive definite even with "
        f"dampening {damps[-1]:g}; use more (or more varied) calibration data"
    )


def whitened_factors(
    weight: torch.Tensor, hessian: torch.Tensor, rank: int, damp: float = DAMP, label: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` minimising ``tr((W - B A) H (W - B A)^T)`` for the dampened ``H``."""
    lower = damped_cholesky(hessian, damp, label)
    left, right = truncated_svd(weight @ lower, rank)[:2]
    # A S = Σ^½ V^T: solve for A against the triangular S
    return left, torch.linalg.solve_triangular(lower, right, upper=False, left=False)


def row_importance(fisher: torch.Tensor) -> torch.Tensor:
    """``I_i = sqrt(sum_j F_ij)``, floored at ``FISHER_FLOOR`` times its mean (all ones when
    the Fisher information is zero everywhere)."""
    importance = fisher.sum(dim=1).clamp_min(0).sqrt()
    mean = float(importance.mean())
    if not mean > 0:
        return torch.ones_like(importance)
    return importance.clamp_min(FISHER_FLOOR * mean)


def fisher_factors(
    weight: torch.Tensor, fisher: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` of the truncated SVD of ``diag(I) W``, unscaled on the left."""
    importance = row_importance(fisher.to(weight.dtype))
    left, right = truncated_svd(importance[:, None] * weight, rank)[:2]
    return left / importance[:, None], right


# --- observers ------------------------------------------------------------------------------


class FisherObserver(Observer):
    """Receives the weight's diagonal Fisher information ``[rows, cols]`` (summed over
    hand-overs); its forward hook only counts calls."""

    needs_fisher: ClassVar[bool] = True

    def __init__(self, rows: int, cols: int) -> None:
        self.rows, self.cols = rows, cols
        self.fisher: torch.Tensor | None = None
        self.calls = 0

    def observe(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        self.calls += 1

    def observe_fisher(self, fisher: torch.Tensor) -> None:
        if tuple(fisher.shape) != (self.rows, self.cols):
            raise ValueError(
                f"Fisher information of shape {tuple(fisher.shape)} for a weight of shape "
                f"{(self.rows, self.cols)} (rows are output features)"
            )
        fisher = fisher.detach().to(torch.float32)
        self.fisher = fisher.clone() if self.fisher is None else self.fisher + fisher


# --- methods --------------------------------------------------------------------------------


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


class PlainSVD(LowRank):
    def factorise(
        self, weight: torch.Tensor, rank: int, option: LowRankOption, observer: Observer | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return truncated_svd(weight, rank)[:2]


class WhitenedSVD(LowRank):
    name: ClassVar[str] = "whitened_svd"
    option_type: ClassVar[type[Option]] = WhitenedSVDOption
    # Gaussian layers are calibrated on few tokens (conformance: 90 for 64 or 384 inputs):
    # input directions they miss are fitted only through the dampening
    off_target: ClassVar[float] = 1.1

    def needs_calibration(self, option: Option) -> bool:
        return True

    def observer(self, module: nn.Module, option: Option) -> Observer | None:
        cols = LayerShape.of(module).cols
        return SHARED.get(module, HessianObserver, lambda: HessianObserver(cols))

    def factorise(
        self, weight: torch.Tensor, rank: int, option: LowRankOption, observer: Observer | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(observer, HessianObserver) or observer.tokens == 0:
            raise OptionError(
                f"{option.label} needs calibration: a Hessian observer that saw the layer's "
                "inputs" + (" (none was given)" if observer is None else " (it saw none)")
            )
        if observer.cols != weight.shape[1]:
            raise OptionError(
                f"{option.label}: the observer saw inputs of width {observer.cols}, "
                f"the layer takes {weight.shape[1]}"
            )
        hessian = observer.hessian(weight.dtype).to(weight.device)
        if not torch.isfinite(hessian).all():
            raise OptionError(f"{option.label}: the calibration inputs hold NaN or inf values")
        return whitened_factors(weight, hessian, rank, DAMP, option.label)


class FisherSVD(LowRank):
    name: ClassVar[str] = "fisher_svd"
    option_type: ClassVar[type[Option]] = FisherSVDOption
    off_target: ClassVar[float] = 1.1
    needs_whole_model: ClassVar[bool] = True  # Fisher information: backward passes

    def needs_calibration(self, option: Option) -> bool:
        return True

    def observer(self, module: nn.Module, option: Option) -> Observer | None:
        shape = LayerShape.of(module)
        return SHARED.get(module, FisherObserver, lambda: FisherObserver(shape.rows, shape.cols))

    def factorise(
        self, weight: torch.Tensor, rank: int, option: LowRankOption, observer: Observer | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(observer, FisherObserver) or observer.fisher is None:
            raise OptionError(
                f"{option.label} needs calibration: an observer that received the weight's "
                "Fisher information" + (" (none was given)" if observer is None else "")
            )
        if (observer.rows, observer.cols) != tuple(weight.shape):
            raise OptionError(
                f"{option.label}: Fisher information of a {observer.rows}x{observer.cols} "
                f"weight for a {weight.shape[0]}x{weight.shape[1]} layer"
            )
        fisher = observer.fisher.to(device=weight.device, dtype=weight.dtype)
        if not torch.isfinite(fisher).all():
            raise OptionError(f"{option.label}: the Fisher information holds NaN or inf values")
        return fisher_factors(weight, fisher, rank)


register(PlainSVD())
register(WhitenedSVD())
register(FisherSVD())
