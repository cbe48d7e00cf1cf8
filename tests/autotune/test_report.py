"""The report's search line and reference notes say what the selection split decided."""

from __future__ import annotations

from autotune.plan import Plan
from autotune.report import Report

RTN4 = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}


def _plan(selection: dict, best_uniform: dict | None = None) -> Plan:
    measured = {"heldout_error": 0.02, "bytes": 1000}
    if best_uniform is not None:
        measured["best_uniform"] = best_uniform
    return Plan(
        layers={"_default": RTN4},
        target={"name": "local"},
        budget={"memory_bytes": 2000},
        predicted={"bytes": 1000, "original_bytes": 4000},
        measured=measured,
        search={"algorithm": "allocator", "chosen": "x", "selection": selection},
    )


def test_search_line_says_when_a_uniform_plan_beat_the_front_runner() -> None:
    won = _plan({"windows": 8, "front_runner": "allocator", "chosen": "uniform int4-g32-asym"})
    line = Report(won).search_line()
    assert line is not None
    assert "'uniform int4-g32-asym' beat the calibration front runner 'allocator'" in line
    assert "8 windows" in line

    kept = _plan({"windows": 8, "front_runner": "allocator", "chosen": "allocator"})
    assert "front runner" not in (Report(kept).search_line() or "")


def test_best_uniform_note_gives_both_sizes_and_the_error_ratio() -> None:
    plan = _plan(
        {"windows": 8, "front_runner": "allocator", "chosen": "allocator"},
        {"option": "int4-g32-asym", "heldout_error": 0.08, "selection_error": 0.07, "bytes": 990},
    )
    note = next(n for n in Report(plan).notes() if n.startswith("best uniform"))
    assert "on the selection split (int4-g32-asym)" in note
    assert "990 B against this plan's 1,000 B" in note
    assert "0.25x that" in note
