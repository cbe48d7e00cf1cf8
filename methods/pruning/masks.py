"""Mask selection: the weights each row keeps, by score, under an option's pattern."""

from __future__ import annotations

import torch

from methods.pruning.options import PruneOption


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
