"""The sensitivity-estimator registry: every estimator scores every offered option."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from autotune.calibration import build_calibration
from autotune.costs import layer_options
from autotune.errors import AutotuneError
from autotune.estimators import ESTIMATORS, get_estimator
from autotune.layers import compressible_layers
from autotune.refinement import Reach
from profilers.execution.observe import collect_observers
from tests.conftest import make_tiny_bert


@pytest.fixture(scope="module")
def setting(tokenizer):
    model = make_tiny_bert()
    layers = compressible_layers(model)
    options = layer_options(layers, ("rtn",), ["int8-ch-sym", "int4-g32-sym", "keep"])
    calib = build_calibration(
        model,
        tokenizer,
        seq_len=32,
        calibration_windows=4,
        selection_windows=2,
        heldout_windows=2,
        sensitivity_windows=2,
    )
    observers = collect_observers(model, options, calib.calibration)
    return model, options, calib.sensitivity, observers


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_scores_every_option_and_leaves_the_model(name, setting) -> None:
    model, options, batches, observers = setting
    before = {k: v.clone() for k, v in model.state_dict().items()}
    estimator = get_estimator(name)
    assert estimator.description
    table = estimator.table(model, options, batches, observers=observers)
    assert set(table.errors) == set(options)
    for layer, offered in options.items():
        scores = table.errors[layer]
        assert {o.label for o in offered} <= set(scores)
        assert all(math.isfinite(v) and v >= 0 for v in scores.values())
        assert scores["keep"] == pytest.approx(0.0, abs=1e-9)
        assert scores["int4-g32-sym"] >= scores["int8-ch-sym"]  # coarser never scores less
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_an_unknown_estimator_is_refused_naming_the_registered_ones() -> None:
    with pytest.raises(AutotuneError, match="allowed: end-to-end, fisher, local"):
        get_estimator("bogus")


def test_hybrid_measures_the_front_end_to_end_and_scales_the_estimate_elsewhere(setting) -> None:
    from autotune.estimators import _front
    from profilers.proxies import fisher_table

    model, options, batches, observers = setting
    options = layer_options(
        compressible_layers(model), ("rtn",), None
    )  # the whole grid: many options per layer are dominated
    hybrid = get_estimator("hybrid").table(model, options, batches, observers=observers)
    exact = get_estimator("end-to-end").table(model, options, batches, observers=observers)
    estimate = fisher_table(model, options, batches, observers=observers)
    total = sum(len(o) for o in options.values())
    assert sum(hybrid.scored_by.values()) == total
    assert 0 < hybrid.scored_by["end-to-end"] < total
    for layer, offered in options.items():
        front = {o.label for o in _front(model, layer, offered, estimate)}
        for label in front:
            assert hybrid.errors[layer][label] == pytest.approx(exact.errors[layer][label])
        rest = [o.label for o in offered if o.label not in front]
        ratios = {hybrid.errors[layer][r] / estimate.errors[layer][r] for r in rest}
        assert len({round(r, 9) for r in ratios}) <= 1  # one scale per layer


def test_hybrid_fronts_and_scales_are_per_method(setting) -> None:
    """A weight-space estimate ranks GPTQ's formats among themselves, not against RTN's: each
    method keeps its own front and its own measured-to-estimated scale."""
    from autotune.estimators import _front
    from profilers.proxies import fisher_table

    model, _, batches, _ = setting
    options = layer_options(compressible_layers(model), ("rtn", "gptq"), None)
    observers = collect_observers(model, options, batches)
    estimate = fisher_table(model, options, batches, observers=observers)
    hybrid = get_estimator("hybrid").table(model, options, batches, observers=observers)
    for layer, offered in options.items():
        front = _front(model, layer, offered, estimate)
        for method in ("rtn", "gptq"):
            own = [o for o in offered if o.method == method]
            alone = {o.label for o in _front(model, layer, own, estimate)}
            assert {o.label for o in front if o.method == method} == alone
        measured = {o.label for o in front}
        for method in ("rtn", "gptq"):
            rest = [o.label for o in offered if o.method == method and o.label not in measured]
            ratios = {round(hybrid.errors[layer][r] / estimate.errors[layer][r], 9) for r in rest}
            assert len(ratios) <= 1
    assert any(o.method == "gptq" for opts in options.values() for o in opts)


def _lagrangian_choice(model, options, weight: float):
    """A stand-in for the allocator: per layer, the least error + weight x bytes."""
    from methods.base import LayerShape
    from methods.registry import method_of

    sizes = {
        name: {
            o.label: method_of(o).cost(LayerShape.of(model.get_submodule(name)), o).bytes
            for o in opts
        }
        for name, opts in options.items()
    }

    def decide(errors):
        return {
            name: min(row, key=lambda label: row[label] + weight * sizes[name][label])
            for name, row in errors.items()
        }

    return decide


def _refined_beside_exact(setting, *reaches: Reach | None):
    """A refined table for each of ``reaches`` (``None``: the default reach), the end-to-end
    table, the stand-in allocator and how many pairs there are."""
    model, _, batches, _ = setting
    options = layer_options(compressible_layers(model), ("rtn", "gptq"), None)
    observers = collect_observers(model, options, batches)
    exact = get_estimator("end-to-end").table(model, options, batches, observers=observers)
    scale = max(max(row.values()) for row in exact.errors.values())
    decide = _lagrangian_choice(model, options, weight=1e-6 * scale)
    tables = []
    for reach in reaches:
        estimator = get_estimator("refined")
        if reach is not None:
            estimator = copy.copy(estimator)
            estimator.reach = reach
        tables.append(estimator.table(model, options, batches, observers=observers, decide=decide))
    return tables, exact, decide, sum(len(o) for o in options.values())


def test_refined_measures_what_the_decision_rests_on(setting) -> None:
    (refined,), exact, decide, total = _refined_beside_exact(setting, None)
    assert sum(refined.scored_by.values()) == total
    assert 0 < refined.scored_by["end-to-end"] < total
    assert refined.rounds >= 2
    chosen = decide(refined.errors)
    assert len(set(chosen.values())) >= 3  # a mixed plan, not all kept or all cheapest
    for layer, label in chosen.items():  # the decision is made on measured errors
        assert refined.errors[layer][label] == pytest.approx(exact.errors[layer][label])


def test_refined_with_a_wider_reach_decides_as_every_pair_measured(setting) -> None:
    wide = Reach(steps=1, band=0.8, rounds=8)
    (refined, lean), exact, decide, total = _refined_beside_exact(setting, wide, None)
    assert lean.scored_by["end-to-end"] < refined.scored_by["end-to-end"] < total
    assert decide(refined.errors) == decide(exact.errors)


def test_refined_converts_calibrated_options_only_to_measure_them(setting, monkeypatch) -> None:
    from methods.gptq import GPTQ

    model, _, batches, _ = setting
    options = layer_options(compressible_layers(model), ("rtn", "gptq"), None)
    observers = collect_observers(model, options, batches)
    converted: set[tuple[int, str]] = set()
    original = GPTQ.convert_many

    def recording(self, module, group, observer_of):
        converted.update((id(module), o.label) for o in group)
        yield from original(self, module, group, observer_of)

    monkeypatch.setattr(GPTQ, "convert_many", recording)
    decide = _lagrangian_choice(model, options, weight=1e-9)
    refined = get_estimator("refined").table(
        model, options, batches, observers=observers, decide=decide
    )
    gptq_measured = {
        (id(model.get_submodule(layer)), label)
        for layer, row in refined.errors.items()
        for label in row
        if label.startswith("gptq")
    }
    offered = sum(o.method == "gptq" for opts in options.values() for o in opts)
    assert converted and len(converted) < offered
    measured_exactly = refined.scored_by["end-to-end"]
    assert len(converted) <= measured_exactly
    assert converted <= gptq_measured


def test_refined_without_a_decision_measures_what_hybrid_measures(setting) -> None:
    model, options, batches, observers = setting
    refined = get_estimator("refined").table(model, options, batches, observers=observers)
    hybrid = get_estimator("hybrid").table(model, options, batches, observers=observers)
    assert refined.errors.keys() == hybrid.errors.keys()
    for layer, row in refined.errors.items():
        assert row == pytest.approx(hybrid.errors[layer])
    assert refined.scored_by == hybrid.scored_by
