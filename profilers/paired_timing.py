"""Whether a timed model meets a latency limit, decided with a stated confidence.

Timings on a shared machine vary from call to call and drift over seconds. A limit relative
to another model (``0.7x`` the original) is judged on rounds that time both in turn: each
round gives one ratio, model over baseline, and the median of those ratios is the measured
multiple. An absolute limit (ms) is judged on the model's median. Each median comes with a
distribution-free confidence interval from order statistics (no assumption on how timings
are spread), and timing goes on in rounds until every limit lies outside its interval (the
verdict is settled) or the rounds run out: a model near its limit is timed longer, one far
from it no longer than needed.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import comb
from typing import Any

CONFIDENCE = 0.95
MIN_ROUNDS = 10  # rounds timed before a verdict may settle (the interval needs them)
# a timing against a limit may run this many times its usual rounds to settle the verdict
ROUNDS_TO_SETTLE = 4


@dataclass(frozen=True)
class Interval:
    """A median with its confidence interval, over ``rounds`` values."""

    median: float
    low: float
    high: float
    rounds: int

    def describe(self) -> str:
        """``0.66x (95% CI 0.61-0.69, 24 rounds)``: the median as a multiple, with its
        interval."""
        return (
            f"{self.median:.3g}x ({CONFIDENCE:.0%} CI {self.low:.3g}-{self.high:.3g}, "
            f"{self.rounds} rounds)"
        )

    def excludes(self, value: float) -> bool:
        """Whether ``value`` lies outside the interval (which side is then known)."""
        return value < self.low or value > self.high

    def to_dict(self) -> dict[str, Any]:
        return {
            "p50": round(self.median, 4),
            "low": round(self.low, 4),
            "high": round(self.high, 4),
            "rounds": self.rounds,
            "confidence": CONFIDENCE,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Interval:
        return cls(float(data["p50"]), float(data["low"]), float(data["high"]), int(data["rounds"]))


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The median of ``values`` and the interval between the order statistics ``x_(k)`` and
    ``x_(n+1-k)`` with the largest ``k`` whose coverage, ``1 - 2 P(B < k)`` for ``B`` binomial
    (n, 1/2), is at least ``confidence`` (the whole range when no ``k`` reaches it)."""
    if not values:
        raise ValueError("no timings to take a median of")
    ordered, n = sorted(values), len(values)
    tail_allowed = (1.0 - confidence) / 2
    k, below = 0, 0.0  # below: P(B <= k - 1)
    while k < n // 2:
        with_k = below + comb(n, k) / 2.0**n
        if with_k > tail_allowed:
            break
        below, k = with_k, k + 1
    k = max(k, 1)
    return Interval(statistics.median(ordered), ordered[k - 1], ordered[n - k], n)


def ratio_interval(model: Sequence[float], baseline: Sequence[float]) -> Interval:
    """The median of the per-round ratios ``model[i] / baseline[i]`` (rounds that timed
    both), with its confidence interval."""
    ratios = [m / b for m, b in zip(model, baseline, strict=False) if b > 0]
    return median_interval(ratios)


@dataclass(frozen=True)
class Limit:
    """A latency limit to time against: ``ms`` on the model's median (in milliseconds) and
    ``ratio`` on the median of its per-round ratios to the baseline; either may be unset."""

    ms: float | None = None
    ratio: float | None = None

    def settled(self, model_s: Sequence[float], baseline_s: Sequence[float] | None) -> bool:
        """Whether timings so far (in seconds, one per round) settle every limit: each lies
        outside its confidence interval. Never before :data:`MIN_ROUNDS` rounds, nor without
        a limit to settle."""
        if len(model_s) < MIN_ROUNDS or (self.ms is None and self.ratio is None):
            return False
        if self.ms is not None and not median_interval(model_s).excludes(self.ms / 1e3):
            return False
        if self.ratio is not None and baseline_s:
            return ratio_interval(model_s, baseline_s).excludes(self.ratio)
        return True

    def rounds(self, usual: int) -> int:
        """The most rounds a timing that usually takes ``usual`` may take to settle."""
        return usual * ROUNDS_TO_SETTLE

    def settles(self, times: Mapping[str, Sequence[float]]) -> bool:
        """:meth:`settled` on timings per name: ``"model"`` and, where timed, ``"baseline"``."""
        return self.settled(times["model"], times.get("baseline"))


def paired(model_ms: Sequence[float], baseline_ms: Sequence[float] | None) -> Interval | None:
    """The per-round multiple of the baseline's time, where the baseline was timed in the
    same rounds (as many timings as the model)."""
    if not baseline_ms or len(baseline_ms) != len(model_ms):
        return None
    return ratio_interval(model_ms, baseline_ms)
