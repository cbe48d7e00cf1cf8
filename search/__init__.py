"""Optimisation over per-variable choices under resource limits (knows nothing of models).

Engines: the exact allocator (:func:`allocate`), EvoPress-style evolution (:func:`evolve`)
and Optuna samplers (:func:`optuna_search`); all evaluations can be recorded in one Optuna
study (:mod:`search.study`).
"""

from search.allocator import Allocation, InfeasibleError, allocate
from search.evolution import SearchResult, evolve
from search.fitness import Counter, Fitness
from search.optuna_engine import optuna_search
from search.space import ChoiceTable

__all__ = [
    "Allocation",
    "ChoiceTable",
    "Counter",
    "Fitness",
    "InfeasibleError",
    "SearchResult",
    "allocate",
    "evolve",
    "optuna_search",
]
