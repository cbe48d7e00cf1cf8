"""Stages 7 and 8: the chosen plan applied to the model and written down in one place, then
measured on the held-out split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autotune.allocation import candidate_totals, layer_profile
from autotune.costs import CostModel
from autotune.engines import get_engine
from autotune.fitness import windows_of
from autotune.pipeline.choose import Scored, Searched, Selected
from autotune.pipeline.config import TuneConfig
from autotune.pipeline.prepare import Data, Setup
from autotune.pipeline.price import Priced
from autotune.plan import DEFAULT_KEY, Plan
from autotune.selection import UNIFORM_PREFIX
from methods.keep import KeepOption
from profilers.memory import PeakPrediction, scratch_bytes
from profilers.sensitivity import SensitivityTable


def apply_chosen(setup: Setup, selected: Selected) -> None:
    """Compress the working model to the chosen plan (reusing the modules converted for
    the search where the executor kept them), then free what the search kept."""
    setup.executor.apply(selected.chosen.options)


def write_model(setup: Setup, data: Data, plan: Plan) -> Path | None:
    """Write the compressed model where the settings ask (block by block: always)."""
    if setup.executor.save_to is not None:
        setup.say.say(f"writing the compressed model to {setup.executor.save_to}")
    return setup.executor.write(plan, setup.tokenizer, data.calib.calibration)


def record_plan(
    setup: Setup,
    data: Data,
    priced: Priced,
    scored: Scored,
    searched: Searched,
    selected: Selected,
    config: TuneConfig,
) -> Plan:
    """The plan: each layer's option, and what was predicted, searched and chosen."""
    costs, chosen = priced.costs, selected.chosen
    totals = costs.totals({n: costs.options[n].index(o) for n, o in chosen.options.items()})
    layers: dict[str, dict[str, Any]] = {DEFAULT_KEY: KeepOption().to_dict()}
    layers.update({ref.name: chosen.options[ref.name].to_dict() for ref in priced.layers})
    return Plan(
        layers=layers,
        structure=data.structure,
        model={
            "source": setup.source,
            "class": type(setup.original).__name__,
            "fingerprint": setup.fingerprint,
            **({"tied": setup.tied} if setup.tied else {}),
        },
        target={k: v for k, v in setup.spec.to_dict().items() if k != "probed"},
        budget=setup.budget.to_dict(),
        calibration=data.calib.description,
        predicted=_predicted(setup, priced, scored, chosen, totals),
        search=_search_record(setup, data, priced, scored, searched, selected, config),
        profile=layer_profile(costs, scored.table, chosen.options),
        export=setup.runtime.describe_export(setup.work, chosen.options),
    )


def _predicted(
    setup: Setup, priced: Priced, scored: Scored, chosen: Any, totals: dict[str, float]
) -> dict[str, Any]:
    costs, budget = priced.costs, setup.budget
    original = costs.totals({n: costs.options[n].index(KeepOption()) for n in costs.options})
    peak = PeakPrediction.of(int(totals["bytes"]), priced.activations, scratch_bytes(setup.work))
    errors = scored.table.errors
    predicted: dict[str, Any] = {
        "bytes": int(totals["bytes"]),
        "original_bytes": costs.original_bytes,
        "avg_bits": round(totals["avg_bits"], 6),
        "latency_ms": round(totals["latency_ms"], 6),
        "original_latency_ms": round(original["latency_ms"], 6),
        "latency_shape": [budget.batch_size, budget.seq_len],
        "peak_memory_bytes": peak.total,
        "peak_memory": peak.to_dict(),
        "error": chosen.calibration_error,
        "error_additive": float(sum(errors[n][o.label] for n, o in chosen.options.items())),
        "metric": scored.table.metric,
    }
    if "decode_ms" in totals:
        predicted["decode_ms"] = round(totals["decode_ms"], 6)
        predicted["original_decode_ms"] = round(original["decode_ms"], 6)
        predicted["decode_shape"] = [budget.batch_size, budget.decode_context]
    if priced.serving:
        serving = priced.serving
        overhead = serving["kv_cache"] + serving["activations"]
        predicted["memory_overhead_bytes"] = overhead
        predicted["memory_breakdown"] = {
            "weights": int(totals["bytes"]),
            **serving,
            "total": int(totals["bytes"]) + overhead,
        }
    return predicted


def _search_record(
    setup: Setup,
    data: Data,
    priced: Priced,
    scored: Scored,
    searched: Searched,
    selected: Selected,
    config: TuneConfig,
) -> dict[str, Any]:
    costs, fitness, engine = priced.costs, searched.fitness, searched.engine
    settings = config.search
    record: dict[str, Any] = {
        "algorithm": get_engine(engine).provenance,
        "engine": engine,
        "requested": settings.search,
        "sensitivity": setup.estimator.name,
        "seed": settings.seed,
        "chosen": selected.chosen.name,
        "sensitivity_evaluations": scored.table.evaluations,
        "sensitivity_cached": scored.cache.hits if scored.cache else 0,
        **_scoring(scored.table),
        "full_evaluations": round(fitness.full_equivalent, 3),
        "evaluations_by_fidelity": {
            "windows": [round(c * windows_of(data.calib.calibration)) for c in fitness.costs],
            "calls": list(fitness.evaluations),
        },
        "candidates": [
            {
                "name": c.name,
                "screening_error": c.screening_error,
                "calibration_error": c.calibration_error,
                **candidate_totals(costs, c.options),
            }
            for c in searched.candidates
        ],
        "solver_seconds": round(searched.allocation.seconds, 3),
        "solver_optimal": searched.allocation.optimal,
    }
    if setup.as_is:
        record["uncompressed_meets_budget"] = True
    budget = setup.budget
    if priced.margin and (budget.bounds_latency or budget.bounds_decode):
        record["latency_margin"] = priced.margin
    if priced.guard is not None:
        record["decode_guard"] = priced.guard.to_dict()
    if setup.reference is not None:
        record["relative_to"] = {
            **setup.reference.to_dict(),
            "multiple_of_original": {k: round(v, 6) for k, v in priced.reference_multiples.items()},
        }
    record["selection"] = selected.selection.to_dict()
    if selected.latency_checks:
        record["latency_checks"] = selected.latency_checks
    if priced.left_out:
        record["undercalibrated_options_left_out"] = priced.left_out
    if priced.agreements:
        record["calibration_agreement"] = [a.to_dict() for a in priced.agreements]
    outcome = searched.outcome
    if outcome.result is not None:
        result = outcome.result
        record["engine_run"] = {
            "max_evals": settings.max_evals,
            "timeout": settings.timeout,
            "full_evaluations": round(result.evaluations.full_equivalent, 3),
            "iterations": result.iterations,
            "seconds": round(result.seconds, 2),
            "stopped": result.stopped,
            "best_error": result.error,
            "allocator_error": fitness.error(
                searched.options(costs, searched.allocation.assignment), -1
            ),
        }
        if result.judged:  # the parent's selection error per generation, the start first
            record["engine_run"]["selection_errors"] = result.judged
        if outcome.study:
            record["study"] = outcome.study
        if result.pareto:
            record["pareto"] = [
                _pareto_point(costs, searched.options(costs, p["assignment"]), p["error"])
                for p in result.pareto
            ]
    return record


def _scoring(table: SensitivityTable) -> dict[str, Any]:
    """How many (layer, option) pairs each way of scoring gave, and the rounds of
    refinement, for estimators that mix ways."""
    record: dict[str, Any] = {}
    if table.scored_by:
        record["sensitivity_scored_by"] = dict(table.scored_by)
    if table.rounds:
        record["sensitivity_rounds"] = table.rounds
    return record


def _pareto_point(costs: CostModel, options: dict, error: float) -> dict[str, Any]:
    return {
        "error": error,
        **candidate_totals(costs, options),
        "layers": {n: o.label for n, o in options.items()},
    }


def measure_result(
    setup: Setup,
    data: Data,
    priced: Priced,
    scored: Scored,
    selected: Selected,
    plan: Plan,
) -> None:
    """Measure the compressed model (bytes, latency beside the original, held-out error)
    into ``plan.measured``, and the best uniform plan's held-out error beside it."""
    plan.measured = setup.executor.measure(setup, data, priced, scored, plan)
    uniform = selected.best_uniform
    if uniform is not None:
        plan.measured["best_uniform"] = {
            "option": uniform.name.removeprefix(UNIFORM_PREFIX),
            "selection_error": selected.selection.errors[uniform.name],
            "heldout_error": selected.uniform_heldout,
            "bytes": int(candidate_totals(priced.costs, uniform.options)["bytes"]),
        }
