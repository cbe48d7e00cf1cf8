"""The final choice of a tune, made on the selection split.

The calibration data picks the search's front runner (the candidate with the least error on
it); the selection split, which neither profiling nor search saw, then judges that plan
against every uniform plan that fits the budget (and, when calibrated options are offered,
the allocator's plan without them), and the least error wins. The held-out
split is not read here: it measures the chosen plan once the choice is made.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

UNIFORM_PREFIX = "uniform "


@dataclass(frozen=True)
class Selection:
    """The selection split's verdict: each judged plan's error on it and the winner."""

    front_runner: str
    errors: dict[str, float]
    chosen: str
    best_uniform: str | None
    windows: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": "selection",
            "windows": self.windows,
            "front_runner": self.front_runner,
            "chosen": self.chosen,
            "best_uniform": self.best_uniform,
            "errors": dict(self.errors),
        }


def is_uniform(name: str) -> bool:
    return name.startswith(UNIFORM_PREFIX)


def choose(
    front_runner: str,
    baselines: Sequence[str],
    error: Callable[[str], float],
    windows: int,
    progress: Callable[[int], Any] | None = None,
) -> Selection:
    """Judge ``front_runner`` and every plan in ``baselines`` (the uniform plans that fit,
    and any other plan it must beat) by ``error`` (their error on the selection split) and
    keep the least; ties go to the front runner, then to the order of ``baselines``."""
    names = [front_runner, *(u for u in baselines if u != front_runner)]
    errors: dict[str, float] = {}
    for name in names:
        errors[name] = float(error(name))
        if progress is not None:
            progress(1)
    chosen = min(names, key=lambda n: (errors[n], names.index(n)))
    judged_uniforms = [n for n in names if is_uniform(n)]
    best_uniform = (
        min(judged_uniforms, key=lambda n: (errors[n], names.index(n))) if judged_uniforms else None
    )
    return Selection(front_runner, errors, chosen, best_uniform, windows)
