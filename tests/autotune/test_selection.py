"""The final choice's rules: which uniform plans meet the front runner, and who wins."""

from __future__ import annotations

from autotune.selection import UNIFORM_FINALISTS, choose, uniform_finalists


def test_the_best_screened_uniform_plans_are_the_finalists_best_first() -> None:
    screening = {
        "allocator": 0.01,
        "uniform int2-g32-asym": 1.2,
        "uniform int4-g32-asym": 0.05,
        "uniform int3-g32-asym": 0.19,
        "uniform int4-g64-asym": 0.06,
        "uniform int4-ch-sym": 0.14,
    }
    assert (
        uniform_finalists(screening)
        == [
            "uniform int4-g32-asym",
            "uniform int4-g64-asym",
            "uniform int4-ch-sym",
        ][:UNIFORM_FINALISTS]
    )
    assert uniform_finalists(screening, keep=1) == ["uniform int4-g32-asym"]


def test_uniform_plans_far_above_the_front_runner_are_not_finalists_but_the_best_is() -> None:
    screening = {
        "uniform int4-g32-asym": 0.05,
        "uniform int4-g64-asym": 0.06,
        "uniform int4-ch-sym": 0.14,
    }
    # within 2x of a front runner at 0.03: the two best; at 0.001 only the best one is kept
    assert uniform_finalists(screening, within=(0.03, 2.0)) == [
        "uniform int4-g32-asym",
        "uniform int4-g64-asym",
    ]
    assert uniform_finalists(screening, within=(0.001, 2.0)) == ["uniform int4-g32-asym"]
    assert uniform_finalists(screening, within=(0.1, 2.0)) == uniform_finalists(screening)
    assert uniform_finalists(screening, within=(None, 2.0)) == uniform_finalists(screening)


def test_unscreened_and_searched_plans_are_never_uniform_finalists() -> None:
    screening = {"evolution": 0.001, "uniform int8-ch-sym": None, "uniform int4-g32-asym": 0.5}
    assert uniform_finalists(screening) == ["uniform int4-g32-asym"]


def test_equal_screening_errors_keep_the_candidates_order() -> None:
    screening = {"uniform b": 0.1, "uniform a": 0.1, "uniform c": 0.1}
    assert uniform_finalists(screening, keep=2) == ["uniform b", "uniform a"]


def test_the_least_selection_error_wins_and_ties_go_to_the_front_runner() -> None:
    errors = {"evolution": 0.02, "allocator": 0.02, "uniform int4-g32-asym": 0.03}
    selection = choose("evolution", ["allocator", "uniform int4-g32-asym"], errors.get, 8)
    assert selection.chosen == "evolution"
    assert selection.best_uniform == "uniform int4-g32-asym"
    errors["allocator"] = 0.01
    assert choose("evolution", ["allocator"], errors.get, 8).chosen == "allocator"
