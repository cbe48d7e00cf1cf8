"""The search-engine registry: every engine conforms, and a new one is one registration."""

from __future__ import annotations

import numpy as np
import pytest

from autotune import engines
from autotune.engines import (
    SEARCH_ENGINES,
    SearchEngine,
    SearchRun,
    engine_choices,
    get_engine,
    register_engine,
)
from autotune.errors import AutotuneError
from autotune.searching import check_settings
from search import ChoiceTable, SearchResult, allocate
from search.fitness import Counter


def _table() -> ChoiceTable:
    """Four layers, three choices each: cheaper choices have higher errors."""
    scores = [np.array([0.0, 1.0 + i, 3.0 + i]) for i in range(4)]
    costs = {
        "bytes": [np.array([8.0, 4.0, 2.0]) for _ in range(4)],
        "seconds": [np.array([1.0, 0.8, 0.9]) for _ in range(4)],
    }
    choices = [["keep", "int8", "int4"] for _ in range(4)]
    return ChoiceTable(
        variables=[f"l{i}" for i in range(4)],
        choices=choices,
        scores=scores,
        costs=costs,
        fixed={"bytes": 0.0, "seconds": 0.0},
    )


class _Fitness:
    """Whole-plan error: the summed scores plus an interaction the allocator cannot see."""

    costs = (0.25, 1.0)

    def __init__(self, table: ChoiceTable) -> None:
        self.table = table
        self.calls = 0

    def __call__(self, assignment: list[int], fidelity: int) -> float:
        self.calls += 1
        base = sum(float(s[c]) for s, c in zip(self.table.scores, assignment, strict=True))
        return base + 0.5 * (assignment[0] == assignment[1] == 2)


@pytest.mark.parametrize("name", sorted(SEARCH_ENGINES))
def test_every_registered_engine_returns_a_plan_within_the_limits(name: str) -> None:
    table, limits = _table(), {"bytes": 16.0}
    allocation = allocate(table, limits)
    fitness = _Fitness(table)
    settings = SearchRun(0, 6.0, None, None, "study", "key", None)
    engine = get_engine(name)
    assert engine.provenance.startswith(engine.algorithm) and engine.description
    result = engine.run(table, limits, fitness, allocation, settings)
    if not engine.searches:
        assert result is None and fitness.calls == 0
        return
    assert isinstance(result, SearchResult)
    assert table.fits(result.assignment, limits)
    assert result.error <= fitness(allocation.assignment, -1) + 1e-12
    assert result.evaluations.full_equivalent <= 6.0 + 1.0


class _Toy(SearchEngine):
    name = "toy"
    algorithm = "milp-allocator -> toy"
    description = "keeps the allocator's plan after one evaluation"

    def run(self, table, limits, fitness, allocation, settings) -> SearchResult:
        counter = Counter(fitness.costs)
        counter.add(len(fitness.costs) - 1)
        error = fitness(allocation.assignment, -1)
        return SearchResult(allocation.assignment, error, counter, 0.0, stopped="toy")


@pytest.fixture
def toy_engine():
    register_engine(_Toy())
    yield
    SEARCH_ENGINES.pop("toy")


def test_a_registered_engine_is_offered_checked_and_recorded(toy_engine, tokenizer) -> None:
    from autotune.tuner import autotune
    from tests.conftest import make_tiny_bert

    assert "toy" in engine_choices()
    check_settings("toy", None, None, None)
    result = autotune(
        make_tiny_bert(),
        "60%",
        "cpu",
        tokenizer=tokenizer,
        progress=False,
        search="toy",
        seq_len=32,
        calibration_windows=8,
        sensitivity_windows=2,
        heldout_windows=4,
    )
    assert result.plan.search["engine"] == "toy"
    assert result.plan.search["algorithm"].startswith("milp-allocator -> toy")
    assert result.plan.search["engine_run"]["stopped"] == "toy"


def test_an_unknown_engine_is_refused_naming_the_registered_ones() -> None:
    with pytest.raises(AutotuneError, match="allowed: auto, allocator, evolution"):
        check_settings("bogus", None, None, None)


def test_auto_cannot_be_registered() -> None:
    class Auto(_Toy):
        name = engines.AUTO

    with pytest.raises(ValueError, match="reserved"):
        register_engine(Auto())


def test_the_command_line_offers_a_registered_engine_without_other_edits(
    toy_engine, tiny_bert_dir, tmp_path, capsys
) -> None:
    import json

    from autotune.cli import main

    out = tmp_path / "plan.json"
    argv = ["tune", str(tiny_bert_dir), "--budget", "35%", "--target", "cpu", "--quiet"]
    assert main([*argv, "--search", "toy", "--no-measure", "-o", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["search"]["engine"] == "toy"
    assert plan["search"]["engine_run"]["stopped"] == "toy"
