from __future__ import annotations

import pytest

from autotune.budget import Budget
from autotune.costs import layer_options
from autotune.errors import InfeasibleBudgetError
from autotune.layers import compressible_layers
from autotune.pipeline import prepare as prepare_stage
from autotune.storage_bounds import StorageBounds
from autotune.tuner import autotune
from methods.keep import KeepOption
from methods.registry import method_of
from profilers.measure import model_bytes
from tests.conftest import make_tiny_bert

SMALL = {"seq_len": 32, "calibration_windows": 8, "sensitivity_windows": 2, "heldout_windows": 4}


def _bounds(methods=("rtn",)):
    model = make_tiny_bert()
    layers = compressible_layers(model)
    return model, layers, StorageBounds.of(model, layers, layer_options(layers, methods, None))


def test_kept_bytes_are_the_models_and_smallest_is_the_cheapest_option_per_layer() -> None:
    model, layers, bounds = _bounds()
    assert bounds.kept_bytes == model_bytes(model)
    options = layer_options(layers, ("rtn",), None)
    saved = 0
    for ref in layers:
        kept = method_of(KeepOption()).cost(ref.shape, KeepOption()).bytes
        saved += kept - min(method_of(o).cost(ref.shape, o).bytes for o in options[ref.name])
    assert bounds.smallest_bytes == bounds.kept_bytes - saved
    assert 0 < bounds.smallest_bytes < bounds.kept_bytes
    assert bounds.smallest_bits < bounds.kept_bits


def test_a_budget_below_the_smallest_plan_is_refused_with_the_figure() -> None:
    _, _, bounds = _bounds()
    with pytest.raises(InfeasibleBudgetError, match=f"{bounds.smallest_bytes:,} bytes"):
        bounds.refuse_unreachable(Budget.parse(f"{bounds.smallest_bytes - 1}B"))
    bounds.refuse_unreachable(Budget.parse(f"{bounds.smallest_bytes}B"))
    with pytest.raises(InfeasibleBudgetError, match="bits per weight"):
        bounds.refuse_unreachable(Budget.parse("1bits"))


def test_met_as_is_only_for_storage_terms_the_model_meets() -> None:
    _, _, bounds = _bounds()
    assert bounds.met_as_is(Budget.parse(f"{bounds.kept_bytes}B"))
    assert not bounds.met_as_is(Budget.parse(f"{bounds.kept_bytes - 1}B"))
    assert bounds.met_as_is(Budget.parse("32bits"))
    assert not bounds.met_as_is(Budget.parse("31bits"))
    assert not bounds.met_as_is(Budget.parse(f"{bounds.kept_bytes}B,10000ms"))


def test_an_unreachable_budget_is_refused_before_any_calibration(monkeypatch, tokenizer) -> None:
    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration was built")

    monkeypatch.setattr(prepare_stage, "build_calibration", no_calibration)
    with pytest.raises(InfeasibleBudgetError, match="smallest plan"):
        autotune(make_tiny_bert(), "1KB", "cpu", tokenizer=tokenizer, progress=False, **SMALL)


@pytest.mark.parametrize("budget", ["100%", "100MB,100000ms"])
def test_a_budget_the_model_meets_keeps_every_layer_without_profiling(budget, tokenizer) -> None:
    model = make_tiny_bert()
    result = autotune(model, budget, "cpu", tokenizer=tokenizer, progress=False, **SMALL)
    methods = {entry["method"] for name, entry in result.plan.layers.items()}
    assert methods == {"none"}
    assert result.plan.search["uncompressed_meets_budget"] is True
    assert result.plan.search["sensitivity_evaluations"] == 0
    assert result.plan.search["engine"] == "allocator"
    assert result.plan.predicted["bytes"] == model_bytes(model)
    assert all(result.report.holds().values())


def test_a_budget_that_needs_compression_is_not_answered_as_is(tokenizer) -> None:
    model = make_tiny_bert()
    result = autotune(model, "60%", "cpu", tokenizer=tokenizer, progress=False, **SMALL)
    assert "uncompressed_meets_budget" not in result.plan.search
    assert result.plan.predicted["bytes"] < model_bytes(model)
