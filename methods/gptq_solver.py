"""The GPTQ column sweep, for one option or for many options of one layer at once.

GPTQ quantises the columns of a linear layer one at a time and, after each, spreads the
rounding error over the columns not yet quantised, through the upper Cholesky factor ``U`` of
the inverse Hessian ``(2 X^T X / n + d I)^-1``: quantising column ``j`` to ``q`` updates the
later columns by ``-(w_j - q) / U_jj * U_j,j+1:``. Updates are applied lazily, one block of
columns at a time (one matrix product per block instead of a rank-one update per column).

The factor depends on the layer's Hessian and the dampening only, and with static groups
(scales fitted before the sweep, as activation order needs) every row's sweep is independent
of every other row's. So the options of a layer that share a dampening are factored once and
swept together: their weights are stacked row-wise, each row with its option's scales, offsets
and code range, and one pass over the columns quantises them all. Each option gets the codes
it gets alone; the stack only removes the per-column overhead that dominates small layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from methods import affine
from methods.errors import OptionError
from methods.owned_cache import OwnedCache

if TYPE_CHECKING:
    from methods.gptq import GPTQOption

# Columns per lazy-update block. Small: on the CPU the rank-one updates of a block then stay
# under torch's parallel grain for layers of a few hundred rows, whose thread wake-ups cost
# far more than the arithmetic on a busy machine (8 s against 0.15 s for 384 x 1536).
BLOCK = 32
_MAX_DAMP_RETRIES = 4
# Rows of one stacked sweep (summed over its options): each column's update then touches a
# block that stays in the CPU's cache (3072 rows beat 1536 and 6144 by 20% on the demo's
# layers). And at most this many weights, each with its work copy, code, column scale and
# offset in the work dtype: a few hundred MB at most.
STACK_ROWS = 3072
STACK_ELEMENTS = 1 << 24
# Stacked rows up to which a CPU sweep runs in numpy (one thread, a microsecond per call)
# rather than torch (several per call, two threads that pay on wider stacks)
NUMPY_ROWS = 1536


class Quantized(NamedTuple):
    """Codes ``[rows, cols]`` (uint8, original column order), float16 scales and offsets
    ``[rows, groups]`` (offsets ``None`` when symmetric)."""

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None


def work_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the Cholesky solvers built on this one (pruning, low rank)."""
    return torch.float32 if device.type == "cuda" else torch.float64


# GPTQ's own factor and sweep: float32 on every device, as GPTQ's reference implementation
# (float64 took 1.3-2x the time of a factor and a sweep of the demo's layers on the CPU)
GPTQ_DTYPE = torch.float32


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, label: str) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + d I)^-1`` (``U^T U = (H + d I)^-1``), raising ``d``
    while the factorisation fails. With ``J`` the reversal of the columns, the lower factor of
    ``J (H + d I) J = L L^T`` gives ``U = J L^-1 J``: one factorisation and one triangular
    inverse, where inverting and factoring the inverse again took 1.4-1.7x the time (384 and
    1536 columns on a 2-core CPU; ``benchmarks/gptq_sweep.py``)."""
    mean_diag = float(hessian.diagonal().mean())
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    reversed_hessian = hessian.flip(0, 1)
    damps = [damp] + [max(damp, 0.01) * 10.0**k for k in range(1, _MAX_DAMP_RETRIES)]
    for fraction in damps:
        lower, info = torch.linalg.cholesky_ex(reversed_hessian + (fraction * mean_diag) * eye)
        if int(info) != 0:
            continue
        upper = torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
        if torch.isfinite(upper).all() and bool((upper.diagonal() > 0).all()):
            return upper
    raise OptionError(
        f"{label}: the calibration Hessian is not positive definite even with "
        f"dampening {damps[-1]:g}; use more (or more varied) calibration data"
    )


def quantize_column(
    w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of one column (per-row scales and offsets) and the values they decode to."""
    top = affine.levels(bits) - 1
    if offset is None:
        half = affine.levels(bits) // 2
        codes = (torch.round(w / scale) + half).clamp_(0, top)
        return codes, (codes - half) * scale
    codes = torch.round((w - offset) / scale).clamp_(0, top)
    return codes, codes * scale + offset


@dataclass
class Factored:
    """A layer made ready for sweeps: ``weight`` in the work dtype with dead inputs (never
    non-zero in calibration) zeroed, in the original column order; ``perm`` the sweep order of
    the columns; ``upper`` the inverse Hessian's upper factor in that order."""

    weight: torch.Tensor
    perm: torch.Tensor
    upper: torch.Tensor


def factor(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    damp: float,
    act_order: bool,
    label: str,
    dtype: torch.dtype | None = None,
) -> Factored:
    """The layer's factor for dampening ``damp`` in ``dtype`` (default :func:`work_dtype`);
    with ``act_order`` the columns are swept by decreasing Hessian diagonal. Neither argument
    is modified."""
    dtype = dtype or work_dtype(weight.device)
    w = weight.to(dtype).clone()
    h = hessian.to(dtype=dtype, device=weight.device).clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.arange(w.shape[1], device=w.device)
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        h = h[perm][:, perm]
    return Factored(w, perm, inverse_hessian_factor(h, damp, label))


FactorOf = Callable[[float, bool], Factored]  # the factor for a dampening and activation order


class FactorCache(OwnedCache[Factored]):
    """Factors kept per owner (a layer's calibration observer) and key, least recently used
    out first within a byte cap, so that options of a layer converted at different times (a
    probe first, then the options scoring measures, round after round) share one
    factorisation. An owner's entries go when it is collected."""

    def __init__(self, cap_bytes: int) -> None:
        super().__init__(cap_bytes, _factored_bytes)


def _factored_bytes(factored: Factored) -> int:
    return sum(
        t.element_size() * t.numel() for t in (factored.weight, factored.perm, factored.upper)
    )


# every GPTQ conversion's factors: the demo's 36 linear layers need about 240 MB
FACTORS = FactorCache(cap_bytes=512 << 20)


def has_static_groups(option: GPTQOption, cols: int) -> bool:
    """Whether the option's scales are fitted before the sweep: with activation order, or when
    one group spans the row."""
    return option.act_order or (option.group_size or cols) == cols


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    option: GPTQOption,
    label: str = "gptq",
    factor_of: FactorOf | None = None,
) -> Quantized:
    """``weight`` (``[rows, cols]``) quantised by GPTQ for the calibration Hessian
    ``hessian`` (``[cols, cols]``); ``factor_of`` gives their factor where it is kept
    (default: factored here). Neither argument is modified."""
    factored = (factor_of or _factoring(weight, hessian, label))(option.damp, option.act_order)
    if has_static_groups(option, weight.shape[1]):
        return sweep_static(factored, [option])[0]
    return _sweep_dynamic(factored, option)


def _factoring(weight: torch.Tensor, hessian: torch.Tensor, label: str) -> FactorOf:
    return lambda damp, act_order: factor(weight, hessian, damp, act_order, label, GPTQ_DTYPE)


def gptq_quantize_many(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    options: Sequence[GPTQOption],
    label: str = "gptq",
    factor_of: FactorOf | None = None,
) -> Iterator[Quantized]:
    """What :func:`gptq_quantize` gives for each option, in order: one factor per dampening
    and activation order, and options with static groups swept in stacks of at most
    :data:`STACK_ROWS` rows and :data:`STACK_ELEMENTS` weights."""
    rows, cols = weight.shape
    factors: dict[tuple[float, bool], Factored] = {}
    make = factor_of or _factoring(weight, hessian, label)

    def factored(option: GPTQOption) -> Factored:
        key = (option.damp, option.act_order)
        if key not in factors:
            factors[key] = make(option.damp, option.act_order)
        return factors[key]

    per_stack = max(1, min(STACK_ROWS // rows, STACK_ELEMENTS // (rows * cols)))
    stack: list[GPTQOption] = []

    def flush() -> Iterator[Quantized]:
        if stack:
            yield from sweep_static(factored(stack[0]), stack)
            stack.clear()

    for option in options:
        if not has_static_groups(option, cols):
            yield from flush()
            yield _sweep_dynamic(factored(option), option)
            continue
        if stack and (
            (stack[0].damp, stack[0].act_order) != (option.damp, option.act_order)
            or len(stack) == per_stack
        ):
            yield from flush()
        stack.append(option)
    yield from flush()


def sweep_static(factored: Factored, options: Sequence[GPTQOption]) -> list[Quantized]:
    """One sweep over the columns for ``options`` (static groups, one factor), their rows
    stacked: each row has its option's column scales, offsets (zero when symmetric), code
    offset (``half`` when symmetric, else 0) and largest code."""
    w, perm, upper = factored.weight, factored.perm, factored.upper
    rows, cols = w.shape
    dtype = w.dtype
    fitted = []
    col_scale, col_offset, half, top = [], [], [], []
    for option in options:
        group = option.group_size or cols
        scales, offsets = affine.fit_scales(
            affine.group_view(w, group), option.bits, option.symmetric
        )
        fitted.append((scales, offsets))
        group_of = perm // group
        col_scale.append(scales[:, group_of])
        col_offset.append(
            torch.zeros_like(col_scale[-1]) if offsets is None else offsets[:, group_of]
        )
        levels = affine.levels(option.bits)
        half.append(torch.full((rows,), levels // 2 if option.symmetric else 0, dtype=dtype))
        top.append(torch.full((rows,), levels - 1, dtype=dtype))
    # column-major: a column of every stacked row is one contiguous row of these
    steps = _Steps(
        scales=torch.cat(col_scale).t().to(dtype).contiguous(),
        offsets=torch.cat(col_offset).t().to(dtype).contiguous(),
        half=torch.cat(half).to(w.device),
        top=torch.cat(top).to(w.device),
    )
    work = w[:, perm].repeat(len(options), 1).t().contiguous()
    codes = torch.empty_like(work)  # whole codes, in the work dtype until the end
    narrow = w.device.type == "cpu" and steps.half.shape[0] <= NUMPY_ROWS
    sweep_block = _sweep_block_numpy if narrow else _sweep_block_torch
    for start in range(0, cols, BLOCK):
        end = min(start + BLOCK, cols)
        block = work[start:end].clone()
        err = torch.empty_like(block)
        sweep_block(block, err, codes[start:end], upper[start:end, start:end], steps, start)
        if end < cols:
            work[end:] -= upper[start:end, end:].t() @ err
    codes = codes.t().to(torch.uint8)
    original = torch.empty_like(codes)
    original[:, perm] = codes
    return [
        Quantized(original[k * rows : (k + 1) * rows], scales, offsets)
        for k, (scales, offsets) in enumerate(fitted)
    ]


@dataclass
class _Steps:
    """Per column (rows of ``scales`` and ``offsets``) and per stacked row (``half``, the code
    offset, and ``top``, the largest code): how a static-group sweep quantises."""

    scales: torch.Tensor
    offsets: torch.Tensor
    half: torch.Tensor
    top: torch.Tensor


def _sweep_block_torch(
    block: torch.Tensor,
    err: torch.Tensor,
    codes: torch.Tensor,
    upper: torch.Tensor,
    steps: _Steps,
    first: int,
) -> None:
    """Quantise the columns of ``block`` (rows: columns ``first``, ``first + 1``, ... of
    the layer) in turn into ``codes``, spreading each one's scaled error (kept in ``err``)
    over the block's later columns through the block's factor ``upper``."""
    floor, decoded = torch.zeros_like(steps.top), torch.empty_like(steps.half)
    diagonal = upper.diagonal().tolist()
    for i in range(block.shape[0]):
        s, m = steps.scales[first + i], steps.offsets[first + i]
        column, q, e = block[i], codes[i], err[i]
        torch.sub(column, m, out=q).div_(s).round_().add_(steps.half).clamp_(floor, steps.top)
        torch.sub(q, steps.half, out=decoded).mul_(s).add_(m)
        torch.sub(column, decoded, out=e).div_(diagonal[i])
        block[i + 1 :].sub_(torch.outer(upper[i, i + 1 :], e))


def _sweep_block_numpy(
    block: torch.Tensor,
    err: torch.Tensor,
    codes: torch.Tensor,
    upper: torch.Tensor,
    steps: _Steps,
    first: int,
) -> None:
    """:func:`_sweep_block_torch` on the CPU, the same arithmetic in the same order (so the
    same codes) through numpy views of the tensors: a numpy call on a few hundred values
    costs about a microsecond against several for torch, and those calls are most of a
    small layer's sweep (one 384 x 384 option in 0.67x the torch path's time;
    benchmarks/gptq_sweep.py)."""
    b, e_all, q_all, u = block.numpy(), err.numpy(), codes.numpy(), upper.numpy()
    scales, offsets = steps.scales.numpy(), steps.offsets.numpy()
    half, top = steps.half.numpy(), steps.top.numpy()
    decoded = np.empty_like(half)
    for i in range(b.shape[0]):
        s, m = scales[first + i], offsets[first + i]
        column, q, e = b[i], q_all[i], e_all[i]
        np.subtract(column, m, out=q)
        np.divide(q, s, out=q)
        np.round(q, out=q)
        np.add(q, half, out=q)
        np.clip(q, 0.0, top, out=q)
        np.subtract(q, half, out=decoded)
        np.multiply(decoded, s, out=decoded)
        np.add(decoded, m, out=decoded)
        np.subtract(column, decoded, out=e)
        np.divide(e, u[i, i], out=e)
        b[i + 1 :] -= np.outer(u[i, i + 1 :], e)


def _sweep_dynamic(factored: Factored, option: GPTQOption) -> Quantized:
    """The sweep of an option whose group scales are fitted when the sweep reaches each group,
    on the weights as updated so far (no activation order: ``perm`` is the identity)."""
    w, upper = factored.weight.clone(), factored.upper
    rows, cols = w.shape
    dtype = w.dtype
    group = option.group_size or cols
    scales = torch.empty(rows, cols // group, dtype=torch.float16, device=w.device)
    offsets = None if option.symmetric else torch.empty_like(scales)
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=w.device)
    # a group fitted during the sweep starts a block or lies within one
    block = BLOCK if group % BLOCK == 0 or BLOCK % group == 0 else group
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w1 = w[:, start:end].clone()
        err = torch.empty_like(w1)
        u1 = upper[start:end, start:end]
        for i in range(end - start):
            j = start + i
            g = j // group
            if j % group == 0:  # fit the group on its current (updated) weights
                current = w1[:, i : i + group] if j + group <= end else w[:, j : j + group]
                s16, m16 = affine.fit_scales(current.unsqueeze(1), option.bits, option.symmetric)
                scales[:, g] = s16[:, 0]
                if offsets is not None:
                    offsets[:, g] = m16[:, 0]
            s = scales[:, g].to(dtype)
            m = None if offsets is None else offsets[:, g].to(dtype)
            column = w1[:, i]
            q_codes, q_values = quantize_column(column, s, m, option.bits)
            codes[:, j] = q_codes.to(torch.uint8)
            e = (column - q_values) / u1[i, i]
            err[:, i] = e
            w1[:, i + 1 :] -= e[:, None] * u1[i, i + 1 :][None, :]
        if end < cols:
            w[:, end:] -= err @ upper[start:end, end:]
    return Quantized(codes, scales, offsets)
