"""autotune: hardware-aware per-layer compression plans for PyTorch / Hugging Face models.

The names below are imported on first use, so that ``import autotune.plan`` or the command
line's ``--help`` does not load torch, transformers and the whole tuner.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "apply_plan": "autotune.apply",
    "Budget": "autotune.budget",
    "AutotuneError": "autotune.errors",
    "BudgetError": "autotune.errors",
    "CalibrationError": "autotune.errors",
    "FingerprintMismatchError": "autotune.errors",
    "InfeasibleBudgetError": "autotune.errors",
    "ModelLoadError": "autotune.errors",
    "OptionError": "autotune.errors",
    "PlanError": "autotune.errors",
    "TargetError": "autotune.errors",
    "ExportError": "autotune.export",
    "ExportResult": "autotune.export",
    "export_plan": "autotune.export",
    "Plan": "autotune.plan",
    "load_compressed": "autotune.saved",
    "save_compressed": "autotune.saved",
    "StreamedResult": "autotune.streamed",
    "apply_streamed": "autotune.streamed",
    "tune_streamed": "autotune.streamed",
    "validate_streamed": "autotune.streamed",
    "get_target": "autotune.targets",
    "list_targets": "autotune.targets",
    "TuneResult": "autotune.tuner",
    "autotune": "autotune.tuner",
    "ValidationResult": "autotune.validate",
    "validate_plan": "autotune.validate",
}

__all__ = [
    "AutotuneError",
    "Budget",
    "BudgetError",
    "CalibrationError",
    "ExportError",
    "ExportResult",
    "FingerprintMismatchError",
    "InfeasibleBudgetError",
    "ModelLoadError",
    "OptionError",
    "Plan",
    "PlanError",
    "StreamedResult",
    "TargetError",
    "TuneResult",
    "ValidationResult",
    "__version__",
    "apply_plan",
    "apply_streamed",
    "autotune",
    "export_plan",
    "get_target",
    "list_targets",
    "load_compressed",
    "save_compressed",
    "tune_streamed",
    "validate_plan",
    "validate_streamed",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'autotune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from autotune.apply import apply_plan
    from autotune.budget import Budget
    from autotune.errors import (
        AutotuneError,
        BudgetError,
        CalibrationError,
        FingerprintMismatchError,
        InfeasibleBudgetError,
        ModelLoadError,
        OptionError,
        PlanError,
        TargetError,
    )
    from autotune.export import ExportError, ExportResult, export_plan
    from autotune.plan import Plan
    from autotune.saved import load_compressed, save_compressed
    from autotune.streamed import (
        StreamedResult,
        apply_streamed,
        tune_streamed,
        validate_streamed,
    )
    from autotune.targets import get_target, list_targets
    from autotune.tuner import TuneResult, autotune
    from autotune.validate import ValidationResult, validate_plan
