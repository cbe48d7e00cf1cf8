"""``autotune validate`` on the ``local`` target: a budget relative to the original is
judged on the rounds that timed the original beside the plan."""

from __future__ import annotations

import pytest
from timing_helpers import timed_beside

from autotune.plan import Plan
from autotune.validate import plan_checks


def _latency_check(spec: str, plan_ms: list[float], original_ms: list[float]):
    plan = Plan(
        layers={"_default": {"method": "none"}},
        target={"name": "local"},
        budget={"spec": spec, "batch_size": 1, "seq_len": 16},
        predicted={"bytes": 1000, "original_bytes": 4000, "original_latency_ms": 20.0},
    )
    checks = plan_checks(plan, timed_beside(plan_ms, original_ms), 0.1, originals={"latency": 10.0})
    return next(c for c in checks if c.name == "latency p50")


# the machine slowed down in the last rounds: 9 ms over 10 ms (0.9x) p50 against p50, while
# the median round timed the plan at 9/14 = 0.64x the original's
PLAN, ORIGINAL = [6.0] * 5 + [9.0] * 8, [10.0] * 7 + [14.0] * 6


@pytest.mark.parametrize(
    ("spec", "holds"), [("0.75x", True), ("0.6x", False), ("0.75x,8ms", False)]
)
def test_a_relative_budget_is_judged_on_the_rounds_that_timed_both(spec: str, holds: bool) -> None:
    check = _latency_check(spec, PLAN, ORIGINAL)
    assert check.holds is holds
    assert "timed in the same rounds" in check.expected
    assert check.measured.startswith("0.643x (95% CI") and "13 rounds" in check.measured


def test_without_rounds_that_timed_both_the_original_is_taken_by_its_p50() -> None:
    check = _latency_check("0.75x", PLAN, ORIGINAL[:-1])  # not the same rounds
    assert not check.holds and "0.75x the original's 10 ms" in check.expected
