"""Sensitivity of every (layer, option): the output error when only that layer is compressed.

Each option is applied with the method's real ``convert`` (so what is measured is what would
be deployed) and the model is run on the calibration batches. The unchanged prefix of the
model is not recomputed: blocks before the layer's block replay their recorded outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from methods.base import Option
from methods.errors import OptionError
from methods.registry import convert_each
from profilers.cache import SensitivityCache
from profilers.converted import ConvertedModules
from profilers.execution.adapters import adapter_for
from profilers.execution.blocks import BlockCache, block_index
from profilers.execution.observe import Observers, collect_observers
from profilers.quality import OutputError, metric_for, select_outputs

StepCallback = Callable[[int], None]  # called with the steps just done


@dataclass
class SensitivityTable:
    """``errors[layer][label]``: output error with only ``layer`` under option ``label``."""

    metric: str
    errors: dict[str, dict[str, float]]
    evaluations: int
    seconds: float
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)
    prefix_cached: bool = False
    scored_by: dict[str, int] = field(default_factory=dict)  # pairs per way of scoring
    rounds: int = 0  # decisions re-made on new measurements (refined estimators)


class _Evaluator:
    def __init__(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
        self.model = model
        self.batches = batches
        self.cache = BlockCache(adapter_for(model).blocks(model))
        with torch.inference_mode(), self.cache.recording():
            self.reference = [
                {k: v.detach().float() for k, v in select_outputs(model(**b)).items()}
                for b in batches
            ]
        self.metric = metric_for(self.reference[0])
        self.order = [name for name, _ in model.named_modules()]
        self.replay = bool(self.cache.blocks) and self._replay_is_exact()

    def _replay_is_exact(self) -> bool:
        """Replaying every block must reproduce the reference bit for bit (twice)."""
        return all(self.error(len(self.cache.blocks)) == 0.0 for _ in range(2))

    def error(self, replayed_blocks: int) -> float:
        acc = OutputError(self.metric)
        with torch.inference_mode(), self.cache.replaying(replayed_blocks):
            for i, batch in enumerate(self.batches):
                self.cache.batch = i
                out = select_outputs(self.model(**batch))
                acc.add(self.reference[i], out, batch.get("attention_mask"))
        return acc.value()

    def blocks_before(self, layer: str) -> int:
        """Blocks that may replay when only ``layer`` changes (0 if replay is off)."""
        return block_index(self.cache.blocks, layer, self.order) if self.replay else 0


def _conversions(
    layer: str,
    original: nn.Module,
    options: list[Option],
    observers: Observers,
    converted: ConvertedModules | None,
) -> Iterator[tuple[Option, nn.Module | OptionError]]:
    """Each option's module: from ``converted`` where it is kept (first), converted (and
    kept there, within its cap) otherwise."""
    fresh = []
    for option in options:
        module = None if converted is None else converted.get(layer, option.label)
        if module is None:
            fresh.append(option)
        else:
            yield option, module
    if fresh:
        for option, module in convert_each(
            original, fresh, lambda o: observers.get((layer, o.label))
        ):
            if converted is not None and isinstance(module, nn.Module):
                converted.put(layer, option.label, module, original)
            yield option, module


def measure_sensitivity(
    model: nn.Module,
    options: Mapping[str, list[Option]],
    batches: list[dict[str, torch.Tensor]],
    progress: StepCallback | None = None,
    observers: Observers | None = None,
    cache: SensitivityCache | None = None,
    converted: ConvertedModules | None = None,
) -> SensitivityTable:
    """Error at the output for each layer in ``options`` under each of its options.

    Options that need calibration statistics take them from ``observers`` (keyed by layer
    and option label); when none are given they are collected on ``batches``. Entries found
    in ``cache`` are not measured again (a full hit runs no forward pass), and new ones are
    stored in it after every layer. Modules already in ``converted`` are not converted
    again, and new ones are kept there. An option whose conversion is the layer itself
    (keep) has error 0 without a forward pass. ``model`` is modified while this runs and
    restored before it returns.
    """
    start = time.perf_counter()
    errors: dict[str, dict[str, float]] = {}
    skipped: dict[str, dict[str, str]] = {}
    evaluations = 0
    pending = {
        layer: opts
        for layer, opts in options.items()
        if cache is None or not cache.has(layer, [o.label for o in opts])
    }
    if cache is not None:
        for layer in options.keys() - pending.keys():
            cached = {o.label: cache.get(layer, o.label) for o in options[layer]}
            errors[layer] = {label: v for label, v in cached.items() if v is not None}
            refused = {label: "refused (cached)" for label, v in cached.items() if v is None}
            if refused:
                skipped[layer] = refused
            if progress is not None:
                progress(len(options[layer]))
    if not pending and cache is not None and cache.metric:
        return SensitivityTable(
            metric=cache.metric,
            errors={layer: errors[layer] for layer in options},
            evaluations=0,
            seconds=time.perf_counter() - start,
            skipped=skipped,
        )
    if observers is None:
        observers = collect_observers(model, pending, batches)
    evaluator = _Evaluator(model, batches)
    if cache is not None:
        cache.metric = evaluator.metric
    for layer, layer_options in pending.items():
        original = model.get_submodule(layer)
        replayed = evaluator.blocks_before(layer)
        errors[layer] = {}
        conversions = _conversions(layer, original, layer_options, observers, converted)
        for option, compressed in conversions:
            if isinstance(compressed, OptionError):
                skipped.setdefault(layer, {})[option.label] = str(compressed)
                continue
            if compressed is original:  # the model is unchanged: its output is the reference
                errors[layer][option.label] = 0.0
                if progress is not None:
                    progress(1)
                continue
            model.set_submodule(layer, compressed)
            try:
                errors[layer][option.label] = evaluator.error(replayed)
            finally:
                model.set_submodule(layer, original)
            evaluations += 1
            if progress is not None:
                progress(1)
        if cache is not None:
            for option in layer_options:
                cache.put(layer, option.label, errors[layer].get(option.label))
            cache.save()
    return SensitivityTable(
        metric=evaluator.metric,
        errors={layer: errors[layer] for layer in options},
        evaluations=evaluations,
        seconds=time.perf_counter() - start,
        skipped=skipped,
        prefix_cached=evaluator.replay,
    )
