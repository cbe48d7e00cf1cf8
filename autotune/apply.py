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
from profilers.execution.observe import (
    Observers,
    collect_observers,
    needs_statistics,
    plan_needs_statistics,
)


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
    observers: Observers | None = None,
) -> nn.Module:
    """Replace each named layer of ``model`` in place by its compressed module.

    Methods that need statistics observe the calibration batches through forward hooks
    first (phase one; or take them from ``observers``), then every layer is converted
    (phase two). ``prebuilt`` supplies modules already converted for some layers.
    """
    prebuilt = prebuilt or {}
    check_options(model, options)
    pending = {n: [o] for n, o in options.items() if n not in prebuilt}
    if observers is None and needs_statistics(pending):
        if not calibration:
            name, option = next(
                (n, o) for n, o in options.items() if method_of(o).needs_calibration(o)
            )
            raise OptionError(f"{name}: {option.label} needs calibration data and none was given")
        observers = collect_observers(model, pending, calibration)
    observers = observers or {}
    for name, option in options.items():
        if name in prebuilt:
            new = prebuilt[name]
        else:
            observer = observers.get((name, option.label))
            new = method_of(option).convert(model.get_submodule(name), option, observer)
        model.set_submodule(name, new)
    return model


def plan_calibration(plan: Plan, model: nn.Module, tokenizer: Any, calibration: Any) -> list:
    """The calibration batches the plan was tuned with (rebuilt from its description)."""
    from autotune.calibration import STDLIB_SOURCE, build_calibration

    described = plan.calibration or {}
    source = described.get("source", STDLIB_SOURCE)
    if calibration is None and source != STDLIB_SOURCE:
        raise CalibrationError(
            f"this plan's methods need calibration and it was tuned on {source!r}: pass it "
            "(calibration=...)"
        )
    if calibration is None and tokenizer is None:
        raise CalibrationError("this plan's methods need calibration: pass a tokenizer or batches")
    return build_calibration(
        model,
        tokenizer,
        calibration,
        seq_len=int(described.get("seq_len", 128)),
        calibration_windows=int(described.get("calibration_windows", 32)),
        batch_size=int(described.get("batch_size", 8)),
    ).calibration


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
    from autotune.loading import load_model

    if isinstance(model, (str, Path)):
        loaded = load_model(model, trust_remote_code=trust_remote_code)
        model, tokenizer, inplace = loaded.model, tokenizer or loaded.tokenizer, True
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    plan.check_model(model, strict=strict)
    work = model if inplace else copy.deepcopy(model)
    plan.shaped(work)  # structured pruning first: the layer options apply to the result
    options = {ref.name: opt for ref, opt in plan.layer_options(work, strict=strict).items()}
    check_options(work, options)
    batches = None
    if plan_needs_statistics(options):
        batches = plan_calibration(plan, work, tokenizer, calibration)
    return compress(work, options, batches)
