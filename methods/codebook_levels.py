"""Code-book maths: the level tables and the per-group encoding of weights against them.

This module computes the tables a code-book format indexes (NormalFloat levels at quantiles
of N(0, 1), the FP4 E2M1 values, and a table fitted to a layer's weights by Lloyd's
algorithm) and encodes a ``[rows, cols]`` weight against one: a float16 absmax scale per
group, the weights divided by it, and the index of the nearest level. It holds no modules
and registers nothing; :mod:`methods.codebook` builds the storage and the method on it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from scipy.stats import norm

LLOYD_MAX_ITERATIONS = 1000
_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24
_FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# --- tables --------------------------------------------------------------------------------


@functools.cache
def normal_float_levels(bits: int) -> tuple[float, ...]:
    """NormalFloat levels, ascending: ``2**(bits-1)`` positive quantiles of N(0, 1) (the
    largest one becomes 1), ``2**(bits-1) - 1`` negative ones, and an exact 0.

    Each side spaces its probabilities evenly from ``offset`` down to 1/2 (the zero level is
    shared), where ``1 - offset`` is the mean of half a bin of ``2**bits`` and of
    ``2**bits - 1`` equal-mass bins, so that the extreme quantile stays finite; the levels are
    then divided by the largest. For 4 bits this is the NF4 table of QLoRA.
    """
    n = 1 << bits
    offset = 1.0 - 0.5 * (1.0 / (2 * n) + 1.0 / (2 * (n - 1)))
    positive = norm.ppf(np.linspace(offset, 0.5, n // 2 + 1)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, n // 2)[:-1])
    levels = np.sort(np.concatenate([negative, [0.0], positive]))
    return tuple(float(v) for v in levels / levels.max())


@functools.cache
def fp4_levels() -> tuple[float, ...]:
    """The 15 distinct FP4 (E2M1) values, ascending, divided by 6 (-0 is the same as 0)."""
    values = sorted({sign * v / 6.0 + 0.0 for v in _FP4_E2M1 for sign in (-1.0, 1.0)})
    return tuple(values)


def fixed_levels(fmt: str, bits: int) -> torch.Tensor:
    """The constant table of a fixed format, float32, ascending."""
    levels = normal_float_levels(bits) if fmt == "nf" else fp4_levels()
    return torch.tensor(levels, dtype=torch.float32)


def lloyd_levels(values: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` levels (float32, ascending) that locally minimise the squared error of
    ``values``, by Lloyd's algorithm.

    The levels start at the quantiles ``(i + 1/2) / count`` of the data. Each step assigns
    every value to its nearest level (the cells are cut at the midpoints between levels) and
    moves each level to the mean of its cell (a level whose cell is empty stays); it stops
    when no value changes cell, or after ``LLOYD_MAX_ITERATIONS``. On sorted data a cell is a
    slice, so a step costs a search of the cut points and prefix sums only.
    """
    data = values.detach().reshape(-1).float().sort().values
    n = data.numel()
    if n == 0:
        return torch.zeros(count)
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), data.double().cumsum(0)])
    picks = ((torch.arange(count, dtype=torch.float64) + 0.5) * n / count).long()
    levels = data[picks.clamp(max=n - 1)].double()
    cuts = None
    for _ in range(LLOYD_MAX_ITERATIONS):
        middles = ((levels[1:] + levels[:-1]) / 2).float()
        new_cuts = torch.searchsorted(data, middles, right=True)
        if cuts is not None and torch.equal(new_cuts, cuts):
            break
        cuts = new_cuts
        edges = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([n])])
        sizes = edges[1:] - edges[:-1]
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        means = sums / sizes.clamp(min=1)
        levels = torch.where(sizes > 0, means, levels).sort().values
    return levels.float()


# --- encoding ------------------------------------------------------------------------------


def group_scales(weight: torch.Tensor, group: int) -> torch.Tensor:
    """Float16 absmax of each group of ``[rows, cols]``: ``[rows, cols // group]``.

    An all-zero group gets scale 0 (it decodes to exactly 0 whatever its codes); others are
    clamped to float16's range, so no scale is inf or NaN.
    """
    rows, cols = weight.shape
    absmax = weight.float().reshape(rows, cols // group, group).abs().amax(dim=-1)
    scale = absmax.clamp(_FP16_TINY, _FP16_MAX)
    return torch.where(absmax > 0, scale, torch.zeros_like(scale)).to(torch.float16)


def normalise(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``w / s`` per group as ``[rows, cols]`` float32 (0 where the scale is 0)."""
    rows, cols = weight.shape
    s = scales.float().unsqueeze(-1)
    groups = weight.float().reshape(rows, scales.shape[1], -1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.where(s > 0, groups / safe, torch.zeros_like(groups)).reshape(rows, cols)


def nearest_codes(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the level nearest to each value; ``levels`` ascending."""
    middles = ((levels[1:].float() + levels[:-1].float()) / 2).contiguous()
    return torch.bucketize(values.float(), middles, out_int32=True).to(torch.uint8)
