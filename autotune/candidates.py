"""End-to-end checks of candidate plans: the search's plans against uniform plans.

Per-layer sensitivities add up only approximately, so candidates are compared on the real
compressed model. Selection is in two steps of growing fidelity: every candidate on the
small profiling batches, the best few on the full calibration set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from methods.base import Option
from methods.registry import method_of
from profilers.converted import ConvertedModules
from profilers.execution.observe import Observers
from profilers.quality import output_error


@dataclass
class Candidate:
    name: str
    options: dict[str, Option]
    screening_error: float | None = None
    calibration_error: float | None = None


class ModuleCache:
    """Converted modules by (layer, option label), converted on first use and kept in
    ``converted`` (which a sensitivity estimator may have filled already)."""

    def __init__(
        self, model: nn.Module, cap_bytes: int, observers: Observers | None = None
    ) -> None:
        self.model = model
        self.observers = observers or {}
        self.converted = ConvertedModules(cap_bytes)

    def get(self, layer: str, option: Option, original: nn.Module) -> nn.Module:
        module = self.converted.get(layer, option.label)
        if module is None:
            observer = self.observers.get((layer, option.label))
            module = method_of(option).convert(original, option, observer)
            self.converted.put(layer, option.label, module, original)
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
    candidates: list[Candidate],
    errors: Callable[[list[Mapping[str, Option]], int], list[float]],
    finalists: int = 3,
    searched: int = 0,
    progress=None,
) -> Candidate:
    """The candidate with the least error on the full calibration set (fidelity ``-1``).

    Every candidate is first screened on the profiling batches (fidelity ``0``); the first
    ``searched`` candidates (the search's plans) and the ``finalists`` best-screened others
    are then checked on the full set. ``errors(plans, fidelity)`` measures several plans at
    once."""
    screened = errors([c.options for c in candidates], 0)
    for candidate, error in zip(candidates, screened, strict=True):
        candidate.screening_error = error
    if progress is not None:
        progress(len(candidates))
    others = sorted(
        range(searched, len(candidates)), key=lambda i: (candidates[i].screening_error, i)
    )
    checked = list(range(searched)) + others[:finalists]
    full = errors([candidates[i].options for i in checked], -1)
    for index, error in zip(checked, full, strict=True):
        candidates[index].calibration_error = error
    if progress is not None:
        progress(len(checked))
    return min(
        (candidates[i] for i in checked), key=lambda c: (c.calibration_error, candidates.index(c))
    )
