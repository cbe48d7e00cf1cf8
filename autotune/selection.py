"""The final choice of a tune, made on the selection split.

The calibration data picks the search's front runner (the candidate with the least error on
it); the selection split, which neither profiling nor search saw, then judges that plan
against the other searched plans (the allocator's, and when calibrated options are offered,
the allocator's plan without them) and the uniform plans that fit the budget, and the least
error wins. Of the uniform plans only the few that screened best on calibration windows are
judged (on the demo their ranks agree on both splits, and the others are several times the
front runner's error), and of those the best one and any screened near the front runner's
error. The held-out split is not read here: it measures the chosen plan once the choice is
made.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

UNIFORM_PREFIX = "uniform "
# uniform plans judged on the selection split: the best-screened few
UNIFORM_FINALISTS = 3
# of those, the ones screened at more than this multiple of the front runner's error are not
# judged (the best-screened one always is: the report gives its errors); on the demo at
# NNCF's int4 bytes the best three screen at 17-24x
UNIFORM_REACH = 2.0


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


def uniform_finalists(
    screening: Mapping[str, float | None],
    keep: int = UNIFORM_FINALISTS,
    within: tuple[float | None, float] | None = None,
) -> list[str]:
    """The ``keep`` uniform plans of ``screening`` (each plan's error on the calibration
    windows it was screened on, ``None`` if it was not) with the least error, best first;
    ties keep their order. With ``within=(error, reach)``, of those only the best one and
    the ones screened at most ``reach`` times ``error`` (the front runner's): a plan several
    times its error on those windows is not judged again."""
    screened = [name for name, error in screening.items() if is_uniform(name) and error is not None]
    best = sorted(screened, key=screening.__getitem__)[:keep]  # stable: ties keep their order
    if within is None or within[0] is None or not best:
        return best
    error, reach = within
    return best[:1] + [name for name in best[1:] if screening[name] <= reach * error]


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
