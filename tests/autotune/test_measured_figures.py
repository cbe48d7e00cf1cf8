"""The measured figures record the plan's time as a multiple of the original's, taken on
the rounds that timed both."""

from __future__ import annotations

import pytest
from timing_helpers import timed_beside


def test_the_multiple_timed_in_the_same_rounds_is_recorded_beside_the_baseline() -> None:
    plan, original = [6.0] * 5 + [9.0] * 8, [10.0] * 7 + [14.0] * 6
    figures = timed_beside(plan, original).to_dict([1, 16], "nmse")
    multiple = figures["baseline"]["latency_ratio"]
    assert multiple["p50"] == pytest.approx(9 / 14, abs=1e-4) and multiple["rounds"] == 13
    assert multiple["low"] <= multiple["p50"] <= multiple["high"]
    assert "decode_ratio" not in figures["baseline"]  # no decode timed
    unpaired = timed_beside(plan, original[:-1]).to_dict([1, 16], "nmse")["baseline"]
    assert "latency_ratio" not in unpaired
