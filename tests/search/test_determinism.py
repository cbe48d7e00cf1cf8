"""Both engines, given one seed, repeat the same evaluations and leave the same study."""

from __future__ import annotations

from typing import Any

from search import evolve, optuna_search
from search.study import open_study
from tests.search.synthetic import SyntheticFitness


def trials(study: Any) -> list[tuple]:
    """What a study holds, without timestamps."""
    return [
        (
            t.number,
            t.state,
            t.params,
            t.values,
            t.intermediate_values,
            t.user_attrs,
            t.system_attrs.get("constraints"),
        )
        for t in study.get_trials(deepcopy=False)
    ]


def outcome(result: Any) -> tuple:
    return (
        result.assignment,
        result.error,
        result.evaluations.calls,
        result.iterations,
        result.history,
        result.stopped,
        result.pareto,
    )


def test_evolution_repeats_its_evaluations_and_study_for_a_seed(problem):
    table, weights, limits, start = problem
    runs = []
    for _ in range(2):
        fitness, study = SyntheticFitness(table, weights, (0.1, 0.4, 1.0)), open_study(None, None)
        result = evolve(table, limits, fitness, start, max_evals=12, seed=4, study=study)
        runs.append((outcome(result), fitness.calls, trials(study)))
    assert runs[0] == runs[1]
    assert len(runs[0][2]) == len({plan for plan, _ in runs[0][1]})


def test_optuna_repeats_its_evaluations_and_study_for_a_seed(problem, tmp_path):
    table, weights, limits, start = problem
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    runs = []
    for name in ("a", "b"):
        fitness = SyntheticFitness(table, weights, (1.0,))
        result = optuna_search(
            table,
            limits,
            fitness,
            sampler="nsga2",
            objectives=("error", "bits"),
            warm_start=[start],
            max_evals=15,
            population=6,
            seed=2,
            storage=storage,
            study_name=name,
        )
        study = open_study(storage, name, directions=("minimize", "minimize"))
        runs.append((outcome(result), fitness.calls, trials(study)))
    assert runs[0] == runs[1]
    assert runs[0][0][-1]  # a Pareto front
