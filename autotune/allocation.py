"""The allocator's view of a cost model: limits, the choice table, candidates' totals, and
what a plan records per layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from autotune.budget import Budget
from autotune.costs import CostModel
from autotune.errors import InfeasibleBudgetError
from methods.base import Option
from methods.keep import KeepOption
from methods.registry import method_of
from profilers.sensitivity import SensitivityTable
from search import Allocation, ChoiceTable, InfeasibleError, allocate
from search.ties import tie

RESOURCE_NAMES = {
    "bytes": "stored bytes",
    "bits": "stored weight bits",
    "seconds": "latency",
    "decode_seconds": "decode latency",
}


# measured (``local``) latencies vary by a few percent between runs on a shared machine: a
# plan predicted just under a latency limit is measured over it about half the time
LOCAL_LATENCY_MARGIN = 0.05
# how far a measured (``local``) option table's prediction of a whole plan may miss its
# measured time: on the demo in ONNX Runtime, 3-12% either way from one run to the next
# (README, "ONNX Runtime"); a latency budget within it of the fastest prediction is timed,
# not refused
TIMING_SPREAD = 0.15
LATENCY_RESOURCES = ("seconds", "decode_seconds")


def limits_for(
    budget: Budget, costs: CostModel, overhead_bytes: int = 0, latency_margin: float = 0.0
) -> dict[str, float]:
    """Limits on the stored bytes, bits and seconds of the layers' options; a serving
    budget leaves the stored bytes what the KV cache and activations do not take. Latency
    limits are planned ``latency_margin`` (a fraction) below the budget's."""
    limits: dict[str, float] = {}
    memory = budget.memory_limit(costs.original_bytes)
    if memory is not None:
        if memory <= overhead_bytes:
            raise InfeasibleBudgetError(
                f"budget {budget.spec} cannot be met: the KV cache and activation peak alone "
                f"take {overhead_bytes:,} bytes at batch {budget.batch_size} x context "
                f"{budget.context} ({budget.kv_dtype})",
                {"bytes": float(overhead_bytes)},
            )
        limits["bytes"] = memory - overhead_bytes
    if budget.avg_bits is not None:
        limits["bits"] = budget.avg_bits * costs.total_weights
    keep = 1.0 - latency_margin
    latency_ms, decode_ms = latency_limits_ms(budget, costs)
    if latency_ms is not None:
        limits["seconds"] = keep * latency_ms / 1e3
    if decode_ms is not None:
        limits["decode_seconds"] = keep * decode_ms / 1e3
    return limits


def latency_limits_ms(budget: Budget, costs: CostModel) -> tuple[float | None, float | None]:
    """The budget's forward-pass and per-token limits in ms, a limit relative to the
    original taken against the original model's predicted latency."""
    latency_ms = decode_ms = None
    if budget.bounds_latency or budget.bounds_decode:
        original = costs.original_totals()
        latency_ms = budget.latency_limit_ms(original["latency_ms"])
        if budget.bounds_decode:
            if budget.decode_ratio is not None and "decode_ms" not in original:
                raise InfeasibleBudgetError(
                    f"budget {budget.spec} cannot be met: no decode latency was priced", {}
                )
            decode_ms = budget.decode_limit_ms(original.get("decode_ms"))
    return latency_ms, decode_ms


def choice_table(costs: CostModel, scores: dict[str, list[float]]) -> ChoiceTable:
    """The allocator's view; an option with an unknown (non-finite) cost is never chosen."""
    names = [r.name for r in costs.layers]
    resources = {"bytes": costs.bytes, "bits": costs.weight_bits, "seconds": costs.seconds}
    fixed = {
        "bytes": float(costs.fixed_bytes),
        "bits": float(costs.fixed_weight_bits),
        "seconds": costs.fixed_seconds,
    }
    if costs.decode_seconds is not None:
        resources["decode_seconds"] = costs.decode_seconds
        fixed["decode_seconds"] = costs.fixed_decode_seconds
    arrays = {r: [np.asarray(v[n], dtype=np.float64) for n in names] for r, v in resources.items()}
    score_arrays = []
    for i, name in enumerate(names):
        score = np.asarray(scores[name], dtype=np.float64)
        unknown = np.zeros(len(score), dtype=bool)
        for per_var in arrays.values():
            unknown |= ~np.isfinite(per_var[i])
        for per_var in arrays.values():
            per_var[i] = np.where(unknown, 0.0, per_var[i])
        score_arrays.append(np.where(unknown, np.inf, score))
    return ChoiceTable(
        variables=names,
        choices=[[o.label for o in costs.options[n]] for n in names],
        scores=score_arrays,
        costs=arrays,
        fixed=fixed,
    )


def _latency_limit(limit_s: float, budget_ms: float | None, ratio: float | None = None) -> str:
    """A latency limit in words, with the budget it was taken from if a margin lowers it
    (and the multiple of the original's latency it stands for, where it is one)."""
    planned = 1e3 * limit_s
    if budget_ms is None:
        return f"{planned:g} ms"
    relative = f"{ratio:g}x the original's predicted latency" if ratio is not None else None
    if abs(planned - budget_ms) <= 1e-9 * budget_ms:
        return f"{planned:g} ms" if relative is None else f"{planned:.4g} ms ({relative})"
    budget = f"{budget_ms:g} ms" if relative is None else f"{budget_ms:.4g} ms, {relative}"
    return f"{planned:.4g} ms (the budget's {budget} less a margin for timing noise)"


def _relative(
    milliseconds: float | None, ratio: float | None, limit_ms: float | None
) -> float | None:
    """The relative term where it is the limit (tighter than the ms term), else ``None``."""
    if ratio is None or (milliseconds is not None and limit_ms == milliseconds):
        return None
    return ratio


def infeasible_message(
    budget: Budget, table: ChoiceTable, limits: dict[str, float], costs: CostModel
) -> str:
    parts = []
    latency_ms, decode_ms = latency_limits_ms(budget, costs)
    latency_ratio = _relative(budget.latency_ms, budget.latency_ratio, latency_ms)
    decode_ratio = _relative(budget.decode_ms, budget.decode_ratio, decode_ms)
    for resource, limit in limits.items():
        smallest = table.minimum(resource)
        if smallest <= limit:
            continue
        if resource == "bytes":
            parts.append(
                f"the smallest plan for this model stores {int(smallest):,} bytes "
                f"({smallest / 1e6:.3f} MB), above the limit of {int(limit):,} bytes"
            )
        elif resource == "bits":
            fewest = smallest / costs.total_weights
            parts.append(
                f"the fewest stored bits per weight reachable is {fewest:.3f}, "
                f"above {budget.avg_bits:g}"
            )
        elif resource == "decode_seconds":
            parts.append(
                f"the lowest predicted decode latency is {1e3 * smallest:.3f} ms per token, "
                f"above {_latency_limit(limit, decode_ms, decode_ratio)}"
            )
        else:
            parts.append(
                f"the lowest predicted latency is {1e3 * smallest:.3f} ms, "
                f"above {_latency_limit(limit, latency_ms, latency_ratio)}"
            )
    if not parts:
        parts.append(
            "each limit can be met alone but not all at once (smallest alone: "
            + ", ".join(f"{RESOURCE_NAMES[r]} {table.minimum(r):.6g}" for r in limits)
            + ")"
        )
    return f"budget {budget.spec} cannot be met: " + "; ".join(parts)


def candidate_totals(costs: CostModel, options: dict) -> dict[str, float]:
    totals = costs.totals({n: costs.options[n].index(o) for n, o in options.items()})
    out = {
        "bytes": int(totals["bytes"]),
        "avg_bits": round(totals["avg_bits"], 6),
        "latency_ms": round(totals["latency_ms"], 6),
    }
    if "decode_ms" in totals:
        out["decode_ms"] = round(totals["decode_ms"], 6)
    return out


def finite(value: float) -> float | None:
    return value if np.isfinite(value) else None


def layer_profile(costs: CostModel, sensitivity: SensitivityTable, chosen: dict) -> dict[str, Any]:
    """Per layer: shape, the chosen option's bytes, bits, latency and error, and the error of
    every option profiled (what a reviewer needs to see why a layer got its option)."""
    layers = {}
    for ref in costs.layers:
        index = costs.options[ref.name].index(chosen[ref.name])
        errors = sensitivity.errors.get(ref.name, {})
        layers[ref.name] = {
            "kind": ref.shape.kind,
            "shape": [ref.shape.rows, ref.shape.cols],
            "bytes": int(costs.bytes[ref.name][index]),
            "bits_per_weight": round(costs.weight_bits[ref.name][index] / ref.shape.numel, 4),
            "latency_ms": finite(round(1e3 * costs.seconds[ref.name][index], 6)),
            **(
                {"decode_ms": finite(round(1e3 * costs.decode_seconds[ref.name][index], 6))}
                if costs.decode_seconds is not None
                else {}
            ),
            "error": finite(errors.get(chosen[ref.name].label, float("nan"))),
            "errors": {label: finite(err) for label, err in errors.items()},
        }
    return {"metric": sensitivity.metric, "layers": layers}


def _screen(costs: CostModel) -> ChoiceTable:
    """The choice table of ``costs`` before any scores (every option scored 0)."""
    return choice_table(costs, {n: [0.0] * len(o) for n, o in costs.options.items()})


def keep_fits(costs: CostModel, limits: dict[str, float]) -> bool:
    """Whether keeping every layer as it is meets all the limits once priced."""
    screen = _screen(costs)
    keep = screen.uniform(KeepOption().label)
    return keep is not None and screen.fits(keep, limits)


def within_timing_spread(
    budget: Budget, costs: CostModel, limits: dict[str, float], margin: float
) -> tuple[dict[str, float], list[str]]:
    """``limits`` with each latency limit that no plan within the other limits is predicted
    to meet, but whose budget (the limit before ``margin``) is within :data:`TIMING_SPREAD`
    of the fastest such prediction, raised to ``margin`` over that prediction: plans
    predicted that near the fastest cannot be told from it by prediction (timings of whole
    plans stray by more), so the search takes the least error among them, and a latency
    check times it (on a miss, :mod:`autotune.pipeline.confirm` searches for the fastest).
    Returns the limits and the resources raised; refuses as :func:`check_feasible` does
    whatever is still out of reach."""
    raised = dict(limits)
    for resource, least in least_within(costs, limits).items():
        wanted = limits[resource] / (1.0 - margin)
        if least is not None and limits[resource] < least <= (1.0 + TIMING_SPREAD) * wanted:
            raised[resource] = least * (1 + max(margin, 1e-6))
    check_feasible(budget, costs, raised)
    return raised, [r for r in raised if raised[r] != limits[r]]


def non_latency(limits: Mapping[str, float]) -> dict[str, float]:
    """``limits`` without the latency ones (stored bytes, bits)."""
    return {r: v for r, v in limits.items() if r not in LATENCY_RESOURCES}


def least_within(costs: CostModel, limits: Mapping[str, float]) -> dict[str, float | None]:
    """For each latency limit in ``limits``, the least total of its resource among plans
    within the other limits (stored bytes, bits), predicted; ``None`` where no plan is
    within those or the resource is not priced."""
    others = non_latency(limits)
    return {r: least_reachable(costs, others, r) for r in LATENCY_RESOURCES if r in limits}


def least_reachable(costs: CostModel, limits: dict[str, float], resource: str) -> float | None:
    """The least total of ``resource`` (seconds or decode seconds) of any plan within
    ``limits``; ``None`` if no plan meets them."""
    per_layer = costs.seconds if resource == "seconds" else costs.decode_seconds
    if per_layer is None:
        return None
    table = choice_table(costs, {n: list(per_layer[n]) for n in costs.options})
    if not limits:
        return table.minimum(resource)
    try:
        return table.total(resource, allocate(table, limits).assignment)
    except InfeasibleError:
        return None


def check_feasible(budget: Budget, costs: CostModel, limits: dict[str, float]) -> None:
    """Refuse, before any profiling, limits that even the cheapest options break."""
    screen = _screen(costs)
    if any(screen.minimum(r) > limit for r, limit in limits.items()):
        raise InfeasibleBudgetError(
            infeasible_message(budget, screen, limits, costs),
            {r: screen.minimum(r) for r in limits},
        )


def allocate_plan(
    budget: Budget,
    costs: CostModel,
    limits: dict[str, float],
    errors: dict[str, dict[str, float]],
    ties: Sequence[Sequence[str]] = (),
) -> tuple[ChoiceTable, Allocation]:
    """The choice table scored by ``errors[layer][label]`` (an option a layer could not take
    is never chosen) and the allocator's plan within ``limits``, each group of ``ties``
    (layer names) taking one label."""
    scores = {
        name: [errors[name].get(o.label, float("inf")) for o in opts]
        for name, opts in costs.options.items()
    }
    table = choice_table(costs, scores)
    try:
        return table, allocate_tied(table, limits, ties)
    except InfeasibleError as exc:
        raise InfeasibleBudgetError(
            infeasible_message(budget, table, limits, costs), exc.minimums
        ) from None


def assignment_options(
    costs: CostModel, table: ChoiceTable, assignment: list[int]
) -> dict[str, Option]:
    """The option of each layer in an assignment of ``table``."""
    return {n: costs.options[n][i] for n, i in zip(table.variables, assignment, strict=True)}


def allocate_tied(
    table: ChoiceTable, limits: dict[str, float], ties: Sequence[Sequence[str]] = ()
) -> Allocation:
    """The allocator's plan of ``table`` within ``limits``, each group of ``ties`` taking
    one label."""
    if not ties:
        return allocate(table, limits)
    tied = tie(table, ties)
    return tied.allocation(allocate(tied.reduced, limits))


def fitting_uniforms(
    costs: CostModel,
    table: ChoiceTable,
    limits: dict[str, float],
    keep: int | None = None,
    ties: Sequence[Sequence[str]] = (),
) -> dict[str, dict[str, Option]]:
    """``{name: options}`` for every uniform plan that fits: ``uniform <label>`` where every
    layer takes the option ``label``; where only most layers can take an uncalibrated option
    (int8 activations reach linear layers, not embeddings), ``uniform <label> on K of N
    layers``, the others taking the allocator's choice within what is left of ``limits``, as
    ONNX Runtime's ``quantize_dynamic`` gives embeddings a form of its own. A calibrated
    option (GPTQ) makes no such plan: fitted to the calibration text as the searched plans
    are, it does not guard against them, and the selection split cannot tell it from them
    (on the demo at 3 bits one won that split by 0.02% with 1.14x the searched plan's
    held-out error). With ``keep``, only the ``keep`` of them with the least summed error in
    ``table`` (ties by name)."""
    labels = {o.label for opts in costs.options.values() for o in opts} - {KeepOption().label}
    fitting: dict[str, list[int]] = {}
    calibrated = {
        o.label
        for opts in costs.options.values()
        for o in opts
        if method_of(o).needs_calibration(o)
    }
    for label in sorted(labels):
        taking = [label in choices for choices in table.choices]
        if all(taking):
            uniform, name = table.uniform(label), f"uniform {label}"
        elif label in calibrated or 2 * sum(taking) < len(taking):
            continue
        else:
            uniform = _uniform_where_offered(table, label, taking, limits, ties)
            name = f"uniform {label} on {sum(taking)} of {len(taking)} layers"
        if uniform is not None and table.fits(uniform, limits):
            fitting[name] = uniform
    if keep is not None:
        ranked = sorted(fitting, key=lambda name: table.score(fitting[name]))  # ties by name
        fitting = {name: fitting[name] for name in sorted(ranked[:keep])}
    return {name: assignment_options(costs, table, uniform) for name, uniform in fitting.items()}


def _uniform_where_offered(
    table: ChoiceTable,
    label: str,
    taking: list[bool],
    limits: dict[str, float],
    ties: Sequence[Sequence[str]],
) -> list[int] | None:
    """The layers ``taking`` the label taking it, the others the allocator's least-error
    choice within ``limits``; ``None`` if nothing fits."""
    scores = [
        np.where(np.arange(len(choices)) == choices.index(label), scores, np.inf)
        if takes
        else scores
        for takes, choices, scores in zip(taking, table.choices, table.scores, strict=True)
    ]
    masked = ChoiceTable(table.variables, table.choices, scores, table.costs, table.fixed)
    try:
        return allocate_tied(masked, limits, ties).assignment
    except InfeasibleError:
        return None
