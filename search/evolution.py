"""EvoPress-style evolutionary search over per-variable choices.

(1+lambda) elitist search: each generation mutates the parent into ``offspring`` new plans
by level switches that keep every limit (one variable moves to a cheaper choice, another to a
dearer one; choices are ordered by cost into levels), rejects plans already seen, and selects
in steps of growing fidelity: all offspring are scored cheaply, the best few again on more
data, and the last survivor on the full fitness; it replaces the parent if it is better.
Every finished evaluation can be recorded in an Optuna study (see :mod:`search.study`), from
which a later run resumes and other processes cooperate.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from search.fitness import Counter, Fitness
from search.space import ChoiceTable
from search.study import WORKER_ATTR, constraint_dict, finished, record

Progress = Callable[[Counter, float, dict[str, float]], None]


@dataclass
class SearchResult:
    """The best plan an engine found, at full fidelity, and what it cost to find it."""

    assignment: list[int]
    error: float
    evaluations: Counter
    seconds: float
    iterations: int = 0
    history: list[float] = field(default_factory=list)
    stopped: str = ""
    resumed: int = 0
    shared: int = 0
    pareto: list[dict[str, Any]] = field(default_factory=list)


def default_survivors(offspring: int, fidelities: int) -> list[int]:
    """How many offspring pass each cheaper fidelity: a quarter at each step, at least one."""
    kept, out = offspring, []
    for _ in range(fidelities - 1):
        kept = max(1, kept // 4)
        out.append(kept)
    return out


def primary_resource(limits: dict[str, float]) -> str:
    return next(iter(limits), "bytes")


class _Mutator:
    def __init__(
        self, table: ChoiceTable, limits: dict[str, float], rng: random.Random, order_by: str
    ) -> None:
        self.table = table
        self.limits = limits
        self.rng = rng
        self.levels = table.levels(order_by)
        self.position = [{c: i for i, c in enumerate(levels)} for levels in self.levels]

    def _step(self, child: list[int], variable: int, direction: int) -> bool:
        levels = self.levels[variable]
        here = self.position[variable][child[variable]]
        there = here + direction * self.rng.choice((1, 1, 1, 2))
        if not 0 <= there < len(levels):
            return False
        child[variable] = levels[there]
        return True

    def __call__(self, parent: list[int], flips: tuple[int, int]) -> list[int] | None:
        child = list(parent)
        n = len(child)
        for _ in range(self.rng.randint(*flips)):
            if n >= 2 and self.rng.random() < 0.7:
                lower, raise_ = self.rng.sample(range(n), 2)
                self._step(child, lower, -1)
                self._step(child, raise_, +1)
            else:
                self._step(child, self.rng.randrange(n), self.rng.choice((-1, 1)))
        if child == parent or not self.table.fits(child, self.limits):
            return None
        return child


def evolve(
    table: ChoiceTable,
    limits: dict[str, float],
    fitness: Fitness,
    start: list[int],
    *,
    seed: int = 0,
    max_evals: float = 200.0,
    timeout: float | None = None,
    offspring: int = 16,
    survivors: Sequence[int] | None = None,
    flips: tuple[int, int] = (1, 3),
    study: Any = None,
    order_by: str | None = None,
    progress: Progress | None = None,
) -> SearchResult:
    """Improve ``start`` (a plan within ``limits``) by evolution.

    ``max_evals`` bounds the cost in full evaluations (cheaper fidelities count by their
    cost), ``timeout`` the seconds; ``survivors`` gives how many offspring pass each cheaper
    fidelity (one entry per fidelity but the last; default a quarter at each step). With
    ``study``, evaluations already in it (earlier runs, other processes: read again every
    generation) are not repeated, its best complete plan within the limits becomes the
    parent if better, and every new evaluation is recorded there. Choices are ordered into
    levels by their cost in ``order_by`` (default: the first limit's resource).
    """
    began = time.perf_counter()
    if not table.fits(start, limits):
        raise ValueError("the starting plan does not meet the limits")
    fidelities = len(fitness.costs)
    if survivors is None:
        survivors = default_survivors(offspring, fidelities)
    if len(survivors) != fidelities - 1:
        raise ValueError(f"survivors needs {fidelities - 1} entries, one per cheaper fidelity")
    rng = random.Random(seed)
    mutate = _Mutator(table, limits, rng, order_by or primary_resource(limits))
    counter = Counter(fitness.costs)
    seen: set[tuple[int, ...]] = set()
    parent, parent_error = list(start), None
    synced: set[int] = set()
    shared = [0]  # trials of other processes: earlier runs or concurrent workers

    def sync() -> int:
        """Take in the study's evaluations not seen yet (earlier runs, other processes): they
        are never repeated, and the best complete plan within the limits becomes the parent
        if it is better. Returns how many were new."""
        nonlocal parent, parent_error
        if study is None:
            return 0
        new = 0
        for assignment, trial in finished(study, table, mutate.levels):
            if trial.number in synced:
                continue
            synced.add(trial.number)
            new += 1
            if trial.user_attrs.get(WORKER_ATTR) != os.getpid():
                shared[0] += 1
            seen.add(tuple(assignment))
            if (
                trial.values
                and table.fits(assignment, limits)
                and (parent_error is None or trial.values[0] < parent_error)
            ):
                parent, parent_error = assignment, trial.values[0]
        return new

    resumed = sync()
    full = fidelities - 1

    def evaluate(plan: list[int], fidelity: int) -> float:
        counter.add(fidelity)
        return float(fitness(plan, fidelity))

    def save(plan: list[int], scores: dict[int, float]) -> None:
        if study is None:
            return
        complete = full in scores
        constraints = constraint_dict(table.margins(plan, limits))
        record(
            study,
            table,
            mutate.levels,
            plan,
            value=scores[full] if complete else None,
            intermediate=scores,
            constraints=constraints,
            engine="evolution",
        )

    if parent_error is None:
        parent_error = evaluate(parent, full)
        seen.add(tuple(parent))
        save(parent, {full: parent_error})
    history = [parent_error]
    generations, stopped = 0, "max_evals"
    while True:
        if counter.full_equivalent >= max_evals:
            break
        if timeout is not None and time.perf_counter() - began > timeout:
            stopped = "timeout"
            break
        sync()
        children: list[list[int]] = []
        for _ in range(offspring * 50):
            if len(children) == offspring:
                break
            child = mutate(parent, flips)
            if child is not None and tuple(child) not in seen:
                seen.add(tuple(child))
                children.append(child)
        if not children:
            stopped = "no new plan within the limits"
            break
        scores: dict[tuple[int, ...], dict[int, float]] = {tuple(c): {} for c in children}
        pool = children
        for fidelity in range(fidelities):
            for child in pool:
                scores[tuple(child)][fidelity] = evaluate(child, fidelity)
            if fidelity < full:
                ranked = sorted(pool, key=lambda c, f=fidelity: (scores[tuple(c)][f], c))
                pool = ranked[: survivors[fidelity]]
                for child in ranked[survivors[fidelity] :]:  # visible to other workers now
                    save(child, scores[tuple(child)])
        best = min(pool, key=lambda c: (scores[tuple(c)][full], c))
        if scores[tuple(best)][full] < parent_error:
            parent, parent_error = best, scores[tuple(best)][full]
        for child in pool:
            save(child, scores[tuple(child)])
        generations += 1
        history.append(parent_error)
        if progress is not None:
            progress(counter, parent_error, table.margins(parent, limits))
    if sync() and parent_error < history[-1]:  # a better plan another process found
        history.append(parent_error)
    return SearchResult(
        assignment=parent,
        error=parent_error,
        evaluations=counter,
        seconds=time.perf_counter() - began,
        iterations=generations,
        history=history,
        stopped=stopped,
        resumed=resumed,
        shared=shared[0],
    )
