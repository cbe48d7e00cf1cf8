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
NO_NEW_PLAN = "no new plan within the limits"


def _generations_spelled(count: int) -> str:
    return f"{count} generation{'' if count == 1 else 's'}"


@dataclass(frozen=True)
class Stall:
    """Stop once the parent's error fell by less than ``gain`` (relative) over the last
    ``generations`` generations, or did not fall at all over the last ``idle`` generations
    (``None``: no such rule). The default, under 0.5% in one generation (a smaller gain on
    the selection split's few windows is noise, not progress), gave the same held-out error
    as 3 generations or 1 without any gain in seven of eight tunes of the bundled models at
    3-5 bits and a lower one in the eighth, with 4 full evaluations each instead of up to
    10; see benchmarks/evolution_stall.py."""

    generations: int = 1
    gain: float = 0.005
    idle: int | None = None

    def __post_init__(self) -> None:
        if self.generations < 1 or not 0 <= self.gain < 1:
            raise ValueError(
                f"a stall needs generations >= 1 and 0 <= gain < 1, got {self.generations}, "
                f"{self.gain}"
            )
        if self.idle is not None and self.idle < 1:
            raise ValueError(f"a stall's idle generations must be at least 1, got {self.idle}")

    def reason(self, history: Sequence[float], judged_on: str = "") -> str | None:
        """Why the search stalled after ``history`` (the parent's error per generation, the
        start first; ``judged_on`` names the data it was measured on), or ``None``."""
        where = f" on the {judged_on}" if judged_on else ""
        idle = self.idle
        if idle is not None and len(history) > idle and history[-1] >= history[-1 - idle]:
            return f"stalled (no lower error{where} in {_generations_spelled(idle)})"
        if len(history) <= self.generations:
            return None
        before, now = history[-1 - self.generations], history[-1]
        if before - now > self.gain * abs(before):
            return None
        return (
            f"stalled (under {100 * self.gain:g}% lower error{where} in "
            f"{_generations_spelled(self.generations)})"
        )


@dataclass
class Judge:
    """Data other than the search's own that judges when it stalls: ``error(assignment)``
    on it (kept per plan by its caller) and its name for the record."""

    error: Callable[[list[int]], float]
    name: str = "selection split"
    history: list[float] = field(default_factory=list)

    def look(self, parent: list[int]) -> None:
        self.history.append(self.error(parent))


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
    judged: list[float] = field(default_factory=list)  # the parent's error on the judge's data


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


def out_of_time(began: float, timeout: float | None) -> bool:
    """Whether more than ``timeout`` seconds (if any) have passed since ``began``."""
    return timeout is not None and time.perf_counter() - began > timeout


def _survivors(survivors: Sequence[int] | None, offspring: int, fidelities: int) -> Sequence[int]:
    """``survivors``, or the default; one entry per cheaper fidelity."""
    if survivors is None:
        survivors = default_survivors(offspring, fidelities)
    if len(survivors) != fidelities - 1:
        raise ValueError(f"survivors needs {fidelities - 1} entries, one per cheaper fidelity")
    return survivors


@dataclass(frozen=True)
class _Budget:
    """When to stop: the cost in full evaluations and the seconds allowed."""

    max_evals: float
    timeout: float | None
    began: float

    def spent(self, counter: Counter) -> str | None:
        """Why to stop before another generation, or ``None`` to go on."""
        if counter.full_equivalent >= self.max_evals:
            return "max_evals"
        if out_of_time(self.began, self.timeout):
            return "timeout"
        return None


Scores = dict[tuple[int, ...], dict[int, float]]


class _Evolution:
    """One run's state: the parent, the plans seen, the evaluations and the study's trials."""

    def __init__(
        self,
        table: ChoiceTable,
        limits: dict[str, float],
        fitness: Fitness,
        mutate: _Mutator,
        study: Any,
        start: list[int],
    ) -> None:
        self.table = table
        self.limits = limits
        self.fitness = fitness
        self.mutate = mutate
        self.study = study
        self.counter = Counter(fitness.costs)
        self.full = len(fitness.costs) - 1
        self.seen: set[tuple[int, ...]] = set()
        self.synced: set[int] = set()
        self.shared = 0  # trials of other processes: earlier runs or concurrent workers
        self.parent = list(start)
        self.parent_error: float | None = None
        self.history: list[float] = []

    def sync(self) -> int:
        """Take in the study's evaluations not seen yet (earlier runs, other processes): they
        are never repeated, and the best complete plan within the limits becomes the parent
        if it is better. Returns how many were new."""
        if self.study is None:
            return 0
        new = 0
        for assignment, trial in finished(self.study, self.table, self.mutate.levels):
            if trial.number not in self.synced:
                self.synced.add(trial.number)
                self._take(assignment, trial)
                new += 1
        return new

    def _take(self, assignment: list[int], trial: Any) -> None:
        """Note one of the study's trials as seen; its plan becomes the parent if better."""
        if trial.user_attrs.get(WORKER_ATTR) != os.getpid():
            self.shared += 1
        self.seen.add(tuple(assignment))
        if (
            trial.values
            and self.table.fits(assignment, self.limits)
            and self._better(trial.values[0])
        ):
            self.parent, self.parent_error = assignment, trial.values[0]

    def _better(self, error: float) -> bool:
        """Whether a plan with ``error`` would be a better parent."""
        return self.parent_error is None or error < self.parent_error

    def evaluate(self, plan: list[int], fidelity: int) -> float:
        """The fitness of ``plan`` at ``fidelity``, counted."""
        self.counter.add(fidelity)
        return float(self.fitness(plan, fidelity))

    def save(self, plan: list[int], scores: dict[int, float]) -> None:
        """Record an evaluation in the study: complete if it reached the full fidelity."""
        if self.study is None:
            return
        record(
            self.study,
            self.table,
            self.mutate.levels,
            plan,
            value=scores.get(self.full),
            intermediate=scores,
            constraints=constraint_dict(self.table.margins(plan, self.limits)),
            engine="evolution",
        )

    def begin(self) -> None:
        """Evaluate the starting plan unless the study gave a parent; start the history."""
        if self.parent_error is None:
            self.parent_error = self.evaluate(self.parent, self.full)
            self.seen.add(tuple(self.parent))
            self.save(self.parent, {self.full: self.parent_error})
        self.history.append(self.parent_error)

    def breed(self, offspring: int, flips: tuple[int, int]) -> list[list[int]]:
        """Up to ``offspring`` mutations of the parent within the limits, none seen before."""
        children: list[list[int]] = []
        for _ in range(offspring * 50):
            if len(children) == offspring:
                break
            child = self.mutate(self.parent, flips)
            if child is not None and tuple(child) not in self.seen:
                self.seen.add(tuple(child))
                children.append(child)
        return children

    def screen(
        self, children: list[list[int]], survivors: Sequence[int]
    ) -> tuple[list[list[int]], Scores]:
        """Score the children at each fidelity in turn, keeping ``survivors[f]`` after each
        cheaper fidelity ``f`` (the others are recorded at once, for other workers to see)."""
        scores: Scores = {tuple(c): {} for c in children}
        pool = children
        for fidelity in range(self.full + 1):
            for child in pool:
                scores[tuple(child)][fidelity] = self.evaluate(child, fidelity)
            if fidelity < self.full:
                pool = self._cut(pool, scores, fidelity, survivors[fidelity])
        return pool, scores

    def _cut(
        self, pool: list[list[int]], scores: Scores, fidelity: int, keep: int
    ) -> list[list[int]]:
        """The ``keep`` best of ``pool`` at ``fidelity``; the rest are recorded."""
        ranked = sorted(pool, key=lambda c: (scores[tuple(c)][fidelity], c))
        for child in ranked[keep:]:
            self.save(child, scores[tuple(child)])
        return ranked[:keep]

    def accept(self, pool: list[list[int]], scores: Scores) -> None:
        """The best of the fully evaluated ``pool`` replaces the parent if better; all are
        recorded."""
        best = min(pool, key=lambda c: (scores[tuple(c)][self.full], c))
        error = scores[tuple(best)][self.full]
        if self._better(error):
            self.parent, self.parent_error = best, error
        for child in pool:
            self.save(child, scores[tuple(child)])

    def generation(self, offspring: int, flips: tuple[int, int], survivors: Sequence[int]) -> bool:
        """Breed, screen and select once; ``False`` if no new plan within the limits was
        found."""
        self.sync()
        children = self.breed(offspring, flips)
        if not children:
            return False
        self.accept(*self.screen(children, survivors))
        self.history.append(self.parent_error)
        return True

    def finish(self) -> None:
        """A last look at the study: a better plan another process found is taken."""
        if self.sync() and self.parent_error < self.history[-1]:
            self.history.append(self.parent_error)


def _generations(
    run: _Evolution,
    budget: _Budget,
    offspring: int,
    flips: tuple[int, int],
    survivors: Sequence[int],
    progress: Progress | None,
    stall: Stall | None = None,
    judge: Judge | None = None,
) -> tuple[int, str]:
    """Run generations until the budget is spent, no new plan is found or the search stalls
    (on the judge's data when there is a judge, else on its own); returns how many ran and
    why they stopped."""
    generations = 0
    if stall is not None and judge is not None:
        judge.look(run.parent)
    while (stopped := budget.spent(run.counter)) is None:
        if not run.generation(offspring, flips, survivors):
            return generations, NO_NEW_PLAN
        generations += 1
        if progress is not None:
            progress(run.counter, run.parent_error, run.table.margins(run.parent, run.limits))
        if stall is None:
            continue
        if judge is not None:
            judge.look(run.parent)
            stalled = stall.reason(judge.history, judge.name)
        else:
            stalled = stall.reason(run.history)
        if stalled is not None:
            return generations, stalled
    return generations, stopped


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
    stall: Stall | None = None,
    judge: Judge | None = None,
) -> SearchResult:
    """Improve ``start`` (a plan within ``limits``) by evolution.

    ``max_evals`` bounds the cost in full evaluations (cheaper fidelities count by their
    cost), ``timeout`` the seconds; ``survivors`` gives how many offspring pass each cheaper
    fidelity (one entry per fidelity but the last; default a quarter at each step). With
    ``study``, evaluations already in it (earlier runs, other processes: read again every
    generation) are not repeated, its best complete plan within the limits becomes the
    parent if better, and every new evaluation is recorded there. Choices are ordered into
    levels by their cost in ``order_by`` (default: the first limit's resource). With
    ``stall``, the search also stops once its best error stops falling (see :class:`Stall`):
    on ``judge``'s data when given (the parent is judged after every generation), else on
    the search's own.
    """
    began = time.perf_counter()
    if not table.fits(start, limits):
        raise ValueError("the starting plan does not meet the limits")
    survivors = _survivors(survivors, offspring, len(fitness.costs))
    mutate = _Mutator(table, limits, random.Random(seed), order_by or primary_resource(limits))
    run = _Evolution(table, limits, fitness, mutate, study, start)
    resumed = run.sync()
    run.begin()
    budget = _Budget(max_evals, timeout, began)
    generations, stopped = _generations(
        run, budget, offspring, flips, survivors, progress, stall, judge
    )
    run.finish()
    return SearchResult(
        assignment=run.parent,
        error=run.parent_error,
        evaluations=run.counter,
        seconds=time.perf_counter() - began,
        iterations=generations,
        history=run.history,
        stopped=stopped,
        resumed=resumed,
        shared=run.shared,
        judged=[] if judge is None else list(judge.history),
    )
