"""Exact allocation: a multiple-choice knapsack solved as a mixed-integer program.

Minimise the sum of per-variable scores subject to one or more resource limits, choosing
exactly one option per variable. Solved with HiGHS through ``scipy.optimize.milp``. Integer
resources (bytes) are then re-checked in exact integer arithmetic; if the solver's
tolerance let a limit slip by a few units, the limit is tightened and the problem re-solved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array, vstack

from search.space import ChoiceTable


class InfeasibleError(ValueError):
    """No assignment meets the limits; ``minimums`` holds the least each resource can be."""

    def __init__(self, message: str, minimums: dict[str, float]) -> None:
        super().__init__(message)
        self.minimums = minimums


@dataclass(frozen=True)
class Allocation:
    assignment: list[int]
    score: float
    totals: dict[str, float]
    seconds: float
    solves: int


def _check_feasible(table: ChoiceTable, limits: dict[str, float]) -> None:
    minimums = {r: table.minimum(r) for r in limits}
    broken = [r for r, limit in limits.items() if minimums[r] > limit]
    if broken:
        parts = ", ".join(
            f"{r}: limit {limits[r]:g} < smallest achievable {minimums[r]:g}" for r in broken
        )
        raise InfeasibleError(f"no plan meets the limits ({parts})", minimums)


def allocate(
    table: ChoiceTable,
    limits: dict[str, float],
    *,
    time_limit: float = 60.0,
    max_solves: int = 5,
) -> Allocation:
    """The assignment with the least total score whose resource totals meet ``limits``."""
    start = time.perf_counter()
    _check_feasible(table, limits)
    sizes = [len(ch) for ch in table.choices]
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    n = int(offsets[-1])
    scores = np.concatenate(table.scores).astype(np.float64)
    scale = float(np.abs(scores).max()) or 1.0
    objective = scores / scale

    rows = [
        csr_array(
            (np.ones(size), (np.zeros(size, dtype=int), np.arange(offsets[i], offsets[i + 1]))),
            shape=(1, n),
        )
        for i, size in enumerate(sizes)
    ]
    one_hot = LinearConstraint(vstack(rows), lb=1, ub=1)
    resources = list(limits)
    matrix = np.vstack([np.concatenate(table.costs[r]).astype(np.float64) for r in resources])
    budgets = np.array([limits[r] - table.fixed.get(r, 0.0) for r in resources], dtype=np.float64)

    for solve in range(1, max_solves + 1):
        norm = np.maximum(np.abs(budgets), 1.0)
        resource_rows = LinearConstraint(matrix / norm[:, None], lb=-np.inf, ub=budgets / norm)
        result = milp(
            objective,
            constraints=[one_hot, resource_rows],
            integrality=np.ones(n),
            bounds=Bounds(0, 1),
            options={"time_limit": time_limit, "mip_rel_gap": 1e-7, "disp": False},
        )
        if result.x is None:
            raise InfeasibleError(
                f"the solver found no plan within the limits ({result.message})",
                {r: table.minimum(r) for r in limits},
            )
        assignment = [
            int(np.argmax(result.x[offsets[i] : offsets[i + 1]])) for i in range(len(sizes))
        ]
        totals = {r: table.total(r, assignment) for r in resources}
        excess = {r: totals[r] - limits[r] for r in resources if totals[r] > limits[r]}
        if not excess:
            return Allocation(
                assignment,
                table.score(assignment),
                totals,
                time.perf_counter() - start,
                solve,
            )
        for r, over in excess.items():
            k = resources.index(r)
            budgets[k] -= max(
                over, 1e-9 * abs(limits[r]), 1.0 if float(limits[r]).is_integer() else 0.0
            )
    raise InfeasibleError(
        "the solver kept exceeding the limits by its tolerance",
        {r: table.minimum(r) for r in limits},
    )
