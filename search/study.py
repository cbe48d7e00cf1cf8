"""Optuna studies as the shared record of every engine's evaluations.

Every finished evaluation of every engine is a trial in one Optuna study, so that a search
resumes from its storage after a crash, several processes (on one or many machines) work on
one study through a shared storage URL (SQLite, PostgreSQL, MySQL), and optuna-dashboard shows
all engines alike. A trial's parameters are the plan's levels (per variable, the index of its
choice among the choices ordered by cost); its value is the full-fidelity error, or, for an
evaluation stopped at a cheaper fidelity, the intermediate values of a pruned trial.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

from search.space import ChoiceTable

ENGINE_ATTR = "engine"
SPACE_ATTR = "search_space"
WORKER_ATTR = "worker"


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def param_names(table: ChoiceTable) -> list[str]:
    return list(table.variables)


def distributions(table: ChoiceTable, levels: list[list[int]]) -> dict[str, Any]:
    optuna = _optuna()
    return {
        name: optuna.distributions.IntDistribution(0, len(levels[i]) - 1)
        for i, name in enumerate(param_names(table))
    }


def to_params(assignment: list[int], table: ChoiceTable, levels: list[list[int]]) -> dict[str, int]:
    return {name: levels[i].index(assignment[i]) for i, name in enumerate(param_names(table))}


def from_params(
    params: dict[str, Any], table: ChoiceTable, levels: list[list[int]]
) -> list[int] | None:
    """The assignment of a trial's parameters, or ``None`` if they do not fit this table."""
    try:
        return [levels[i][int(params[name])] for i, name in enumerate(param_names(table))]
    except (KeyError, IndexError, ValueError):
        return None


def constraint_dict(margins: dict[str, float]) -> dict[str, float]:
    """Optuna constraints from limit margins: positive values mean a limit is broken."""
    return {resource: -margin for resource, margin in margins.items()}


def check_storage(storage: str) -> None:
    """Connect to an Optuna storage URL (creating its tables if new), or raise ValueError
    with the reason in one line."""
    optuna = _optuna()
    try:
        optuna.storages.get_storage(storage)
    except Exception as exc:  # sqlalchemy and driver errors have no common base
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"cannot open study storage {storage!r}: {reason} (allowed: an Optuna storage URL "
            "such as sqlite:///study.db, postgresql://user:pw@host/db, mysql://user:pw@host/db)"
        ) from None


def space_key(table: ChoiceTable, levels: list[list[int]], extra: str = "") -> str:
    """A digest of what a trial's parameters mean (variables, choices in level order) and of
    ``extra`` (for example the data the fitness is measured on)."""
    payload = json.dumps(
        [table.variables, [[table.choices[i][c] for c in lv] for i, lv in enumerate(levels)], extra]
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def open_study(
    storage: str | None,
    name: str | None,
    *,
    directions: Sequence[str] = ("minimize",),
    sampler: Any = None,
    key: str | None = None,
) -> Any:
    """Create or load a study (``load_if_exists``); in memory without ``storage``.

    With ``key`` (see :func:`space_key`), a study made for another search space or other
    data is refused rather than mixed with this one."""
    optuna = _optuna()
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            directions=list(directions),
            sampler=sampler,
            load_if_exists=True,
        )
    except (ValueError, ImportError, RuntimeError) as exc:
        raise ValueError(f"cannot open study {name!r} in {storage!r}: {exc}") from None
    if len(study.directions) != len(directions):
        raise ValueError(
            f"study {name!r} has {len(study.directions)} objective(s), this search "
            f"{len(directions)}: use another study name"
        )
    if key is not None:
        stored = study.user_attrs.get(SPACE_ATTR)
        if stored is None:
            study.set_user_attr(SPACE_ATTR, key)
        elif stored != key:
            raise ValueError(
                f"study {name!r} was made for another model, option set, budget order or "
                "calibration data: use another study name"
            )
    return study


def record(
    study: Any,
    table: ChoiceTable,
    levels: list[list[int]],
    assignment: list[int],
    *,
    value: float | Sequence[float] | None,
    intermediate: dict[int, float],
    constraints: dict[str, float],
    engine: str,
    attrs: dict[str, Any] | None = None,
) -> None:
    """Add a finished evaluation: complete with ``value``, or pruned with only
    ``intermediate`` values (keyed by fidelity) when ``value`` is ``None``."""
    optuna = _optuna()
    state = (
        optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.PRUNED
    )
    values = None
    if value is not None:
        values = list(value) if isinstance(value, (list, tuple)) else [float(value)]
    user_attrs = {ENGINE_ATTR: engine, WORKER_ATTR: os.getpid(), **(attrs or {})}
    trial = optuna.trial.create_trial(
        state=state,
        values=values,
        params=to_params(assignment, table, levels),
        distributions=distributions(table, levels),
        user_attrs=user_attrs,
        intermediate_values={int(k): float(v) for k, v in intermediate.items()},
        constraints={k: float(v) for k, v in constraints.items()},
    )
    study.add_trial(trial)


def finished(
    study: Any, table: ChoiceTable, levels: list[list[int]]
) -> list[tuple[list[int], Any]]:
    """Assignments of the study's complete and pruned trials, with the trials."""
    optuna = _optuna()
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    out = []
    for trial in study.get_trials(deepcopy=False, states=states):
        assignment = from_params(trial.params, table, levels)
        if assignment is not None:
            out.append((assignment, trial))
    return out
