"""Fixtures of the search tests: the synthetic problem with the allocator's plan."""

from __future__ import annotations

import pytest

from search import allocate
from tests.search.synthetic import bits_limit, make_problem


@pytest.fixture
def problem():
    """(table, weights, limits at 3 bits per weight, the allocator's plan)."""
    table, weights = make_problem()
    limits = bits_limit(table, 3.0)
    start = allocate(table, limits).assignment
    return table, weights, limits, start
