"""Optuna engines: TPE (one objective) and NSGA-II (a Pareto front of error and costs).

Each variable is an integer parameter, its level among its choices ordered by cost, so that
samplers see which choices are close. Limits are the trials' Optuna constraints: a
plan over a limit is not evaluated (it is told a cheap additive estimate and marked
infeasible); instead it is stepped down within the limits (:meth:`ChoiceTable.repair`) and
that plan is evaluated and recorded as a trial of its own, so every sample yields a plan
within the limits and only those cost a full evaluation. The allocator's plan and
any others given are enqueued first (warm start).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from search.evolution import Progress, SearchResult, out_of_time, primary_resource
from search.fitness import Counter, Fitness
from search.space import ChoiceTable
from search.study import (
    ENGINE_ATTR,
    constraint_dict,
    distributions,
    from_params,
    open_study,
    record,
    to_params,
)

SAMPLERS = ("tpe", "nsga2")
NOTHING_NEW = "the sampler proposes nothing new within the limits"
Best = tuple[float, list[int]]  # (error, plan)


def _sampler(name: str, seed: int, population: int) -> Any:
    """The Optuna sampler called ``name``, seeded."""
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
    raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")


def _open(
    storage: str | None,
    study_name: str | None,
    objectives: Sequence[str],
    sampler: Any,
    key: str | None,
) -> Any:
    """The study to search in, one direction (minimise) per objective."""
    return open_study(
        storage,
        study_name,
        directions=["minimize"] * len(objectives),
        sampler=sampler,
        key=key,
    )


def _warm_start(
    study: Any,
    plans: Sequence[list[int]],
    table: ChoiceTable,
    levels: list[list[int]],
    limits: dict[str, float],
) -> None:
    """Enqueue the given plans within the limits as the first trials."""
    for plan in plans:
        if table.fits(plan, limits):
            study.enqueue_trial(to_params(plan, table, levels), skip_if_exists=True)


class _Sampling:
    """One run's state: the study, the plans evaluated (also by earlier runs) and the best."""

    def __init__(
        self,
        study: Any,
        table: ChoiceTable,
        limits: dict[str, float],
        fitness: Fitness,
        levels: list[list[int]],
        spaces: dict[str, Any],
        engine: str,
        objectives: Sequence[str],
    ) -> None:
        self.study = study
        self.table = table
        self.limits = limits
        self.fitness = fitness
        self.levels = levels
        self.spaces = spaces
        self.engine = engine
        self.objectives = objectives
        self.full = len(fitness.costs) - 1
        self.counter = Counter(fitness.costs)
        self.known = {
            tuple(plan): trial.values[0]
            for trial, plan in _feasible_trials(study, table, levels, limits)
        }
        self.best: Best | None = None

    def step(self) -> bool:
        """Ask for one trial and evaluate its plan, or the plan repaired within the limits;
        ``False`` if that repaired plan was nothing new."""
        trial = self.study.ask(self.spaces)
        plan = from_params(trial.params, self.table, self.levels)
        assert plan is not None
        margins = self.table.margins(plan, self.limits)
        self._label(trial, margins)
        if any(m < 0 for m in margins.values()):
            outcome = self._repaired(trial, plan)
        else:
            outcome = self._feasible(trial, plan)
        if outcome is None:
            return False
        if self.best is None or outcome[0] < self.best[0]:
            self.best = outcome
        return True

    def _label(self, trial: Any, margins: dict[str, float]) -> None:
        """Give the trial its constraints (from the limit margins) and this engine's name."""
        for resource, value in constraint_dict(margins).items():
            trial.set_constraint(resource, value)
        trial.set_user_attr(ENGINE_ATTR, self.engine)

    def _extra(self, plan: list[int]) -> list[float]:
        """The plan's resource objectives."""
        return [self.table.total(r, plan) for r in self.objectives[1:]]

    def _feasible(self, trial: Any, plan: list[int]) -> Best:
        """Tell the trial its plan's error (evaluated unless known)."""
        if tuple(plan) not in self.known:
            self.known[tuple(plan)] = float(self.fitness(plan, self.full))
            self.counter.add(self.full)
        error = self.known[tuple(plan)]
        self.study.tell(trial, [error, *self._extra(plan)])
        return error, plan

    def _repaired(self, trial: Any, over: list[int]) -> Best | None:
        """Tell a trial over a limit a cheap estimate (it is infeasible); evaluate the plan
        stepped down within the limits instead, as a trial of its own, unless known."""
        self.study.tell(trial, [self.table.score(over), *self._extra(over)])
        plan = self.table.repair(over, self.limits, self.levels)
        if plan is None or tuple(plan) in self.known:
            return None
        error = float(self.fitness(plan, self.full))
        self.counter.add(self.full)
        self.known[tuple(plan)] = error
        record(
            self.study,
            self.table,
            self.levels,
            plan,
            value=[error, *self._extra(plan)],
            intermediate={},
            constraints=constraint_dict(self.table.margins(plan, self.limits)),
            engine=self.engine,
            attrs={"repaired": True},
        )
        return error, plan


def _sample(
    run: _Sampling,
    max_evals: float,
    began: float,
    timeout: float | None,
    progress: Progress | None,
) -> tuple[int, str]:
    """Ask for trials until ``max_evals`` evaluations, the timeout or too many asks without
    anything new; returns the number of asks and why they stopped."""
    asks = 0
    while run.counter.calls[run.full] < max_evals:
        if out_of_time(began, timeout):
            return asks, "timeout"
        if asks > 50 * max(max_evals, 1):
            return asks, NOTHING_NEW
        asks += 1
        if run.step() and progress is not None and run.best is not None:
            progress(run.counter, run.best[0], run.table.margins(run.best[1], run.limits))
    return asks, "max_evals"


def _result(run: _Sampling, began: float, asks: int, stopped: str, resumed: int) -> SearchResult:
    """The best feasible plan in the study (earlier runs included) and the Pareto front."""
    best = _best_feasible(run.study, run.table, run.levels, run.limits) or run.best
    if best is None:
        raise ValueError("the search evaluated no plan within the limits")
    front: list[dict[str, Any]] = []
    if len(run.objectives) > 1:
        front = _front(run.study, run.table, run.levels, run.limits, run.objectives)
    return SearchResult(
        assignment=best[1],
        error=best[0],
        evaluations=run.counter,
        seconds=time.perf_counter() - began,
        iterations=asks,
        stopped=stopped,
        resumed=resumed,
        pareto=front,
    )


def optuna_search(
    table: ChoiceTable,
    limits: dict[str, float],
    fitness: Fitness,
    *,
    sampler: str = "tpe",
    objectives: Sequence[str] = ("error",),
    warm_start: Sequence[list[int]] = (),
    seed: int = 0,
    max_evals: float = 200.0,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    population: int = 24,
    key: str | None = None,
    order_by: str | None = None,
    progress: Progress | None = None,
) -> SearchResult:
    """Search with an Optuna sampler; ``objectives`` is ``("error",)`` or ``("error", *resources)``
    (a Pareto front over error and those resources, for NSGA-II). Evaluations are at full
    fidelity; ``max_evals`` counts them."""
    began = time.perf_counter()
    if objectives[0] != "error":
        raise ValueError("the first objective must be 'error'")
    levels = table.levels(order_by or primary_resource(limits))
    spaces = distributions(table, levels)
    study = _open(storage, study_name, objectives, _sampler(sampler, seed, population), key)
    resumed = len(study.trials)
    _warm_start(study, warm_start, table, levels, limits)
    run = _Sampling(study, table, limits, fitness, levels, spaces, sampler, objectives)
    asks, stopped = _sample(run, max_evals, began, timeout, progress)
    return _result(run, began, asks, stopped, resumed)


def _feasible_trials(study: Any, table: ChoiceTable, levels: list[list[int]], limits) -> list:
    import optuna

    out = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        plan = from_params(trial.params, table, levels)
        if plan is not None and table.fits(plan, limits) and trial.values:
            out.append((trial, plan))
    return out


def _best_feasible(study, table, levels, limits) -> tuple[float, list[int]] | None:
    trials = _feasible_trials(study, table, levels, limits)
    if not trials:
        return None
    trial, plan = min(trials, key=lambda item: (item[0].values[0], item[1]))
    return trial.values[0], plan


def _front(study, table, levels, limits, objectives) -> list[dict[str, Any]]:
    """The non-dominated feasible plans, by (error, each resource objective)."""
    points = [
        (trial.values, plan) for trial, plan in _feasible_trials(study, table, levels, limits)
    ]
    front = []
    for values, plan in points:
        dominated = any(
            all(o <= v for o, v in zip(other, values, strict=True)) and other != values
            for other, _ in points
        )
        if not dominated:
            front.append({"assignment": plan, **dict(zip(objectives, values, strict=True))})
    return sorted(front, key=lambda p: p[objectives[1]])
