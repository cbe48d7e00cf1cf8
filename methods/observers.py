"""Calibration statistics shared by methods, and the pool that shares them.

Several methods need the same statistic of a layer's inputs: GPTQ, SparseGPT, whitened SVD
and GPTQ-based outlier keeping the Hessian ``X^T X``; Wanda and RTN-based outlier keeping the
per-channel sums of squares. :data:`SHARED` hands every option of a layer that asks for a kind
of statistic before calibration runs the same observer, so it is hooked and fed once, and
held once in memory, however many methods and options use it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from methods.base import Observer

ObserverT = TypeVar("ObserverT", bound=Observer)


class HessianObserver(Observer):
    """Sum of ``x^T x`` over all calibration inputs of a linear layer (float32)."""

    def __init__(self, cols: int) -> None:
        self.cols = cols
        self.xtx: torch.Tensor | None = None
        self.tokens = 0
        self.calls = 0

    def observe(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        x = inputs[0].detach().reshape(-1, self.cols).float()
        if self.xtx is None:
            self.xtx = torch.zeros(self.cols, self.cols, dtype=torch.float32, device=x.device)
        self.xtx.addmm_(x.t(), x.to(self.xtx.device))
        self.tokens += x.shape[0]
        self.calls += 1

    def hessian(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``2 X^T X / n`` as a fresh tensor of ``dtype``."""
        if self.xtx is None or self.tokens == 0:
            raise ValueError("the observer has seen no inputs")
        return self.xtx.to(dtype) * (2.0 / self.tokens)

    def output_error(self, delta: torch.Tensor) -> float:
        """Mean over the observed tokens of ``||x delta^T||^2``: how much the layer's output
        moves when its weight moves by ``delta`` (``rows x cols``), exactly, from ``X^T X``."""
        if self.xtx is None or self.tokens == 0:
            raise ValueError("the observer has seen no inputs")
        delta = delta.to(device=self.xtx.device, dtype=self.xtx.dtype)
        return float((delta @ self.xtx * delta).sum(dtype=torch.float64)) / self.tokens


class ChannelObserver(Observer):
    """Sum of squares of each input channel over all calibration tokens (float64, CPU)."""

    def __init__(self, cols: int) -> None:
        self.cols = cols
        self.sumsq = torch.zeros(cols, dtype=torch.float64)
        self.tokens = 0
        self.calls = 0

    def observe(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        x = inputs[0].detach().reshape(-1, self.cols)
        self.sumsq += x.double().pow(2).sum(dim=0).cpu()
        self.tokens += x.shape[0]
        self.calls += 1

    def norms(self) -> torch.Tensor:
        """``||X_j||_2`` of every input channel ``j``."""
        return self.sumsq.sqrt()


class SharedObservers:
    """One unfed observer per (layer, kind of statistic), shared by every option that asks
    before calibration runs; a new one once it has been fed. Weak both ways: nothing here
    keeps a layer or an observer alive."""

    def __init__(self) -> None:
        self._unfed: weakref.WeakKeyDictionary[nn.Module, dict[type, weakref.ref[Observer]]] = (
            weakref.WeakKeyDictionary()
        )

    def get(
        self, module: nn.Module, kind: type[ObserverT], make: Callable[[], ObserverT]
    ) -> ObserverT:
        """The layer's unfed observer of ``kind``, made by ``make()`` if there is none."""
        slots = self._unfed.setdefault(module, {})
        ref = slots.get(kind)
        observer = ref() if ref is not None else None
        if observer is None or getattr(observer, "calls", 0):
            observer = make()
            slots[kind] = weakref.ref(observer)
        return observer  # type: ignore[return-value]


SHARED = SharedObservers()
