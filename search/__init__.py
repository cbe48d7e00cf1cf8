"""Optimisation over per-variable choices under resource limits (knows nothing of models)."""

from search.allocator import Allocation, InfeasibleError, allocate
from search.space import ChoiceTable

__all__ = ["Allocation", "ChoiceTable", "InfeasibleError", "allocate"]
