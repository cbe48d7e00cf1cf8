"""Apply a plan: build the compressed model with real compressed storage."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autotune.errors import CalibrationError
from autotune.plan import Plan
from methods.base import LayerShape, Option
from methods.errors import OptionError
from methods.registry import method_of


def check_options(model: nn.Module, options: Mapping[str, Option]) -> None:
    """Refuse, before any work, an option a layer cannot take (naming layer and option)."""
    for name, option in options.items():
        shape = LayerShape.of(model.get_submodule(name))
        method_of(option).check(shape, option, layer=name)


def compress(
    model: nn.Module,
    options: Mapping[str, Option],
    calibration: Sequence[dict[str, torch.Tensor]] | None = None,
    prebuilt: Mapping[str, nn.Module] | None = None,
) -> nn.Module:
    """Replace each named layer of ``model`` in place by its compressed module.

    Methods that need statistics observe the calibration batches through forward hooks
    first (phase one), then every layer is converted (phase two). ``prebuilt`` supplies
    modules already converted for some layers.
    """
    prebuilt = prebuilt or {}
    check_options(model, options)
    observers = {}
    for name, option in options.items():
        method = method_of(option)
        if name in prebuilt or not method.needs_calibration(option):
            continue
        if not calibration:
            raise OptionError(f"{name}: {option.label} needs calibration data and none was given")
        observers[name] = method.observer(model.get_submodule(name), option)
    if observers:
        handles = [
            model.get_submodule(name).register_forward_hook(obs.observe)
            for name, obs in observers.items()
            if obs is not None
        ]
        try:
            with torch.inference_mode():
                for batch in calibration or []:
                    model(**batch)
        finally:
            for handle in handles:
                handle.remove()
    for name, option in options.items():
        if name in prebuilt:
            new = prebuilt[name]
        else:
            new = method_of(option).convert(model.get_submodule(name), option, observers.get(name))
        model.set_submodule(name, new)
    return model


def apply_plan(
    model: nn.Module | str | Path,
    plan: Plan | str | Path,
    *,
    calibration: Any = None,
    tokenizer: Any = None,
    inplace: bool = False,
    strict: bool = True,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The model compressed as ``plan`` says; ``model`` itself is untouched unless
    ``inplace``. ``model`` may be a path or ``"demo"``, ``plan`` a path to plan JSON."""
    from autotune.calibration import build_calibration
    from autotune.loading import load_model

    if isinstance(model, (str, Path)):
        loaded = load_model(model, trust_remote_code=trust_remote_code)
        model, tokenizer, inplace = loaded.model, tokenizer or loaded.tokenizer, True
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    plan.check_model(model, strict=strict)
    options = {ref.name: opt for ref, opt in plan.layer_options(model, strict=strict).items()}
    check_options(model, options)
    batches = None
    if any(method_of(o).needs_calibration(o) for o in options.values()):
        if calibration is None and tokenizer is None:
            raise CalibrationError("this plan uses methods that need calibration: pass calibration")
        batches = build_calibration(model, tokenizer, calibration).calibration
    work = model if inplace else copy.deepcopy(model)
    return compress(work, options, batches)
