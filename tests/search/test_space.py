"""ChoiceTable: validation and the plain arithmetic over assignments."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from search import ChoiceTable


def _table() -> ChoiceTable:
    """Three variables with 3, 2 and 1 choices, an integer and a float resource."""
    return ChoiceTable(
        variables=["embed", "attn", "head"],
        choices=[["int8", "int4", "keep"], ["keep", "int4"], ["keep"]],
        scores=[
            np.array([0.25, 1.5, 0.0]),
            np.array([0.0, -0.75]),
            np.array([2.0]),
        ],
        costs={
            "bytes": [
                np.array([800, 400, 3200], dtype=np.int64),
                np.array([1600, 200], dtype=np.int64),
                np.array([50], dtype=np.int64),
            ],
            "seconds": [
                np.array([0.5, 0.25, 1.0]),
                np.array([0.125, 0.0625]),
                np.array([0.03125]),
            ],
        },
        fixed={"bytes": 1000.0},
    )


def _assignments(table: ChoiceTable) -> list[list[int]]:
    return [list(a) for a in itertools.product(*(range(len(ch)) for ch in table.choices))]


# --------------------------------------------------------------------------- validation


def test_valid_table_builds() -> None:
    table = _table()
    assert len(_assignments(table)) == 3 * 2 * 1


def test_empty_table_is_valid() -> None:
    table = ChoiceTable(variables=[], choices=[], scores=[], costs={"bytes": []})
    assert table.total("bytes", []) == 0.0
    assert table.score([]) == 0.0


@pytest.mark.parametrize("drop", ["choices", "scores"])
def test_one_entry_per_variable_required(drop: str) -> None:
    args = {
        "variables": ["a", "b"],
        "choices": [["x"], ["x", "y"]],
        "scores": [np.array([0.0]), np.array([0.0, 1.0])],
        "costs": {"bytes": [np.array([1]), np.array([1, 2])]},
    }
    args[drop] = args[drop][:1]
    with pytest.raises(ValueError, match="one entry per variable"):
        ChoiceTable(**args)


def test_extra_variable_name_rejected() -> None:
    with pytest.raises(ValueError, match="one entry per variable"):
        ChoiceTable(
            variables=["a", "b", "c"],
            choices=[["x"], ["x", "y"]],
            scores=[np.array([0.0]), np.array([0.0, 1.0])],
            costs={},
        )


def test_cost_arrays_must_cover_every_variable() -> None:
    with pytest.raises(ValueError, match="'latency'"):
        ChoiceTable(
            variables=["a", "b"],
            choices=[["x"], ["x", "y"]],
            scores=[np.array([0.0]), np.array([0.0, 1.0])],
            costs={
                "bytes": [np.array([1]), np.array([1, 2])],
                "latency": [np.array([1.0])],
            },
        )


def test_cost_array_length_must_match_choices() -> None:
    with pytest.raises(ValueError, match="wrong number of costs for b"):
        ChoiceTable(
            variables=["a", "b"],
            choices=[["x"], ["x", "y"]],
            scores=[np.array([0.0]), np.array([0.0, 1.0])],
            costs={"bytes": [np.array([1]), np.array([1, 2, 3])]},
        )


def test_score_array_length_must_match_choices() -> None:
    with pytest.raises(ValueError, match=r"^b: needs one score per choice"):
        ChoiceTable(
            variables=["a", "b"],
            choices=[["x"], ["x", "y"]],
            scores=[np.array([0.0]), np.array([0.0])],
            costs={"bytes": [np.array([1]), np.array([1, 2])]},
        )


@pytest.mark.parametrize("with_costs", [True, False])
def test_empty_choice_list_rejected(with_costs: bool) -> None:
    costs = {"bytes": [np.array([1]), np.array([], dtype=np.int64)]} if with_costs else {}
    with pytest.raises(ValueError, match=r"^b: needs one score per choice"):
        ChoiceTable(
            variables=["a", "b"],
            choices=[["x"], []],
            scores=[np.array([0.0]), np.array([])],
            costs=costs,
        )


# --------------------------------------------------------------------------- arithmetic


def test_index_finds_label_per_variable() -> None:
    table = _table()
    assert table.index(0, "keep") == 2
    assert table.index(1, "keep") == 0
    with pytest.raises(ValueError):
        table.index(2, "int4")


@pytest.mark.parametrize("resource", ["bytes", "seconds"])
def test_total_adds_fixed_part_and_one_cost_per_variable(resource: str) -> None:
    table = _table()
    fixed = table.fixed.get(resource, 0.0)
    per_var = table.costs[resource]
    for assignment in _assignments(table):
        expected = fixed
        for i, c in enumerate(assignment):
            expected += float(per_var[i][c])
        assert table.total(resource, assignment) == pytest.approx(expected, abs=0, rel=1e-15)


def test_total_of_integer_costs_is_exact() -> None:
    table = _table()
    for assignment in _assignments(table):
        exact = int(table.fixed["bytes"]) + sum(
            int(table.costs["bytes"][i][c]) for i, c in enumerate(assignment)
        )
        assert table.total("bytes", assignment) == exact


def test_score_sums_chosen_scores() -> None:
    table = _table()
    for assignment in _assignments(table):
        expected = sum(float(table.scores[i][c]) for i, c in enumerate(assignment))
        assert table.score(assignment) == pytest.approx(expected)
        assert isinstance(table.score(assignment), float)


@pytest.mark.parametrize("resource", ["bytes", "seconds"])
def test_minimum_is_least_total_over_all_assignments(resource: str) -> None:
    table = _table()
    least = min(table.total(resource, a) for a in _assignments(table))
    assert table.minimum(resource) == pytest.approx(least)
    by_hand = table.fixed.get(resource, 0.0) + sum(
        float(arr.min()) for arr in table.costs[resource]
    )
    assert table.minimum(resource) == pytest.approx(by_hand)


def test_labels_maps_variables_to_chosen_labels() -> None:
    table = _table()
    for assignment in _assignments(table):
        labels = table.labels(assignment)
        assert list(labels) == table.variables
        for i, (variable, c) in enumerate(zip(table.variables, assignment, strict=True)):
            assert labels[variable] == table.choices[i][c]


def test_labels_rejects_wrong_length() -> None:
    with pytest.raises(ValueError):
        _table().labels([0, 0])


def test_uniform_finds_shared_label_at_each_position() -> None:
    table = _table()
    uniform = table.uniform("keep")
    assert uniform is not None
    assert len(uniform) == len(table.variables)
    assert [table.choices[i][c] for i, c in enumerate(uniform)] == ["keep"] * 3
    # "keep" sits at a different index in different variables
    assert len(set(uniform)) > 1


@pytest.mark.parametrize("label", ["int4", "int8", "absent"])
def test_uniform_is_none_unless_every_variable_has_label(label: str) -> None:
    assert _table().uniform(label) is None


def test_fits_compares_every_limit_inclusively() -> None:
    table = _table()
    for assignment in _assignments(table):
        used_bytes = table.total("bytes", assignment)
        used_seconds = table.total("seconds", assignment)
        assert table.fits(assignment, {"bytes": used_bytes})
        assert table.fits(assignment, {"bytes": used_bytes, "seconds": used_seconds})
        assert not table.fits(assignment, {"bytes": used_bytes - 1})
        assert not table.fits(assignment, {"bytes": used_bytes, "seconds": used_seconds / 2})
        assert table.fits(assignment, {})


def test_fits_agrees_with_totals_against_fixed_limits() -> None:
    table = _table()
    limits = {"bytes": 2500.0, "seconds": 0.6}
    for assignment in _assignments(table):
        expected = all(
            table.fixed.get(r, 0.0)
            + sum(float(table.costs[r][i][c]) for i, c in enumerate(assignment))
            <= limit
            for r, limit in limits.items()
        )
        assert table.fits(assignment, limits) is expected
    # the limits split the assignments, so both outcomes are exercised
    outcomes = {table.fits(a, limits) for a in _assignments(table)}
    assert outcomes == {True, False}


def test_repair_steps_down_to_within_the_limits_at_least_score() -> None:
    import numpy as np

    from search import ChoiceTable

    table = ChoiceTable(
        variables=["a", "b"],
        choices=[["lo", "hi"], ["lo", "hi"]],
        scores=[np.array([5.0, 0.0]), np.array([1.0, 0.0])],
        costs={"bytes": [np.array([1.0, 3.0]), np.array([1.0, 3.0])]},
    )
    levels = table.levels("bytes")
    # both high (6 bytes) over a limit of 4: dropping b costs 1, dropping a 5
    assert table.repair([1, 1], {"bytes": 4.0}, levels) == [1, 0]
    assert table.repair([1, 1], {"bytes": 6.0}, levels) == [1, 1]
    assert table.repair([1, 1], {"bytes": 1.0}, levels) is None
