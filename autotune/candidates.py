"""End-to-end checks of candidate plans: the allocator's plan against uniform plans.

Per-layer sensitivities add up only approximately, so candidates are compared on the real
compressed model. Selection is in two steps of growing fidelity: every candidate on the
small profiling batches, the best few on the full calibration set.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from methods.base import Option
from methods.registry import method_of
from profilers.observe import Observers
from profilers.quality import output_error


@dataclass
class Candidate:
    name: str
    options: dict[str, Option]
    screening_error: float | None = None
    calibration_error: float | None = None


class ModuleCache:
    """Converted modules by (layer, option label), up to a byte cap."""

    def __init__(
        self, model: nn.Module, cap_bytes: int, observers: Observers | None = None
    ) -> None:
        self.model = model
        self.cap = cap_bytes
        self.observers = observers or {}
        self.used = 0
        self.store: dict[tuple[str, str], nn.Module] = {}

    def get(self, layer: str, option: Option, original: nn.Module) -> nn.Module:
        key = (layer, option.label)
        if key in self.store:
            return self.store[key]
        observer = self.observers.get(key)
        module = method_of(option).convert(original, option, observer)
        size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        if module is not original and self.used + size <= self.cap:
            self.store[key] = module
            self.used += size
        return module


@contextmanager
def swapped(
    model: nn.Module, options: Mapping[str, Option], cache: ModuleCache
) -> Iterator[dict[str, nn.Module]]:
    """Temporarily replace layers by their compressed modules; yields the modules."""
    originals = {name: model.get_submodule(name) for name in options}
    modules = {name: cache.get(name, opt, originals[name]) for name, opt in options.items()}
    for name, module in modules.items():
        model.set_submodule(name, module)
    try:
        yield modules
    finally:
        for name, module in originals.items():
            model.set_submodule(name, module)


def evaluate(
    model: nn.Module,
    candidate_options: Mapping[str, Option],
    batches: list[dict[str, torch.Tensor]],
    reference: list[dict[str, torch.Tensor]],
    metric: str,
    cache: ModuleCache,
) -> float:
    with swapped(model, candidate_options, cache):
        return output_error(model, batches, reference, metric)


def select(
    model: nn.Module,
    candidates: list[Candidate],
    screening: tuple[list[dict], list[dict]],
    full: tuple[list[dict], list[dict]],
    metric: str,
    cache: ModuleCache,
    finalists: int = 3,
    progress=None,
) -> Candidate:
    """The candidate with the least error on the full calibration set, after screening."""
    for candidate in candidates:
        candidate.screening_error = evaluate(model, candidate.options, *screening, metric, cache)
        if progress is not None:
            progress(1)
    order = sorted(range(len(candidates)), key=lambda i: (candidates[i].screening_error, i))
    for index in order[:finalists]:
        candidate = candidates[index]
        candidate.calibration_error = evaluate(model, candidate.options, *full, metric, cache)
        if progress is not None:
            progress(1)
    checked = [candidates[i] for i in order[:finalists]]
    return min(checked, key=lambda c: (c.calibration_error, candidates.index(c)))
