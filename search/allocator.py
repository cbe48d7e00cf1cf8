"""Exact allocation: a multiple-choice knapsack solved as a mixed-integer program.

Minimise the sum of per-variable scores subject to one or more resource limits, choosing
exactly one choice per variable. Solved with HiGHS through ``scipy.optimize.milp``. A choice
whose score is not finite is never taken. Resource totals are then re-checked in exact
arithmetic; if the solver's feasibility tolerance let a limit slip, the limit is tightened
(by a growing margin) and the problem solved again.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from search.space import ChoiceTable

_RELATIVE_SLACK = 1e-7  # of a limit: the order of HiGHS's primal feasibility tolerance


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
    optimal: bool


def _describe(limits: dict[str, float], minimums: dict[str, float]) -> str:
    return ", ".join(f"{r}: limit {limits[r]:g}, smallest alone {minimums[r]:g}" for r in limits)


def _check_feasible(table: ChoiceTable, limits: dict[str, float]) -> dict[str, float]:
    minimums = {r: table.minimum(r) for r in limits}
    broken = [r for r, limit in limits.items() if minimums[r] > limit]
    if broken:
        parts = ", ".join(
            f"{r}: limit {limits[r]:g} < smallest achievable {minimums[r]:g}" for r in broken
        )
        raise InfeasibleError(f"no plan meets the limits ({parts})", minimums)
    return minimums


def _is_integral(table: ChoiceTable, resource: str) -> bool:
    fixed = table.fixed.get(resource, 0.0)
    arrays = table.costs[resource]
    return float(fixed).is_integer() and all(np.all(np.mod(a, 1) == 0) for a in arrays)


@contextlib.contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """Discard what native code writes to the process's standard output (file descriptor 1,
    wherever Python's ``sys.stdout`` points) meanwhile: HiGHS prints debugging lines of its
    own even with ``disp`` off."""
    fd = 1
    for stream in (sys.stdout, sys.__stdout__):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            stream.flush()
    try:
        saved = os.dup(fd)
    except OSError:  # no standard output to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            try:
                yield
            finally:
                os.dup2(saved, fd)
    finally:
        os.close(saved)


def allocate(
    table: ChoiceTable,
    limits: dict[str, float],
    *,
    time_limit: float = 60.0,
    max_solves: int = 8,
) -> Allocation:
    """The assignment with the least total score whose resource totals meet ``limits``.

    ``time_limit`` bounds each solve; ``Allocation.optimal`` is false if one was cut short.
    """
    start = time.perf_counter()
    if not table.variables:
        raise ValueError("the table has no variables to allocate")
    minimums = _check_feasible(table, limits)
    sizes = [len(ch) for ch in table.choices]
    offsets = np.concatenate(([0], np.cumsum(sizes))).astype(int)
    n = int(offsets[-1])
    raw = np.concatenate(table.scores).astype(np.float64)
    allowed = np.isfinite(raw)
    if not all(allowed[offsets[i] : offsets[i + 1]].any() for i in range(len(sizes))):
        raise InfeasibleError("some variable has no allowed choice", minimums)
    scores = np.where(allowed, raw, 0.0)
    rows = np.repeat(np.arange(len(sizes)), sizes)
    one_hot = LinearConstraint(csr_array((np.ones(n), (rows, np.arange(n)))), lb=1, ub=1)
    resources = list(limits)
    matrix = np.vstack([np.concatenate(table.costs[r]).astype(np.float64) for r in resources])
    budgets = np.array([limits[r] - table.fixed.get(r, 0.0) for r in resources])
    integral = {r: _is_integral(table, r) for r in resources}
    margins = {r: 0.0 for r in resources}
    bounds = Bounds(np.zeros(n), allowed.astype(np.float64))

    scale = float(np.abs(scores).max()) or 1.0
    optimal = True
    for solve in range(1, max_solves + 1):
        norm = np.maximum(np.abs(budgets), 1.0)
        shrink = np.array([margins[r] for r in resources])
        resource_rows = LinearConstraint(
            matrix / norm[:, None], lb=-np.inf, ub=(budgets - shrink) / norm
        )
        with _native_stdout_silenced():
            result = milp(
                scores / scale,
                constraints=[one_hot, resource_rows],
                integrality=np.ones(n),
                bounds=bounds,
                options={"time_limit": time_limit, "mip_rel_gap": 1e-9, "disp": False},
            )
        if result.x is None:
            raise InfeasibleError(
                "no plan meets all limits at once, though each can be met alone "
                f"({_describe(limits, minimums)})",
                minimums,
            )
        optimal = optimal and result.status == 0
        assignment = [
            int(np.argmax(result.x[offsets[i] : offsets[i + 1]])) for i in range(len(sizes))
        ]
        objective = table.score(assignment) / scale
        if 0 < objective < 1e-3 and solve == 1:
            # the objective is tiny against the largest score: re-solve with it nearer 1, so
            # the solver's absolute gap cannot hide better plans (coefficients stay <= 1e6)
            scale = max(scale * objective, scale * 1e-6)
            continue
        totals = {r: table.total(r, assignment) for r in resources}
        excess = {r: totals[r] - limits[r] for r in resources if totals[r] > limits[r]}
        if not excess:
            return Allocation(
                assignment,
                table.score(assignment),
                totals,
                time.perf_counter() - start,
                solve,
                optimal,
            )
        for r, over in excess.items():
            step = max(2 * over, _RELATIVE_SLACK * max(abs(limits[r]), 1.0))
            if integral[r]:
                step = max(step, 1.0)
            margins[r] = 2 * margins[r] + step
    raise InfeasibleError(
        f"the solver kept exceeding the limits by its tolerance ({_describe(limits, minimums)})",
        minimums,
    )
