"""Latency of each (layer shape, option) measured inside the model on this machine.

A layer timed on its own runs in another cache state than inside a forward pass (there, the
other layers' weights and the activations compete for the cache), and standalone timings
rank formats differently from the model. So layers are timed in place: for each option label,
every layer that can take it is swapped to it at once (one converted module per shape, copied
so that each layer has weights of its own), and forward hooks time every layer during real
forward passes; the unchanged model's pass gives the time of everything else. Options are
visited round-robin, one forward pass each per round, and every figure is a median over
rounds, so that bursts of load on a shared machine hit all options alike.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from methods.base import LayerShape, Option
from methods.errors import OptionError
from methods.registry import method_of
from profilers.execution.observe import Observers
from profilers.measure import timed_call


@dataclass
class InModelLatency:
    """``layers[(shape, label)]``: seconds of one call of a layer of that shape under that
    option; ``whole``: seconds of the unchanged model; ``rest``: ``whole`` minus its layers."""

    layers: dict[tuple[LayerShape, str], float]
    whole: float
    rest: float


class _LayerTimer:
    def __init__(self) -> None:
        self.start = 0.0
        self.seconds = 0.0
        self.cuda = False

    def before(self, module: nn.Module, args: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def after(self, module: nn.Module, args: object, output: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self.start


def _copy(module: nn.Module) -> nn.Module:
    """A copy with storage of its own (kernel caches are rebuilt on first use)."""
    if hasattr(module, "_unpack"):
        module._unpack()
    return copy.deepcopy(module)


def measure_in_model(
    model: nn.Module,
    layers: Mapping[str, Sequence[Option]],
    inputs: dict[str, torch.Tensor],
    *,
    observers: Observers | None = None,
    rounds: int = 7,
    progress: Callable[[int], None] | None = None,
    also_timed: Mapping[str, Sequence[nn.Module]] | None = None,
) -> InModelLatency:
    """Time every option of ``layers`` (name -> options) inside ``model`` on ``inputs``.

    Layers of the same shape share their timings. ``also_timed`` (layer name -> modules):
    modules whose calls count as the layer's (a tied output layer reading the layer's table).
    The model is restored before this returns.
    """
    observers = observers or {}
    cuda = any(t.is_cuda for t in inputs.values() if isinstance(t, torch.Tensor))
    shapes = {name: LayerShape.of(model.get_submodule(name)) for name in layers}
    originals = {name: model.get_submodule(name) for name in layers}
    # per option label: the module every layer that can take it gets
    plans: dict[str, dict[str, nn.Module]] = {}
    built: dict[tuple[LayerShape, str], nn.Module | None] = {}
    for name, options in layers.items():
        shape = shapes[name]
        for option in options:
            if option.method == "none":
                continue
            key = (shape, option.label)
            if key not in built:
                try:
                    built[key] = method_of(option).convert(
                        originals[name], option, observers.get((name, option.label))
                    )
                    module = built[key]
                except OptionError:
                    built[key] = None
                    continue
                if progress is not None:
                    progress(1)
            else:
                prototype = built[key]
                if prototype is None:
                    continue
                module = _copy(prototype)
            plans.setdefault(option.label, {})[name] = module
    timers = {name: _LayerTimer() for name in layers}
    handles = []
    for name, timer in timers.items():
        timer.cuda = cuda
        variants = [originals[name]] + [plan[name] for plan in plans.values() if name in plan]
        for module in [*variants, *(also_timed or {}).get(name, ())]:
            handles.append(module.register_forward_pre_hook(timer.before))
            handles.append(module.register_forward_hook(timer.after))

    def forward() -> float:
        for timer in timers.values():
            timer.seconds = 0.0
        return timed_call(lambda: model(**inputs), cuda)

    samples: dict[tuple[LayerShape, str], list[float]] = {}
    whole: list[float] = []
    rest: list[float] = []

    def record(label: str, names) -> None:
        by_shape: dict[LayerShape, list[float]] = {}
        for name in names:
            by_shape.setdefault(shapes[name], []).append(timers[name].seconds)
        for shape, values in by_shape.items():
            samples.setdefault((shape, label), []).append(statistics.fmean(values))

    try:
        with torch.inference_mode():
            for _ in range(2):
                forward()
            order = list(plans.items())
            for round_index in range(rounds + 1):  # round 0 warms every plan up
                total = forward()
                if round_index:
                    whole.append(total)
                    rest.append(total - sum(t.seconds for t in timers.values()))
                    record("keep", layers)
                for label, plan in order if round_index % 2 else reversed(order):
                    for name, module in plan.items():
                        model.set_submodule(name, module)
                    try:
                        forward()
                    finally:
                        for name in plan:
                            model.set_submodule(name, originals[name])
                    if round_index:
                        record(label, plan)
    finally:
        for handle in handles:
            handle.remove()
    medians = {key: statistics.median(values) for key, values in samples.items()}
    return InModelLatency(medians, statistics.median(whole), max(statistics.median(rest), 0.0))
