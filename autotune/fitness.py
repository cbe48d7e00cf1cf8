"""The output error of whole plans on the model, at growing fidelities, for the search.

A fidelity is a set of calibration batches with their uncompressed reference outputs:
the profiling batches first (cheap), the whole calibration set last. Each plan is evaluated
once per fidelity (results are kept), on the model with its layers swapped for compressed
modules that are converted once and reused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from autotune.candidates import ModuleCache, evaluate
from methods.base import Option

Batches = list[dict[str, torch.Tensor]]


def windows_of(batches: Batches) -> int:
    return sum(int(next(iter(b.values())).shape[0]) for b in batches)


class PlanFitness:
    """``fitness(assignment, fidelity)`` for the engines of :mod:`search`; ``costs`` are the
    fidelities' sizes relative to the last (full) one, in calibration windows."""

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        options: Mapping[str, Sequence[Option]],
        tiers: Sequence[tuple[Batches, Batches]],
        metric: str,
        cache: ModuleCache,
    ) -> None:
        if not tiers:
            raise ValueError("at least one fidelity is needed")
        self.model = model
        self.layers = list(layers)
        self.options = options
        self.tiers = list(tiers)
        self.metric = metric
        self.cache = cache
        full = windows_of(self.tiers[-1][0])
        self.costs = [windows_of(batches) / full for batches, _ in self.tiers]
        self.known: dict[tuple[tuple[str, ...], int], float] = {}
        self.evaluations = [0] * len(self.tiers)

    def assignment_options(self, assignment: Sequence[int]) -> dict[str, Option]:
        return {n: self.options[n][c] for n, c in zip(self.layers, assignment, strict=True)}

    def error(self, chosen: Mapping[str, Option], fidelity: int) -> float:
        """The output error of a plan given as options per layer (kept once measured)."""
        fidelity = fidelity % len(self.tiers)
        key = (tuple(chosen[n].label for n in self.layers), fidelity)
        if key not in self.known:
            batches, reference = self.tiers[fidelity]
            self.known[key] = evaluate(
                self.model, chosen, batches, reference, self.metric, self.cache
            )
            self.evaluations[fidelity] += 1
        return self.known[key]

    def __call__(self, assignment: list[int], fidelity: int) -> float:
        return self.error(self.assignment_options(assignment), fidelity)

    @property
    def full_equivalent(self) -> float:
        return sum(c * n for c, n in zip(self.costs, self.evaluations, strict=True))
