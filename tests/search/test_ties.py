"""tie: tied variables take one label in every engine's plan, optimally for the allocator."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from search import ChoiceTable, allocate, evolve
from search.ties import TiedFitness, tie
from tests.search.synthetic import SyntheticFitness, bits_limit, make_problem


def table_of(choices: list[list[str]], scores: list[list[float]], costs: list[list[float]]):
    return ChoiceTable(
        variables=[f"v{i}" for i in range(len(choices))],
        choices=choices,
        scores=[np.asarray(s, dtype=np.float64) for s in scores],
        costs={"bytes": [np.asarray(c, dtype=np.float64) for c in costs]},
        fixed={"bytes": 5.0},
    )


def brute_force(table: ChoiceTable, limits, groups) -> tuple[float, list[int]]:
    """The best assignment whose grouped variables share labels, by enumeration."""
    best = (float("inf"), [])
    for assignment in itertools.product(*(range(len(c)) for c in table.choices)):
        labels = table.labels(list(assignment))
        if any(len({labels[v] for v in group}) > 1 for group in groups):
            continue
        if table.fits(list(assignment), limits) and table.score(list(assignment)) < best[0]:
            best = (table.score(list(assignment)), list(assignment))
    return best


def test_the_reduced_table_sums_members_over_the_labels_they_share() -> None:
    table = table_of(
        [["keep", "int8", "int4"], ["keep", "int4"], ["int8", "keep"]],
        [[0.0, 1.0, 4.0], [0.0, 2.0], [3.0, 0.0]],
        [[10, 5, 3], [20, 6], [7, 14]],
    )
    tied = tie(table, [["v0", "v1"]])
    assert tied.reduced.variables == ["v0+v1", "v2"]
    assert tied.reduced.choices == [["keep", "int4"], ["int8", "keep"]]  # int8: v1 lacks it
    assert tied.reduced.scores[0].tolist() == [0.0, 6.0]
    assert tied.reduced.costs["bytes"][0].tolist() == [30.0, 9.0]
    assert tied.reduced.fixed == {"bytes": 5.0}
    full = tied.expand([1, 0])
    assert table.labels(full) == {"v0": "int4", "v1": "int4", "v2": "int8"}
    assert tied.reduce(full) == [1, 0]
    assert tied.reduce([1, 1, 0]) is None  # v0 int8, v1 int4: the group split
    assert table.total("bytes", full) == tied.reduced.total("bytes", [1, 0])


@pytest.mark.parametrize("limit", [20.0, 30.0, 45.0, 60.0])
def test_the_allocator_on_the_reduced_table_is_the_best_tied_plan(limit: float) -> None:
    rng = np.random.default_rng(int(limit))
    labels = ["keep", "int8", "int4", "int2"]
    table = table_of(
        [labels] * 5,
        [sorted(rng.uniform(0, 5, 4).tolist()) for _ in range(5)],
        [[12, 7, 4, 2]] * 5,
    )
    groups = [["v0", "v2"], ["v1", "v3", "v4"]]
    tied = tie(table, groups)
    limits = {"bytes": limit}
    allocation = tied.allocation(allocate(tied.reduced, limits))
    best_score, _ = brute_force(table, limits, groups)
    assert table.score(allocation.assignment) == pytest.approx(best_score)
    assert tied.reduce(allocation.assignment) is not None
    assert table.fits(allocation.assignment, limits)


def test_evolution_on_the_reduced_table_keeps_every_group_whole() -> None:
    table, weights = make_problem(n=8, seed=4)
    groups = [["layer0", "layer1", "layer2"], ["layer5", "layer6"]]
    tied = tie(table, groups)
    limits = bits_limit(table, 4.5)
    fitness = SyntheticFitness(table, weights)
    start = allocate(tied.reduced, limits).assignment

    reduced = TiedFitness(tied, fitness)
    result = tied.result(evolve(tied.reduced, limits, reduced, start, max_evals=30))
    assert fitness.calls
    for assignment, _ in fitness.calls:
        assert tied.reduce(list(assignment)) is not None
    assert tied.reduce(result.assignment) is not None
    assert table.fits(result.assignment, limits)
    labels = table.labels(result.assignment)
    assert len({labels[v] for v in groups[0]}) == len({labels[v] for v in groups[1]}) == 1


def test_bad_groups_are_refused() -> None:
    table = table_of([["keep", "int8"], ["int4"]], [[0.0, 1.0], [1.0]], [[2, 1], [1]])
    with pytest.raises(ValueError, match="not in the table: v9"):
        tie(table, [["v0", "v9"]])
    with pytest.raises(ValueError, match="tied twice"):
        tie(table, [["v0", "v1"], ["v1", "v0"]])
    with pytest.raises(ValueError, match="share no choice"):
        tie(table, [["v0", "v1"]])
