"""Profile and evaluate a streamed model stage by stage (see :mod:`profilers.execution.streaming`).

A *stage* is the prefix (the modules before the first block), one block, or the suffix (the
modules after the last block). Each stage is wrapped as a module of its own whose input is a
batch index (its real inputs were recorded as the stream reached it), so the per-layer tools
written for whole models (sensitivity, observers, conversion) run on it unchanged.

* :func:`profile` scores every (layer, option): a block's layers by the error of the block's
  output with only that layer compressed, the outer layers by their own output error. Both
  are normalised squared errors; they stand in for the end-to-end error, which would need
  the whole model in memory for every option.
* :func:`evaluate` runs several variants of the model (each a layer -> option map) side by
  side through one pass, loading each block once, and returns every variant's outputs.
  A variant's compressed modules are converted one stage at a time, so memory holds one
  block per variant.
* :func:`compare` runs two streamed models side by side (the original and a compressed
  model written to disk, read back block by block).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from methods.base import Option
from methods.keep import KeepOption
from methods.registry import method_of
from profilers.execution.blocks import block_index
from profilers.execution.observe import Observers, collect_observers
from profilers.execution.streaming import Batch, BlockCall, StreamedModel
from profilers.proxies import local_error_table
from profilers.quality import select_outputs
from profilers.sensitivity import SensitivityTable, measure_sensitivity

StepCallback = Callable[[int], None]  # called with the steps just done


class BlockStage(nn.Module):
    """A block run on recorded calls: ``forward(index)`` is the block's output hidden
    states for call ``index``."""

    def __init__(self, block: nn.Module, calls: Sequence[BlockCall]) -> None:
        super().__init__()
        self.block = block
        self.calls = list(calls)

    def forward(self, index: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
        call = self.calls[int(index)]
        out = self.block(*call.args, **call.kwargs)
        return out[0] if isinstance(out, tuple) else out


class OuterStage(nn.Module):
    """The modules outside the blocks. Without ``hidden`` it is the prefix (its output is
    the first block's input); with ``hidden`` (the last block's outputs) it is the suffix,
    whose output is the model's main output (logits, or the last hidden states)."""

    def __init__(
        self,
        streamed: StreamedModel,
        batches: Sequence[Batch],
        hidden: Sequence[torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.model = streamed.model
        object.__setattr__(self, "_streamed", streamed)  # not a submodule: model is
        self.batches = list(batches)
        self.hidden = None if hidden is None else list(hidden)

    def forward(self, index: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
        i = int(index)
        streamed: StreamedModel = self._streamed  # type: ignore[attr-defined]
        if self.hidden is None:
            return streamed.first_calls([self.batches[i]])[0].hidden
        outputs = select_outputs(streamed.finish([self.batches[i]], [self.hidden[i]])[0])
        return next(iter(outputs.values()))


def index_batches(batches: Sequence[Batch]) -> list[dict[str, Any]]:
    """The inputs of a stage module: one index per batch (and its attention mask, so that
    errors leave padding out)."""
    out = []
    for i, batch in enumerate(batches):
        item: dict[str, Any] = {"index": torch.tensor(i)}
        if batch.get("attention_mask") is not None:
            item["attention_mask"] = batch["attention_mask"]
        out.append(item)
    return out


def stage_of(streamed: StreamedModel, names: Sequence[str]) -> dict[str, int]:
    """The stage of each layer: -1 for the prefix, a block's index, or ``len(blocks)`` for
    the suffix."""
    order = [name for name, _ in streamed.model.named_modules()]
    blocks = streamed.blocks
    stages = {}
    for name in names:
        index = block_index(blocks, name, order)
        inside = index < len(blocks) and (
            name == blocks[index][0] or name.startswith(blocks[index][0] + ".")
        )
        stages[name] = index if inside else (-1 if index == 0 else len(blocks))
    return stages


def _block_names(block_name: str, names: Sequence[str]) -> dict[str, str]:
    return {name: "block." + name.removeprefix(block_name + ".") for name in names}


@dataclass
class _Stream:
    """A variant's hidden states, per batch, where the pass has got to."""

    hidden: list[torch.Tensor]


def _groups(streamed: StreamedModel, names: Sequence[str]) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for name, stage in stage_of(streamed, names).items():
        groups.setdefault(stage, []).append(name)
    return groups


def _outer_names(names: Sequence[str]) -> dict[str, str]:
    return {name: f"model.{name}" for name in names}


def profile(
    streamed: StreamedModel,
    options: Mapping[str, Sequence[Option]],
    batches: Sequence[Batch],
    progress: StepCallback | None = None,
) -> SensitivityTable:
    """Every (layer, option)'s error, one stage at a time (see the module docstring)."""
    groups = _groups(streamed, list(options))
    calls = streamed.calls(batches)
    inputs = index_batches(batches)
    errors: dict[str, dict[str, float]] = {}
    skipped: dict[str, dict[str, str]] = {}
    evaluations = 0
    seconds = 0.0

    def merge(table: SensitivityTable, names: dict[str, str]) -> None:
        nonlocal evaluations, seconds
        back = {local: name for name, local in names.items()}
        for local, per_option in table.errors.items():
            errors[back[local]] = per_option
        for local, reasons in table.skipped.items():
            skipped[back[local]] = reasons
        evaluations += table.evaluations
        seconds += table.seconds

    def outer(stage: OuterStage, names: Sequence[str]) -> None:
        local = _outer_names(names)
        opts = {local[n]: list(options[n]) for n in names}
        observers = collect_observers(stage, opts, inputs)
        merge(local_error_table(stage, opts, inputs, observers=observers), local)
        if progress is not None:
            progress(sum(len(o) for o in opts.values()))

    if -1 in groups:
        outer(OuterStage(streamed, batches), groups[-1])
    hidden = [call.hidden for call in calls[0]]
    for index, (block_name, _) in enumerate(streamed.blocks):
        with streamed.loaded(index) as block:
            stage_calls = [c.with_hidden(h) for c, h in zip(calls[index], hidden, strict=True)]
            names = groups.get(index, [])
            if names:
                stage = BlockStage(block, stage_calls)
                local = _block_names(block_name, names)
                opts = {local[n]: list(options[n]) for n in names}
                observers = collect_observers(stage, opts, inputs)
                merge(measure_sensitivity(stage, opts, inputs, progress, observers), local)
            hidden = streamed.run_block(block, stage_calls)
    if len(streamed.blocks) in groups:
        outer(OuterStage(streamed, batches, hidden), groups[len(streamed.blocks)])
    return SensitivityTable(
        metric="nmse",
        errors={name: errors.get(name, {}) for name in options},
        evaluations=evaluations,
        seconds=seconds,
        skipped=skipped,
    )


@contextlib.contextmanager
def _swapped(root: nn.Module, modules: Mapping[str, nn.Module]) -> Iterator[None]:
    originals = {name: root.get_submodule(name) for name in modules}
    for name, module in modules.items():
        root.set_submodule(name, module)
    try:
        yield
    finally:
        for name, module in originals.items():
            root.set_submodule(name, module)


def _build(
    root: nn.Module, local: Mapping[str, str], options: Mapping[str, Option], observers: Observers
) -> dict[str, nn.Module]:
    """The compressed module of every layer of a stage that a variant does not keep."""
    built = {}
    for name, local_name in local.items():
        option = options.get(name, KeepOption())
        if not isinstance(option, KeepOption):
            observer = observers.get((local_name, option.label))
            module = root.get_submodule(local_name)
            built[local_name] = method_of(option).convert(module, option, observer)
    return built


@dataclass
class Variant:
    """A layer -> option map run through a pass, its modules converted stage by stage.
    ``sink``, if given, receives each stage's state once its layers are swapped in:
    ``sink(stage, state_dict)`` with model-level names."""

    options: Mapping[str, Option]
    sink: Callable[[str, dict[str, torch.Tensor]], None] | None = None


Outputs = dict[str, torch.Tensor]


class Judge(Protocol):
    """Accumulates a figure over batches: ``add`` for each batch's selected outputs (see
    :func:`profilers.quality.select_outputs`) of the reference and the model judged, then
    ``result``. Outputs are judged a batch at a time, so the outputs of every batch (the
    logits of a large vocabulary) are never held at once."""

    def add(self, index: int, reference: Outputs, output: Outputs) -> None: ...

    def result(self) -> Any: ...


def evaluate(
    streamed: StreamedModel,
    batches: Sequence[Batch],
    variants: Mapping[str, Variant],
    judge: Callable[[], Judge],
    observe: Sequence[Batch] | None = None,
    progress: StepCallback | None = None,
) -> dict[str, Any]:
    """For every variant, the result of a new ``judge()`` fed its outputs beside those of
    the model as it is, batch by batch, from one pass that loads each block once.
    Calibrated options observe the first ``len(observe)`` batches' inputs to each stage in
    the uncompressed model (``observe`` must be a prefix of ``batches``)."""
    calibrated = len(observe) if observe is not None else 0
    names = sorted({name for v in variants.values() for name in v.options})
    groups = _groups(streamed, names)
    blocks = streamed.blocks
    calls = streamed.calls(batches)
    inputs = index_batches(batches)
    suffix = len(blocks)

    def outer_modules(stage: OuterStage, group: int, variant: Variant) -> dict[str, nn.Module]:
        local = _outer_names(groups.get(group, []))
        opts = {local[n]: [variant.options[n]] for n in local if n in variant.options}
        observers = collect_observers(stage, opts, inputs[:calibrated]) if calibrated else {}
        return _build(stage, local, variant.options, observers)

    prefix_stage = OuterStage(streamed, batches)
    streams: dict[str, _Stream] = {"reference": _Stream([c.hidden for c in calls[0]])}
    for key, variant in variants.items():  # the prefix's modules are built again at the end
        with _swapped(prefix_stage, outer_modules(prefix_stage, -1, variant)):
            streams[key] = _Stream([prefix_stage(**item) for item in inputs])
    for index, (block_name, _) in enumerate(blocks):
        with streamed.loaded(index) as block:
            reference = [
                c.with_hidden(h)
                for c, h in zip(calls[index], streams["reference"].hidden, strict=True)
            ]
            stage = BlockStage(block, reference)
            local = _block_names(block_name, groups.get(index, []))
            wanted: dict[str, list[Option]] = {}
            for variant in variants.values():
                for name in local.keys() & variant.options.keys():
                    known = wanted.setdefault(local[name], [])
                    if variant.options[name].label not in {o.label for o in known}:
                        known.append(variant.options[name])
            observers = collect_observers(stage, wanted, inputs[:calibrated]) if calibrated else {}
            for key, variant in variants.items():
                built = _build(stage, local, variant.options, observers)
                stage.calls = [
                    c.with_hidden(h) for c, h in zip(calls[index], streams[key].hidden, strict=True)
                ]
                with _swapped(stage, built), torch.inference_mode():
                    streams[key].hidden = [stage(**item) for item in inputs]
                    if variant.sink is not None:
                        variant.sink(block_name, block.state_dict(prefix=block_name + "."))
                del built
            streams["reference"].hidden = streamed.run_block(block, reference)
        if progress is not None:
            progress(1)
    reference_hidden = streams.pop("reference").hidden
    reference_suffix = OuterStage(streamed, batches, reference_hidden)
    results = {}
    for key, variant in variants.items():
        # the suffix may read the prefix's tables (tied heads); its own layers observe the
        # reference's last hidden states
        modules = outer_modules(prefix_stage, -1, variant)
        modules.update(outer_modules(reference_suffix, suffix, variant))
        hidden = streams.pop(key).hidden
        accumulator = judge()
        for i, batch in enumerate(batches):
            reference = _final_output(streamed, batch, reference_hidden[i])
            with _swapped(reference_suffix, modules):
                accumulator.add(i, reference, _final_output(streamed, batch, hidden[i]))
        results[key] = accumulator.result()
        if variant.sink is not None:
            with _swapped(reference_suffix, modules):
                variant.sink("outer", _outer_state(streamed))
    return results


def _outer_state(streamed: StreamedModel) -> dict[str, torch.Tensor]:
    """The model's state outside its blocks (the blocks' tensors are not in memory)."""
    blocks = tuple(name + "." for name, _ in streamed.blocks)
    return {k: v for k, v in streamed.model.state_dict().items() if not k.startswith(blocks)}


def _final_output(streamed: StreamedModel, batch: Batch, hidden: torch.Tensor) -> Outputs:
    """The model's selected outputs for ``batch`` when its last block produced ``hidden``."""
    with torch.inference_mode():
        out = streamed.finish([batch], [hidden])[0]
        return {k: v.detach().float() for k, v in select_outputs(out).items()}


def compare(
    reference: StreamedModel,
    other: StreamedModel,
    batches: Sequence[Batch],
    judge: Callable[[], Judge],
    progress: StepCallback | None = None,
) -> Any:
    """The result of ``judge()`` fed the outputs of two streamed models of the same
    architecture (e.g. the original and its compressed version read back from disk), run
    side by side on ``batches`` with one block of each in memory at a time."""
    if len(reference.blocks) != len(other.blocks):
        raise ValueError("the two models have different numbers of blocks")
    streams = []
    for streamed in (reference, other):
        calls = streamed.calls(batches)
        streams.append((streamed, calls, [call.hidden for call in calls[0]]))
    for index in range(len(reference.blocks)):
        for position, (streamed, calls, hidden) in enumerate(streams):
            with streamed.loaded(index) as block:
                stage_calls = [c.with_hidden(h) for c, h in zip(calls[index], hidden, strict=True)]
                streams[position] = (streamed, calls, streamed.run_block(block, stage_calls))
        if progress is not None:
            progress(1)
    (ref_model, _, ref_hidden), (other_model, _, other_hidden) = streams
    accumulator = judge()
    for i, batch in enumerate(batches):
        accumulator.add(
            i,
            _final_output(ref_model, batch, ref_hidden[i]),
            _final_output(other_model, batch, other_hidden[i]),
        )
    return accumulator.result()
