"""The latency check: a plan that misses its latency budget where it runs is searched for
again under a limit tightened by its measured-over-predicted ratio."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import pytest

from autotune.pipeline import confirm
from autotune.pipeline.confirm import LatencyCheck, tightened
from profilers.measure import LatencyStats, latency_stats


def check(measured: float, predicted: float = 8.0, budget: float = 10.0, search: int = 1):
    return LatencyCheck("seconds", "allocator", search, budget, 9.5, predicted, measured)


def test_a_missed_check_plans_the_limit_so_the_same_ratio_lands_under_the_budget() -> None:
    priced = SimpleNamespace(limits={"seconds": 0.0095, "bytes": 100.0}, margin=0.05)
    limits = tightened(priced, [check(measured=12.0, predicted=8.0)])
    # off by 1.5x: planned at 0.95 * 10 ms / 1.5, so 1.5x that is the margin under 10 ms
    assert limits["seconds"] == pytest.approx(0.95 * 0.010 / 1.5)
    assert limits["bytes"] == 100.0
    assert priced.limits["seconds"] == 0.0095  # the caller's limits are not changed
    assert check(measured=10.0).met and not check(measured=10.01).met


@dataclass
class _Priced:
    limits: dict[str, float]
    margin: float
    costs: Any = None


@dataclass
class _Selected:
    name: str
    latency_checks: list[dict[str, Any]] = field(default_factory=list)
    error: float = 0.1  # on the selection split

    @property
    def chosen(self) -> SimpleNamespace:
        return SimpleNamespace(name=self.name)

    @property
    def selection(self) -> SimpleNamespace:
        return SimpleNamespace(chosen=self.name, errors={self.name: self.error})


class _Run:
    """Stand-ins for the search and the timing: the plans searched, in order, each timed at
    the next of ``measured`` (ms)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, measured: list[float], feasible=True):
        self.measured, self.limits, self.said = list(measured), [], []
        self.feasible, self.fastest = feasible, 0.0
        self.errors: list[float] = []  # the selection errors of the plans searched, in order
        self.predicted = 8.0  # each plan's predicted ms
        monkeypatch.setattr(confirm, "applies", lambda setup, priced: True)
        monkeypatch.setattr(confirm, "check_plan", self.check_plan)
        monkeypatch.setattr(confirm, "search", self.search)
        monkeypatch.setattr(confirm, "select_plan", self.select)
        monkeypatch.setattr(confirm, "least_within", self.least_within)
        self.setup = SimpleNamespace(budget=None, say=SimpleNamespace(say=self.said.append))

    def check_plan(self, setup, priced, selected, attempt):
        self.limits.append(priced.limits["seconds"])
        return [check(self.measured.pop(0), self.predicted, search=attempt)]

    def search(self, setup, data, priced, scored, config):
        return f"search {len(self.limits)}"

    def select(self, setup, data, scored, searched, config):
        error = self.errors.pop(0) if self.errors else 0.1
        return _Selected(f"plan {len(self.limits)}", error=error)

    def least_within(self, costs, limits):
        assert "seconds" in limits  # the tightened limits, the others among them
        return {"seconds": self.fastest if self.feasible else None}

    def confirm(self):
        priced = _Priced(limits={"seconds": 0.0095}, margin=0.05)
        return confirm.confirm_latency(
            self.setup, None, priced, None, "search 0", _Selected("plan 0"), None
        )


def test_a_plan_that_meets_its_budget_is_kept_after_one_check(monkeypatch) -> None:
    run = _Run(monkeypatch, [9.0])
    _, searched, selected = run.confirm()
    assert (searched, selected.name) == ("search 0", "plan 0")
    assert [c["met"] for c in selected.latency_checks] == [True]
    assert run.limits == [0.0095]


def test_a_missed_budget_is_searched_again_until_met(monkeypatch) -> None:
    run = _Run(monkeypatch, [12.0, 10.5, 9.9])
    priced, searched, selected = run.confirm()
    assert selected.name == "plan 2" and searched == "search 2"
    checks = selected.latency_checks
    assert [(c["search"], c["met"]) for c in checks] == [
        (1, False),
        (2, False),
        (3, True),
    ]
    assert run.limits[1] == pytest.approx(0.95 * 0.010 / 1.5)  # 12 ms measured / 8 predicted
    assert run.limits[2] == pytest.approx(min(run.limits[1], 0.95 * 0.010 / (10.5 / 8)))
    assert priced.limits["seconds"] == run.limits[2]
    assert sum("(missed)" in line for line in run.said) == 2


def test_searches_are_bounded_and_the_plan_measured_nearest_the_budget_is_kept(
    monkeypatch,
) -> None:
    run = _Run(monkeypatch, [12.0, 10.4, 11.0, 9.0])
    priced, searched, selected = run.confirm()
    assert len(selected.latency_checks) == confirm.SEARCHES
    assert not any(c["met"] for c in selected.latency_checks)
    assert (searched, selected.name) == ("search 1", "plan 1")  # 10.4 ms: the nearest
    assert priced.limits["seconds"] == run.limits[1]
    assert any("kept the nearest (search 2)" in line for line in run.said)


def test_limits_no_plan_meets_keep_the_checked_plan(monkeypatch) -> None:
    run = _Run(monkeypatch, [12.0], feasible=False)
    _, searched, selected = run.confirm()
    assert (searched, selected.name) == ("search 0", "plan 0")
    assert any("no plan fits the tightened limits" in line for line in run.said)


def test_a_plan_that_met_with_room_is_searched_again_under_a_loosened_limit(monkeypatch) -> None:
    # 6 ms measured against 10, 9.4 predicted under a 9.5 ms limit (bound by it): the next
    # limit is planned for the margin under 10 ms at that ratio, 0.95 * 10 / (6 / 9.4)
    run = _Run(monkeypatch, [6.0, 9.0])
    run.predicted = 9.4
    priced, searched, selected = run.confirm()
    assert run.limits[1] == pytest.approx(0.95 * 0.010 / (6.0 / 9.4))
    assert (searched, selected.name) == ("search 1", "plan 1")
    assert priced.limits["seconds"] == run.limits[1]
    checks = selected.latency_checks
    assert [(c["search"], c["met"], c.get("loosened", False)) for c in checks] == [
        (1, True, False),
        (2, True, True),
    ]
    assert any("loosened" in line for line in run.said)


def test_a_loosened_plan_that_misses_or_is_worse_is_not_kept(monkeypatch) -> None:
    missed = _Run(monkeypatch, [6.0, 10.5])
    missed.predicted = 9.4
    _, searched, selected = missed.confirm()
    assert (searched, selected.name) == ("search 0", "plan 0")
    assert [c["met"] for c in selected.latency_checks] == [True, False]
    assert any("kept search 1's plan" in line for line in missed.said)
    worse = _Run(monkeypatch, [6.0, 9.0])
    worse.predicted = 9.4
    worse.errors = [0.2]  # the loosened plan's selection error, above the first's 0.1
    _, searched, selected = worse.confirm()
    assert (searched, selected.name) == ("search 0", "plan 0")


def test_only_a_first_plan_bound_by_its_limit_and_with_room_is_loosened(monkeypatch) -> None:
    # 9.7 ms of 10 is within the margin: nothing to spend
    near = _Run(monkeypatch, [9.7])
    near.predicted = 9.4
    assert len(near.confirm()[2].latency_checks) == 1 and len(near.limits) == 1
    # predicted at 8 ms under a 9.5 ms limit: the limit did not bind, so a looser one would
    # find the same plan
    free = _Run(monkeypatch, [6.0])
    assert len(free.confirm()[2].latency_checks) == 1 and len(free.limits) == 1
    # a plan that met after a miss is not loosened again
    after_miss = _Run(monkeypatch, [12.0, 6.0])
    after_miss.predicted = 9.4
    _, _, selected = after_miss.confirm()
    assert [c["met"] for c in selected.latency_checks] == [False, True]
    assert len(after_miss.limits) == 2


def test_a_check_has_room_only_if_sure_to_be_under_its_budget() -> None:
    from profilers.paired_timing import Interval

    roomy = _relative(0.6, 0.55, 0.65, 1)  # 0.6x against 0.7x: 0.86 of the budget
    assert roomy.roomy(0.05)
    # predicted 6 ms under a 6.5 ms limit: the limit did not bind the search
    priced = SimpleNamespace(limits={"seconds": 0.0065}, margin=0.05)
    assert confirm.loosened(priced, [roomy]) is None
    roomy = replace(roomy, planned_ms=6.1)
    assert not _relative(0.6, 0.5, 0.72, 1).roomy(0.05)  # the interval reaches over 0.7x
    assert not _relative(0.68, 0.66, 0.69, 1).roomy(0.05)  # within the margin
    # without the original on the prediction's scale, the ms scale: measured as predicted
    # (6 ms), so planned the margin under the 7 ms budget, 1% or more above the 6.1 ms limit
    priced = SimpleNamespace(limits={"seconds": 0.0061}, margin=0.05)
    assert confirm.loosened(priced, [roomy])["seconds"] == pytest.approx(0.95 * 0.007)
    tighter = SimpleNamespace(limits={"seconds": 0.0066}, margin=0.05)
    assert confirm.loosened(tighter, [roomy]) is None
    scaled = replace(roomy, original_predicted_ms=10.0, ratio=Interval(0.5, 0.45, 0.55, 12))
    # predicted 0.6x of the original, measured 0.5x: 0.95 * 0.7 * 10 ms / (0.5 / 0.6)
    assert confirm.loosened(priced, [scaled])["seconds"] == pytest.approx(
        0.95 * 0.7 * 0.010 / (0.5 / 0.6)
    )


def _stats(*ms: float) -> LatencyStats:
    return latency_stats([m / 1e3 for m in ms])


def _checked(monkeypatch: pytest.MonkeyPatch, budget: str, timed, baseline=None, multiples=None):
    """``check_plan`` of a plan predicted at 12 ms, the original predicted at 20 ms, timed at
    ``timed``: ms of the plan and of the original beside it (or ``None``), one number for
    every round alike, or one per round; ``multiples``: a reference file's time as a multiple
    of the original's, by phase, where the budget's multiples are of that file."""
    from autotune.budget import Budget

    def rounds(ms):
        return None if ms is None else _stats(*([ms] * 12 if isinstance(ms, float) else ms))

    stats = tuple(rounds(ms) for ms in timed)
    monkeypatch.setattr(confirm, "candidate_totals", lambda costs, options: {"latency_ms": 12.0})
    monkeypatch.setattr(confirm, "measured_ms", lambda setup, priced, options: {"seconds": stats})
    costs = SimpleNamespace(original_totals=lambda: {"latency_ms": 20.0})
    priced = SimpleNamespace(
        costs=costs,
        limits={"seconds": 0.014},
        baseline=baseline,
        reference_multiples=multiples or {},
    )
    setup = SimpleNamespace(budget=Budget.parse(budget))
    selected = SimpleNamespace(chosen=SimpleNamespace(options={}, name="allocator"))
    (found,) = confirm.check_plan(setup, priced, selected)
    return found


def test_a_relative_budget_is_judged_against_the_original_timed_in_the_same_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the machine runs both 2x faster than when priced: 0.75x of the original timed beside
    # the plan, not of its predicted 20 ms
    found = _checked(monkeypatch, "0.75x", (7.0, 10.0))
    assert found.budget_ms == pytest.approx(7.5) and found.met
    assert found.to_dict()["original_ms"] == 10.0
    slower = _checked(monkeypatch, "0.75x", (7.6, 10.0))
    assert not slower.met
    assert _checked(monkeypatch, "0.75x,7ms", (7.2, 10.0)).budget_ms == 7.0
    # tuned in place: the original as timed before tuning, else its predicted latency
    before = SimpleNamespace(latency=SimpleNamespace(p50_ms=8.0), decode=None)
    assert _checked(monkeypatch, "0.75x", (5.0, None), before).budget_ms == pytest.approx(6.0)
    assert _checked(monkeypatch, "0.75x", (5.0, None)).budget_ms == pytest.approx(15.0)
    absolute = _checked(monkeypatch, "9ms", (7.0, 10.0))
    assert absolute.budget_ms == 9.0


def test_a_budget_of_a_reference_files_time_is_judged_beside_that_file(monkeypatch) -> None:
    # the file (timed beside the plan at 8 ms) runs at 0.4x the original: 1x of it is the
    # limit, and on the prediction's scale the file stands at 0.4 x 20 ms
    found = _checked(monkeypatch, "1x", (7.0, 8.0), multiples={"latency": 0.4})
    assert found.budget_ms == pytest.approx(8.0) and found.met
    assert found.original_predicted_ms == pytest.approx(8.0)
    recorded = found.to_dict()
    assert recorded["reference_ms"] == 8.0 and "original_ms" not in recorded
    # a miss is replanned on the file's scale: predicted 12 ms is 1.5x the file's predicted
    # 8 ms, measured 1.1x: the next limit is 0.95 x 1 x 8 ms
    missed = _checked(monkeypatch, "1x", (8.8, 8.0), multiples={"latency": 0.4})
    assert not missed.met
    assert missed.replanned_ms(0.95) == pytest.approx(0.95 * 8.0)


def test_a_relative_budget_is_judged_on_the_rounds_that_timed_both(monkeypatch) -> None:
    # the machine ran slower in the last rounds: the medians of each model fall in
    # different rounds (9 ms over 10 ms: 0.9x), while every round timed the plan at
    # 0.6-0.9x the original, at 0.64x in the median round
    plan, original = [6.0] * 5 + [9.0] * 8, [10.0] * 7 + [14.0] * 6
    found = _checked(monkeypatch, "0.75x", (plan, original))
    assert found.measured_ms / found.original_ms == pytest.approx(0.9)
    assert found.ratio.median == pytest.approx(9 / 14) and found.ratio.rounds == 13
    assert found.ratio.low <= found.ratio.median <= found.ratio.high
    assert found.met and found.excess == pytest.approx(9 / 14 / 0.75)
    assert found.to_dict()["ratio"]["p50"] == pytest.approx(9 / 14, abs=1e-4)
    assert not _checked(monkeypatch, "0.6x", (plan, original)).met
    # an ms term next to it is judged on the plan's own p50
    assert not _checked(monkeypatch, "0.75x,8ms", (plan, original)).met
    assert _checked(monkeypatch, "0.75x,9ms", (plan, original)).met


def _relative_miss() -> LatencyCheck:
    """Predicted 12 ms against the original's 20 ms (0.6x), timed at 0.9x the original
    (95% CI 0.85-0.95) on a machine twice as fast (10 ms), against a 0.75x budget."""
    from profilers.paired_timing import Interval

    return LatencyCheck(
        "seconds",
        "allocator",
        1,
        budget_ms=7.5,
        planned_ms=14.25,
        predicted_ms=12.0,
        measured_ms=9.0,
        original_ms=10.0,
        ratio_term=0.75,
        ratio=Interval(0.9, 0.85, 0.95, 20),
        original_predicted_ms=20.0,
    )


def test_a_missed_relative_check_is_replanned_by_the_multiple_measured() -> None:
    # planned next at 0.75x / 1.5 of 20 ms, with the margin
    missed = _relative_miss()
    assert not missed.met and missed.excess == pytest.approx(1.2)
    priced = SimpleNamespace(limits={"seconds": 0.01425}, margin=0.05)
    assert tightened(priced, [missed])["seconds"] == pytest.approx(0.95 * 0.75 * 0.020 / 1.5)
    # with an ms term beside it, the tighter of both: 6 ms / (9 / 12 -> 1) with the margin
    both = replace(missed, ms_term=6.0)
    assert tightened(priced, [both])["seconds"] == pytest.approx(0.95 * 0.006)


def test_a_miss_the_timing_could_not_settle_is_replanned_onto_the_budget() -> None:
    from profilers.paired_timing import Interval

    # predicted at 0.6x the original, measured at 0.76x (95% CI 0.74-0.78) against 0.75x:
    # the interval still holds the budget, so the next limit lands on it, not the margin under
    unsettled = replace(
        _relative_miss(),
        resource="decode_seconds",
        planned_ms=12.0,
        measured_ms=7.6,
        ratio=Interval(0.76, 0.74, 0.78, 60),
    )
    assert not unsettled.met and not unsettled.settled
    priced = SimpleNamespace(limits={"decode_seconds": 0.012}, margin=0.05)
    misfit = 0.76 / 0.6
    assert tightened(priced, [unsettled])["decode_seconds"] == pytest.approx(0.75 * 0.020 / misfit)
    # the same median, sure to be over: the margin under, as before
    settled = replace(unsettled, ratio=Interval(0.76, 0.755, 0.765, 60))
    assert settled.settled and not settled.met
    assert tightened(priced, [settled])["decode_seconds"] == pytest.approx(
        0.95 * 0.75 * 0.020 / misfit
    )
    # a met check is settled; without an interval a miss is as measured
    assert replace(unsettled, ratio=Interval(0.7, 0.6, 0.8, 60)).settled
    assert check(measured=10.01).settled


def test_a_limit_tightened_below_every_prediction_searches_for_the_fastest_plan(
    monkeypatch,
) -> None:
    run = _Run(monkeypatch, [12.0, 9.5])
    run.fastest = 0.007  # the fastest plan is predicted at 7 ms: 0.95 * 10 / 1.5 is below
    _, searched, selected = run.confirm()
    assert run.limits[1] == pytest.approx(0.007, rel=1e-5) and run.limits[1] > 0.007
    assert (searched, selected.name) == ("search 1", "plan 1")
    assert [c["met"] for c in selected.latency_checks] == [False, True]
    assert any("searching for the fastest plan predicted" in line for line in run.said)


def test_the_fastest_plan_is_searched_for_once(monkeypatch) -> None:
    run = _Run(monkeypatch, [12.0, 11.0, 10.5])
    run.fastest = 0.007
    _, _, selected = run.confirm()
    # the second check missed at the fastest plan: no tighter plan is predicted, so it stops
    assert len(selected.latency_checks) == 2 and len(run.limits) == 2
    assert any("no plan fits the tightened limits" in line for line in run.said)


def test_a_plan_predicted_at_the_fastest_is_not_searched_for_again(monkeypatch) -> None:
    # the first plan is the fastest predicted (8 ms): a tightened limit below it has nothing
    # new to find
    run = _Run(monkeypatch, [12.0, 11.0])
    run.fastest = 0.008
    _, searched, selected = run.confirm()
    assert len(selected.latency_checks) == 1 and len(run.limits) == 1
    assert searched == "search 0"
    assert any("no plan fits the tightened limits" in line for line in run.said)


def _relative(median: float, low: float, high: float, search: int) -> LatencyCheck:
    """A check of a 0.7x budget whose plan measured ``median`` times the original."""
    from profilers.paired_timing import Interval

    ratio = Interval(median, low, high, 12)
    return LatencyCheck(
        "seconds", "allocator", search, 7.0, 6.5, 6.0, 10 * median, 10.0, None, 0.7, ratio
    )


def _tried(check: LatencyCheck, error: float) -> confirm.Tried:
    selected = _Selected(f"plan {check.search}", error=error)
    return confirm.Tried([check], check.search, None, f"search {check.search}", selected)


def test_of_misses_told_apart_the_nearest_is_kept_and_of_misses_alike_the_best_quality() -> None:
    nearer, worse = _relative(0.78, 0.71, 0.89, 2), _relative(0.80, 0.69, 0.86, 1)
    assert nearer.excess_range == pytest.approx((0.71 / 0.7, 0.89 / 0.7))
    # 0.78x and 0.80x with overlapping intervals: not told apart, so the plan with 1/50 of
    # the other's selection error is kept, not the one 0.02x nearer
    kept = confirm.kept_after_misses([_tried(worse, 0.004), _tried(nearer, 0.2)])
    assert kept.search == 1 and "least error" in kept.why
    # a miss that is nearer for sure is kept whatever its error
    sure = _relative(0.74, 0.72, 0.76, 2)
    kept = confirm.kept_after_misses(
        [_tried(_relative(0.85, 0.80, 0.90, 1), 0.004), _tried(sure, 0.2)]
    )
    assert kept.search == 2 and kept.why == "the nearest"
    # without intervals (an ms budget) the nearest p50 decides, as before
    kept = confirm.kept_after_misses(
        [_tried(check(12.0), 0.001), _tried(check(11.0, search=2), 0.2)]
    )
    assert kept.search == 2
