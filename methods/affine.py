"""The affine integer format shared by quantisation methods.

A row of weights is cut into groups along its width; each group has a float16 scale ``s``
and, when asymmetric, a float16 offset ``m``. Codes ``u`` are unsigned ``bits``-bit integers:

* symmetric:  ``w = s * (u - 2**(bits-1))``, ``s = absmax / (2**(bits-1) - 0.5)``
* asymmetric: ``w = s * u + m``, ``s = (max' - min') / (2**bits - 1)``, ``m = -z * s``, where
  the range ``[min', max']`` is the group's widened to include 0 and ``z = round(-min' / s)``
  is a whole zero point, so that 0 is stored exactly (up to the float16 rounding of ``m``).
  Without that, a row with one outlier maps all its small weights to its minimum: a bias that
  adds up coherently through the layer.

Scales and offsets are rounded to float16 before the codes are chosen, so the stored
numbers are exactly the ones the codes were fitted to.
"""

from __future__ import annotations

import torch

_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24
_FP16_NORMAL = 2.0**-14  # scale of a group whose values are all equal (any scale fits it)


def levels(bits: int) -> int:
    return 1 << bits


def group_view(weight: torch.Tensor, group: int) -> torch.Tensor:
    """``[rows, cols]`` -> ``[rows, cols // group, group]`` (``group`` divides ``cols``)."""
    rows, cols = weight.shape
    return weight.reshape(rows, cols // group, group)


def fit_scales(
    groups: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float16 scales (and offsets when asymmetric) for ``[rows, n_groups, group]`` weights."""
    groups = groups.float()
    if symmetric:
        absmax = groups.abs().amax(dim=-1)
        scale = absmax / (levels(bits) / 2 - 0.5)
        scale = torch.where(scale > 0, scale, torch.full_like(scale, _FP16_NORMAL))
        return scale.clamp(_FP16_TINY, _FP16_MAX).to(torch.float16), None
    low = groups.amin(dim=-1).clamp(max=0.0)
    high = groups.amax(dim=-1).clamp(min=0.0)
    scale = (high - low) / (levels(bits) - 1)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, _FP16_NORMAL))
    scale = scale.clamp(_FP16_TINY, _FP16_MAX).to(torch.float16)
    zero = torch.round(-low / scale.float()).clamp(0, levels(bits) - 1)
    offset = (-zero * scale.float()).clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
    return scale, offset


def encode(
    groups: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Unsigned codes (uint8) of ``[rows, n_groups, group]`` weights for given scales."""
    s = scale.float().unsqueeze(-1)
    if offset is None:
        q = torch.round(groups.float() / s) + levels(bits) // 2
    else:
        q = torch.round((groups.float() - offset.float().unsqueeze(-1)) / s)
    return q.clamp_(0, levels(bits) - 1).to(torch.uint8)


def decode(
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    bits: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Weights of ``[rows, n_groups, group]`` codes, in ``dtype``."""
    s = scale.to(dtype).unsqueeze(-1)
    if offset is None:
        return (codes.to(dtype) - levels(bits) // 2) * s
    return codes.to(dtype) * s + offset.to(dtype).unsqueeze(-1)


def round_trip(weight: torch.Tensor, group: int, bits: int, symmetric: bool) -> torch.Tensor:
    """``[rows, cols]`` float32 weights as their fitted codes decode: what storing them
    in this format and reading them back gives, without the codes."""
    groups = group_view(weight.detach().float().contiguous(), group)
    scale, offset = fit_scales(groups, bits, symmetric)
    return decode(encode(groups, scale, offset, bits), scale, offset, bits).reshape(weight.shape)


def whole_zero_points(scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor | None:
    """The whole zero point ``z`` of each group, as uint8: the one whose ``-z * scale``,
    rounded to float16, is the stored ``offset`` (``round(-offset / scale)`` or a neighbour,
    where float16 rounding of a tiny offset blurs it); ``None`` when some offset is no such
    value. Formats that store ``w = s * (u - z)`` (compressed-tensors, ONNX) need it."""
    scale, offset = scale.detach().cpu().float(), offset.detach().cpu().float()
    guess = torch.round(-offset / scale)
    top = levels(bits) - 1
    zero = torch.full_like(guess, -1.0)
    for delta in (0.0, -1.0, 1.0):
        candidate = (guess + delta).clamp(0, top)
        fits = (zero < 0) & ((-candidate * scale).to(torch.float16).float() == offset)
        zero = torch.where(fits, candidate, zero)
    return None if bool((zero < 0).any()) else zero.to(torch.uint8)
