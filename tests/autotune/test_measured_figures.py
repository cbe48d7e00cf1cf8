"""The measured figures record the plan's time as a multiple of the original's, taken on
the rounds that timed both."""

from __future__ import annotations

import pytest

from autotune.measured_figures import Measured
from profilers.measure import latency_stats


def _measured(plan_ms: list[float], original_ms: list[float]) -> Measured:
    return Measured(
        bytes=1000,
        state_bytes=1000,
        avg_bits=4.0,
        latency=latency_stats([ms / 1e3 for ms in plan_ms]),
        heldout_error=None,
        baseline_latency=latency_stats([ms / 1e3 for ms in original_ms]),
    )


def test_the_multiple_timed_in_the_same_rounds_is_recorded_beside_the_baseline() -> None:
    plan, original = [6.0] * 5 + [9.0] * 8, [10.0] * 7 + [14.0] * 6
    figures = _measured(plan, original).to_dict([1, 16], "nmse")
    multiple = figures["baseline"]["latency_ratio"]
    assert multiple["p50"] == pytest.approx(9 / 14, abs=1e-4) and multiple["rounds"] == 13
    assert multiple["low"] <= multiple["p50"] <= multiple["high"]
    assert "decode_ratio" not in figures["baseline"]  # no decode timed
    unpaired = _measured(plan, original[:-1]).to_dict([1, 16], "nmse")["baseline"]
    assert "latency_ratio" not in unpaired
