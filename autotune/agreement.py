"""Calibrated options are offered where their gain holds on text they were not fitted to.

A calibrated method (GPTQ) fits a layer's weight to the layer's calibration inputs. Its gain
over the uncalibrated option stored alike (its stand-in) is what makes the allocator choose
it, and that gain is measured on the very inputs it was fitted to: with little calibration
text, or text unlike the rest, it does not carry over. Per layer and calibrated method, one
probe (the method's offered option with the fewest bytes, where its fit matters most) is
converted and compared with its stand-in on the calibration inputs and on the selection
split's inputs. Where the probe is no better than its stand-in on the selection split, the
two splits disagree and the method's options are left out of that layer. Elsewhere the
method's errors on the layer (measured on calibration text, which it fitted) are scaled by
how far calibration overstated the probe's gain, so the allocator weighs it by what it gains
on text it did not see. The comparison is
exact and cheap: for weight-only formats the layer's output error is ``tr(dW X^T X dW^T)``,
from the ``X^T X`` of each split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autotune.layers import LayerRef
from methods.base import LayerShape, Option
from methods.errors import OptionError
from methods.observers import HessianObserver
from methods.registry import method_of
from profilers.cache import SensitivityCache
from profilers.converted import ConvertedModules
from profilers.execution.observe import Observers, run_hooked
from profilers.proxies import effective_weight


@dataclass(frozen=True)
class Agreement:
    """A calibrated method's probe on one layer: its output error over its stand-in's on the
    calibration inputs and on the selection split's (below 1: the probe is better)."""

    layer: str
    method: str
    probe: str
    stand_in: str
    calibration: float
    selection: float

    @property
    def holds(self) -> bool:
        """Whether the probe beats its stand-in on the selection split too."""
        return self.selection < 1.0

    @property
    def optimism(self) -> float:
        """How far calibration overstates the probe's gain: its ratio on the selection split
        over that on calibration, at least 1. The method's errors on the layer, measured on
        calibration text it was fitted to, are scaled by it."""
        if self.calibration <= 0:
            return 1.0
        return max(1.0, self.selection / self.calibration)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "method": self.method,
            "probe": self.probe,
            "stand_in": self.stand_in,
            "calibration_ratio": round(self.calibration, 4),
            "selection_ratio": round(self.selection, 4),
            "kept": self.holds,
        }


@dataclass(frozen=True)
class _Probe:
    layer: str
    option: Option
    stand_in: Option
    calibration: HessianObserver


def probes(
    layers: Sequence[LayerRef], options: Mapping[str, Sequence[Option]], observers: Observers
) -> list[_Probe]:
    """Per layer and calibrated method with a stand-in and a Hessian observer, the offered
    option with the fewest bytes."""
    found: list[_Probe] = []
    for ref in layers:
        by_method: dict[str, Option] = {}
        for option in options.get(ref.name, ()):
            method = method_of(option)
            observer = observers.get((ref.name, option.label))
            if not method.needs_calibration(option) or not isinstance(observer, HessianObserver):
                continue
            if method.stand_in(option) is None:
                continue
            best = by_method.get(method.name)
            size = method.cost(ref.shape, option).bytes
            if best is None or size < method.cost(ref.shape, best).bytes:
                by_method[method.name] = option
        for option in by_method.values():
            observer = observers[(ref.name, option.label)]
            assert isinstance(observer, HessianObserver)
            stand_in = method_of(option).stand_in(option)
            assert stand_in is not None
            found.append(_Probe(ref.name, option, stand_in, observer))
    return found


def agreements(
    model: nn.Module,
    layers: Sequence[LayerRef],
    options: Mapping[str, Sequence[Option]],
    observers: Observers,
    selection: Sequence[Mapping[str, Any]],
    keep: ConvertedModules | None = None,
) -> list[Agreement]:
    """Every probe's errors over its stand-in's, on calibration and on ``selection``'s inputs
    (one hooked pass of ``model`` over the selection batches); a probe whose conversion is
    refused is not judged. Converted probes are kept in ``keep`` for the tune to reuse."""
    found = probes(layers, options, observers)
    if not found:
        return []
    selected: dict[str, HessianObserver] = {}
    handles = []
    for layer in dict.fromkeys(p.layer for p in found):
        module = model.get_submodule(layer)
        selected[layer] = HessianObserver(LayerShape.of(module).cols)
        handles.append(module.register_forward_hook(selected[layer].observe))
    run_hooked(model, selection, handles)
    judged: list[Agreement] = []
    for probe in found:
        module = model.get_submodule(probe.layer)
        try:
            converted = method_of(probe.option).convert(module, probe.option, probe.calibration)
            plain_weight = _weight_of(module, probe.stand_in)
        except OptionError:
            continue
        weight, fitted = effective_weight(module), effective_weight(converted)
        if weight is None or fitted is None or plain_weight is None:
            continue
        ratios = []
        for observer in (probe.calibration, selected[probe.layer]):
            base = observer.output_error(plain_weight - weight)
            ratios.append(observer.output_error(fitted - weight) / base if base > 0 else 1.0)
        agreement = Agreement(
            probe.layer,
            method_of(probe.option).name,
            probe.option.label,
            probe.stand_in.label,
            *ratios,
        )
        judged.append(agreement)
        if keep is not None and agreement.holds:  # the tune may measure it
            keep.put(probe.layer, probe.option.label, converted, module)
    return judged


_SPLITS = ("calibration", "selection")


def remembered(
    layers: Sequence[LayerRef],
    options: Mapping[str, Sequence[Option]],
    observers: Observers,
    cache: SensitivityCache | None,
    judge: Callable[[], list[Agreement]],
) -> list[Agreement]:
    """``judge()``'s agreements, read from ``cache`` where it holds every probe's (a tune of
    the same model on the same calibration and selection text judged them), else judged and
    stored there: a probe's entries are its two ratios, or ``None`` where its conversion was
    refused (not judged)."""
    found = probes(layers, options, observers)
    keys = {
        (p.layer, _entry(method_of(p.option).name, p.option.label, p.stand_in.label)): p
        for p in found
    }
    if cache is not None and found and all(cache.has(layer, _labels(e)) for layer, e in keys):
        judged = []
        for (layer, entry), probe in keys.items():
            ratios = [cache.get(layer, label) for label in _labels(entry)]
            if None not in ratios:
                method = method_of(probe.option).name
                judged.append(
                    Agreement(layer, method, probe.option.label, probe.stand_in.label, *ratios)
                )
        return judged
    judged = judge()
    if cache is not None and found:
        by_key = {(a.layer, _entry(a.method, a.probe, a.stand_in)): a for a in judged}
        for layer, entry in keys:
            agreement = by_key.get((layer, entry))
            for label, split in zip(_labels(entry), _SPLITS, strict=True):
                cache.put(layer, label, None if agreement is None else getattr(agreement, split))
        cache.metric = "ratio"
        cache.save()
    return judged


def _entry(method: str, probe: str, stand_in: str) -> str:
    """A probe's name in the cache: its method, its option and its stand-in."""
    return f"{method}|{probe}|{stand_in}"


def _labels(entry: str) -> list[str]:
    return [f"{entry}|{split}" for split in _SPLITS]


def _weight_of(module: nn.Module, option: Option) -> torch.Tensor | None:
    """The float weight ``option`` leaves ``module`` with: found without packing where its
    method can (``Method.simulated_weight``), else from the converted module."""
    method = method_of(option)
    found = method.simulated_weight(module, option)
    return found if found is not None else effective_weight(method.convert(module, option))


def drop_disagreeing(
    options: dict[str, list[Option]], observers: Observers, judged: Sequence[Agreement]
) -> list[Agreement]:
    """Remove, in place, the options of every (layer, method) whose probe's gain does not
    hold on the selection split; returns those disagreements."""
    disagreeing = [a for a in judged if not a.holds]
    for agreement in disagreeing:
        kept = []
        for option in options[agreement.layer]:
            if method_of(option).name == agreement.method:
                observers.pop((agreement.layer, option.label), None)
            else:
                kept.append(option)
        options[agreement.layer] = kept
    return disagreeing


def honest_errors(
    errors: Mapping[str, Mapping[str, float]],
    options: Mapping[str, Sequence[Option]],
    judged: Sequence[Agreement],
) -> dict[str, dict[str, float]]:
    """``errors[layer][label]`` with every kept calibrated method's options on a layer scaled
    by its probe's :attr:`Agreement.optimism` there."""
    factor = {(a.layer, a.method): a.optimism for a in judged if a.holds}
    scaled: dict[str, dict[str, float]] = {}
    for layer, row in errors.items():
        method = {o.label: method_of(o).name for o in options.get(layer, ())}
        scaled[layer] = {
            label: error * factor.get((layer, method.get(label, "")), 1.0)
            for label, error in row.items()
        }
    return scaled
