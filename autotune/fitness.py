"""The output error of whole plans on the model, at growing fidelities, for the search.

A fidelity is a data split: the profiling batches first (cheap), the whole calibration set
last. Each plan is evaluated once per fidelity (results are kept) by the tune's executor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from autotune.executors.base import Executor, Split
from methods.base import Option

Batches = list[dict[str, torch.Tensor]]


def windows_of(batches: Batches) -> int:
    return sum(int(next(iter(b.values())).shape[0]) for b in batches)


class PlanFitness:
    """``fitness(assignment, fidelity)`` for the engines of :mod:`search`; ``costs`` are the
    fidelities' sizes relative to the last (full) one, in calibration windows. Plans are
    evaluated by the tune's executor, several in one call where they are asked together."""

    def __init__(
        self,
        executor: Executor,
        layers: Sequence[str],
        options: Mapping[str, Sequence[Option]],
        tiers: Sequence[Split],
        metric: str,
    ) -> None:
        if not tiers:
            raise ValueError("at least one fidelity is needed")
        self.executor = executor
        self.layers = list(layers)
        self.options = options
        self.tiers = list(tiers)
        self.metric = metric
        full = windows_of(self.tiers[-1].batches)
        self.costs = [windows_of(split.batches) / full for split in self.tiers]
        self.known: dict[tuple[tuple[str, ...], int], float] = {}
        self.evaluations = [0] * len(self.tiers)

    def assignment_options(self, assignment: Sequence[int]) -> dict[str, Option]:
        return {n: self.options[n][c] for n, c in zip(self.layers, assignment, strict=True)}

    def errors(self, plans: Sequence[Mapping[str, Option]], fidelity: int) -> list[float]:
        """The output error of each plan given as options per layer (kept once measured);
        the plans not measured yet are evaluated together."""
        fidelity = fidelity % len(self.tiers)
        keys = [(tuple(p[n].label for n in self.layers), fidelity) for p in plans]
        todo = {key: plan for key, plan in zip(keys, plans, strict=True) if key not in self.known}
        if todo:
            named = {f"plan {i}": plan for i, plan in enumerate(todo.values())}
            found = self.executor.errors(named, self.tiers[fidelity], self.metric)
            for key, name in zip(todo, named, strict=True):
                self.known[key] = found[name]
            self.evaluations[fidelity] += len(todo)
        return [self.known[key] for key in keys]

    def error(self, chosen: Mapping[str, Option], fidelity: int) -> float:
        """The output error of a plan given as options per layer (kept once measured)."""
        return self.errors([chosen], fidelity)[0]

    def __call__(self, assignment: list[int], fidelity: int) -> float:
        return self.error(self.assignment_options(assignment), fidelity)

    @property
    def full_equivalent(self) -> float:
        return sum(c * n for c, n in zip(self.costs, self.evaluations, strict=True))
