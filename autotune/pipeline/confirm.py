"""Stage 7: a latency budget checked where the plan runs, before the plan is kept.

On ``local`` each option was timed on this machine (in autotune's modules, ONNX Runtime or
llama.cpp), but a plan's time is predicted by adding its layers' shares, which misses how
kernels interact (ONNX Runtime's int8 kernels gain unequally on float32 from one mix to
another). So the selected plan is timed as a whole, in the runtime that runs it, beside the
original as the final measurement times it; if it misses a latency or decode budget, the
limit it is planned under is tightened by how far its prediction was off and the search runs
again (the sensitivity table is reused), up to :data:`SEARCHES` searches in all. A settled
miss is replanned the latency margin under the budget; a miss the timing could not settle
(the measured multiple's confidence interval still holds the budget after the most rounds)
is replanned onto the budget, without the margin, since a plan within timing noise of it
needs no more speed than a plan predicted a little faster (with the margin, a plan a hair
over its budget could be replaced by the fastest plan predicted, at many times its error).
A limit tightened below every plan's prediction searches for the fastest plan predicted
instead (once). If none meets it, the plan measured nearest to it is kept, or, among plans whose
misses cannot be told from the nearest one's, the one with the least error on the selection
split (:func:`kept_after_misses`). A first plan that was bound by its limit and meets its
budget by more than the margin was predicted slower than it runs, so the search runs once
more under limits loosened the same way (:func:`spend_room`), and the new plan is kept if
its own check meets the budget and its selection error is no higher (a budget at the
fastest plan predicted otherwise leaves the allocator no room when the predictions are
pessimistic). A plan is timed beside the original until the verdict is settled
(:mod:`profilers.paired_timing`), and a relative budget is judged on the median of the
per-round multiples. Every check is recorded in the plan (``search.latency_checks``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from autotune.allocation import candidate_totals, least_within
from autotune.errors import InfeasibleBudgetError
from autotune.latency_models import measuring_model
from autotune.pipeline.choose import Scored, Searched, Selected, search, select_plan
from autotune.pipeline.config import TuneConfig
from autotune.pipeline.prepare import Data, Setup
from autotune.pipeline.price import Priced, times_plans
from autotune.plan import Plan
from methods.base import Option
from profilers.measure import LatencyStats, measure_against
from profilers.paired_timing import Interval, paired

SEARCHES = 3  # the first search and at most two more under tightened (or loosened) limits
LOOSEN_AT_LEAST = 0.01  # a loosened limit less than 1% above the last is not searched
BINDING = 0.97  # a plan predicted at 97% of its limit or more was bound by it

# the limit each latency budget sets -> its phase (``{phase}_ms``: the predicted total's name)
_PHASES = {"seconds": "latency", "decode_seconds": "decode"}


@dataclass(frozen=True)
class LatencyCheck:
    """One plan timed as a whole against one latency budget (``seconds`` or
    ``decode_seconds``): the limit it was searched under, its predicted and measured p50."""

    resource: str
    plan: str
    search: int  # which search found the plan: 1 the first, then one per tightened limit
    budget_ms: float
    planned_ms: float
    predicted_ms: float
    measured_ms: float
    original_ms: float | None = None  # the original timed in the same run, where it was
    ms_term: float | None = None  # the budget's limit in ms, where it sets one
    ratio_term: float | None = None  # the budget's multiple of the original, where it sets one
    ratio: Interval | None = None  # the measured multiple, from rounds that timed both
    original_predicted_ms: float | None = None  # the original on the prediction's scale
    loosened: bool = False  # its plan was searched under a limit loosened after a roomy check
    beside: str = "original"  # what was timed beside it: the original, or a reference file

    @property
    def excess(self) -> float:
        """How far over its budget the plan measured (at most 1: met): the p50 over the ms
        term, and the median of the per-round multiples of the original over the relative
        term where both were timed in the same rounds (else the p50 over ``budget_ms``)."""
        terms = []
        if self.ms_term is not None:
            terms.append(self.measured_ms / self.ms_term)
        if self.ratio_term is not None and self.ratio is not None:
            terms.append(self.ratio.median / self.ratio_term)
        elif self.ratio_term is not None or not terms:
            terms.append(self.measured_ms / self.budget_ms)
        return max(terms)

    @property
    def excess_range(self) -> tuple[float, float]:
        """:attr:`excess` as low and as high as the measured multiple's confidence interval
        allows (a term without an interval counts at its measured value both ways)."""
        if self.ratio_term is None or self.ratio is None:
            return self.excess, self.excess
        others = [self.measured_ms / self.ms_term] if self.ms_term is not None else []
        low = max([self.ratio.low / self.ratio_term, *others])
        high = max([self.ratio.high / self.ratio_term, *others])
        return low, high

    @property
    def met(self) -> bool:
        return self.excess <= 1.0

    @property
    def settled(self) -> bool:
        """Whether the verdict is sure: met, or missed even at the low end of the measured
        multiple's confidence interval (a term without an interval counts as measured)."""
        return self.met or self.excess_range[0] > 1.0

    def replanned_ms(self, keep: float, loosen: bool = False) -> float:
        """The limit (ms, on the prediction's scale) to search under next so that, off by
        as much again, the plan lands at ``keep`` of each term: an ms term by the measured
        over the predicted time, a relative term by the measured over the predicted
        multiple of the original (each on its own scale, so a machine that ran faster or
        slower than when the options were timed moves neither). A plan measured faster
        than predicted counts as predicted, unless ``loosen``."""

        def off(measured: float, predicted: float) -> float:
            if predicted <= 0:
                return 1.0
            return measured / predicted if loosen else max(measured / predicted, 1.0)

        wanted = []
        if self.ms_term is not None or self.ratio_term is None:
            term = self.ms_term if self.ms_term is not None else self.budget_ms
            wanted.append(keep * term / off(self.measured_ms, self.predicted_ms))
        if self.ratio_term is not None:
            multiple = self.ratio.median if self.ratio is not None else None
            if multiple is None and self.original_ms:
                multiple = self.measured_ms / self.original_ms
            original = self.original_predicted_ms
            if multiple is not None and original:
                misfit = off(multiple, self.predicted_ms / original)
                wanted.append(keep * self.ratio_term * original / misfit)
            else:
                wanted.append(keep * self.budget_ms / off(self.measured_ms, self.predicted_ms))
        return min(wanted)

    def roomy(self, margin: float) -> bool:
        """Whether the plan measured more than ``margin`` under its budget and is sure to
        be under it (the high end of :attr:`excess_range` below 1)."""
        return self.excess < 1.0 - margin and self.excess_range[1] < 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": "decode" if self.resource == "decode_seconds" else "latency",
            "plan": self.plan,
            "search": self.search,
            "budget_ms": round(self.budget_ms, 6),
            "planned_ms": round(self.planned_ms, 6),
            "predicted_ms": round(self.predicted_ms, 6),
            "measured_ms": round(self.measured_ms, 6),
            **(
                {f"{self.beside}_ms": round(self.original_ms, 6)}
                if self.original_ms is not None
                else {}
            ),
            **({"ratio": self.ratio.to_dict()} if self.ratio is not None else {}),
            "met": self.met,
            **({"loosened": True} if self.loosened else {}),
        }


def applies(setup: Setup, priced: Priced) -> bool:
    """Whether the plan can be checked here: a latency budget, priced by timing on this
    machine, with the whole model in memory."""
    return times_plans(setup) and bool(checked_resources(setup, priced))


def checked_resources(setup: Setup, priced: Priced) -> list[str]:
    """The latency limits a check times the plan against: the budget's own (a decode guard,
    :mod:`autotune.decode_guard`, is a search limit, not a budget)."""
    budget = setup.budget
    bound = {"seconds": budget.bounds_latency, "decode_seconds": budget.bounds_decode}
    return [r for r in _PHASES if r in priced.limits and bound[r]]


def confirm_latency(
    setup: Setup,
    data: Data,
    priced: Priced,
    scored: Scored,
    searched: Searched,
    selected: Selected,
    config: TuneConfig,
) -> tuple[Priced, Searched, Selected]:
    """Time the selected plan where it runs; while it misses a latency budget, search again
    under limits tightened by its measured-over-predicted ratio (see the module docstring)."""
    if not applies(setup, priced):
        return priced, searched, selected
    checks: list[LatencyCheck] = []
    tried: list[Tried] = []
    for attempt in range(SEARCHES):
        found = check_plan(setup, priced, selected, attempt + 1)
        checks += found
        missed = [c for c in found if not c.met]
        for check in found:
            _say_check(setup, check)
        if not missed:
            break
        tried.append(Tried(found, attempt + 1, priced, searched, selected))
        if attempt == SEARCHES - 1:
            break
        limits = tightened(priced, missed)
        least = least_within(priced.costs, limits)
        if any(value is None or limits[r] < value for r, value in least.items()):
            limits = fastest_reachable(priced, limits, least, found)
            if limits is None:
                setup.say.say("latency check: no plan fits the tightened limits")
                break
            setup.say.say(
                "latency check: the tightened limit is below every plan's prediction; "
                "searching for the fastest plan predicted"
            )
        priced = replace(priced, limits=limits)
        try:
            searched = search(setup, data, priced, scored, config)
        except InfeasibleBudgetError:
            setup.say.say("latency check: no plan fits the tightened limits and the budget")
            break
        selected = select_plan(setup, data, scored, searched, config)
    if missed:  # none met its budget: keep the one measured nearest to it
        kept = kept_after_misses(tried)
        priced, searched, selected = kept.priced, kept.searched, kept.selected
        setup.say.say(
            f"latency check: no plan met the budget; kept {kept.why} (search {kept.search})"
        )
    elif attempt == 0:  # the first plan met: a plan tightened after a miss is not loosened
        met = Tried(found, attempt + 1, priced, searched, selected)
        kept, more = spend_room(setup, data, scored, config, met)
        priced, searched, selected = kept.priced, kept.searched, kept.selected
        checks += more
    selected.latency_checks = [c.to_dict() for c in checks]
    return priced, searched, selected


def spend_room(
    setup: Setup, data: Data, scored: Scored, config: TuneConfig, met: Tried
) -> tuple[Tried, list[LatencyCheck]]:
    """A plan that met its latency budgets with room to spare (:func:`loosened`) was
    predicted slower than it runs: search once more under limits loosened by how far it
    was off, keeping the margin, and keep that plan if its check meets the budgets and its
    error on the selection split is no higher; else the plan that met. Returns the plan
    kept and the new checks."""
    limits = loosened(met.priced, met.checks)
    if limits is None:
        return met, []
    setup.say.say(
        "latency check: met with room; searching again under a limit loosened by the "
        "measured-over-predicted ratio"
    )
    priced = replace(met.priced, limits=limits)
    try:
        searched = search(setup, data, priced, scored, config)
    except InfeasibleBudgetError:
        return met, []
    selected = select_plan(setup, data, scored, searched, config)
    checks = [
        replace(c, loosened=True) for c in check_plan(setup, priced, selected, met.search + 1)
    ]
    for check in checks:
        _say_check(setup, check)
    wider = Tried(checks, met.search + 1, priced, searched, selected)
    if all(c.met for c in checks) and wider.selection_error <= met.selection_error:
        return wider, checks
    setup.say.say(f"latency check: kept search {met.search}'s plan")
    return met, checks


@dataclass
class Tried:
    """A searched plan and its checks, with what it was searched and selected from."""

    checks: list[LatencyCheck]
    search: int
    priced: Priced
    searched: Searched
    selected: Selected
    why: str = "the nearest"

    @property
    def excess(self) -> float:
        return max(c.excess for c in self.checks)

    @property
    def excess_range(self) -> tuple[float, float]:
        ranges = [c.excess_range for c in self.checks]
        return max(r[0] for r in ranges), max(r[1] for r in ranges)

    @property
    def selection_error(self) -> float:
        selection = self.selected.selection
        return selection.errors.get(selection.chosen, float("inf"))


def kept_after_misses(tried: list[Tried]) -> Tried:
    """Of searched plans that all missed: the one measured nearest its budget, unless
    others' misses cannot be told from it (their measured multiples' confidence intervals
    overlap its own); then, of those, the one with the least error on the selection split,
    so that a plan no faster for sure is not kept at the cost of its quality."""
    nearest = min(tried, key=lambda t: (t.excess, t.search))
    reach = nearest.excess_range[1]
    alike = [t for t in tried if t.excess_range[0] <= reach]
    best = min(alike, key=lambda t: (t.selection_error, t.excess, t.search))
    if best is not nearest:
        best.why = (
            "the least error on the selection split among those measured as near the budget "
            "as the nearest"
        )
    return best


def tightened(priced: Priced, missed: list[LatencyCheck]) -> dict[str, float]:
    """The limits with each missed latency planned so that, off by the same ratio, the plan
    lands the margin under its budget, or on it where the miss was not settled."""
    limits = dict(priced.limits)
    for check in missed:
        keep = 1.0 - priced.margin if check.settled else 1.0
        wanted = check.replanned_ms(keep) / 1e3
        limits[check.resource] = min(limits[check.resource], wanted)
    return limits


def loosened(priced: Priced, checks: list[LatencyCheck]) -> dict[str, float] | None:
    """The limits with each latency that bound the search (the plan predicted within
    :data:`BINDING` of it) and whose check has room (:meth:`LatencyCheck.roomy`) planned so
    that, off by the same ratio, the plan lands the margin under its budget; ``None`` where
    no limit grows by more than :data:`LOOSEN_AT_LEAST`."""
    limits = dict(priced.limits)
    keep = 1.0 - priced.margin
    grown = False
    for check in checks:
        binding = check.predicted_ms >= BINDING * check.planned_ms
        if not (binding and check.met and check.roomy(priced.margin)):
            continue
        wanted = check.replanned_ms(keep, loosen=True) / 1e3
        if wanted > limits[check.resource] * (1.0 + LOOSEN_AT_LEAST):
            limits[check.resource] = wanted
            grown = True
    return limits if grown else None


def fastest_reachable(
    priced: Priced,
    limits: dict[str, float],
    smallest: Mapping[str, float | None],
    checked: Sequence[LatencyCheck] = (),
) -> dict[str, float] | None:
    """``limits`` with every latency limit below the least any plan within the other limits
    is predicted to reach (``smallest``, :func:`~autotune.allocation.least_within`) raised
    to that least (a hair above it), so that the next search finds the fastest plan
    predicted; ``None`` where that is no tighter than the search just checked or the plan it
    found (``checked``, its checks: it was the fastest already), a limit other than latency
    is out of reach, or no least is known (no plan is within the other limits)."""
    raised = dict(limits)
    found = {c.resource: c.predicted_ms / 1e3 for c in checked}
    for resource, limit in limits.items():
        least = smallest.get(resource, 0.0)
        if least is None:
            return None
        if limit >= least:
            continue
        before = min(priced.limits[resource], found.get(resource, float("inf")))
        if resource not in _PHASES or least * (1 + 1e-6) >= before:
            return None
        raised[resource] = least * (1 + 1e-6)
    return raised if raised != limits else None


def check_plan(
    setup: Setup, priced: Priced, selected: Selected, attempt: int = 1
) -> list[LatencyCheck]:
    """The selected plan (found by search number ``attempt``) timed against each latency
    budget."""
    options = selected.chosen.options
    predicted = candidate_totals(priced.costs, options)
    original = priced.costs.original_totals()
    measured = measured_ms(setup, priced, options)
    checks = []
    for resource, (stats, beside) in measured.items():
        phase, budget = _PHASES[resource], setup.budget
        budget_field = f"{phase}_ms"
        # a budget of multiples of a reference file: that file, on the prediction's scale
        multiple = priced.reference_multiples.get(phase)
        original_ms = None if beside is None else beside.p50_ms
        if original_ms is None:  # tuned in place: the original as timed before tuning
            original_ms = _timed_before(priced, resource)
        against = original_ms if original_ms is not None else original[budget_field]
        limit = budget.phase_limit_ms(phase, against)
        checks.append(
            LatencyCheck(
                resource=resource,
                plan=selected.chosen.name,
                search=attempt,
                budget_ms=float(limit),
                planned_ms=priced.limits[resource] * 1e3,
                predicted_ms=float(predicted[budget_field]),
                measured_ms=stats.p50_ms,
                original_ms=original_ms,
                ms_term=budget.phase_ms(phase),
                ratio_term=budget.phase_ratio(phase),
                ratio=None if beside is None else paired(stats.samples_ms, beside.samples_ms),
                original_predicted_ms=float(original[budget_field]) * (multiple or 1.0),
                beside="original" if multiple is None else "reference",
            )
        )
    return checks


def _say_check(setup: Setup, check: LatencyCheck) -> None:
    """One line on a check: measured, predicted, the budget and the verdict."""
    verdict = "" if check.met else " (missed)" if check.settled else " (missed, unsettled)"
    setup.say.say(
        f"latency check: '{check.plan}' {check.measured_ms:.4g} ms measured"
        + _multiple(check.ratio, check.beside)
        + f", {check.predicted_ms:.4g} ms predicted, budget {check.budget_ms:.4g} ms"
        + verdict
    )


def _multiple(ratio: Interval | None, beside: str = "original") -> str:
    """``", 0.71x (95% CI 0.69-0.74, 23 rounds) of the original's"`` (or the reference
    file's), where it was timed."""
    if ratio is None:
        return ""
    return f", {ratio.describe()} of the {beside}'s"


def _timed_before(priced: Priced, resource: str) -> float | None:
    """The original's p50 ms as timed before tuning in place, where it was."""
    baseline = priced.baseline
    if baseline is None:
        return None
    stats = baseline.latency if resource == "seconds" else baseline.decode
    return None if stats is None else stats.p50_ms


def measured_ms(
    setup: Setup, priced: Priced, options: dict[str, Option]
) -> dict[str, tuple[LatencyStats, LatencyStats | None]]:
    """Timings of the model with ``options``, and of the original timed beside it (``None``
    when tuned in place; the reference file where the budget's multiple is of one,
    :mod:`autotune.reference_file`), for each latency limit, timed as the final
    measurement times them (in the runtime the plan is for when its latency model times
    there, else in autotune's modules), in rounds that go on until the budget's verdict is
    settled (:meth:`~autotune.budget.Budget.timing_limit`)."""
    latency_model = measuring_model(setup.spec)
    original = None if setup.inplace else setup.original
    plan = Plan(layers={name: option.to_dict() for name, option in options.items()})
    inputs = {"seconds": priced.latency_inputs, "decode_seconds": priced.decode}
    out: dict[str, tuple[LatencyStats, LatencyStats | None]] = {}
    with setup.executor.swapped(options) as model:
        models = {"model": model} if original is None else {"model": model, "baseline": original}
        for resource in checked_resources(setup, priced):
            phase = _PHASES[resource]
            if inputs[resource] is None:
                continue
            reference = setup.reference if phase in priced.reference_multiples else None
            baseline = original if reference is None else reference.path
            limit = setup.budget.timing_limit(phase, baseline is not None)
            elsewhere = None
            if resource == "seconds" or latency_model.measures_decode:
                elsewhere = latency_model.measure(model, plan, baseline, inputs[resource], limit)
            if elsewhere is None:
                elsewhere = measure_against(models, inputs[resource], limit)
            out[resource] = (elsewhere["model"], elsewhere.get("baseline"))
    return out
