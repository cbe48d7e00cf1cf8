"""Measured figures of a plan timed beside its original, round by round, for the tests."""

from __future__ import annotations

from autotune.measured_figures import Measured
from profilers.measure import latency_stats


def timed_beside(plan_ms: list[float], original_ms: list[float]) -> Measured:
    """A plan's figures with its latency timed at ``plan_ms`` and the original's beside it
    at ``original_ms``, one per round."""
    return Measured(
        bytes=1000,
        state_bytes=1000,
        avg_bits=4.0,
        latency=latency_stats([ms / 1e3 for ms in plan_ms]),
        heldout_error=None,
        baseline_latency=latency_stats([ms / 1e3 for ms in original_ms]),
    )
