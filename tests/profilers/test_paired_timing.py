"""Medians with confidence intervals from order statistics, per-round multiples, and timing
that goes on until a limit's verdict is settled."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from profilers import measure
from profilers.measure import measure_against, measure_latencies
from profilers.paired_timing import (
    MIN_ROUNDS,
    ROUNDS_TO_SETTLE,
    Interval,
    Limit,
    median_interval,
    paired,
    ratio_interval,
)


def test_the_interval_is_the_order_statistics_binomial_coverage_gives() -> None:
    values = [float(v) for v in range(1, 11)]  # n = 10: P(B <= 1) = 0.011, P(B <= 2) = 0.055
    found = median_interval(values)
    assert (found.low, found.median, found.high, found.rounds) == (2.0, 5.5, 9.0, 10)
    assert median_interval(values, confidence=0.88).low == 3.0  # P(B <= 2) <= 0.06
    # too few values for the confidence asked: the whole range
    assert (median_interval([3.0, 1.0, 2.0]).low, median_interval([3.0, 1.0, 2.0]).high) == (1, 3)
    with pytest.raises(ValueError, match="no timings"):
        median_interval([])


def test_the_interval_covers_the_true_median_as_often_as_it_claims() -> None:
    rng = random.Random(0)
    true_median = math.log(2)  # of an exponential distribution, skewed as timings are
    for n in (10, 15, 40):
        covered = sum(
            median_interval([rng.expovariate(1.0) for _ in range(n)]).excludes(true_median) is False
            for _ in range(2000)
        )
        assert 0.95 <= covered / 2000 <= 0.995


def test_a_multiple_is_taken_round_by_round() -> None:
    # per round 0.5x, 0.25x and 1x: the median round is 0.5x, while the medians of each
    # model's own timings (1 and 3) are in different rounds
    model, baseline = [1.0, 1.0, 3.0], [2.0, 4.0, 3.0]
    found = ratio_interval(model, baseline)
    assert (found.median, found.low, found.high, found.rounds) == (0.5, 0.25, 1.0, 3)
    assert paired(model, baseline) == found
    assert paired(model, baseline[:-1]) is None and paired(model, None) is None
    assert Interval.from_dict(found.to_dict()) == found


def test_a_limit_settles_once_it_lies_outside_every_interval() -> None:
    fast, slow = [1e-3] * MIN_ROUNDS, [2e-3] * MIN_ROUNDS
    assert Limit(ms=1.5).settled(fast, None) and Limit(ms=0.5).settled(fast, None)
    assert not Limit(ms=1.0).settled(fast, None)  # at the limit: never settled
    assert not Limit(ms=1.5).settled(fast[:-1], None)  # too few rounds
    assert not Limit().settled(fast, slow)  # nothing to settle
    assert Limit(ratio=0.7).settled(fast, slow) and not Limit(ratio=0.5).settled(fast, slow)
    assert not Limit(ms=1.5, ratio=0.5).settled(fast, slow)  # both must settle
    assert Limit(ratio=0.5).settled(fast, None)  # no baseline: the ratio is not timed here


class _Steady(nn.Module):
    """A model every call of which the fixed clock below says takes ``seconds``."""

    def __init__(self, seconds: float, ran: list[float]) -> None:
        super().__init__()
        self.seconds, self.ran = seconds, ran

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.ran.append(self.seconds)
        return x


def _fixed_clock(monkeypatch: pytest.MonkeyPatch, ran: list[float]) -> None:
    """Every timed call takes what the model it ran says."""

    def timed(fn, cuda: bool = False) -> float:
        fn()
        return ran.pop()

    monkeypatch.setattr(measure, "timed_call", timed)


def test_timing_goes_on_until_the_verdict_is_settled(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[float] = []
    model, baseline = _Steady(1e-3, ran), _Steady(2e-3, ran)
    _fixed_clock(monkeypatch, ran)
    models, inputs = {"model": model, "baseline": baseline}, {"x": torch.zeros(1)}
    # far from the limit: the fewest rounds a verdict needs
    assert measure_against(models, inputs, Limit(ratio=0.7))["model"].repeats == MIN_ROUNDS
    # exactly at it: never settled, so up to ROUNDS_TO_SETTLE times the usual rounds
    stats = measure_against(models, inputs, Limit(ratio=0.5))
    assert stats["model"].repeats == measure.ROUNDS * ROUNDS_TO_SETTLE
    assert len(stats["baseline"].samples_ms) == stats["model"].repeats
    # without a limit, the rounds of a report; a limit passed straight in caps at ``rounds``
    assert measure_against(models, inputs, None)["model"].repeats == measure.REPORT_ROUNDS
    capped = measure_latencies(models, inputs, rounds=12, limit=Limit(ratio=0.5))
    assert capped["model"].repeats == 12
    assert capped["model"].samples_ms == (1.0,) * 12


def test_files_in_llama_cpp_are_timed_in_alternating_order_until_settled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from autotune.export import llama_cpp, llama_latency

    order: list[str] = []

    class Loaded:
        def __init__(self, path: Path, **_: object) -> None:
            self.name = Path(path).stem

        def close(self) -> None:
            pass

    def timed(llm: Loaded, rows: int, tokens: int, context: int) -> float:
        order.append(llm.name)
        return {"model": 1e-3, "baseline": 2e-3}[llm.name]

    monkeypatch.setattr(llama_cpp, "LlamaCppModel", Loaded)
    monkeypatch.setattr(llama_latency, "time_file", timed)
    paths = {"model": Path("model.gguf"), "baseline": Path("baseline.gguf")}
    inputs = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
    found = llama_latency.measure_files(paths, inputs, rounds=60, limit=Limit(ratio=0.8))
    assert found["model"].repeats == MIN_ROUNDS
    assert order[:4] == ["model", "baseline", "baseline", "model"]
    order.clear()
    assert llama_latency.measure_files(paths, inputs, rounds=7)["baseline"].repeats == 7
