"""Phase one of methods that need statistics: observe calibration activations by hooks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from methods.base import LayerShape, Observer, Option
from methods.registry import method_of
from profilers.fisher import fisher_diagonals

Observers = dict[tuple[str, str], Observer]

FISHER_SAMPLES = 2  # backward passes per batch for observers that ask for Fisher information


def needs_statistics(options: Mapping[str, Sequence[Option]]) -> bool:
    """Whether any option offered to any layer is converted from calibration statistics."""
    return any(method_of(o).needs_calibration(o) for opts in options.values() for o in opts)


def plan_needs_statistics(options: Mapping[str, Option]) -> bool:
    """Whether any layer's one option (a plan's) is converted from calibration statistics."""
    return needs_statistics({name: [option] for name, option in options.items()})


def collect_observers(
    model: nn.Module,
    options: Mapping[str, Sequence[Option]],
    batches: Sequence[dict[str, torch.Tensor]],
) -> Observers:
    """Observers keyed by ``(layer, option label)`` for every option that needs calibration,
    fed in one pass over ``batches`` of the model as it is (layers unchanged). A method may
    give several options of a layer one shared observer: it is hooked (and fed) once.
    Observers that ask for the weight's Fisher diagonal get it from backward passes after."""
    observers: Observers = {}
    for layer, layer_options in options.items():
        module = model.get_submodule(layer)
        shape = LayerShape.of(module)
        for option in layer_options:
            method = method_of(option)
            if method.supports(shape) and method.needs_calibration(option):
                observer = method.observer(module, option)
                if observer is not None:
                    observers[(layer, option.label)] = observer
    if not observers:
        return observers
    hooked: dict[int, tuple[str, Observer]] = {}
    for (layer, _), observer in observers.items():
        hooked.setdefault(id(observer), (layer, observer))
    handles = [
        model.get_submodule(layer).register_forward_hook(observer.observe)
        for layer, observer in hooked.values()
    ]
    run_hooked(model, batches, handles)
    wanting = [(layer, o) for layer, o in hooked.values() if o.needs_fisher]
    if wanting:
        layers = sorted({layer for layer, _ in wanting})
        diagonals, _, _ = fisher_diagonals(model, layers, batches, FISHER_SAMPLES, seed=0)
        for layer, observer in wanting:
            observer.observe_fisher(diagonals[layer])
    return observers


def run_hooked(
    model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], handles: list
) -> None:
    """Run ``model`` on every batch without gradients, then remove the hook ``handles``
    (also when a pass fails)."""
    try:
        with torch.inference_mode():
            for batch in batches:
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
