"""Int8 weight codes that x86 CPUs without VNNI multiply exactly with 8-bit activations.

Without VNNI, int8 matrix products (ONNX Runtime's MLAS, fbgemm) multiply unsigned 8-bit
activation codes by signed 8-bit weight codes with ``vpmaddubsw``, which adds the products of
each pair of adjacent input columns (``2i``, ``2i + 1``) in a signed 16-bit lane with
saturation: 255 x 127 x 2 = 64,770 overflows 32,767 and the sum is clipped. Codes whose
pairs hold ``|c[2i]| + |c[2i + 1]| <= 128`` cannot overflow (255 x 128 = 32,640), whatever the
activations. Few pairs break that limit at full 8-bit range (0.05% of the demo's per-tensor
codes, 3.8% of its per-channel ones), so the codes here keep 8-bit resolution: each pair over
the limit is moved to the nearest point within it, and each row's scale (or the tensor's) is
searched from the plain one up to twice it for the least squared weight error, since a
slightly coarser scale can fit more pairs under the limit than it costs elsewhere.
"""

from __future__ import annotations

import torch

PAIR_LIMIT = 128  # 255 x 128 = 32,640: a pair of products fits a signed 16-bit lane
CODE_MAX = 127
SCALE_STEPS = 16  # candidate scales, from absmax / 127 to twice that
_FP16_TINY, _FP16_MAX = 2.0**-24, 65504.0


def _even(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a zero column appended when its columns are odd (a last lone column)."""
    return torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1) if x.shape[1] % 2 else x


def pair_limited(units: torch.Tensor) -> torch.Tensor:
    """``units`` (weight over scale, rows x cols) as integer codes in [-127, 127] whose
    adjacent column pairs sum to at most :data:`PAIR_LIMIT` in magnitude: each pair is
    moved to the nearest point within both limits, rounded, and any pair rounding lifted
    over the pair limit is stepped back by one on the element rounded furthest up. A last
    odd column pairs with nothing."""
    cols = units.shape[1]
    x = _even(units.float())
    a, b = x[:, 0::2], x[:, 1::2]
    over = a.abs() + b.abs() > PAIR_LIMIT
    shrink = ((a.abs() + b.abs() - PAIR_LIMIT) / 2).clamp_min(0)
    keep_a, keep_b = a.abs() - shrink, b.abs() - shrink
    # the nearest point of the L1 ball: both magnitudes shrink alike; where one would pass
    # zero, it is zero and the other takes the whole limit
    mag_a = torch.where(
        over, torch.where(keep_b < 0, float(PAIR_LIMIT), keep_a.clamp_min(0)), a.abs()
    )
    mag_b = torch.where(
        over, torch.where(keep_a < 0, float(PAIR_LIMIT), keep_b.clamp_min(0)), b.abs()
    )
    # past the code range the nearest point is on its edge, the other within what is left
    rest = float(PAIR_LIMIT - CODE_MAX)
    a_edge, b_edge = mag_a > CODE_MAX, mag_b > CODE_MAX
    mag_a, mag_b = (
        torch.where(b_edge & over, a.abs().clamp(max=rest), mag_a.clamp(max=CODE_MAX)),
        torch.where(a_edge & over, b.abs().clamp(max=rest), mag_b.clamp(max=CODE_MAX)),
    )
    a, b = torch.sign(a) * mag_a, torch.sign(b) * mag_b
    ra, rb = torch.round(a), torch.round(b)
    lifted = ra.abs() + rb.abs() > PAIR_LIMIT
    step_a = lifted & (ra.abs() - a.abs() >= rb.abs() - b.abs())
    step_b = lifted & ~step_a
    ra = ra - torch.where(step_a, torch.sign(ra), torch.zeros_like(ra))
    rb = rb - torch.where(step_b, torch.sign(rb), torch.zeros_like(rb))
    codes = torch.empty_like(x)
    codes[:, 0::2], codes[:, 1::2] = ra, rb
    return codes[:, :cols]


def pair_sums_fit(codes: torch.Tensor) -> bool:
    """Whether every adjacent column pair of ``codes`` is within :data:`PAIR_LIMIT`."""
    c = _even(codes.to(torch.int32))
    return bool((c[:, 0::2].abs() + c[:, 1::2].abs()).max() <= PAIR_LIMIT)


def pair_safe_codes(
    weight: torch.Tensor, per_tensor: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of ``weight`` (rows x cols) within the pair limit, and float16
    scales (one per row, or one in all): each scale the best of :data:`SCALE_STEPS`
    multiples of ``absmax / 127``, from 1 to 2, by squared weight error."""
    w = weight.float()
    absmax = w.abs().amax().reshape(1) if per_tensor else w.abs().amax(dim=1)
    best_codes = best_scales = best_error = None
    for factor in torch.linspace(1.0, 2.0, SCALE_STEPS).tolist():
        scales = (absmax * factor / CODE_MAX).clamp(_FP16_TINY, _FP16_MAX).to(torch.float16)
        per_row = scales.float().expand(w.shape[0]) if per_tensor else scales.float()
        codes = pair_limited(w / per_row[:, None])
        error = ((codes * per_row[:, None] - w) ** 2).sum(dim=1)
        if per_tensor:
            error = error.sum().reshape(1)
        if best_error is None:
            best_codes, best_scales, best_error = codes, scales, error
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scales = torch.where(better, scales, best_scales)
        row_better = better.expand(w.shape[0]) if per_tensor else better
        best_codes = torch.where(row_better[:, None], codes, best_codes)
    assert best_codes is not None and best_scales is not None
    return best_codes.to(torch.int8), best_scales
