"""Tune, apply and validate a model larger than memory, one block at a time.

The model is never whole in memory: it is built with its parameters on the ``meta`` device,
and each pass over it loads one block's weights from its safetensors files, runs the
activations through, and frees them (see :mod:`profilers.execution.streaming`). A tune is the stages
of :func:`autotune.tuner.autotune` run by the block-by-block executor
(:mod:`autotune.executors.blocks`); this module holds what it and ``apply`` / ``validate``
share: opening a model to stream, writing a compressed model shard by shard, and reading
one back to measure it beside the original. Memory holds the outer modules (embeddings,
head), one block and its compressed versions, and the activations.
"""

from __future__ import annotations

import copy
import json
import resource
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from autotune.apply import check_options, plan_calibration
from autotune.budget import Budget
from autotune.errors import AutotuneError, ModelLoadError, PlanError
from autotune.fingerprint import fingerprint
from autotune.io import atomic_directory
from autotune.layers import weight_numel
from autotune.loading import LoadedModel, load_skeleton, model_folder
from autotune.measured_figures import Measured
from autotune.plan import Plan
from autotune.report import Report
from autotune.safetensors_check import check_folder
from autotune.saved import PLAN
from autotune.validate import ValidationResult, heldout_batches, plan_checks
from methods.base import LayerShape, Option
from methods.keep import KeepOption
from methods.registry import method_of
from profilers.execution.checkpoint import INDEX, Checkpoint, CheckpointError
from profilers.execution.observe import plan_needs_statistics
from profilers.execution.stages import Outputs, Variant, compare, evaluate
from profilers.execution.streaming import StreamedModel
from profilers.hardware import HardwareSpec
from profilers.measure import model_bytes, weight_storage_bytes
from profilers.quality import NextTokenLoss, OutputError, is_causal_lm, metric_for

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


class Figures:
    """A judge of :func:`profilers.execution.stages.evaluate`: the output error against the
    reference on each split of the batches (``parts[i]`` names batch ``i``'s split), in the model's
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
    tokenizer: Any = None,
    **settings: Any,
) -> StreamedResult:
    """Tune a model stored as safetensors without ever holding it whole, write the
    compressed model to ``save_to`` shard by shard, and validate what was written: the
    stages of :func:`autotune.tuner.autotune` run by the block-by-block executor
    (:mod:`autotune.executors.blocks`). ``settings`` are those of ``autotune()``; layers are
    scored by the error at their block's output unless ``sensitivity`` names another
    estimator that streams."""
    from autotune.tuner import autotune

    result = autotune(
        model,
        budget,
        target,
        tokenizer=tokenizer,
        executor="block-by-block",
        save_to=save_to,
        **settings,
    )
    assert result.saved is not None
    return StreamedResult(result.plan, result.report, result.saved)


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
        lambda: Figures(heldout, ["heldout"] * len(heldout), perplexity=causal),
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
    if plan_needs_statistics(options):
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
            if plan_needs_statistics(options):
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
