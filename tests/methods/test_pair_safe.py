"""Pair-safe int8 codes: adjacent column pairs within 128, as close to the weight as that
allows."""

from __future__ import annotations

import itertools

import pytest
import torch

from methods.pair_safe import PAIR_LIMIT, pair_limited, pair_safe_codes, pair_sums_fit
from methods.smoothquant import quantize_weight


def _pairs(codes: torch.Tensor) -> torch.Tensor:
    c = codes.float()
    if c.shape[1] % 2:
        c = torch.cat([c, torch.zeros(c.shape[0], 1)], dim=1)
    return c[:, 0::2].abs() + c[:, 1::2].abs()


@pytest.mark.parametrize("cols", [96, 97])
def test_every_pair_fits_and_pairs_within_the_limit_are_plainly_rounded(cols: int) -> None:
    units = torch.randn(40, cols, generator=torch.Generator().manual_seed(0)) * 60
    codes = pair_limited(units)
    assert _pairs(codes).max() <= PAIR_LIMIT and codes.abs().max() <= 127
    assert pair_sums_fit(codes) and not pair_sums_fit(torch.round(units).clamp(-127, 127))
    plain = torch.round(units).clamp(-127, 127)
    inside = _pairs(plain) <= PAIR_LIMIT
    untouched = torch.repeat_interleave(inside, 2, dim=1)[:, :cols]
    assert torch.equal(codes[untouched], plain[untouched])
    assert torch.equal(codes[:, -1], plain[:, -1]) or cols % 2 == 0  # a lone last column


def test_a_pair_over_the_limit_moves_to_a_nearest_integer_point_within_it() -> None:
    """Against every integer pair within the limit: the chosen one is within half a code of
    the nearest, and as near on average within a fiftieth (it rounds the projection)."""
    generator = torch.Generator().manual_seed(1)
    pairs = (torch.rand(300, 2, generator=generator) * 2 - 1) * 140
    codes = pair_limited(pairs)
    grid = torch.tensor(
        [
            (x, y)
            for x, y in itertools.product(range(-127, 128), repeat=2)
            if abs(x) + abs(y) <= PAIR_LIMIT
        ],
        dtype=torch.float32,
    )
    best = torch.cdist(pairs, grid).min(dim=1).values
    chosen = (codes - pairs).norm(dim=1)
    assert (chosen <= best + 0.5).all()
    assert float((chosen - best).mean()) < 0.02


@pytest.mark.parametrize("per_tensor", [False, True])
def test_searched_scales_fit_at_least_as_well_as_the_plain_scale_projected(
    per_tensor: bool,
) -> None:
    torch.manual_seed(0)  # heavy tails: an unlucky draw's outliers cost more than 1.5x
    weight = torch.distributions.Laplace(0.0, 1.0).sample((32, 128))
    codes, scales = pair_safe_codes(weight, per_tensor)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16
    assert scales.numel() == (1 if per_tensor else 32)
    assert pair_sums_fit(codes)
    plain_codes, plain_scales = quantize_weight(weight, per_tensor)
    per_row = plain_scales.float().expand(32)[:, None]
    projected = pair_limited(weight / per_row) * per_row

    def error(c: torch.Tensor, s: torch.Tensor) -> float:
        return float((c.float() * s.float().expand(32)[:, None] - weight).norm())

    assert error(codes, scales) <= float((projected - weight).norm()) + 1e-6
    assert error(codes, scales) < 1.5 * error(plain_codes, plain_scales)
