"""``autotune()``: profile, search, apply and validate, end to end."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autotune.apply import compress
from autotune.budget import Budget
from autotune.calibration import build_calibration
from autotune.candidates import Candidate, ModuleCache, evaluate, select
from autotune.choices import (
    LOCAL_LATENCY_MARGIN,
    allocate_plan,
    candidate_totals,
    check_feasible,
    choice_table,
    fitting_uniforms,
    layer_profile,
    limits_for,
)
from autotune.choices import options_of as plan_options
from autotune.engines import get_engine
from autotune.errors import AutotuneError
from autotune.estimators import get_estimator
from autotune.fingerprint import fingerprint
from autotune.fitness import PlanFitness, windows_of
from autotune.layers import compressible_layers
from autotune.loading import load_model
from autotune.measurement import measure_model
from autotune.plan import DEFAULT_KEY, Plan
from autotune.progress import Progress
from autotune.report import Report
from autotune.runtimes import get_runtime
from autotune.searching import check_settings, choose_engine, run_search
from autotune.selection import UNIFORM_PREFIX, choose, is_uniform
from autotune.space import (
    CostModel,
    build_costs,
    default_methods,
    drop_undercalibrated,
    layer_options,
)
from autotune.storage_bounds import StorageBounds, keep_only
from autotune.targets import get_target
from methods.errors import OptionError
from methods.keep import KeepOption
from methods.structured import UNIT_KINDS, prune_structured
from methods.tied import untie_output_embeddings
from profilers.cache import SensitivityCache, batches_digest, default_cache_dir, table_key
from profilers.decode import DecodeError, decode_inputs, max_context
from profilers.hardware import HardwareSpec
from profilers.memory import PeakPrediction, activation_peak, kv_cache_bytes, scratch_bytes
from profilers.observe import collect_observers
from profilers.quality import is_causal_lm, metric_for, run_outputs
from profilers.sensitivity import SensitivityTable


@dataclass
class TuneResult:
    """The plan, the compressed model, and the predicted-vs-measured report."""

    plan: Plan
    model: nn.Module
    report: Report
    sensitivity: SensitivityTable
    costs: CostModel


def _module_cache_cap(original_bytes: int) -> int:
    """Converted modules kept for the search: up to 12x the model, within a third of the
    memory available now."""
    import psutil

    return int(min(12 * original_bytes, psutil.virtual_memory().available / 3))


def _pareto_point(costs: CostModel, options: dict, error: float) -> dict[str, Any]:
    return {
        "error": error,
        **candidate_totals(costs, options),
        "layers": {n: o.label for n, o in options.items()},
    }


def _serving_memory(model: nn.Module, budget: Budget, activation_bytes: int) -> dict[str, Any]:
    """With a context in the budget: the KV cache and activation peak the memory budget
    includes beside the stored bytes (empty otherwise)."""
    if budget.context is None:
        return {}
    if not is_causal_lm(model):
        raise AutotuneError(
            f"a context (KV cache) budget is for causal language models; "
            f"{type(model).__name__} is not one: leave out --context"
        )
    kv = kv_cache_bytes(model, budget.batch_size, budget.context, budget.kv_bytes_per_element)
    return {
        "kv_cache": kv,
        "activations": activation_bytes,
        "batch_size": budget.batch_size,
        "context": budget.context,
        "kv_dtype": budget.kv_dtype,
    }


def _decode_inputs(model: nn.Module, calib: Any, budget: Budget) -> dict[str, Any] | None:
    """Inputs of one decode step at the budget's batch size and context for a causal LM
    (``None`` for other models, or when the model cannot decode and no budget asks it to)."""
    if not is_causal_lm(model):
        return None
    tokens = calib.latency_inputs(budget.batch_size, budget.decode_context)["input_ids"]
    try:
        return decode_inputs(model, tokens)
    except DecodeError as exc:
        if budget.decode_ms is not None:
            raise AutotuneError(f"cannot time a decode step: {exc}") from None
        return None


def check_structured(fractions: Mapping[str, float] | None) -> None:
    """Refuse, before any work, structured fractions that are not in [0, 1) or unknown kinds."""
    for kind, fraction in (fractions or {}).items():
        if kind not in UNIT_KINDS:
            raise AutotuneError(
                f"unknown structured unit kind {kind!r}; allowed: {', '.join(UNIT_KINDS)}"
            )
        number = isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
        if not number or not 0.0 <= fraction < 1.0:
            raise AutotuneError(
                f"structured pruning fraction for {kind} is {fraction!r}; allowed: [0, 1)"
            )


def _prune_structure(
    model: nn.Module, fractions: Mapping[str, float] | None, batches: list
) -> dict[str, Any]:
    """Structured pruning of ``model`` in place; the plan's ``structure`` section."""
    if not fractions or not any(fractions.values()):
        return {}
    before = sum(p.numel() for p in model.parameters())
    try:
        kept = prune_structured(model, fractions, batches)
    except OptionError as exc:
        raise AutotuneError(str(exc)) from None
    return {
        "fractions": {k: float(v) for k, v in fractions.items()},
        "removed_parameters": before - sum(p.numel() for p in model.parameters()),
        "kept": kept,
    }


def _storage_answer(
    model: nn.Module,
    budget: Budget,
    runner: Any,
    methods: Sequence[str],
    option_labels: Sequence[str] | None,
    structured: Mapping[str, float] | None,
) -> bool:
    """From layer shapes alone, before calibration: refuse a storage budget no plan meets,
    and say whether the uncompressed model meets it already. Structured pruning changes
    the shapes first, so it is left to the priced check."""
    if structured and any(structured.values()):
        return False
    layers = compressible_layers(model)
    if not layers:
        return False
    options = runner.restrict(layers, layer_options(layers, methods, option_labels))
    bounds = StorageBounds.of(model, layers, options)
    bounds.refuse_unreachable(budget)
    return bounds.met_as_is(budget)


def _keep_fits(costs: CostModel, limits: dict[str, float]) -> bool:
    """Whether keeping every layer as it is meets all the limits once priced."""
    table = choice_table(costs, {n: [0.0] * len(o) for n, o in costs.options.items()})
    keep = table.uniform(KeepOption().label)
    return keep is not None and table.fits(keep, limits)


def autotune(
    model: nn.Module | str | Path,
    budget: Budget | str | dict,
    target: str | HardwareSpec = "local",
    *,
    calibration: Any = None,
    heldout: Any = None,
    tokenizer: Any = None,
    seed: int = 0,
    methods: Sequence[str] | None = None,
    option_labels: Sequence[str] | None = None,
    target_files: Iterable[str | Path] = (),
    inplace: bool = False,
    progress: bool = True,
    measure: bool = True,
    seq_len: int = 128,
    batch_size: int | None = None,
    latency_seq_len: int | None = None,
    calibration_windows: int = 32,
    sensitivity_windows: int = 4,
    selection_windows: int = 8,
    heldout_windows: int = 16,
    trust_remote_code: bool = False,
    cache: bool | str | Path = True,
    sensitivity: str = "end-to-end",
    search: str = "auto",
    max_evals: float | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    structured: Mapping[str, float] | None = None,
    runtime: str = "torch",
) -> TuneResult:
    """Find the best per-layer compression plan for ``model`` under ``budget`` on ``target``,
    apply it, and measure predicted against measured figures.

    ``model`` is an ``nn.Module``, a local model folder, or ``"demo"``. ``calibration`` is a
    list of texts, a text file or a list of input batches (default: standard library
    docstrings). ``methods`` names the compression methods to search (default: those with
    a fast kernel on the target, see :func:`autotune.space.default_methods`);
    ``option_labels`` (e.g. ``["int8-ch-sym", "int4-g64-asym"]``) keeps only those options of
    their grids. Sensitivity
    tables are cached on disk (``cache``: ``True`` for ``$AUTOTUNE_CACHE`` or
    ``~/.cache/autotune``, a folder, or ``False``). ``sensitivity`` is how each (layer,
    option) is scored: ``"end-to-end"`` (the output error with only that layer compressed),
    or the cheaper proxies ``"fisher"`` (a second-order estimate from weight perturbations,
    which ranks like end-to-end on the demo: Spearman 0.996) and ``"local"`` (the layer's own
    output error). ``search`` is the engine that improves on the allocator's plan with
    whole-model evaluations: ``"auto"`` (evolution, or the allocator alone for models over
    a billion weights or when its plan loses nothing), ``"allocator"``, ``"evolution"``,
    ``"tpe"`` or ``"nsga2"`` (a Pareto front of error, bytes and latency, kept in the plan).
    ``max_evals`` bounds its cost in full evaluations (default 100), ``timeout`` its seconds;
    with ``storage`` (an Optuna storage URL such as ``sqlite:///study.db``) every evaluation
    is recorded in the study ``study_name``, so a killed search resumes and several processes
    can share one study. ``structured`` (e.g. ``{"ffn": 0.25, "heads": 0.1}``) first removes
    that fraction of FFN neurons and attention heads in every block (the lowest-scoring on the
    calibration data); the per-layer search then works on the shrunken layers and quality is
    measured against the unpruned model. The calibration data picks the search's front
    runner; the selection split (``selection_windows``) then keeps it or the uniform plan
    that fits with the least error there; the held-out split (``heldout_windows``) only
    measures the result. ``runtime`` is what will run the plan (:mod:`autotune.runtimes`):
    ``"torch"`` (autotune's modules, every option), ``"vllm"`` or ``"onnxruntime"`` (only
    options that runtime's export holds and its kernels run, priced with those kernels).
    The user's model is not modified unless ``inplace=True``.
    """
    started = time.perf_counter()
    say = Progress(progress)
    budget = Budget.parse(budget, batch_size=batch_size, seq_len=latency_seq_len)
    runner = get_runtime(runtime)
    spec = get_target(target, target_files)
    runner.check_target(spec, target if isinstance(target, str) else spec.name)
    spec = runner.spec_for(spec)
    check_settings(search, max_evals, timeout, storage)
    check_structured(structured)
    estimator = get_estimator(sensitivity)
    source = "nn.Module"
    if isinstance(model, (str, Path)):
        loaded = load_model(model, trust_remote_code=trust_remote_code)
        model, tokenizer, source, inplace = (
            loaded.model,
            tokenizer or loaded.tokenizer,
            loaded.source,
            True,
        )
    budget.check_positions(max_context(model))
    if budget.decode_ms is not None and not is_causal_lm(model):
        raise AutotuneError(
            f"a decode latency budget is for causal language models; {type(model).__name__} "
            "is not one: use a plain latency term (e.g. 20ms)"
        )
    torch.manual_seed(seed)
    model.eval()
    original_fp = fingerprint(model)
    work = model if inplace else copy.deepcopy(model)
    tied = untie_output_embeddings(work)  # a tied embedding is one layer, stored once
    methods = methods if methods is not None else default_methods(spec)
    as_is = _storage_answer(work, budget, runner, methods, option_labels, structured)
    if as_is:
        say.say(
            f"the uncompressed model already meets budget {budget.spec}: every layer is kept "
            "and nothing is profiled"
        )

    calib = build_calibration(
        work,
        tokenizer,
        calibration,
        heldout,
        seq_len=seq_len,
        calibration_windows=calibration_windows,
        selection_windows=selection_windows,
        heldout_windows=heldout_windows,
        sensitivity_windows=sensitivity_windows,
    )
    # quality is judged against the model as given, before any structured pruning
    heldout_reference = run_outputs(work, calib.heldout)
    selection_reference = run_outputs(work, calib.selection)
    calib_reference = run_outputs(work, calib.calibration)
    screening_reference = run_outputs(work, calib.sensitivity)
    structure = _prune_structure(work, structured, calib.calibration)
    tuned_fp = fingerprint(work) if structure else original_fp  # keys caches and studies
    if structure:
        say.say(f"structured pruning: {structure['removed_parameters']:,} parameters removed")
    layers = compressible_layers(work)
    if not layers:
        raise AutotuneError(
            "the model has no compressible layer (linear or embedding layers of at least "
            "4096 weights that are not shared with another layer)"
        )
    options = runner.restrict(layers, layer_options(layers, methods, option_labels))
    if as_is:
        options = keep_only(options)
    latency_inputs = calib.latency_inputs(budget.batch_size, budget.seq_len)
    observers = collect_observers(work, options, calib.calibration)
    left_out = drop_undercalibrated(layers, options, observers)
    for name, count in left_out.items():
        say.say(
            f"{name}: {count} calibrated options left out (fewer calibration tokens than "
            "inputs: their statistics would be rank-deficient)"
        )
    n_entries = len({(r.shape, o.label) for r in layers for o in options[r.name]})
    with say.bar(n_entries if spec.name == "local" else 0, "latency") as bar:
        costs = build_costs(
            work, layers, options, spec, latency_inputs, progress=bar.update, observers=observers
        )
    activations = activation_peak(work, latency_inputs)  # of the uncompressed model
    decode = _decode_inputs(work, calib, budget)
    if decode is not None:
        with say.bar(n_entries if spec.name == "local" else 0, "decode latency") as bar:
            decode_costs = build_costs(
                work, layers, options, spec, decode, progress=bar.update, observers=observers
            )
        costs.with_decode(decode_costs)
    serving = _serving_memory(work, budget, activations.peak_bytes)
    margin = LOCAL_LATENCY_MARGIN if spec.name == "local" else 0.0
    overhead = serving.get("kv_cache", 0) + serving.get("activations", 0)
    limits = limits_for(budget, costs, overhead, latency_margin=margin)
    check_feasible(budget, costs, limits)
    if not as_is and _keep_fits(costs, limits):
        as_is = True
        say.say(
            f"the uncompressed model already meets budget {budget.spec} on {spec.name}: "
            "every layer is kept and nothing is profiled"
        )
        options, costs = keep_only(options), costs.only(KeepOption().label)
    say.say(
        f"{len(layers)} layers x {max(len(o) for o in options.values())} options; "
        f"target {spec.name}; budget {budget.spec}"
    )

    # the original is timed beside the result at the end; tuning in place leaves no original
    early_baseline = (
        measure_model(work, latency_inputs=latency_inputs, decode_inputs=decode)
        if measure and inplace
        else None
    )

    table_cache = None
    if cache and estimator.cacheable:
        folder = default_cache_dir() if cache is True else Path(cache)
        key = table_key(tuned_fp, batches_digest(calib.sensitivity), estimator.name)
        table_cache = SensitivityCache(folder, key)
    kind = estimator.name
    steps = sum(len(o) for o in options.values()) if estimator.steps_per_option else 0
    with say.bar(steps, f"sensitivity ({kind})") as bar:
        if as_is:  # one option per layer, which changes nothing: no error to measure
            sensitivity = SensitivityTable(
                metric=metric_for(screening_reference[0]),
                errors={name: {KeepOption().label: 0.0} for name in options},
                evaluations=0,
                seconds=0.0,
            )
        else:
            sensitivity = estimator.table(
                work,
                options,
                calib.sensitivity,
                observers=observers,
                cache=table_cache,
                progress=bar.update,
            )
    # the search compares errors with end-to-end checks of candidates, in the model's metric
    sensitivity.metric = metric_for(screening_reference[0])
    cached = f", {table_cache.hits} from the cache" if table_cache and table_cache.hits else ""
    say.say(
        f"sensitivity: {sensitivity.evaluations} evaluations in {sensitivity.seconds:.1f} s"
        f"{cached} (prefix replay {'on' if sensitivity.prefix_cached else 'off'})"
    )

    table, allocation = allocate_plan(budget, costs, limits, sensitivity.errors)

    def options_of(assignment: list[int]) -> dict[str, Any]:
        return plan_options(costs, table, assignment)

    cache = ModuleCache(
        work, cap_bytes=_module_cache_cap(costs.original_bytes), observers=observers
    )
    fitness = PlanFitness(
        work,
        table.variables,
        costs.options,
        [(calib.sensitivity, screening_reference), (calib.calibration, calib_reference)],
        sensitivity.metric,
        cache,
    )
    engine = choose_engine("allocator" if as_is else search, table, allocation, costs.total_weights)
    data_key = f"{tuned_fp}:{batches_digest(calib.calibration)}:{sensitivity.metric}"
    outcome = run_search(
        engine,
        table,
        limits,
        fitness,
        allocation,
        seed=seed,
        max_evals=max_evals,
        timeout=timeout,
        storage=storage,
        study_name=study_name,
        data_key=data_key,
        progress=progress,
    )
    if outcome.result is not None:
        say.say(
            f"{engine}: {outcome.result.evaluations.full_equivalent:.1f} full evaluations in "
            f"{outcome.result.seconds:.1f} s, stopped by {outcome.result.stopped}"
            + (f", {outcome.result.resumed} trials resumed" if outcome.result.resumed else "")
        )

    candidates = []
    if outcome.assignment is not None and outcome.assignment != allocation.assignment:
        candidates.append(Candidate(engine, options_of(outcome.assignment)))
    candidates.append(Candidate("allocator", options_of(allocation.assignment)))
    searched = len(candidates)
    for name, uniform in fitting_uniforms(costs, table, limits).items():
        candidates.append(Candidate(name, uniform))
    with say.bar(
        len(candidates) + searched + min(3, len(candidates) - searched), "candidates"
    ) as bar:
        chosen = select(candidates, fitness.error, searched=searched, progress=bar.update)
    by_name = {c.name: c for c in candidates}
    with say.bar(1 + len(candidates) - searched, "selection split") as bar:
        selection = choose(
            chosen.name,
            [c.name for c in candidates[searched:] if is_uniform(c.name)],
            lambda name: evaluate(
                work,
                by_name[name].options,
                calib.selection,
                selection_reference,
                sensitivity.metric,
                cache,
            ),
            windows_of(calib.selection),
            progress=bar.update,
        )
    chosen = by_name[selection.chosen]
    if chosen.calibration_error is None:  # a uniform plan that was not a finalist won
        chosen.calibration_error = fitness.error(chosen.options, -1)
    best_uniform = by_name[selection.best_uniform] if selection.best_uniform else None
    # the plan is fixed: only now is the held-out split read, to measure and never to choose
    uniform_heldout = (
        evaluate(
            work, best_uniform.options, calib.heldout, heldout_reference, sensitivity.metric, cache
        )
        if measure and best_uniform is not None
        else None
    )
    say.say(
        f"chose {chosen.name} (selection error {selection.errors[chosen.name]:.4g}; "
        f"calibration front runner {selection.front_runner})"
    )

    choice = {n: costs.options[n].index(o) for n, o in chosen.options.items()}
    totals = costs.totals(choice)
    compress(
        work,
        chosen.options,
        prebuilt={n: cache.get(n, o, work.get_submodule(n)) for n, o in chosen.options.items()},
    )
    cache.store.clear()
    peak = PeakPrediction.of(int(totals["bytes"]), activations, scratch_bytes(work))

    layer_entries: dict[str, dict[str, Any]] = {DEFAULT_KEY: KeepOption().to_dict()}
    layer_entries.update({ref.name: chosen.options[ref.name].to_dict() for ref in layers})
    original = costs.totals({n: costs.options[n].index(KeepOption()) for n in costs.options})
    predicted = {
        "bytes": int(totals["bytes"]),
        "original_bytes": costs.original_bytes,
        "avg_bits": round(totals["avg_bits"], 6),
        "latency_ms": round(totals["latency_ms"], 6),
        "original_latency_ms": round(original["latency_ms"], 6),
        "latency_shape": [budget.batch_size, budget.seq_len],
        "peak_memory_bytes": peak.total,
        "peak_memory": peak.to_dict(),
        "error": chosen.calibration_error,
        "error_additive": float(
            sum(sensitivity.errors[n][o.label] for n, o in chosen.options.items())
        ),
        "metric": sensitivity.metric,
    }
    if "decode_ms" in totals:
        predicted["decode_ms"] = round(totals["decode_ms"], 6)
        predicted["original_decode_ms"] = round(original["decode_ms"], 6)
        predicted["decode_shape"] = [budget.batch_size, budget.decode_context]
    if serving:
        overhead = serving["kv_cache"] + serving["activations"]
        predicted["memory_overhead_bytes"] = overhead
        predicted["memory_breakdown"] = {
            "weights": int(totals["bytes"]),
            **serving,
            "total": int(totals["bytes"]) + overhead,
        }
    search_info = {
        "algorithm": get_engine(engine).provenance,
        "engine": engine,
        "requested": search,
        "sensitivity": kind,
        "seed": seed,
        "chosen": chosen.name,
        "sensitivity_evaluations": sensitivity.evaluations,
        "sensitivity_cached": table_cache.hits if table_cache else 0,
        "full_evaluations": round(fitness.full_equivalent, 3),
        "evaluations_by_fidelity": {
            "windows": [round(c * windows_of(calib.calibration)) for c in fitness.costs],
            "calls": list(fitness.evaluations),
        },
        "candidates": [
            {
                "name": c.name,
                "screening_error": c.screening_error,
                "calibration_error": c.calibration_error,
                **candidate_totals(costs, c.options),
            }
            for c in candidates
        ],
        "solver_seconds": round(allocation.seconds, 3),
        "solver_optimal": allocation.optimal,
    }
    if as_is:
        search_info["uncompressed_meets_budget"] = True
    if margin and (budget.latency_ms or budget.decode_ms) is not None:
        search_info["latency_margin"] = margin
    search_info["selection"] = selection.to_dict()
    if left_out:
        search_info["undercalibrated_options_left_out"] = left_out
    if outcome.result is not None:
        result = outcome.result
        search_info["engine_run"] = {
            "max_evals": max_evals,
            "timeout": timeout,
            "full_evaluations": round(result.evaluations.full_equivalent, 3),
            "iterations": result.iterations,
            "seconds": round(result.seconds, 2),
            "stopped": result.stopped,
            "best_error": result.error,
            "allocator_error": fitness.error(options_of(allocation.assignment), -1),
        }
        if outcome.study:
            search_info["study"] = outcome.study
        if result.pareto:
            search_info["pareto"] = [
                _pareto_point(costs, options_of(point["assignment"]), point["error"])
                for point in result.pareto
            ]
    profile = layer_profile(costs, sensitivity, chosen.options)
    plan = Plan(
        layers=layer_entries,
        structure=structure,
        model={
            "source": source,
            "class": type(model).__name__,
            "fingerprint": original_fp,
            **({"tied": tied} if tied else {}),
        },
        target={k: v for k, v in spec.to_dict().items() if k != "probed"},
        budget=budget.to_dict(),
        calibration=calib.description,
        predicted=predicted,
        search=search_info,
        profile=profile,
    )
    if measure:
        measured = measure_model(
            work,
            total_weights=costs.total_weights,
            latency_inputs=latency_inputs,
            decode_inputs=decode,
            heldout=(calib.heldout, heldout_reference),
            metric=sensitivity.metric,
            baseline=None if inplace else model,
        )
        plan.measured = measured.to_dict([budget.batch_size, budget.seq_len], sensitivity.metric)
        if early_baseline is not None and early_baseline.latency is not None:
            plan.measured["baseline"] = {
                **early_baseline.latency_figures(),
                "timed": "before tuning (the model was tuned in place)",
            }
        if best_uniform is not None:
            plan.measured["best_uniform"] = {
                "option": best_uniform.name.removeprefix(UNIFORM_PREFIX),
                "selection_error": selection.errors[best_uniform.name],
                "heldout_error": uniform_heldout,
                "bytes": int(candidate_totals(costs, best_uniform.options)["bytes"]),
            }
    plan.search["seconds"] = round(time.perf_counter() - started, 2)
    return TuneResult(plan, work, Report(plan), sensitivity, costs)
