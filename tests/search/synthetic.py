"""A synthetic compression problem for the engines: layers whose errors interact.

Each variable is a layer of ``sizes[i]`` weights; its choices store 2, 3, 4, 6 or 8 bits
per weight. The table's scores are the layers' errors alone; the true fitness adds a
pairwise interaction between neighbouring layers, so the additive optimum (the allocator's
plan) is not the true optimum and a search can improve on it. Cheaper fidelities add a
deterministic perturbation, as fewer calibration batches would.
"""

from __future__ import annotations

import numpy as np

from search import ChoiceTable

BITS = (2, 3, 4, 6, 8)


def make_problem(n: int = 12, seed: int = 0) -> tuple[ChoiceTable, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, size=n) * 1000
    weights = rng.uniform(0.2, 3.0, size=n)
    scores = [w * 4.0 ** (-np.asarray(BITS, dtype=float)) * 100 for w in weights]
    table = ChoiceTable(
        variables=[f"layer{i}" for i in range(n)],
        choices=[[f"int{b}" for b in BITS] for _ in range(n)],
        scores=scores,
        costs={"bits": [np.asarray(BITS, dtype=np.float64) * s for s in sizes]},
    )
    return table, weights


class SyntheticFitness:
    """Additive errors plus neighbour interactions; ``calls`` records every evaluation."""

    def __init__(self, table: ChoiceTable, weights: np.ndarray, costs=(0.25, 1.0)) -> None:
        self.table = table
        self.weights = weights
        self.costs = list(costs)
        self.calls: list[tuple[tuple[int, ...], int]] = []

    def exact(self, assignment: list[int]) -> float:
        errors = np.array([self.table.scores[i][c] for i, c in enumerate(assignment)])
        return float(errors.sum() + 2.0 * (errors[:-1] * errors[1:]).sum())

    def __call__(self, assignment: list[int], fidelity: int) -> float:
        self.calls.append((tuple(assignment), fidelity))
        value = self.exact(assignment)
        if fidelity < len(self.costs) - 1:
            wobble = (hash(tuple(assignment)) % 1000) / 1000.0 - 0.5
            value *= 1.0 + 0.05 * wobble
        return value


def bits_limit(table: ChoiceTable, avg_bits: float) -> dict[str, float]:
    weights = sum(float(c[0]) / BITS[0] for c in table.costs["bits"])
    return {"bits": avg_bits * weights}
