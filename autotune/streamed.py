"""Tune, apply and validate a model larger than memory, one block at a time.

The model is never whole in memory: it is built with its parameters on the ``meta`` device,
and each pass over it loads one block's weights from its safetensors files, runs the
calibration activations through, and frees them (see :mod:`profilers.streaming`). A tune
makes four such passes: profiling (every layer's options scored on its block's output),
candidate checks (the allocator's plan and every uniform plan that fits, end to end on
calibration and held-out data, side by side), writing the compressed model shard by shard,
and validating the written model by reading it back. Memory holds the outer modules
(embeddings, head), one block and its compressed versions, and the activations.
"""

from __future__ import annotations

import copy
import json
import resource
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from autotune.allocation import (
    allocate_plan,
    assignment_options,
    candidate_totals,
    check_feasible,
    fitting_uniforms,
    layer_profile,
    limits_for,
)
from autotune.apply import check_options, plan_calibration
from autotune.budget import Budget
from autotune.calibration import build_calibration
from autotune.costs import build_costs, default_methods, layer_options
from autotune.errors import AutotuneError, ModelLoadError, PlanError
from autotune.fingerprint import fingerprint
from autotune.fitness import windows_of
from autotune.io import atomic_directory
from autotune.layers import compressible_layers, weight_numel
from autotune.loading import LoadedModel, load_skeleton, model_folder
from autotune.measured_figures import Measured
from autotune.plan import DEFAULT_KEY, Plan
from autotune.progress import Progress
from autotune.report import Report
from autotune.safetensors_check import check_folder
from autotune.saved import PLAN
from autotune.selection import UNIFORM_PREFIX, choose, is_uniform
from autotune.targets import get_target
from autotune.validate import ValidationResult, heldout_batches, plan_checks
from methods.base import LayerShape, Option
from methods.keep import KeepOption
from methods.registry import get_method, method_of
from methods.tied import untie_output_embeddings
from profilers.decode import max_context
from profilers.hardware import HardwareSpec
from profilers.measure import model_bytes, weight_storage_bytes
from profilers.quality import NextTokenLoss, OutputError, is_causal_lm, metric_for
from profilers.stages import Outputs, Variant, compare, evaluate, profile, stage_of
from profilers.streaming import INDEX, Checkpoint, CheckpointError, StreamedModel

ALGORITHM = "milp-allocator + selection split vs uniform plans, streamed block by block"
# methods whose statistics need backward passes through the whole model


@dataclass
class StreamedResult:
    """The plan, its report, and the folder the compressed model was written to."""

    plan: Plan
    report: Report
    saved: Path


def checkpoint_bytes(folder: str | Path) -> int:
    """Bytes of the tensors of a model folder's safetensors files (their headers checked)."""
    check_folder(folder)
    return Checkpoint(folder).nbytes


def open_streamed(model: str | Path, trust_remote_code: bool = False) -> tuple[StreamedModel, Any]:
    """The model at ``model`` (a folder, ``demo`` or ``tiny-lm``) ready to stream, and its
    tokenizer."""
    loaded: LoadedModel = load_skeleton(model, trust_remote_code=trust_remote_code)
    assert loaded.path is not None
    try:
        return StreamedModel(loaded.model, Checkpoint(loaded.path)), loaded
    except CheckpointError as exc:
        raise ModelLoadError(f"cannot stream model {str(model)!r}: {exc}") from None


def peak_rss_bytes() -> int:
    """The most resident memory this process has held so far."""
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def _refuse(budget: Budget, spec: HardwareSpec, methods: Sequence[str]) -> None:
    if spec.name == "local":
        raise AutotuneError(
            "a model tuned block by block is priced on a named target (e.g. cpu, a100): "
            "'local' times the whole model in memory"
        )
    if budget.decode_ms is not None or budget.context is not None:
        raise AutotuneError(
            "decode and serving-memory budgets need the whole model in memory; tuned block "
            "by block, a budget takes memory, bits, a share of the size and latency"
        )
    refused = sorted(m for m in set(methods) if get_method(m).needs_whole_model)
    if refused:
        raise AutotuneError(
            f"method(s) {', '.join(refused)} need backward passes through the whole model "
            "and cannot be tuned block by block"
        )


def _outer_calibrated_options(
    streamed: StreamedModel, options: dict[str, list[Option]]
) -> dict[str, int]:
    """Leave out, in place, calibrated options of the layers outside the blocks (a head or
    pooler may see too few calibration tokens for its statistics); counts per layer."""
    stages = stage_of(streamed, list(options))
    inner = range(len(streamed.blocks))
    dropped = {}
    for name, opts in options.items():
        if stages[name] in inner:
            continue
        kept = [o for o in opts if not method_of(o).needs_calibration(o)]
        if len(kept) < len(opts):
            dropped[name] = len(opts) - len(kept)
            options[name] = kept
    return dropped


class _Figures:
    """A judge of :func:`profilers.stages.evaluate`: the output error against the reference
    on each split of the batches (``parts[i]`` names batch ``i``'s split), in the model's
    metric; with ``perplexity``, the next-token perplexity of both models on the held-out
    batches."""

    def __init__(
        self,
        batches: Sequence[dict[str, torch.Tensor]],
        parts: Sequence[str],
        perplexity: bool = False,
    ) -> None:
        self.batches, self.parts, self.perplexity = batches, parts, perplexity
        self.metric: str | None = None
        self.errors: dict[str, OutputError] = {}
        self.losses = {"perplexity": NextTokenLoss(), "baseline_perplexity": NextTokenLoss()}

    def add(self, index: int, reference: Outputs, output: Outputs) -> None:
        self.metric = self.metric or metric_for(reference)
        batch = self.batches[index]
        part = self.parts[index]
        error = self.errors.setdefault(part, OutputError(self.metric))
        error.add(reference, output, batch.get("attention_mask"))
        if self.perplexity and part == "heldout" and "logits" in output:
            self.losses["perplexity"].add(output["logits"], batch)
            self.losses["baseline_perplexity"].add(reference["logits"], batch)

    def result(self) -> dict[str, Any]:
        figures: dict[str, Any] = {"metric": self.metric}
        figures.update({part: error.value() for part, error in self.errors.items()})
        if self.perplexity and self.losses["perplexity"].tokens:
            figures.update({k: round(v.perplexity(), 4) for k, v in self.losses.items()})
        return figures


class _Ignore:
    """A judge that keeps nothing (a pass run for its side effects)."""

    def add(self, index: int, reference: Outputs, output: Outputs) -> None:
        return None

    def result(self) -> None:
        return None


class _ShardWriter:
    """Writes each stage's state to a safetensors shard of its own, keeping the weight map
    and the bytes written."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self.shards = 0

    def __call__(self, stage: str, state: dict[str, torch.Tensor]) -> None:
        self.shards += 1
        name = f"model-{self.shards:05d}.safetensors"
        tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
        safetensors.torch.save_file(
            tensors, str(self.folder / name), metadata={"format": "pt", "producer": "autotune"}
        )
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.total += sum(t.numel() * t.element_size() for t in tensors.values())

    def write_index(self) -> None:
        index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_streamed(
    streamed: StreamedModel,
    options: dict[str, Option],
    plan: Plan,
    outdir: str | Path,
    calibration: list[dict[str, torch.Tensor]],
    tokenizer: Any = None,
) -> Path:
    """Compress ``streamed`` as ``options`` say, block by block, into ``outdir``: one
    safetensors shard per block plus one for the outer modules, an index, the config, the
    plan and the tokenizer (written atomically; :func:`autotune.saved.load_compressed` reads
    it)."""
    with atomic_directory(outdir) as staging:
        writer = _ShardWriter(staging)
        evaluate(
            streamed,
            calibration,
            {"plan": Variant(options, sink=writer)},
            judge=_Ignore,
            observe=calibration,
        )
        writer.write_index()
        plan.save(staging / "plan.json")
        config = copy.deepcopy(getattr(streamed.model, "config", None))
        if config is not None and hasattr(config, "save_pretrained"):
            if not getattr(config, "architectures", None):
                config.architectures = [type(streamed.model).__name__]
            config.save_pretrained(staging)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(staging)
    return Path(outdir)


def tune_streamed(
    model: str | Path,
    budget: Budget | str | dict,
    target: str | HardwareSpec = "cpu",
    *,
    save_to: str | Path,
    calibration: Any = None,
    heldout: Any = None,
    tokenizer: Any = None,
    seed: int = 0,
    methods: Sequence[str] | None = None,
    option_labels: Sequence[str] | None = None,
    target_files: Iterable[str | Path] = (),
    seq_len: int = 128,
    batch_size: int | None = None,
    latency_seq_len: int | None = None,
    calibration_windows: int = 32,
    sensitivity_windows: int = 4,
    selection_windows: int = 8,
    heldout_windows: int = 16,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> StreamedResult:
    """Tune a model stored as safetensors without ever holding it whole, write the
    compressed model to ``save_to`` shard by shard, and validate what was written.

    The per-layer scores are the error at the output of the layer's block (the layer's own
    output error for layers outside the blocks), a proxy of the end-to-end error; the
    allocator's plan and every uniform plan that fits are then run end to end in one pass over
    the three splits: the calibration data picks the front runner, the selection split keeps
    it or a uniform plan (:func:`autotune.selection.choose`), as in
    :func:`autotune.tuner.autotune`; the held-out figures of that pass are read only once
    the choice is made."""
    started = time.perf_counter()
    say = Progress(progress)
    budget = Budget.parse(budget, batch_size=batch_size, seq_len=latency_seq_len)
    spec = get_target(target, target_files)
    methods = tuple(methods) if methods is not None else default_methods(spec)
    _refuse(budget, spec, methods)
    torch.manual_seed(seed)
    streamed, loaded = open_streamed(model, trust_remote_code)
    tokenizer = tokenizer or loaded.tokenizer
    skeleton = streamed.model
    budget.check_positions(max_context(skeleton))
    say.say(
        f"{type(skeleton).__name__}: {len(streamed.blocks)} blocks streamed from "
        f"{streamed.checkpoint.nbytes:,} bytes of safetensors"
    )
    original_fp = fingerprint(skeleton, streamed.state_tensors())
    tied = untie_output_embeddings(skeleton)
    calib = build_calibration(
        skeleton,
        tokenizer,
        calibration,
        heldout,
        seq_len=seq_len,
        calibration_windows=calibration_windows,
        selection_windows=selection_windows,
        heldout_windows=heldout_windows,
        sensitivity_windows=sensitivity_windows,
    )
    layers = compressible_layers(skeleton)
    if not layers:
        raise AutotuneError("the model has no compressible layer")
    options = layer_options(layers, methods, option_labels)
    left_out = _outer_calibrated_options(streamed, options)
    latency_inputs = calib.latency_inputs(budget.batch_size, budget.seq_len)
    costs = build_costs(skeleton, layers, options, spec, latency_inputs, run=streamed.forward_pass)
    limits = limits_for(budget, costs)
    check_feasible(budget, costs, limits)
    say.say(f"{len(layers)} layers; target {spec.name}; budget {budget.spec}")

    with say.bar(sum(len(o) for o in options.values()), "sensitivity (block output)") as bar:
        sensitivity = profile(streamed, options, calib.sensitivity, progress=bar.update)
    table, allocation = allocate_plan(budget, costs, limits, sensitivity.errors)
    candidates = {"allocator": assignment_options(costs, table, allocation.assignment)}
    candidates.update(fitting_uniforms(costs, table, limits))
    splits = {
        "calibration": calib.calibration,
        "selection": calib.selection,
        "heldout": calib.heldout,
    }
    batches = [b for part in splits.values() for b in part]
    parts = [name for name, part in splits.items() for _ in part]
    with say.bar(len(streamed.blocks), f"{len(candidates)} candidates, end to end") as bar:
        checked = evaluate(
            streamed,
            batches,
            {name: Variant(opts) for name, opts in candidates.items()},
            lambda: _Figures(batches, parts),
            observe=calib.calibration,
            progress=bar.update,
        )
    metric = checked["allocator"]["metric"]
    front_runner = min(checked, key=lambda n: checked[n]["calibration"])
    selection = choose(
        front_runner,
        [n for n in candidates if is_uniform(n)],
        lambda name: checked[name]["selection"],
        windows_of(calib.selection),
    )
    chosen, best_uniform = selection.chosen, selection.best_uniform
    say.say(
        f"chose {chosen} (selection error {selection.errors[chosen]:.4g}; calibration front "
        f"runner {front_runner})"
    )
    options_chosen = candidates[chosen]
    totals = costs.totals({n: costs.options[n].index(o) for n, o in options_chosen.items()})
    original = costs.totals({n: costs.options[n].index(KeepOption()) for n in costs.options})
    plan = Plan(
        layers={
            DEFAULT_KEY: KeepOption().to_dict(),
            **{ref.name: options_chosen[ref.name].to_dict() for ref in layers},
        },
        model={
            "source": loaded.source,
            "class": type(skeleton).__name__,
            "fingerprint": original_fp,
            **({"tied": tied} if tied else {}),
        },
        target={k: v for k, v in spec.to_dict().items() if k != "probed"},
        budget=budget.to_dict(),
        calibration=calib.description,
        predicted={
            "bytes": int(totals["bytes"]),
            "original_bytes": costs.original_bytes,
            "avg_bits": round(totals["avg_bits"], 6),
            "latency_ms": round(totals["latency_ms"], 6),
            "original_latency_ms": round(original["latency_ms"], 6),
            "latency_shape": [budget.batch_size, budget.seq_len],
            "error": checked[chosen]["calibration"],
            "error_additive": float(
                sum(sensitivity.errors[n][o.label] for n, o in options_chosen.items())
            ),
            "metric": metric,
        },
        search={
            "algorithm": ALGORITHM,
            "engine": "allocator",
            "sensitivity": "block-output",
            "seed": seed,
            "chosen": chosen,
            "sensitivity_evaluations": sensitivity.evaluations,
            "full_evaluations": len(candidates),
            "candidates": [
                {
                    "name": name,
                    "calibration_error": checked[name]["calibration"],
                    "selection_error": checked[name]["selection"],
                    **candidate_totals(costs, opts),
                }
                for name, opts in candidates.items()
            ],
            "solver_seconds": round(allocation.seconds, 3),
            "solver_optimal": allocation.optimal,
            "selection": selection.to_dict(),
            **({"undercalibrated_options_left_out": left_out} if left_out else {}),
        },
        profile=layer_profile(costs, sensitivity, options_chosen),
    )
    say.say(f"writing the compressed model to {save_to}")
    write_streamed(streamed, options_chosen, plan, save_to, calib.calibration, tokenizer)
    say.say("validating the written model")
    measured = validate_saved(streamed, save_to, calib.heldout, metric)
    if best_uniform is not None:
        measured["best_uniform"] = {  # its held-out figure is read now that the plan is fixed
            "option": best_uniform.removeprefix(UNIFORM_PREFIX),
            "selection_error": selection.errors[best_uniform],
            "heldout_error": checked[best_uniform]["heldout"],
            "bytes": candidate_totals(costs, candidates[best_uniform])["bytes"],
        }
    plan.measured = measured
    plan.search["seconds"] = round(time.perf_counter() - started, 2)
    plan.save(Path(save_to) / "plan.json")
    return StreamedResult(plan, Report(plan), Path(save_to))


def open_saved(folder: str | Path, trust_remote_code: bool = False) -> tuple[StreamedModel, Plan]:
    """A compressed model saved by :func:`write_streamed` (or
    :func:`autotune.saved.save_compressed`) ready to stream, and its plan: built from the
    saved config with every compressed layer's module on the ``meta`` device, its stored
    tensors read from the saved files one block at a time."""
    root = Path(folder)
    plan = Plan.load(root / PLAN)
    loaded = load_skeleton(root, trust_remote_code=trust_remote_code)
    skeleton = plan.shaped(loaded.model)
    for ref, option in plan.layer_options(skeleton).items():
        if not isinstance(option, KeepOption):
            module = skeleton.get_submodule(ref.name)
            empty = method_of(option).empty(LayerShape.of(module), option, like=module)
            skeleton.set_submodule(ref.name, empty)
    try:
        return StreamedModel(skeleton, Checkpoint(root)), plan
    except CheckpointError as exc:
        raise ModelLoadError(f"the saved model in {root} does not match its plan: {exc}") from None


def validate_saved(
    original: StreamedModel,
    folder: str | Path,
    heldout: list[dict[str, torch.Tensor]],
    metric: str,
) -> dict[str, Any]:
    """Figures of a compressed model saved in ``folder``, read back block by block beside
    the ``original``: its bytes (every stored tensor, plus the buffers models compute rather
    than save), average stored bits per weight, held-out error against the original (and
    perplexities for causal LMs), and this process's peak resident memory."""
    saved, _ = open_saved(folder)
    causal = metric == "kl" and is_causal_lm(original.model)
    figures = compare(
        original,
        saved,
        heldout,
        lambda: _Figures(heldout, ["heldout"] * len(heldout), perplexity=causal),
    )
    figures["heldout_error"] = figures.pop("heldout")
    return {
        "bytes": model_bytes(saved.model),
        "state_dict_bytes": saved.checkpoint.nbytes,
        "avg_bits": round(8 * weight_storage_bytes(saved.model) / weight_numel(original.model), 6),
        **figures,
        "streamed": {
            "blocks": len(original.blocks),
            "checkpoint_bytes": original.checkpoint.nbytes,
            "peak_rss_bytes": peak_rss_bytes(),
        },
    }


def _streamed_plan(
    model: str | Path, plan: Plan | str | Path, strict: bool, trust_remote_code: bool
) -> tuple[StreamedModel, LoadedModel, Plan, dict[str, Option]]:
    """The model opened to stream, checked against the plan's fingerprint, untied, and the
    plan's option for each of its layers."""
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    if plan.kept_units():
        raise AutotuneError(
            "this plan prunes structure (FFN neurons, heads): apply it to a model in memory"
        )
    streamed, loaded = open_streamed(model, trust_remote_code)
    skeleton = streamed.model
    plan.check_model(skeleton, strict, actual=fingerprint(skeleton, streamed.state_tensors()))
    plan.shaped(skeleton)
    options = {ref.name: opt for ref, opt in plan.layer_options(skeleton, strict=strict).items()}
    check_options(skeleton, options)
    return streamed, loaded, plan, options


def apply_streamed(
    model: str | Path,
    plan: Plan | str | Path,
    outdir: str | Path,
    *,
    calibration: Any = None,
    tokenizer: Any = None,
    strict: bool = True,
    trust_remote_code: bool = False,
) -> Path:
    """Compress the model at ``model`` as ``plan`` says into ``outdir``, block by block,
    without ever holding it whole (see :func:`write_streamed`)."""
    streamed, loaded, plan, options = _streamed_plan(model, plan, strict, trust_remote_code)
    tokenizer = tokenizer or loaded.tokenizer
    batches: list[dict[str, torch.Tensor]] = []
    if any(method_of(o).needs_calibration(o) for o in options.values()):
        batches = plan_calibration(plan, streamed.model, tokenizer, calibration)
    return write_streamed(streamed, options, plan, outdir, batches, tokenizer)


def validate_streamed(
    plan: Plan | str | Path,
    model: str | Path,
    *,
    compressed: str | Path | None = None,
    heldout: Any = None,
    tokenizer: Any = None,
    tolerance: float = 0.10,
    strict: bool = True,
    trust_remote_code: bool = False,
) -> ValidationResult:
    """:func:`autotune.validate.validate_plan` for a model larger than memory: the plan is
    applied block by block into a temporary folder (or the saved model ``compressed`` is
    taken), read back block by block beside the original, and checked (latency against the
    target's prediction)."""
    streamed, loaded, plan, options = _streamed_plan(model, plan, strict, trust_remote_code)
    tokenizer = tokenizer or loaded.tokenizer
    recorded = plan.measured or {}
    metric = recorded.get("metric", plan.predicted.get("metric", "nmse"))
    batches = heldout_batches(plan, streamed.model, tokenizer, heldout)
    with tempfile.TemporaryDirectory(prefix="autotune-validate-") as scratch:
        folder = Path(compressed) if compressed is not None else Path(scratch) / "model"
        if compressed is None:
            calibration = []
            if any(method_of(o).needs_calibration(o) for o in options.values()):
                calibration = plan_calibration(plan, streamed.model, tokenizer, None)
            write_streamed(streamed, options, plan, folder, calibration, tokenizer)
        elif Plan.load(folder / PLAN).layers != plan.layers:
            raise PlanError(f"the saved model in {str(folder)!r} was made from another plan")
        figures = validate_saved(streamed, folder, batches, metric)
    now = Measured(
        bytes=figures["bytes"],
        state_bytes=figures["state_dict_bytes"],
        avg_bits=figures["avg_bits"],
        latency=None,
        heldout_error=figures["heldout_error"],
    )
    return ValidationResult(plan_checks(plan, now, tolerance), figures)


IN_MEMORY_COPIES = 3  # an in-memory tune holds the model, a working copy and converted layers


def too_large_for_memory(model: str | Path) -> str | None:
    """Why ``model`` should be worked on block by block (its weights take more than a third
    of the memory available now), or ``None`` (it fits, or its size is not known here)."""
    import psutil

    folder = model_folder(model)
    if folder is None:
        return None
    try:
        check_folder(folder)  # a bad header is reported by whatever loads the model
        size = Checkpoint(folder).nbytes
    except (CheckpointError, ModelLoadError):
        return None
    available = psutil.virtual_memory().available
    if IN_MEMORY_COPIES * size <= available:
        return None
    return (
        f"the model's {size / 1e9:.2f} GB of weights need about {IN_MEMORY_COPIES}x that in "
        f"memory, and {available / 1e9:.2f} GB are available"
    )
