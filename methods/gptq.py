"""GPTQ weight quantisation (Frantar et al., 2022), stored in RTN's integer format.

RTN rounds each weight on its own. GPTQ quantises the columns of a linear layer one at a time
and, after each, spreads the rounding error over the columns not yet quantised so that the
layer's output on calibration inputs ``X`` changes as little as possible: it minimises
``||X W^T - X Q^T||^2`` through the Hessian ``H = 2 X^T X / n`` of that loss. With
``U = chol(H^-1)`` (upper), quantising column ``j`` to ``q`` updates the later columns by
``-(w_j - q) / U_jj * U_j,j+1:``. Updates are applied lazily, one block of columns at a time
(one matrix product per block instead of a rank-one update per column).

* Dampening: ``damp * mean(diag H)`` is added to the diagonal (more if Cholesky fails).
* Dead inputs (never non-zero in calibration): their diagonal is set to 1 and their weight
  column to 0.
* Activation order (``act_order``): columns are processed by decreasing ``diag H``. Scales are
  then fitted per group of *original* columns before the sweep ("static groups"), and codes
  are stored in the original column order, so the storage is RTN's: ``QuantizedLinear`` with
  the same codes, scales and offsets layout, the same bytes and the same kernels. Without
  ``act_order`` a group's scale is fitted when the sweep reaches it, on the updated weights.

Observers: every option of a layer asked for before calibration runs shares one Hessian
observer (one ``cols x cols`` matrix per layer, not per option; see methods/observers.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from methods import affine
from methods.base import Cost, LayerShape, Method, Observer, Option, finite_weight
from methods.errors import OptionError
from methods.observers import SHARED, HessianObserver
from methods.registry import get_method, register
from methods.rtn import QuantOption, check_quant_option, quant_cost

# As RTN's grid without 8 bits (GPTQ gains little there): 4-bit per row and in groups, 3- and
# 2-bit in groups; always with activation order, which costs nothing in storage.
GRID = {4: (None, 128, 64, 32), 3: (128, 64, 32), 2: (64, 32)}
# Columns per lazy-update block. Small: on the CPU the rank-one updates of a block then stay
# under torch's parallel grain for layers of a few hundred rows, whose thread wake-ups cost
# far more than the arithmetic on a busy machine (8 s against 0.15 s for 384 x 1536).
BLOCK = 32
_MAX_DAMP_RETRIES = 4


@dataclass(frozen=True)
class GPTQOption(Option):
    """``bits``-bit codes in RTN's format, fitted by GPTQ; ``damp`` is the fraction of the mean
    Hessian diagonal added to its diagonal."""

    method: ClassVar[str] = "gptq"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    act_order: bool = True
    damp: float = 0.01

    @property
    def label(self) -> str:
        group = "ch" if self.group_size is None else f"g{self.group_size}"
        label = f"gptq{self.bits}-{group}-{'sym' if self.symmetric else 'asym'}"
        if self.damp != 0.01:
            label += f"-d{self.damp:g}"
        return label + ("-ao" if self.act_order else "")

    def storage(self) -> QuantOption:
        """The RTN option with the same stored format."""
        return QuantOption(self.bits, self.group_size, self.symmetric)


def work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cuda" else torch.float64


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, label: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + d I)^-1``, raising ``d`` while the factorisation fails."""
    mean_diag = float(hessian.diagonal().mean())
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damps = [damp] + [max(damp, 0.01) * 10.0**k for k in range(1, _MAX_DAMP_RETRIES)]
    for fraction in damps:
        lower, info = torch.linalg.cholesky_ex(hessian + (fraction * mean_diag) * eye)
        if int(info) != 0:
            continue
        # cholesky_solve against the identity: the inverse, as cholesky_inverse gives it, but
        # 40x faster on a busy 2-core CPU at 1536 columns
        inverse = torch.cholesky_solve(eye, lower)
        upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
        if int(info) == 0 and torch.isfinite(upper.diagonal()).all():
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


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, option: GPTQOption, label: str = "gptq"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes ``[rows, cols]`` (uint8, original column order), float16 scales and offsets of
    ``weight`` (``[rows, cols]``) for the calibration Hessian ``hessian`` (``[cols, cols]``).
    Neither argument is modified."""
    rows, cols = weight.shape
    dtype = work_dtype(weight.device)
    w = weight.to(dtype).clone()
    h = hessian.to(dtype=dtype, device=weight.device).clone()
    group = option.group_size or cols
    n_groups = cols // group

    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0

    static = option.act_order or n_groups == 1
    if static:  # fitted on the original (dead-zeroed) weights, per group of original columns
        scales, offsets = affine.fit_scales(
            affine.group_view(w, group), option.bits, option.symmetric
        )
    else:
        scales = torch.empty(rows, n_groups, dtype=torch.float16, device=w.device)
        offsets = None if option.symmetric else torch.empty_like(scales)

    perm = torch.arange(cols, device=w.device)
    if option.act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    upper = inverse_hessian_factor(h, option.damp, label)
    del h

    group_of = perm // group  # group of each (permuted) column
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=w.device)
    # a group fitted during the sweep starts a block or lies within one
    block = BLOCK if static or group % BLOCK == 0 or BLOCK % group == 0 else group
    col_scale = col_offset = None
    if static:
        col_scale = scales.to(dtype)[:, group_of]
        col_offset = None if offsets is None else offsets.to(dtype)[:, group_of]

    for start in range(0, cols, block):
        end = min(start + block, cols)
        w1 = w[:, start:end].clone()
        err = torch.empty_like(w1)
        u1 = upper[start:end, start:end]
        for i in range(end - start):
            j = start + i
            if static:
                s = col_scale[:, j]
                m = None if col_offset is None else col_offset[:, j]
            else:
                g = j // group
                if j % group == 0:  # fit the group on its current (updated) weights
                    current = w1[:, i : i + group] if j + group <= end else w[:, j : j + group]
                    s16, m16 = affine.fit_scales(
                        current.unsqueeze(1), option.bits, option.symmetric
                    )
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

    if option.act_order:
        original = torch.empty_like(codes)
        original[:, perm] = codes
        codes = original
    return codes, scales, offsets


class GPTQ(Method):
    name: ClassVar[str] = "gptq"
    version: ClassVar[str] = "1"
    option_type: ClassVar[type[Option]] = GPTQOption

    def supports(self, shape: LayerShape) -> bool:
        return shape.kind == "linear"

    def check(self, shape: LayerShape, option: Option, layer: str = "layer") -> None:
        assert isinstance(option, GPTQOption)
        if shape.kind != "linear":
            raise OptionError(f"{layer}: gptq quantises linear layers only, not {shape.kind}")
        check_quant_option(shape, option, layer)  # type: ignore[arg-type]
        if not isinstance(option.act_order, bool):
            raise OptionError(
                f"{layer}: gptq act_order must be true or false, got {option.act_order!r}"
            )
        damp = option.damp
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 <= damp <= 1:
            raise OptionError(
                f"{layer}: gptq damp {damp!r} is out of range; allowed: a number in [0, 1]"
            )

    def cost(self, shape: LayerShape, option: Option) -> Cost:
        assert isinstance(option, GPTQOption)
        return quant_cost(shape, option.storage())

    def grid(self, shape: LayerShape) -> list[Option]:
        return [
            GPTQOption(bits, group, symmetric, act_order=True)
            for bits, groups in GRID.items()
            for group in groups
            if group is None or shape.cols % group == 0
            for symmetric in (True, False)
        ]

    def runtime_format(self, shape: LayerShape, option: Option) -> str:
        assert isinstance(option, GPTQOption)
        return get_method("rtn").runtime_format(shape, option.storage())

    def needs_calibration(self, option: Option) -> bool:
        return True

    def observer(self, module: nn.Module, option: Option) -> Observer | None:
        """The layer's Hessian observer: shared with every option (of any method) that asks
        for one before calibration runs, a new one after."""
        cols = LayerShape.of(module).cols
        return SHARED.get(module, HessianObserver, lambda: HessianObserver(cols))

    @torch.no_grad()
    def convert(
        self, module: nn.Module, option: Option, observer: Observer | None = None
    ) -> nn.Module:
        assert isinstance(option, GPTQOption)
        shape = LayerShape.of(module)
        self.check(shape, option)
        if not isinstance(observer, HessianObserver) or observer.tokens == 0:
            raise OptionError(
                f"{option.label} needs calibration: a Hessian observer that saw the layer's "
                "inputs (none was given)"
                if observer is None
                else f"{option.label} needs calibration: the observer given saw no inputs"
            )
        if observer.cols != shape.cols:
            raise OptionError(
                f"{option.label}: the observer saw inputs of width {observer.cols}, "
                f"the layer takes {shape.cols}"
            )
        weight = finite_weight(module, option.label)
        hessian = observer.hessian(work_dtype(weight.device))
        if not torch.isfinite(hessian).all():
            raise OptionError(f"{option.label}: the calibration inputs hold NaN or inf values")
        codes, scales, offsets = gptq_quantize(weight, hessian, option, option.label)
        out = self.empty(shape, option, like=module)
        out.store(codes, scales, offsets)
        if out.bias is not None:
            out.bias.copy_(module.bias.detach())
        return out

    def empty(self, shape: LayerShape, option: Option, like: nn.Module | None = None) -> nn.Module:
        assert isinstance(option, GPTQOption)
        if shape.kind != "linear":
            raise OptionError(f"{option.label}: gptq quantises linear layers only")
        return get_method("rtn").empty(shape, option.storage(), like=like)


register(GPTQ())
