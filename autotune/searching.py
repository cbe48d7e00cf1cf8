"""Run the chosen search engine (:mod:`autotune.engines`) from the allocator's plan, with a
progress bar and an optional Optuna study (resume and cooperation through ``storage``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from autotune.engines import AUTO, LEVEL_RESOURCE, SearchRun, get_engine
from autotune.errors import AutotuneError
from autotune.fitness import PlanFitness
from search import Allocation, ChoiceTable, SearchResult
from search.evolution import Judge
from search.study import check_storage, space_key

DEFAULT_MAX_EVALS = 100.0
AUTO_MAX_WEIGHTS = 1_000_000_000  # above this, a whole-model evaluation costs too much


@dataclass
class SearchOutcome:
    engine: str
    assignment: list[int] | None  # the engine's best plan; None for the allocator alone
    result: SearchResult | None = None
    study: dict[str, Any] = field(default_factory=dict)


def check_settings(
    search: str, max_evals: float | None, timeout: float | None, storage: str | None
) -> None:
    """Refuse bad search settings before any work, in one line each."""
    if search != AUTO:
        get_engine(search)
    if max_evals is not None and not max_evals > 0:
        raise AutotuneError(f"max_evals must be a positive number, got {max_evals}")
    if timeout is not None and not timeout > 0:
        raise AutotuneError(f"timeout must be a positive number of seconds, got {timeout}")
    if storage is not None:
        try:
            check_storage(storage)
        except ValueError as exc:
            raise AutotuneError(str(exc)) from None


def choose_engine(
    search: str,
    table: ChoiceTable,
    allocation: Allocation,
    weights: int,
    in_memory: bool = True,
) -> str:
    """``auto``: evolution from the allocator's plan, unless there is nothing to gain (one
    layer, or the allocator's plan loses nothing) or whole plans cost too much to evaluate
    often (over a billion weights, or a model streamed from disk, where each evaluation
    reads every block): then the allocator alone."""
    if search != AUTO:
        return search
    costly = weights > AUTO_MAX_WEIGHTS or not in_memory
    if len(table.variables) < 2 or allocation.score <= 0 or costly:
        return "allocator"
    return "evolution"


def _bar(enabled: bool, total: float, limits: dict[str, float]):
    bar = tqdm(
        total=round(total, 2),
        desc="search",
        unit="eval",
        disable=None if enabled else True,
        leave=False,
        file=sys.stderr,
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.0f} full evals [{elapsed}<{remaining}{postfix}]",
    )
    primary = next(iter(limits))

    def update(counter, best: float, margins: dict[str, float]) -> None:
        bar.n = min(round(counter.full_equivalent, 2), bar.total)
        margin = margins[primary] / limits[primary] if limits[primary] else 0.0
        bar.set_postfix_str(f"best {best:.4g}, {primary} margin {100 * margin:.2f}%")

    return bar, update


def run_search(
    engine: str,
    table: ChoiceTable,
    limits: dict[str, float],
    fitness: PlanFitness,
    allocation: Allocation,
    *,
    seed: int,
    max_evals: float | None,
    timeout: float | None,
    storage: str | None,
    study_name: str | None,
    data_key: str,
    progress: bool,
    judge: Judge | None = None,
) -> SearchOutcome:
    """Search from the allocator's plan; every evaluation is recorded in the study when
    ``storage`` is given (``study_name`` defaults to one derived from the search space and
    ``data_key``, so the same tune resumes the same study). ``judge``, if given, says when
    the search stalls."""
    chosen = get_engine(engine)
    if not chosen.searches:
        return SearchOutcome(engine, None)
    budget = DEFAULT_MAX_EVALS if max_evals is None else float(max_evals)
    levels = table.levels(LEVEL_RESOURCE)
    key = space_key(table, levels, data_key)
    name = study_name or f"autotune-{key}"
    info: dict[str, Any] = {}
    if storage is not None:
        info = {"storage": _redact(storage), "name": name}
    bar, update = _bar(progress, budget, limits)
    settings = SearchRun(seed, budget, timeout, storage, name, key, update, judge)
    try:
        result = chosen.run(table, limits, fitness, allocation, settings)
    except ValueError as exc:
        raise AutotuneError(str(exc)) from None
    finally:
        bar.close()
    if result is None:
        return SearchOutcome(engine, None)
    if storage is not None:
        info["trials_before"] = result.resumed
        info["trials_from_other_processes"] = result.shared
    return SearchOutcome(engine, result.assignment, result, info)


def _redact(url: str) -> str:
    """A storage URL without its password, for the plan."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
