"""Search engines: what improves on the allocator's plan with whole-model evaluations.

Each engine is a :class:`SearchEngine` with a name (``--search NAME``), a line of plan
provenance and a ``run`` method; :func:`register_engine` adds one, and the command line,
the plan and the settings check read the registry. ``auto`` is not an engine: it picks one
(see :func:`autotune.searching.choose_engine`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from autotune.errors import AutotuneError
from autotune.fitness import PlanFitness
from search import Allocation, ChoiceTable, SearchResult, evolve, optuna_search
from search.evolution import Judge, Stall
from search.study import open_study

AUTO = "auto"
FINAL_CHOICE = " + selection split vs searched and uniform plans"
LEVEL_RESOURCE = "bytes"  # levels are ordered by stored bytes whatever the budget


@dataclass(frozen=True)
class SearchRun:
    """What every engine is given besides the table, limits, fitness and start."""

    seed: int
    max_evals: float
    timeout: float | None
    storage: str | None
    study_name: str
    key: str
    progress: Any  # progress(counter, best, margins) or None
    judge: Judge | None = None  # data besides the search's own that says when it stalls


class SearchEngine(ABC):
    """One engine: improves ``allocation.assignment`` within ``limits``."""

    name: ClassVar[str]
    algorithm: ClassVar[str]  # plan provenance, before the final choice
    description: ClassVar[str] = ""
    searches: ClassVar[bool] = True  # False: the allocator's plan is the answer

    @property
    def provenance(self) -> str:
        return self.algorithm + FINAL_CHOICE

    @abstractmethod
    def run(
        self,
        table: ChoiceTable,
        limits: dict[str, float],
        fitness: PlanFitness,
        allocation: Allocation,
        settings: SearchRun,
    ) -> SearchResult | None:
        """The best plan found (``None``: the allocator's plan stands)."""


SEARCH_ENGINES: dict[str, SearchEngine] = {}


def register_engine(engine: SearchEngine) -> SearchEngine:
    """Add ``engine`` to the registry (``--search``, plans and checks read it)."""
    if engine.name == AUTO:
        raise ValueError(f"{AUTO!r} is reserved: it picks an engine")
    SEARCH_ENGINES[engine.name] = engine
    return engine


def get_engine(name: str) -> SearchEngine:
    if name not in SEARCH_ENGINES:
        raise AutotuneError(f"unknown search {name!r}; allowed: {', '.join(engine_choices())}")
    return SEARCH_ENGINES[name]


def engine_choices() -> list[str]:
    """What ``--search`` accepts: ``auto`` and every registered engine."""
    return [AUTO, *SEARCH_ENGINES]


class AllocatorOnly(SearchEngine):
    name = "allocator"
    algorithm = "milp-allocator"
    description = "the exact allocator's plan on the summed layer errors, no further search"
    searches = False

    def run(self, table, limits, fitness, allocation, settings) -> SearchResult | None:
        return None


# 16 offspring screened on the profiling windows, the best one evaluated in full: on the
# demo at 3 bits this beat keeping 4 (or 2 of 8 or 32) for the same number of evaluations;
# the evaluation budget is a ceiling: the search stops earlier once its best error stalls
# on the selection split (its own calibration error keeps falling as it fits that data)
EVOLUTION = {"offspring": 16, "survivors": [1], "stall": Stall()}


class Evolution(SearchEngine):
    name = "evolution"
    algorithm = "milp-allocator -> evolution (EvoPress-style)"
    description = "EvoPress-style evolution from the allocator's plan, screened cheaply first"

    def run(self, table, limits, fitness, allocation, settings) -> SearchResult | None:
        study = None
        if settings.storage is not None:
            study = open_study(settings.storage, settings.study_name, key=settings.key)
        return evolve(
            table,
            limits,
            fitness,
            allocation.assignment,
            seed=settings.seed,
            max_evals=settings.max_evals,
            timeout=settings.timeout,
            study=study,
            order_by=LEVEL_RESOURCE,
            progress=settings.progress,
            judge=settings.judge,
            **EVOLUTION,
        )


class OptunaEngine(SearchEngine):
    """An Optuna sampler warm-started from the allocator's plan, at full fidelity."""

    objectives: ClassVar[tuple[str, ...]] = ("error",)

    def run(self, table, limits, fitness, allocation, settings) -> SearchResult | None:
        return optuna_search(
            table,
            limits,
            _FullFidelity(fitness),
            sampler=self.name,
            objectives=self.objectives,
            warm_start=[allocation.assignment],
            seed=settings.seed,
            max_evals=settings.max_evals,
            timeout=settings.timeout,
            storage=settings.storage,
            study_name=settings.study_name if settings.storage is not None else None,
            key=settings.key,
            order_by=LEVEL_RESOURCE,
            progress=settings.progress,
        )


class TPE(OptunaEngine):
    name = "tpe"
    algorithm = "milp-allocator -> optuna TPE"
    description = "Optuna's TPE sampler from the allocator's plan"


class NSGA2(OptunaEngine):
    name = "nsga2"
    algorithm = "milp-allocator -> optuna NSGA-II (error x bytes x latency)"
    description = "Optuna's NSGA-II: a Pareto front of error, bytes and latency, kept in the plan"
    objectives = ("error", "bytes", "seconds")


class _FullFidelity:
    """Optuna engines evaluate at the full fidelity only."""

    def __init__(self, fitness: PlanFitness) -> None:
        self.fitness = fitness
        self.costs = [1.0]

    def __call__(self, assignment: list[int], fidelity: int) -> float:
        return self.fitness(assignment, -1)


for _engine in (AllocatorOnly(), Evolution(), TPE(), NSGA2()):
    register_engine(_engine)
