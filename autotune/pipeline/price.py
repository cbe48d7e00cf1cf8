"""Stage 3: the layers, the options each is offered, their bytes and latency, and the
limits the budget sets on them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from autotune.agreement import Agreement, drop_disagreeing, remembered
from autotune.allocation import (
    LOCAL_LATENCY_MARGIN,
    RESOURCE_NAMES,
    TIMING_SPREAD,
    check_feasible,
    keep_fits,
    limits_for,
    within_timing_spread,
)
from autotune.budget import Budget
from autotune.costs import CostModel, build_costs, layer_options
from autotune.decode_guard import (
    RUNTIME_DEFAULT,
    DecodeGuard,
    GuardRule,
    decode_guard,
    guard_rule,
)
from autotune.errors import AutotuneError, InfeasibleBudgetError
from autotune.latency_models import latency_model_for
from autotune.layers import LayerRef, compressible_layers
from autotune.measured_figures import Measured, measure_model
from autotune.pipeline.config import TuneConfig
from autotune.pipeline.prepare import Data, Setup
from autotune.plan import Plan
from autotune.reference_file import (
    ReferenceFileError,
    in_terms_of_reference,
    planning_budget,
    reference_multiples,
)
from autotune.storage_bounds import keep_only
from methods.base import Option
from methods.keep import KeepOption
from profilers.cache import SensitivityCache, batches_digest, cache_folder, table_key
from profilers.execution.adapters import adapter_for
from profilers.execution.decode import DecodeError
from profilers.execution.observe import Observers
from profilers.memory import ActivationPeak, activation_peak, kv_cache_bytes
from profilers.quality import is_causal_lm


@dataclass
class Priced:
    """The search space with its costs: ``serving`` is the KV cache and activation peak a
    serving budget counts beside the weights; ``baseline`` the model timed before tuning in
    place (tuning in place leaves no original to time at the end); ``ties`` the groups of
    layers the runtime needs in one format."""

    layers: list[LayerRef]
    options: dict[str, list[Option]]
    observers: Observers
    left_out: dict[str, int]
    agreements: list[Agreement]
    costs: CostModel
    latency_inputs: dict[str, Any]
    decode: dict[str, Any] | None
    activations: ActivationPeak
    serving: dict[str, Any]
    limits: dict[str, float]
    margin: float
    baseline: Measured | None = None
    # groups of layers the runtime runs as one (fused) matrix: each takes one option
    ties: list[tuple[str, ...]] = field(default_factory=list)
    # what a memory budget's decode step is held to, and, once the options are scored, the
    # limit it gives (autotune.decode_guard)
    guard_rule: GuardRule | None = None
    guard: DecodeGuard | None = None
    # the reference file's time as a multiple of the original's, by phase, where the budget's
    # multiples are of a file (autotune.reference_file)
    reference_multiples: dict[str, float] = field(default_factory=dict)


def price(setup: Setup, data: Data, config: TuneConfig) -> Priced:
    """Enumerate the layers and options, price them on the target, set the limits; when
    keeping every layer meets them, offer only that."""
    work, spec, budget, say = setup.work, setup.spec, setup.budget, setup.say
    layers = compressible_layers(work)
    if not layers:
        raise AutotuneError(
            "the model has no compressible layer (linear or embedding layers of at least "
            "4096 weights that are not shared with another layer)"
        )
    offered = layer_options(layers, setup.methods, config.search.option_labels)
    options = setup.runtime.restrict(layers, offered)
    if setup.as_is:
        options = keep_only(options)
    calib = data.calib
    latency_inputs = calib.latency_inputs(budget.batch_size, budget.seq_len)
    executor = setup.executor
    observers, left_out = executor.calibrated(layers, options, calib.calibration)
    for name, count in left_out.items():
        say.say(
            f"{name}: {count} calibrated options left out (fewer calibration tokens than "
            "inputs: their statistics would be rank-deficient)"
        )
    judged = remembered(
        layers,
        options,
        observers,
        _agreement_cache(data, config),
        lambda: executor.agreement(layers, options, observers, calib.selection),
    )
    for agreement in drop_disagreeing(options, observers, judged):
        say.say(
            f"{agreement.layer}: {agreement.method} options left out (its probe "
            f"{agreement.probe} is {agreement.selection:.3g}x its stand-in's error on the "
            f"selection split, {agreement.calibration:.3g}x on calibration)"
        )
    timed = latency_model_for(spec).measures
    steps = len({(r.shape, o.label) for r in layers for o in options[r.name]}) if timed else 0
    with say.bar(steps, "latency") as bar:
        costs = build_costs(
            work,
            layers,
            options,
            spec,
            latency_inputs,
            progress=bar.update,
            observers=observers,
            run=executor.run,
            tokenizer=setup.tokenizer,
        )
    activations = activation_peak(work, latency_inputs, run=executor.run)  # uncompressed
    decode = _decode_inputs(work, calib, budget) if executor.holds_whole_model else None
    if decode is not None:
        with say.bar(steps, "decode latency") as bar:
            decode_costs = build_costs(
                work,
                layers,
                options,
                spec,
                decode,
                progress=bar.update,
                observers=observers,
                tokenizer=setup.tokenizer,
            )
        costs.with_decode(decode_costs)
    serving = _serving_memory(work, budget, activations.peak_bytes)
    margin = LOCAL_LATENCY_MARGIN if timed else 0.0
    overhead = serving.get("kv_cache", 0) + serving.get("activations", 0)
    multiples = _reference_multiples(setup, latency_inputs, decode)
    planned = planning_budget(budget, multiples)  # multiples of the original's time
    try:
        limits = _limits(setup, planned, costs, overhead, margin)
    except InfeasibleBudgetError as exc:
        if setup.reference is None:
            raise
        said = in_terms_of_reference(str(exc), budget, planned, setup.reference, multiples)
        raise InfeasibleBudgetError(said, exc.smallest) from None
    if not setup.as_is and keep_fits(costs, limits):
        setup.as_is = True
        say.say(
            f"the uncompressed model already meets budget {budget.spec} on {spec.name}: "
            "every layer is kept and nothing is profiled"
        )
        options, costs = keep_only(options), costs.only(KeepOption().label)
    rule = None if setup.as_is else _guard_rule(setup, config, costs, options, limits)
    say.say(
        f"{len(layers)} layers x {max(len(o) for o in options.values())} options; "
        f"target {spec.name}; budget {budget.spec}"
    )
    baseline = None
    if config.measure and setup.inplace and executor.holds_whole_model:
        baseline = measure_model(work, latency_inputs=latency_inputs, decode_inputs=decode)
        kept = Plan(layers={"_default": KeepOption().to_dict()})
        outside = latency_model_for(spec).measure(work, kept, None, latency_inputs)
        if outside is not None:  # the original as the runtime the plan is for runs it
            baseline.latency, baseline.decode = outside["model"], None
    return Priced(
        layers,
        options,
        observers,
        left_out,
        judged,
        costs,
        latency_inputs,
        decode,
        activations,
        serving,
        limits,
        margin,
        baseline,
        setup.runtime.tied_layers([ref.name for ref in layers]),
        rule,
        reference_multiples=multiples,
    )


def _limits(
    setup: Setup, planned: Budget, costs: CostModel, overhead: int, margin: float
) -> dict[str, float]:
    """The limits ``planned`` (the budget, its multiples of the original's time) sets;
    refused where no plan is predicted within them, unless a latency check will time the
    plan and the fastest is predicted within the timing spread."""
    limits = limits_for(planned, costs, overhead, latency_margin=margin)
    if not times_plans(setup):
        check_feasible(planned, costs, limits)
        return limits
    limits, raised = within_timing_spread(planned, costs, limits, margin)
    for resource in raised:
        setup.say.say(
            f"budget {setup.budget.spec}: no plan is predicted within its "
            f"{RESOURCE_NAMES[resource]}, but the fastest is within "
            f"{100 * TIMING_SPREAD:g}% of it, how far this machine's timings of whole "
            "plans stray from their prediction: the best plan predicted within "
            f"{100 * margin:g}% of the fastest is searched for and timed"
        )
    return limits


def _agreement_cache(data: Data, config: TuneConfig) -> SensitivityCache | None:
    """Where the calibrated methods' agreement on this model and text is kept (``None``
    when the tune caches nothing): keyed by the model, the calibration and selection
    batches and the methods' versions, as the sensitivity table is."""
    setting = config.search.cache
    if not setting:
        return None
    folder = cache_folder(setting)
    calib = data.calib
    digest = f"{batches_digest(calib.calibration)}:{batches_digest(calib.selection)}"
    return SensitivityCache(folder, table_key(data.fingerprint, digest, "agreement"))


def _reference_multiples(
    setup: Setup, latency_inputs: dict[str, Any], decode: dict[str, Any] | None
) -> dict[str, float]:
    """The reference file's time as a multiple of the original's, for each phase the budget
    holds to a multiple, timed beside it in the runtime (none without a reference file)."""
    reference = setup.reference
    if reference is None:
        return {}
    timer = latency_model_for(setup.spec)
    if not timer.runs_here():
        raise ReferenceFileError(
            f"--relative-to times the file in {setup.runtime.name}, which is not installed here"
        )
    inputs = {"latency": latency_inputs}
    if timer.measures_decode:
        inputs["decode"] = decode
    multiples = reference_multiples(timer.measure, setup.original, inputs, setup.budget, reference)
    for phase, multiple in multiples.items():
        setup.say.say(
            f"reference file {reference.path.name}: {multiple:.4g}x the original's "
            f"{'decode step' if phase == 'decode' else 'latency'} in {setup.runtime.name} (timed "
            "in the same rounds); the budget's multiples are of that file"
        )
    return multiples


def _guard_rule(
    setup: Setup,
    config: TuneConfig,
    costs: CostModel,
    options: dict[str, list[Option]],
    limits: dict[str, float],
) -> GuardRule | None:
    """What the decode step of a budget that sets no decode limit is held to, where the
    runtime holds generation to a reference (:mod:`autotune.decode_guard`)."""
    slack = config.search.decode_slack  # checked by SearchConfig
    if slack == RUNTIME_DEFAULT:
        slack = setup.runtime.decode_slack
    if slack is None or setup.budget.bounds_decode:
        return None
    references = setup.runtime.reference_plans(options)
    return guard_rule(costs, limits, references, float(slack))


def guarded_limits(
    priced: Priced, errors: dict[str, dict[str, float]]
) -> tuple[dict[str, float], DecodeGuard | None]:
    """The limits a plan is searched under on the layers' ``errors``: the budget's, and the
    decode guard's where there is one."""
    if priced.guard_rule is None:
        return priced.limits, None
    guard = decode_guard(priced.guard_rule, priced.costs, priced.limits, errors, priced.ties)
    return {**priced.limits, "decode_seconds": guard.limit_s}, guard


def guard(setup: Setup, priced: Priced, errors: dict[str, dict[str, float]]) -> Priced:
    """Stage 4b: the decode guard's limit on the scored options (unchanged without one)."""
    limits, found = guarded_limits(priced, errors)
    if found is None:
        return priced
    setup.say.say(found.describe())
    return replace(priced, limits=limits, guard=found)


def times_plans(setup: Setup) -> bool:
    """Whether a plan of this tune can be timed here as a whole: options priced by timing on
    this machine, the whole model in memory, something to compress."""
    return (
        not setup.as_is
        and setup.executor.holds_whole_model
        and latency_model_for(setup.spec).measures
    )


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
        return adapter_for(model).decode_inputs(model, tokens)
    except DecodeError as exc:
        if budget.bounds_decode:
            raise AutotuneError(f"cannot time a decode step: {exc}") from None
        return None
