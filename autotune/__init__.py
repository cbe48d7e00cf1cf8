"""autotune: hardware-aware per-layer compression plans for PyTorch / Hugging Face models."""

__version__ = "0.1.0"

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
from autotune.streamed import StreamedResult, apply_streamed, tune_streamed, validate_streamed
from autotune.targets import get_target, list_targets
from autotune.tuner import TuneResult, autotune
from autotune.validate import ValidationResult, validate_plan

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
