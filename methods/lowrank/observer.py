"""The observer of ``fisher_svd``: the weight's diagonal Fisher information."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from methods.base import Observer


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
