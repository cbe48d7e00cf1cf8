"""evolve: limits kept, duplicates rejected, fidelity steps, seeds, studies and resuming."""

from __future__ import annotations

import optuna
import pytest

from search import allocate, evolve
from search.evolution import NO_NEW_PLAN, Judge, Stall, default_survivors
from search.study import open_study
from tests.search.synthetic import SyntheticFitness, bits_limit, make_problem


def test_improves_on_the_additive_optimum_and_keeps_the_limits(problem):
    table, weights, limits, start = problem
    fitness = SyntheticFitness(table, weights)
    result = evolve(table, limits, fitness, start, max_evals=60, seed=1)
    assert table.fits(result.assignment, limits)
    assert result.error == pytest.approx(fitness.exact(result.assignment))
    assert result.error < fitness.exact(start)
    assert all(table.fits(list(plan), limits) for plan, _ in fitness.calls)
    # the parent only ever gets better
    assert result.history == sorted(result.history, reverse=True)


def test_never_evaluates_a_plan_twice_at_one_fidelity(problem):
    table, weights, limits, start = problem
    fitness = SyntheticFitness(table, weights)
    evolve(table, limits, fitness, start, max_evals=40, seed=2)
    assert len(fitness.calls) == len(set(fitness.calls))


def test_cheap_fidelities_screen_the_offspring(problem):
    table, weights, limits, start = problem
    fitness = SyntheticFitness(table, weights, costs=(0.1, 0.4, 1.0))
    result = evolve(table, limits, fitness, start, max_evals=20, offspring=16, seed=3)
    calls = result.evaluations.calls
    generations = result.iterations
    assert default_survivors(16, 3) == [4, 1]
    assert calls == [16 * generations, 4 * generations, 1 + generations]
    # a plan reaches a dearer fidelity only after the cheaper ones
    by_plan: dict[tuple[int, ...], list[int]] = {}
    for plan, fidelity in fitness.calls:
        by_plan.setdefault(plan, []).append(fidelity)
    assert all(f == list(range(len(f))) for p, f in by_plan.items() if p != tuple(start))
    assert result.evaluations.full_equivalent == pytest.approx(
        0.1 * calls[0] + 0.4 * calls[1] + calls[2]
    )
    assert result.evaluations.full_equivalent >= 20


def test_same_seed_same_result_and_other_seed_other_path(problem):
    table, weights, limits, start = problem
    runs = [
        evolve(table, limits, SyntheticFitness(table, weights), start, max_evals=30, seed=s)
        for s in (7, 7, 8)
    ]
    assert runs[0].assignment == runs[1].assignment
    assert runs[0].history == runs[1].history
    assert runs[0].history != runs[2].history or runs[0].assignment != runs[2].assignment


def test_stops_on_timeout(problem):
    table, weights, limits, start = problem
    result = evolve(
        table, limits, SyntheticFitness(table, weights), start, max_evals=10**6, timeout=0.2
    )
    assert result.stopped == "timeout"


def test_stops_when_no_new_plan_fits():
    table, weights = make_problem(n=3)
    limits = bits_limit(table, 2.5)
    start = allocate(table, limits).assignment
    fitness = SyntheticFitness(table, weights)
    result = evolve(table, limits, fitness, start, max_evals=10**6, offspring=4, seed=0)
    assert result.stopped == NO_NEW_PLAN
    assert result.evaluations.full_equivalent < 10**6
    assert len(fitness.calls) == len(set(fitness.calls))
    assert all(table.fits(list(plan), limits) for plan, _ in fitness.calls)


def test_stops_when_the_best_error_stalls_and_says_so(problem):
    """With a stall rule the search ends once the parent's error fell by less than the gain
    over the last generations, well before the evaluation ceiling; without one it runs on."""
    table, weights, limits, start = problem

    def run(**stop):
        fitness = SyntheticFitness(table, weights)
        return evolve(table, limits, fitness, start, max_evals=10**4, seed=4, **stop)

    stalled = run(stall=Stall(generations=3, gain=0.01, idle=None))
    assert stalled.stopped.startswith("stalled (under 1% lower error in 3 generations)")
    history = stalled.history
    assert history[-4] - history[-1] <= 0.01 * history[-4]
    assert all(  # no earlier window of 3 generations had stalled
        history[i - 3] - history[i] > 0.01 * history[i - 3] for i in range(3, len(history) - 1)
    )
    free = run(timeout=3 * stalled.seconds + 0.5)
    assert free.stopped != stalled.stopped and free.iterations > stalled.iterations


def test_a_judge_says_when_the_search_stalls(problem):
    """With a judge, the stall is read on the judge's errors: a judge that sees no gain stops
    the search after the stall's generations, though the search's own error still falls."""
    table, weights, limits, start = problem
    seen: list[list[int]] = []

    def flat(assignment: list[int]) -> float:
        seen.append(list(assignment))
        return 1.0

    judge = Judge(flat)
    fitness = SyntheticFitness(table, weights)
    result = evolve(
        table,
        limits,
        fitness,
        start,
        max_evals=10**4,
        seed=4,
        stall=Stall(3, 0.01, idle=None),
        judge=judge,
    )
    assert result.stopped == (
        "stalled (under 1% lower error on the selection split in 3 generations)"
    )
    assert result.iterations == 3 and result.judged == [1.0] * 4
    assert seen[0] == start and seen[-1] == result.assignment
    assert result.history[0] - result.history[-1] > 0.01 * result.history[0]  # own: no stall


def test_a_judge_that_keeps_seeing_gains_lets_the_search_run(problem):
    table, weights, limits, start = problem
    falling = iter(0.5**k for k in range(10**6))
    judge = Judge(lambda assignment: next(falling))
    fitness = SyntheticFitness(table, weights)
    result = evolve(
        table, limits, fitness, start, max_evals=60, seed=4, stall=Stall(3, 0.01), judge=judge
    )
    assert not result.stopped.startswith("stalled")
    assert len(result.judged) == result.iterations + 1


def test_a_judge_that_sees_no_gain_for_the_idle_generations_stops_the_search(problem):
    """The idle rule: no lower error at all on the judge's data over 2 generations stops the
    search then, before the gain rule's 3 generations; a judge that saw a small gain in
    them lets it run on to the gain rule."""
    table, weights, limits, start = problem

    def run(errors: list[float]):
        judged = iter(errors)
        judge = Judge(lambda assignment: next(judged))
        fitness = SyntheticFitness(table, weights)
        stall = Stall(3, 0.01, idle=2)
        return evolve(
            table, limits, fitness, start, max_evals=10**4, seed=4, stall=stall, judge=judge
        )

    idle = run([1.0, 1.0, 1.2] + [1.0] * 100)
    assert idle.stopped == "stalled (no lower error on the selection split in 2 generations)"
    assert idle.iterations == 2 and idle.judged == [1.0, 1.0, 1.2]
    small_gain = run([1.0, 0.999, 0.998, 0.997] + [0.997] * 100)
    assert small_gain.stopped == (
        "stalled (under 1% lower error on the selection split in 3 generations)"
    )
    assert small_gain.iterations == 3


def test_idle_generations_below_one_are_refused():
    with pytest.raises(ValueError, match="idle generations"):
        Stall(3, 0.01, idle=0)


@pytest.mark.parametrize(("generations", "gain"), [(0, 0.01), (3, -0.1), (3, 1.0)])
def test_a_stall_rule_out_of_range_is_refused(generations: int, gain: float):
    with pytest.raises(ValueError, match="a stall needs"):
        Stall(generations, gain)


def test_refuses_a_start_over_the_limits(problem):
    table, weights, limits, _ = problem
    dearest = [len(c) - 1 for c in table.choices]
    with pytest.raises(ValueError, match="does not meet the limits"):
        evolve(table, limits, SyntheticFitness(table, weights), dearest)


def test_records_every_evaluation_in_the_study_and_resumes_from_it(problem, tmp_path):
    table, weights, limits, start = problem
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = SyntheticFitness(table, weights)
    study = open_study(storage, "s")
    one = evolve(table, limits, first, start, max_evals=15, seed=4, study=study)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == len({plan for plan, _ in first.calls})
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert min(t.values[0] for t in complete) == pytest.approx(one.error)
    assert all(t.user_attrs["engine"] == "evolution" for t in trials)
    assert all(t.constraints is not None and max(t.constraints.values()) <= 0 for t in trials)

    # a new process: loads the study, starts from its best plan, repeats nothing
    second = SyntheticFitness(table, weights)
    two = evolve(table, limits, second, start, max_evals=15, seed=5, study=open_study(storage, "s"))
    assert two.resumed == len(trials)
    assert two.history[0] == pytest.approx(one.error)
    assert not {plan for plan, _ in first.calls} & {plan for plan, _ in second.calls}
    assert two.error <= one.error


def test_a_study_for_another_space_is_refused(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    open_study(storage, "s", key="a")
    open_study(storage, "s", key="a")
    with pytest.raises(ValueError, match="another model"):
        open_study(storage, "s", key="b")
    with pytest.raises(ValueError, match="objective"):
        open_study(storage, "s", directions=("minimize", "minimize"))
