"""What an engine optimises: a fitness at several fidelities, supplied by the caller."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Fitness(Protocol):
    """``fitness(assignment, fidelity)``: the error of a plan (lower is better), measured at
    ``fidelity`` (an index into ``costs``). ``costs`` are the relative costs of the fidelities,
    cheapest first; the last is the full evaluation (1.0)."""

    costs: Sequence[float]

    def __call__(self, assignment: list[int], fidelity: int) -> float: ...


class Counter:
    """Counts evaluations per fidelity and their cost in full evaluations."""

    def __init__(self, costs: Sequence[float]) -> None:
        self.costs = list(costs)
        self.calls = [0] * len(costs)

    def add(self, fidelity: int) -> None:
        self.calls[fidelity] += 1

    @property
    def full_equivalent(self) -> float:
        return sum(c * n for c, n in zip(self.costs, self.calls, strict=True))

    def to_dict(self) -> dict:
        return {
            "calls": list(self.calls),
            "costs": self.costs,
            "full_equivalent": self.full_equivalent,
        }
