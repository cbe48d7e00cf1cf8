"""Errors of autotune: each carries one line that says what was wrong and what is allowed."""

from __future__ import annotations

from methods.errors import OptionError


class AutotuneError(Exception):
    """Base of every error autotune raises on bad input (the CLI exits 2 on these)."""


class BudgetError(AutotuneError, ValueError):
    """A budget that cannot be parsed."""


class InfeasibleBudgetError(BudgetError):
    """A budget below what any plan can reach; ``smallest`` holds the reachable minimum."""

    def __init__(self, message: str, smallest: dict[str, float]) -> None:
        super().__init__(message)
        self.smallest = smallest


class TargetError(AutotuneError, ValueError):
    """An unknown target or a malformed target file."""


class ModelLoadError(AutotuneError):
    """A model that cannot be found or loaded."""


class CalibrationError(AutotuneError, ValueError):
    """Calibration data that cannot be used."""


class PlanError(AutotuneError, ValueError):
    """A plan file that is garbage, truncated, or does not fit the schema or the model."""


class FingerprintMismatchError(PlanError):
    """A plan made for another model."""


__all__ = [
    "AutotuneError",
    "BudgetError",
    "CalibrationError",
    "FingerprintMismatchError",
    "InfeasibleBudgetError",
    "ModelLoadError",
    "OptionError",
    "PlanError",
    "TargetError",
]
