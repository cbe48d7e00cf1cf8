"""Stages 1 and 2: the model, budget and target resolved; the data split and referenced."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autotune.budget import Budget
from autotune.calibration import CalibrationSet, build_calibration
from autotune.costs import default_methods, layer_options
from autotune.errors import AutotuneError
from autotune.estimators import SensitivityEstimator, get_estimator
from autotune.executors import Executor, Opened, Split, get_executor
from autotune.fingerprint import fingerprint
from autotune.layers import compressible_layers
from autotune.pipeline.config import TuneConfig
from autotune.progress import Progress
from autotune.reference_file import ReferenceFile, open_reference
from autotune.runtimes import Runtime, get_runtime
from autotune.searching import check_settings
from autotune.storage_bounds import StorageBounds
from autotune.targets import get_target
from methods.errors import OptionError
from methods.structured import UNIT_KINDS, prune_structured
from methods.tied import untie_output_embeddings
from profilers.execution.adapters import adapter_for
from profilers.hardware import HardwareSpec
from profilers.quality import is_causal_lm


@dataclass
class Setup(Opened):
    """What a tune works on: ``original`` is the model as given (timed beside the result),
    ``work`` the copy that is compressed (the same object when tuning in place)."""

    budget: Budget
    spec: HardwareSpec
    runtime: Runtime
    executor: Executor
    estimator: SensitivityEstimator
    methods: Sequence[str]
    tied: Any
    say: Progress
    as_is: bool  # the uncompressed model meets the budget: every layer is kept
    # the file the budget's multiples are of, timed beside the plan (None: the original)
    reference: ReferenceFile | None = None


def prepare(
    model: nn.Module | str | Path, budget: Budget | str | dict, config: TuneConfig, tokenizer: Any
) -> Setup:
    """Check every setting, load the model, and answer from layer shapes what needs no data:
    a storage budget no plan meets is refused, one the model meets is kept as it is."""
    say = Progress(config.progress)
    parsed = Budget.parse(budget, batch_size=config.batch_size, seq_len=config.latency_seq_len)
    spec = get_target(config.target, config.target_files)
    runtime = get_runtime(config.runtime).for_target(spec)
    runtime.check_target(spec, config.target if isinstance(config.target, str) else spec.name)
    spec = runtime.spec_for(spec)
    reference = None
    if config.relative_to is not None:
        target = config.target if isinstance(config.target, str) else spec.name
        reference = open_reference(config.relative_to, runtime, parsed, target)
    search = config.search
    check_settings(search.search, search.max_evals, search.timeout, search.storage)
    check_structured(search.structured)
    executor = get_executor(config.executor, config.save_to)
    estimator = get_estimator(search.sensitivity or executor.default_sensitivity)
    methods = search.methods
    if methods is None:
        methods = runtime.methods(spec) or default_methods(
            spec,
            executor.default_calibrated_methods,
            # named labels are offered whatever the budget
            for_speed=parsed.bounds_latency
            or parsed.bounds_decode
            or search.option_labels is not None,
        )
    executor.refuse(parsed, spec, config, methods, estimator)
    if reference is not None and not executor.holds_whole_model:
        raise AutotuneError(
            f"--relative-to times the whole plan beside the file; executor {executor.name} "
            "never holds the whole model: use the in-memory executor"
        )
    opened = executor.open(model, config, tokenizer)
    model, work = opened.original, opened.work
    runtime.check_model(model)
    parsed.check_positions(adapter_for(model).max_context(model))
    if parsed.bounds_decode and not is_causal_lm(model):
        raise AutotuneError(
            f"a decode latency budget is for causal language models; {type(model).__name__} "
            "is not one: use a plain latency term (e.g. 20ms)"
        )
    torch.manual_seed(search.seed)
    tied = untie_output_embeddings(work)  # a tied embedding is one layer, stored once
    as_is = _storage_answer(work, parsed, runtime, methods, search.option_labels, search)
    if as_is:
        say.say(
            f"the uncompressed model already meets budget {parsed.spec}: every layer is kept "
            "and nothing is profiled"
        )
    return Setup(
        **vars(opened),
        budget=parsed,
        spec=spec,
        runtime=runtime,
        executor=executor,
        estimator=estimator,
        methods=methods,
        tied=tied,
        say=say,
        as_is=as_is,
        reference=reference,
    )


def _storage_answer(
    model: nn.Module,
    budget: Budget,
    runtime: Runtime,
    methods: Sequence[str],
    option_labels: Sequence[str] | None,
    search: Any,
) -> bool:
    """From layer shapes alone, before calibration: refuse a storage budget no plan meets,
    and say whether the uncompressed model meets it already. Structured pruning changes
    the shapes first, so it is left to the priced check."""
    if search.structured and any(search.structured.values()):
        return False
    layers = compressible_layers(model)
    if not layers:
        return False
    options = runtime.restrict(layers, layer_options(layers, methods, option_labels))
    bounds = StorageBounds.of(model, layers, options)
    bounds.refuse_unreachable(budget)
    return bounds.met_as_is(budget)


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


@dataclass
class Data:
    """The four splits with the model's reference outputs on each (before any pruning,
    where the executor keeps them), the structured pruning done, and the fingerprint that
    keys caches and studies."""

    calib: CalibrationSet
    heldout: Split
    selection: Split
    calibration: Split
    screening: Split  # the sensitivity batches: a subset of calibration
    structure: dict[str, Any]
    fingerprint: str


def calibrate(setup: Setup, config: TuneConfig) -> Data:
    """Build the splits, run the model as given on each, then prune structure if asked."""
    settings = config.calibration
    work = setup.work
    calib = build_calibration(
        work,
        setup.tokenizer,
        settings.calibration,
        settings.heldout,
        seq_len=settings.seq_len,
        calibration_windows=settings.calibration_windows,
        selection_windows=settings.selection_windows,
        heldout_windows=settings.heldout_windows,
        sensitivity_windows=settings.sensitivity_windows,
    )
    # quality is judged against the model as given, before any structured pruning
    executor = setup.executor
    splits = [
        executor.split(name, getattr(calib, name))
        for name in ("heldout", "selection", "calibration", "sensitivity")
    ]
    structure = _prune_structure(work, config.search.structured, calib.calibration)
    if structure:
        setup.say.say(f"structured pruning: {structure['removed_parameters']:,} parameters removed")
    return Data(
        calib,
        *splits,
        structure=structure,
        fingerprint=fingerprint(work) if structure else setup.fingerprint,
    )


def _prune_structure(
    model: nn.Module, fractions: Mapping[str, float] | None, batches: list
) -> dict[str, Any]:
    """Structured pruning of ``model`` in place; the plan's ``structure`` section."""
    if not fractions or not any(fractions.values()):
        return {}
    before = sum(p.numel() for p in model.parameters())
    try:
        groups = adapter_for(model).unit_groups(model)
        kept = prune_structured(model, fractions, batches, groups)
    except OptionError as exc:
        raise AutotuneError(str(exc)) from None
    return {
        "fractions": {k: float(v) for k, v in fractions.items()},
        "removed_parameters": before - sum(p.numel() for p in model.parameters()),
        "kept": kept,
    }
