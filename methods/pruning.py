"""Weight pruning of linear layers: magnitude, Wanda and SparseGPT, optionally with quantised
kept values, stored as :class:`methods.sparse.SparseLinear`.

Sparsity patterns (the same for the three methods, so that bytes depend on the shape only):

* unstructured (``pattern=None``): every row keeps exactly ``block - round(sparsity * block)``
  of each block of ``block`` consecutive input columns (Python's ``round``);
* N:M (``pattern="2:4"``, ``"4:8"``, ...): every row keeps N of every M consecutive input
  columns; ``sparsity`` must then be ``1 - N/M`` and ``block`` a multiple of M (the group of
  the quantisation scales, and SparseGPT's block).

Methods, each choosing the kept weights of a row within each block (or M-group) by a score:

* ``magnitude``: ``|W_ij|``; no calibration.
* ``wanda`` (Sun et al., 2023): ``|W_ij| * ||X_j||_2``, ``X_j`` the calibration activations
  of input channel ``j`` (its observer sums their squares).
* ``sparsegpt`` (Frantar & Alistarh, 2023): optimal brain surgeon pruning through the inverse
  Hessian ``H^-1`` of the layer's inputs (``H = 2 X^T X / n``, dampened), swept column by
  column as in GPTQ (:mod:`methods.gptq`, whose observer, Cholesky factor and column quantiser
  it uses): pruning (or rounding) column ``j`` by ``e`` spreads ``-e / U_jj * U_j,j+1:`` onto
  the columns not yet swept, ``U = chol(H^-1)`` upper. The mask of each block of ``block``
  columns is chosen when the sweep reaches the block (adaptive mask selection) by the OBS
  saliency ``w^2 / U_jj^2`` of the *updated* weights (``U_jj^2`` is the inverse Hessian's
  diagonal over the columns left); for N:M the kept set of each M-group is chosen when the
  sweep reaches the group, as in the paper.

Order of application: choose the mask -> (SparseGPT: weight update) -> quantise the kept values.
With ``bits`` in 2..8 the kept values of each row and block get ``bits``-bit codes with a
float16 scale (and offset unless ``symmetric``) fitted on the kept values only: magnitude and
Wanda prune, then round the kept values to nearest; SparseGPT quantises jointly (as GPTQ does):
it fits a block's scales on its kept, updated values when the sweep reaches the block (as a
pruning-only pass over the block leaves them) and spreads each column's pruning *and* rounding
error onto the columns left.

SparseGPT's Hessian is first shrunk towards its mean diagonal by an intensity estimated from the
calibration data (:func:`shrink_hessian`), on top of the paper's 1% dampening: with few tokens
per input, or nearly isotropic inputs, OBS fits the calibration tokens rather than the layer,
and the shrinkage makes it fall back to magnitude pruning there.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

import torch
from scipy import integrate, stats
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
from methods.gptq import (
    inverse_hessian_factor,
    quantize_column,
    work_dtype,
)
from methods.observers import SHARED, ChannelObserver, HessianObserver
from methods.registry import register
from methods.sparse import FLOAT_BITS, SparseLinear, sparse_weight_bytes

ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8, FLOAT_BITS)
MAX_M = 8  # N:M patterns up to M = 8 (C(8, 4) = 70 kept sets: 7-bit indices)
DAMP = 0.01  # SparseGPT: fraction of the mean Hessian diagonal added to its diagonal
LAZY = 32  # SparseGPT: columns per lazy update when the block is a multiple of it
# The error bound is this multiple of the expected error (as the default quantiser rule is,
# about 1.5x): room for the spread of a few-token measurement and of the Gaussian weights.
BOUND_MARGIN = 1.5
_PATTERN = re.compile(r"^([1-9][0-9]*):([1-9][0-9]*)$")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; ``None`` -> ``None``; ``ValueError`` when malformed."""
    if pattern is None:
        return None
    match = _PATTERN.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(f"malformed pattern {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m <= MAX_M:
        raise ValueError(f"pattern {pattern!r} needs 1 <= N < M <= {MAX_M}")
    return n, m


@dataclass(frozen=True)
class PruneOption(Option):
    """``sparsity``: fraction of each block pruned (unstructured); ``pattern``: ``"N:M"`` or
    ``None``; ``block``: columns per block (mask counts, scales, SparseGPT's mask selection);
    ``bits``: 16 keeps float16 values, 2..8 quantises them (``symmetric`` or not)."""

    method: ClassVar[str] = ""
    prefix: ClassVar[str] = ""
    sparsity: float = 0.5
    pattern: str | None = None
    block: int = 64
    bits: int = FLOAT_BITS
    symmetric: bool = False

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def keep(self) -> int:
        """Weights each row keeps of each block."""
        nm = self.nm
        if nm is not None:
            return self.block // nm[1] * nm[0]
        return self.block - round(self.sparsity * self.block)

    @property
    def quantized(self) -> bool:
        return self.bits != FLOAT_BITS

    @property
    def label(self) -> str:
        kind = self.pattern if self.pattern is not None else f"s{self.sparsity * 100:.10g}"
        label = f"{self.prefix}-{kind}-b{self.block}"
        if self.quantized:
            label += f"-int{self.bits}-{'sym' if self.symmetric else 'asym'}"
        return label


@dataclass(frozen=True)
class MagnitudeOption(PruneOption):
    method: ClassVar[str] = "magnitude"
    prefix: ClassVar[str] = "mag"


@dataclass(frozen=True)
class WandaOption(PruneOption):
    method: ClassVar[str] = "wanda"
    prefix: ClassVar[str] = "wanda"


@dataclass(frozen=True)
class SparseGPTOption(PruneOption):
    method: ClassVar[str] = "sparsegpt"
    prefix: ClassVar[str] = "sgpt"


# --- validation ----------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _valid_patterns(cols: int) -> list[str]:
    return [f"{n}:{m}" for m in range(2, MAX_M + 1) if cols % m == 0 for n in range(1, m)]


def check_prune_option(shape: LayerShape, option: PruneOption, layer: str) -> None:
    """Raise :class:`OptionError` naming the layer, the value at fault and what is allowed."""
    name = option.method
    if shape.kind != "linear":
        raise OptionError(f"{layer}: {name} prunes linear layers only, not {shape.kind}")
    if not _is_int(option.bits) or option.bits not in ALLOWED_BITS:
        raise OptionError(
            f"{layer}: {option.bits} bits is not allowed for {name}; "
            f"allowed: {list(ALLOWED_BITS)} (16: float16 values)"
        )
    if not isinstance(option.symmetric, bool) or (option.symmetric and not option.quantized):
        raise OptionError(
            f"{layer}: {name} symmetric={option.symmetric!r} with {option.bits} bits; allowed: "
            "true or false for quantised values (bits 2..8), false for float16 values"
        )
    try:
        nm = option.nm
    except ValueError:
        nm = (0, 0)
    if nm is not None and (nm == (0, 0) or shape.cols % nm[1]):
        raise OptionError(
            f"{layer}: {name} pattern {option.pattern!r} is not allowed for a layer of width "
            f"{shape.cols}; allowed: null (unstructured) or 'N:M' with 1 <= N < M <= {MAX_M} "
            f"and M dividing {shape.cols}: {', '.join(_valid_patterns(shape.cols))}"
        )
    m = nm[1] if nm else 1
    block = option.block
    if not _is_int(block) or block <= 0 or shape.cols % block or block % m:
        good = [b for b in range(m, shape.cols + 1) if shape.cols % b == 0 and b % m == 0]
        raise OptionError(
            f"{layer}: {name} block {block!r} must divide the layer width {shape.cols}"
            + (f" and be a multiple of M={m}" if nm else "")
            + "; allowed: "
            + ", ".join(str(b) for b in good[:12])
            + (", ..." if len(good) > 12 else "")
        )
    sparsity = option.sparsity
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool):
        sparsity = math.nan
    if nm is not None:
        wanted = 1 - nm[0] / nm[1]
        if not abs(sparsity - wanted) < 1e-9:
            raise OptionError(
                f"{layer}: {name} sparsity {option.sparsity!r} does not match pattern "
                f"{option.pattern}; allowed: {wanted:g} (1 - N/M)"
            )
    elif not (0 < sparsity < 1 and round(sparsity * block) < block):
        most = (block - 0.5) / block
        raise OptionError(
            f"{layer}: {name} sparsity {option.sparsity!r} is out of range; allowed: a number "
            f"in (0, 1) that keeps at least one weight of each block of {block}, i.e. below "
            f"{most:g}"
        )


# --- mask selection ------------------------------------------------------------------------


def top_mask(scores: torch.Tensor, group: int, keep: int) -> torch.Tensor:
    """Bool mask ``[rows, cols]`` keeping the ``keep`` highest scores of each row in each run
    of ``group`` columns (ties: the lower column)."""
    rows, cols = scores.shape
    view = scores.reshape(rows, cols // group, group)
    order = torch.argsort(view, dim=-1, descending=True, stable=True)[..., :keep]
    mask = torch.zeros(view.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(-1, order, True).reshape(rows, cols)


def score_mask(scores: torch.Tensor, option: PruneOption) -> torch.Tensor:
    """The kept weights by ``scores`` under the option's pattern."""
    nm = option.nm
    if nm is not None:
        return top_mask(scores, nm[1], nm[0])
    return top_mask(scores, option.block, option.keep)


# --- SparseGPT -----------------------------------------------------------------------------


def shrinkage(hessian: torch.Tensor, tokens: int) -> float:
    """Shrinkage intensity ``rho`` in [0, 1] of a sample second-moment matrix towards a multiple
    of the identity, from ``tokens`` samples: the Rao-Blackwellised Ledoit-Wolf estimate for
    Gaussian samples (Chen, Wiesel, Eldar & Hero, 2010), with ``S`` the matrix, ``d`` its size,
    ``n`` the samples::

        rho = ((n - 2) / n * tr(S^2) + tr(S)^2) / ((n + 2) * (tr(S^2) - tr(S)^2 / d))

    Near 1 when the samples are few or the inputs nearly isotropic (the matrix then says little
    beyond its mean diagonal); near 0 with many samples of strongly correlated inputs. The
    scale of ``S`` does not matter.
    """
    cols = hessian.shape[0]
    if tokens <= 2:
        return 1.0
    t1 = float(hessian.diagonal().sum())
    t2 = float(hessian.pow(2).sum())
    spread = t2 - t1 * t1 / cols
    if spread <= 0:
        return 1.0
    rho = ((tokens - 2) / tokens * t2 + t1 * t1) / ((tokens + 2) * spread)
    return min(max(rho, 0.0), 1.0)


def shrink_hessian(hessian: torch.Tensor, tokens: int) -> torch.Tensor:
    """``(1 - rho) H + rho * mean(diag H) * I`` with ``rho`` = :func:`shrinkage` (a new tensor).

    SparseGPT fits the kept weights to the calibration inputs through ``H``: with fewer tokens
    than inputs, or barely more, it overfits them and does worse than magnitude pruning on new
    inputs (on Gaussian inputs, 90 tokens and 384 inputs: relative error 0.44 against 0.28).
    Shrinking ``H`` by the estimated intensity removes that: ``rho = 1`` is magnitude pruning.
    """
    rho = shrinkage(hessian, tokens)
    dead = hessian.diagonal() == 0
    shrunk = hessian * (1.0 - rho)
    shrunk.diagonal().add_(rho * hessian.diagonal().mean())
    shrunk.diagonal()[dead] = 0.0  # dead inputs stay dead (the sweep zeroes their weights)
    return shrunk


@dataclass
class SweepResult:
    """What the SparseGPT sweep stores: the mask, the kept values (float, or unsigned codes)
    ``[rows, kept]``, and the scales and offsets of quantised values."""

    mask: torch.Tensor
    values: torch.Tensor
    scales: torch.Tensor | None
    offsets: torch.Tensor | None


def _lazy_block(option: PruneOption) -> int:
    m = option.nm[1] if option.nm else 1
    return LAZY if option.block % LAZY == 0 and LAZY % m == 0 else option.block


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    option: PruneOption,
    damp: float = DAMP,
    label: str = "sparsegpt",
) -> SweepResult:
    """Prune (and quantise) ``weight`` ``[rows, cols]`` for the calibration Hessian ``hessian``
    ``[cols, cols]`` by the SparseGPT sweep. Neither argument is modified.

    Unstructured masks are chosen per block when the sweep reaches it; N:M kept sets per
    M-group when the sweep reaches the group. Quantised values: the block's scales are fitted
    when the sweep reaches the block, on the kept values as a pass over the block that only
    prunes leaves them (for N:M with the kept sets that pass chooses; should the sweep then
    keep another value of a group, its code is clamped to the range).
    """
    rows, cols = weight.shape
    dtype = work_dtype(weight.device)
    w = weight.to(dtype).clone()
    h = hessian.to(dtype=dtype, device=weight.device).clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    upper = inverse_hessian_factor(h, damp, label)
    del h
    sweep = _Sweep(option, rows, cols, upper, w.device)
    lazy = _lazy_block(option)
    for start in range(0, cols, lazy):
        end = start + lazy
        if start % option.block == 0:
            sweep.enter_block(start, w[:, start : start + option.block])
        w1 = w[:, start:end].clone()
        u1 = upper[start:end, start:end]
        err = torch.empty_like(w1)
        for i in range(end - start):
            e = sweep.column(start + i, w1[:, i : i + sweep.group_width]) / u1[i, i]
            err[:, i] = e
            w1[:, i + 1 :] -= e[:, None] * u1[i, i + 1 :][None, :]
        if end < cols:
            w[:, end:] -= err @ upper[start:end, end:]
    return sweep.result()


class _Sweep:
    """The state of a SparseGPT sweep: the mask, what is stored of each column, the scales."""

    def __init__(
        self, option: PruneOption, rows: int, cols: int, upper: torch.Tensor, device: torch.device
    ) -> None:
        self.option, self.rows, self.nm = option, rows, option.nm
        self.dtype = upper.dtype
        self.upper = upper
        self.diag2 = upper.diagonal() ** 2  # [H^-1]_jj over the columns from j on
        self.group_width = self.nm[1] if self.nm else 1
        self.mask = torch.zeros(rows, cols, dtype=torch.bool, device=device)
        stored = torch.uint8 if option.quantized else torch.float16
        self.stored = torch.zeros(rows, cols, dtype=stored, device=device)
        self.scales = self.offsets = None
        if option.quantized:
            n_blocks = cols // option.block
            self.scales = torch.empty(rows, n_blocks, dtype=torch.float16, device=device)
            self.offsets = None if option.symmetric else torch.empty_like(self.scales)

    def enter_block(self, start: int, current: torch.Tensor) -> None:
        """Choose the block's mask by OBS saliency (unstructured) and, for quantised values,
        fit its scales; ``current``: the block's weights as the sweep reaches it."""
        option = self.option
        if self.nm is not None and not option.quantized:
            return  # N:M kept sets are chosen group by group
        span = slice(start, start + current.shape[1])
        mask = None if self.nm else score_mask(current**2 / self.diag2[span], option)
        if option.quantized:
            current, mask = self._pruned_only(span, current, mask)
            kept = current[mask].reshape(self.rows, 1, option.keep)
            scales, offsets = affine.fit_scales(kept, option.bits, option.symmetric)
            self.scales[:, start // option.block] = scales[:, 0]
            if self.offsets is not None:
                self.offsets[:, start // option.block] = offsets[:, 0]
        self.mask[:, span] = mask

    def _pruned_only(
        self, span: slice, current: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's weights and mask after a pass over the block that prunes only (N:M
        sets chosen group by group when ``mask`` is ``None``). Scales fitted on the values at
        the block's start clamp many of the later ones, which the pruning errors of the
        block's first columns move (22% of 4-bit codes at the ends of the range, against 11%
        after this pass); fitted on these, the joint sweep beats pruning then rounding."""
        w1 = current.clone()
        u1 = self.upper[span, span]
        n, m = self.nm or (0, 0)
        if mask is None:
            mask = torch.zeros(w1.shape, dtype=torch.bool, device=w1.device)
        for i in range(w1.shape[1]):
            if self.nm is not None and i % m == 0:
                saliency = w1[:, i : i + m] ** 2 / self.diag2[span][i : i + m]
                mask[:, i : i + m] = top_mask(saliency, m, n)
            column = w1[:, i]
            e = torch.where(mask[:, i], torch.zeros_like(column), column) / u1[i, i]
            w1[:, i + 1 :] -= e[:, None] * u1[i, i + 1 :][None, :]
        return w1, mask

    def column(self, j: int, ahead: torch.Tensor) -> torch.Tensor:
        """Settle column ``j`` (``ahead``: its current weights and, for N:M, those of the rest
        of its group); the error ``w - q`` it leaves."""
        if self.nm is not None and j % self.nm[1] == 0:
            n, m = self.nm
            saliency = ahead**2 / self.diag2[j : j + m]
            self.mask[:, j : j + m] = top_mask(saliency, m, n)
        column = ahead[:, 0]
        if self.option.quantized:
            b = j // self.option.block
            offset = None if self.offsets is None else self.offsets[:, b].to(self.dtype)
            scale = self.scales[:, b].to(self.dtype)
            codes, values = quantize_column(column, scale, offset, self.option.bits)
            self.stored[:, j] = codes.to(torch.uint8)
        else:
            self.stored[:, j] = column.to(torch.float16)
            values = self.stored[:, j].to(self.dtype)
        return column - torch.where(self.mask[:, j], values, torch.zeros_like(values))

    def result(self) -> SweepResult:
        kept = self.stored[self.mask].reshape(self.rows, -1)
        return SweepResult(self.mask, kept, self.scales, self.offsets)


# --- observers -----------------------------------------------------------------------------


# --- error bound ---------------------------------------------------------------------------


@cache
def pruned_energy(group: int, pruned: int) -> float:
    """Expected fraction of the energy ``sum w^2`` of ``group`` i.i.d. standard Gaussians held
    by the ``pruned`` smallest in magnitude.

    The densities of the 1st..p-th order statistics of ``|w|`` (density ``f = 2 phi``, cdf
    ``F = 2 Phi - 1``) sum to ``group * f(x) * P(Binomial(group - 1, F(x)) <= p - 1)``, so the
    fraction is ``int_0^inf x^2 f(x) P(Binomial(group - 1, F(x)) <= p - 1) dx``. For large
    groups it tends to ``(2 Phi(t) - 1) - 2 t phi(t)``, ``t`` the ``p / group`` quantile of
    ``|w|`` (0.0713 at 50%); half of a block of 64 holds 0.0755, 2 of 4 hold 0.1324 and 4 of 8
    hold 0.1033: N:M removes more than unstructured pruning of the same sparsity.
    """

    def integrand(x: float) -> float:
        below = stats.binom.cdf(pruned - 1, group - 1, 2.0 * stats.norm.cdf(x) - 1.0)
        return x * x * 2.0 * stats.norm.pdf(x) * below

    return float(integrate.quad(integrand, 0.0, math.inf)[0])


def prune_error_bound(option: PruneOption) -> float:
    """Bound on the relative output error for i.i.d. Gaussian weights and inputs.

    With inputs of identity covariance the output error's energy is the removed and perturbed
    weights' energy. Pruning removes the fraction :func:`pruned_energy` (over each M-group for
    N:M, each block otherwise); the expected relative error is its square root. Quantised kept
    values add, in quadrature, the default rule of a uniform quantiser (``3 * 2**-bits``, itself
    about 1.5x the expected error) over the kept fraction of the weights, whose range is the
    whole block's. Magnitude pruning is the best mask for such inputs; Wanda's and SparseGPT's
    scores reduce to it in expectation. The pruning part is taken with :data:`BOUND_MARGIN`.
    """
    nm = option.nm
    group, kept = (nm[1], nm[0]) if nm is not None else (option.block, option.keep)
    removed = pruned_energy(group, group - kept)
    quant = 3.0 * 2.0**-option.bits * math.sqrt(kept / group)
    return max(math.sqrt((BOUND_MARGIN**2) * removed + quant**2), 0.01)


# --- the methods ---------------------------------------------------------------------------

# (pattern, bits) offered by default, each with its block (64 where it divides the width)
GRID = ((None, FLOAT_BITS), ("2:4", FLOAT_BITS), (None, 4), ("2:4", 4))
SPARSEGPT_GRID = (*GRID, ("4:8", FLOAT_BITS))


def grid_block(cols: int, multiple: int) -> int | None:
    """64 if it divides ``cols``, else the divisor of ``cols`` in [8, 128] nearest to 64 that
    is a multiple of ``multiple``; ``None`` when there is none."""
    good = [b for b in range(8, 129) if cols % b == 0 and b % multiple == 0]
    return min(good, key=lambda b: (abs(b - 64), b)) if good else None


class PruningMethod(Method):
    """What the three pruning methods share: options, checks, costs, grid and storage."""

    grid_entries: ClassVar[tuple[tuple[str | None, int], ...]] = GRID

    def supports(self, shape: LayerShape) -> bool:
        return shape.kind == "linear"

    def check(self, shape: LayerShape, option: Option, layer: str = "layer") -> None:
        assert isinstance(option, self.option_type)
        check_prune_option(shape, option, layer)

    def cost(self, shape: LayerShape, option: Option) -> Cost:
        assert isinstance(option, PruneOption)
        weight = sparse_weight_bytes(
            shape.rows,
            shape.cols,
            option.keep,
            option.block,
            option.nm,
            option.bits,
            option.symmetric,
        )
        return Cost(weight, shape.bias_bytes, 2 * shape.rows * shape.cols)

    def grid(self, shape: LayerShape) -> list[Option]:
        if shape.kind != "linear":
            return []
        options = []
        for pattern, bits in self.grid_entries:
            nm = parse_pattern(pattern)
            m = nm[1] if nm else 1
            block = grid_block(shape.cols, m)
            if block is None or shape.cols % m:
                continue
            sparsity = 1 - nm[0] / nm[1] if nm else 0.5
            options.append(self.option_type(sparsity, pattern, block, bits))
        return options

    def error_bound(self, shape: LayerShape, option: Option) -> float:
        assert isinstance(option, PruneOption)
        return prune_error_bound(option)

    def runtime_format(self, shape: LayerShape, option: Option) -> str:
        return "dequantize"

    def empty(self, shape: LayerShape, option: Option, like: nn.Module | None = None) -> nn.Module:
        assert isinstance(option, PruneOption)
        if shape.kind != "linear":
            raise OptionError(f"{option.label}: {self.name} prunes linear layers only")
        return SparseLinear(
            shape.cols,
            shape.rows,
            option.keep,
            option.block,
            option.nm,
            option.bits,
            option.symmetric,
            bias=shape.has_bias,
            bias_dtype=dtype_from_name(shape.dtype),
            device=like.weight.device if like is not None else None,
        )

    def _prepare(self, module: nn.Module, option: Option) -> tuple[LayerShape, torch.Tensor]:
        """Checks shared by every conversion: the option, and a finite weight."""
        assert isinstance(option, PruneOption)
        shape = LayerShape.of(module)
        self.check(shape, option)
        weight = finite_weight(module, option.label)
        return shape, weight

    def _finish(self, module: nn.Module, out: SparseLinear) -> SparseLinear:
        if out.bias is not None:
            out.bias.copy_(module.bias.detach())
        return out

    def _calibration(
        self, module: nn.Module, option: Option, observer: Observer | None, kind: type
    ) -> Any:
        """The observer, checked: of the right kind, fed, and of the layer's width."""
        assert isinstance(option, PruneOption)
        if not isinstance(observer, kind) or observer.tokens == 0:
            raise OptionError(
                f"{option.label} needs calibration: a {kind.__name__} that saw the layer's "
                "inputs (none was given)"
                if observer is None
                else f"{option.label} needs calibration: the observer given saw no inputs"
            )
        cols = LayerShape.of(module).cols
        if observer.cols != cols:
            raise OptionError(
                f"{option.label}: the observer saw inputs of width {observer.cols}, "
                f"the layer takes {cols}"
            )
        return observer


class Magnitude(PruningMethod):
    name: ClassVar[str] = "magnitude"
    version: ClassVar[str] = "1"
    option_type: ClassVar[type[Option]] = MagnitudeOption

    @torch.no_grad()
    def convert(
        self, module: nn.Module, option: Option, observer: Observer | None = None
    ) -> nn.Module:
        shape, weight = self._prepare(module, option)
        out = self.empty(shape, option, like=module)
        out.load_pruned(score_mask(weight.abs(), option), weight)
        return self._finish(module, out)


class Wanda(PruningMethod):
    name: ClassVar[str] = "wanda"
    version: ClassVar[str] = "1"
    option_type: ClassVar[type[Option]] = WandaOption

    def needs_calibration(self, option: Option) -> bool:
        return True

    def observer(self, module: nn.Module, option: Option) -> Observer | None:
        """The layer's channel-norm observer, shared with every option that asks for one
        before calibration runs."""
        cols = LayerShape.of(module).cols
        return SHARED.get(module, ChannelObserver, lambda: ChannelObserver(cols))

    @torch.no_grad()
    def convert(
        self, module: nn.Module, option: Option, observer: Observer | None = None
    ) -> nn.Module:
        shape, weight = self._prepare(module, option)
        observer = self._calibration(module, option, observer, ChannelObserver)
        norms = observer.norms().to(weight.device)
        if not torch.isfinite(norms).all():
            raise OptionError(f"{option.label}: the calibration inputs hold NaN or inf values")
        scores = weight.double().abs() * norms[None, :]
        out = self.empty(shape, option, like=module)
        out.load_pruned(score_mask(scores, option), weight)
        return self._finish(module, out)


class SparseGPT(PruningMethod):
    name: ClassVar[str] = "sparsegpt"
    version: ClassVar[str] = "1"
    option_type: ClassVar[type[Option]] = SparseGPTOption
    grid_entries = SPARSEGPT_GRID

    def needs_calibration(self, option: Option) -> bool:
        return True

    def observer(self, module: nn.Module, option: Option) -> Observer | None:
        """The layer's Hessian observer, shared with every option (GPTQ, whitened SVD...)
        that asks for one before calibration runs."""
        cols = LayerShape.of(module).cols
        return SHARED.get(module, HessianObserver, lambda: HessianObserver(cols))

    @torch.no_grad()
    def convert(
        self, module: nn.Module, option: Option, observer: Observer | None = None
    ) -> nn.Module:
        shape, weight = self._prepare(module, option)
        observer = self._calibration(module, option, observer, HessianObserver)
        hessian = observer.hessian(work_dtype(weight.device))
        if not torch.isfinite(hessian).all():
            raise OptionError(f"{option.label}: the calibration inputs hold NaN or inf values")
        hessian = shrink_hessian(hessian, observer.tokens)
        result = sparsegpt_prune(weight, hessian, option, label=option.label)
        out = self.empty(shape, option, like=module)
        out.store(result.mask, result.values, result.scales, result.offsets)
        return self._finish(module, out)


register(Magnitude())
register(Wanda())
register(SparseGPT())
