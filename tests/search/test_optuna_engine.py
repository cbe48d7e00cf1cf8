"""optuna_search: TPE within limits with a warm start, NSGA-II Pareto fronts, resuming."""

from __future__ import annotations

import optuna
import pytest

from search import allocate, optuna_search
from search.optuna_engine import NOTHING_NEW
from search.study import open_study
from tests.search.synthetic import SyntheticFitness, bits_limit, make_problem


def test_tpe_evaluates_only_plans_within_the_limits_and_starts_warm(problem):
    table, weights, limits, start = problem
    fitness = SyntheticFitness(table, weights, costs=(1.0,))
    result = optuna_search(table, limits, fitness, warm_start=[start], max_evals=25, seed=0)
    assert fitness.calls[0] == (tuple(start), 0)
    assert all(table.fits(list(plan), limits) for plan, _ in fitness.calls)
    assert len(fitness.calls) == len(set(fitness.calls)) == result.evaluations.calls[0] == 25
    assert table.fits(result.assignment, limits)
    assert result.error == min(fitness.exact(list(p)) for p, _ in fitness.calls)
    assert result.error <= fitness.exact(start)


def test_same_seed_same_plan(problem):
    table, weights, limits, start = problem
    runs = [
        optuna_search(
            table,
            limits,
            SyntheticFitness(table, weights, (1.0,)),
            warm_start=[start],
            max_evals=15,
            seed=3,
        )
        for _ in range(2)
    ]
    assert runs[0].assignment == runs[1].assignment
    assert runs[0].error == runs[1].error


def test_nsga2_returns_a_pareto_front_of_error_and_cost(problem):
    table, weights, limits, start = problem
    result = optuna_search(
        table,
        limits,
        SyntheticFitness(table, weights, (1.0,)),
        sampler="nsga2",
        objectives=("error", "bits"),
        warm_start=[start],
        max_evals=40,
        population=10,
    )
    front = result.pareto
    assert len(front) >= 2
    for point in front:
        assert table.fits(point["assignment"], limits)
        assert point["bits"] == table.total("bits", point["assignment"])
    for a in front:  # nobody on the front is dominated by another
        assert not any(
            b["error"] <= a["error"] and b["bits"] <= a["bits"] and b != a for b in front
        )
    assert [p["bits"] for p in front] == sorted(p["bits"] for p in front)
    assert result.error == min(p["error"] for p in front)


def test_resumes_from_storage_and_counts_only_new_evaluations(problem, tmp_path):
    table, weights, limits, start = problem
    storage = f"sqlite:///{tmp_path / 'tpe.db'}"
    first = optuna_search(
        table,
        limits,
        SyntheticFitness(table, weights, (1.0,)),
        warm_start=[start],
        max_evals=10,
        storage=storage,
        study_name="t",
    )
    again = optuna_search(
        table,
        limits,
        SyntheticFitness(table, weights, (1.0,)),
        warm_start=[start],
        max_evals=10,
        storage=storage,
        study_name="t",
    )
    assert again.resumed >= 10
    assert again.error <= first.error
    study = open_study(storage, "t")
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len([t for t in complete if max(t.constraints.values()) <= 0]) >= 20


def test_unknown_sampler_is_refused(problem):
    table, weights, limits, _ = problem
    with pytest.raises(ValueError, match="allowed: tpe, nsga2"):
        optuna_search(table, limits, SyntheticFitness(table, weights, (1.0,)), sampler="grid")


def test_plans_over_the_limits_are_repaired_not_wasted(problem):
    table, weights, limits, _ = problem
    fitness = SyntheticFitness(table, weights, costs=(1.0,))
    result = optuna_search(table, limits, fitness, max_evals=20, seed=1)
    # nearly every sample costs one evaluation within the limits
    assert result.evaluations.calls[0] == 20
    assert result.iterations <= 30
    assert all(table.fits(list(plan), limits) for plan, _ in fitness.calls)


def test_stops_when_the_sampler_proposes_nothing_new():
    table, weights = make_problem(n=2)
    limits = bits_limit(table, 2.0)  # only the cheapest plan fits
    fitness = SyntheticFitness(table, weights, costs=(1.0,))
    result = optuna_search(table, limits, fitness, max_evals=2, seed=0)
    assert result.stopped == NOTHING_NEW
    assert result.evaluations.calls == [1]
    assert result.iterations > 50 * 2
    assert result.assignment == allocate(table, limits).assignment
