"""Stage 7: a latency budget checked where the plan runs, before the plan is kept.

On ``local`` each option was timed on this machine (in autotune's modules, ONNX Runtime or
llama.cpp), but a plan's time is predicted by adding its layers' shares, which misses how
kernels interact (ONNX Runtime's int8 kernels gain unequally on float32 from one mix to
another). So the selected plan is timed as a whole, in the runtime that runs it, beside the
original as the final measurement times it; if it misses a latency or decode budget, the
limit it is planned under is tightened by how far its prediction was off and the search runs
again (the sensitivity table is reused), up to :data:`SEARCHES` searches in all; if none
meets it, the plan measured nearest to it is kept. Every check is recorded in the plan
(``search.latency_checks``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from autotune.allocation import candidate_totals, check_feasible
from autotune.errors import InfeasibleBudgetError
from autotune.latency_models import latency_model_for
from autotune.pipeline.choose import Scored, Searched, Selected, search, select_plan
from autotune.pipeline.config import TuneConfig
from autotune.pipeline.prepare import Data, Setup
from autotune.pipeline.price import Priced
from autotune.plan import Plan
from methods.base import Option
from profilers.measure import measure_latencies

SEARCHES = 3  # the first search and at most two more under tightened limits

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

    @property
    def met(self) -> bool:
        return self.measured_ms <= self.budget_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": "decode" if self.resource == "decode_seconds" else "latency",
            "plan": self.plan,
            "search": self.search,
            "budget_ms": round(self.budget_ms, 6),
            "planned_ms": round(self.planned_ms, 6),
            "predicted_ms": round(self.predicted_ms, 6),
            "measured_ms": round(self.measured_ms, 6),
            **({"original_ms": round(self.original_ms, 6)} if self.original_ms is not None else {}),
            "met": self.met,
        }


def applies(setup: Setup, priced: Priced) -> bool:
    """Whether the plan can be checked here: a latency budget, priced by timing on this
    machine, with the whole model in memory."""
    return (
        not setup.as_is
        and setup.executor.holds_whole_model
        and latency_model_for(setup.spec).measures
        and any(r in priced.limits for r in _PHASES)
    )


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
    tried: list[tuple[float, int, Priced, Searched, Selected]] = []
    for attempt in range(SEARCHES):
        found = check_plan(setup, priced, selected, attempt + 1)
        checks += found
        missed = [c for c in found if not c.met]
        for check in found:
            setup.say.say(
                f"latency check: '{check.plan}' {check.measured_ms:.4g} ms measured, "
                f"{check.predicted_ms:.4g} ms predicted, budget {check.budget_ms:.4g} ms"
                + ("" if check.met else " (missed)")
            )
        if not missed:
            break
        nearest = max(c.measured_ms / c.budget_ms for c in found)
        tried.append((nearest, attempt + 1, priced, searched, selected))
        if attempt == SEARCHES - 1:
            break
        limits = tightened(priced, missed)
        try:
            check_feasible(setup.budget, priced.costs, limits)
        except InfeasibleBudgetError:
            setup.say.say("latency check: no plan fits the tightened limits")
            break
        priced = replace(priced, limits=limits)
        searched = search(setup, data, priced, scored, config)
        selected = select_plan(setup, data, scored, searched, config)
    if missed:  # none met its budget: keep the one measured nearest to it
        _, kept, priced, searched, selected = min(tried, key=lambda t: t[:2])
        setup.say.say(f"latency check: no plan met the budget; kept the nearest (search {kept})")
    selected.latency_checks = [c.to_dict() for c in checks]
    return priced, searched, selected


def tightened(priced: Priced, missed: list[LatencyCheck]) -> dict[str, float]:
    """The limits with each missed latency planned so that, off by the same ratio, the plan
    lands the margin under its budget."""
    limits = dict(priced.limits)
    keep = 1.0 - priced.margin
    for check in missed:
        ratio = check.measured_ms / check.predicted_ms if check.predicted_ms > 0 else 1.0
        wanted = keep * check.budget_ms / 1e3 / max(ratio, 1.0)
        limits[check.resource] = min(limits[check.resource], wanted)
    return limits


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
    for resource, (milliseconds, original_ms) in measured.items():
        budget_field = f"{_PHASES[resource]}_ms"
        if original_ms is None:  # tuned in place: the original as timed before tuning
            original_ms = _timed_before(priced, resource)
        against = original_ms if original_ms is not None else original[budget_field]
        limit = setup.budget.phase_limit_ms(_PHASES[resource], against)
        checks.append(
            LatencyCheck(
                resource=resource,
                plan=selected.chosen.name,
                search=attempt,
                budget_ms=float(limit),
                planned_ms=priced.limits[resource] * 1e3,
                predicted_ms=float(predicted[budget_field]),
                measured_ms=milliseconds,
                original_ms=original_ms,
            )
        )
    return checks


def _timed_before(priced: Priced, resource: str) -> float | None:
    """The original's p50 ms as timed before tuning in place, where it was."""
    baseline = priced.baseline
    if baseline is None:
        return None
    stats = baseline.latency if resource == "seconds" else baseline.decode
    return None if stats is None else stats.p50_ms


def measured_ms(
    setup: Setup, priced: Priced, options: dict[str, Option]
) -> dict[str, tuple[float, float | None]]:
    """p50 milliseconds of the model with ``options``, and of the original timed beside it
    (``None`` when tuned in place), for each latency limit, timed as the final measurement
    times them: in the runtime the plan is for when its latency model times there, else in
    autotune's modules."""
    latency_model = latency_model_for(setup.spec)
    baseline = None if setup.inplace else setup.original
    plan = Plan(layers={name: option.to_dict() for name, option in options.items()})
    inputs = {"seconds": priced.latency_inputs, "decode_seconds": priced.decode}
    out: dict[str, tuple[float, float | None]] = {}
    with setup.executor.swapped(options) as model:
        models = {"model": model} if baseline is None else {"model": model, "baseline": baseline}
        for resource in _PHASES:
            if resource not in priced.limits or inputs[resource] is None:
                continue
            elsewhere = None
            if resource == "seconds" or latency_model.measures_decode:
                elsewhere = latency_model.measure(model, plan, baseline, inputs[resource])
            if elsewhere is None:
                elsewhere = measure_latencies(models, inputs[resource])
            beside = elsewhere.get("baseline")
            out[resource] = (elsewhere["model"].p50_ms, None if beside is None else beside.p50_ms)
    return out
