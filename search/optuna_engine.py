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

from search.evolution import Progress, SearchResult, primary_resource
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


def _sampler(name: str, seed: int, population: int) -> Any:
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
    raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")


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
    study = open_study(
        storage,
        study_name,
        directions=["minimize"] * len(objectives),
        sampler=_sampler(sampler, seed, population),
        key=key,
    )
    resumed = len(study.trials)
    for plan in warm_start:
        if table.fits(plan, limits):
            study.enqueue_trial(to_params(plan, table, levels), skip_if_exists=True)
    full = len(fitness.costs) - 1
    counter = Counter(fitness.costs)
    known = {
        tuple(plan): trial.values[0]
        for trial, plan in _feasible_trials(study, table, levels, limits)
    }
    best: tuple[float, list[int]] | None = None
    asks = 0
    stopped = "max_evals"
    while counter.calls[full] < max_evals:
        if timeout is not None and time.perf_counter() - began > timeout:
            stopped = "timeout"
            break
        if asks > 50 * max(max_evals, 1):
            stopped = "the sampler proposes nothing new within the limits"
            break
        asks += 1
        trial = study.ask(spaces)
        plan = from_params(trial.params, table, levels)
        assert plan is not None
        margins = table.margins(plan, limits)
        for resource, value in constraint_dict(margins).items():
            trial.set_constraint(resource, value)
        trial.set_user_attr(ENGINE_ATTR, sampler)
        extra = [table.total(r, plan) for r in objectives[1:]]
        if any(m < 0 for m in margins.values()):
            # over a limit: told a cheap estimate and marked infeasible; the plan stepped
            # down within the limits is evaluated instead and added as a trial of its own
            study.tell(trial, [table.score(plan), *extra])
            plan = table.repair(plan, limits, levels)
            if plan is None or tuple(plan) in known:
                continue
            error = float(fitness(plan, full))
            counter.add(full)
            known[tuple(plan)] = error
            record(
                study,
                table,
                levels,
                plan,
                value=[error, *[table.total(r, plan) for r in objectives[1:]]],
                intermediate={},
                constraints=constraint_dict(table.margins(plan, limits)),
                engine=sampler,
                attrs={"repaired": True},
            )
        else:
            key = tuple(plan)
            if key not in known:
                known[key] = float(fitness(plan, full))
                counter.add(full)
            error = known[key]
            study.tell(trial, [error, *extra])
        if best is None or error < best[0]:
            best = (error, plan)
        if progress is not None:
            progress(counter, best[0], table.margins(best[1], limits))
    best = _best_feasible(study, table, levels, limits) or best
    if best is None:
        raise ValueError("the search evaluated no plan within the limits")
    front = _front(study, table, levels, limits, objectives) if len(objectives) > 1 else []
    return SearchResult(
        assignment=best[1],
        error=best[0],
        evaluations=counter,
        seconds=time.perf_counter() - began,
        iterations=asks,
        stopped=stopped,
        resumed=resumed,
        pareto=front,
    )


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
