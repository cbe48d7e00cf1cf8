"""The allocator's view of a cost model: limits, feasibility, uniform plans."""

from __future__ import annotations

import pytest

from autotune.allocation import (
    TIMING_SPREAD,
    allocate_plan,
    assignment_options,
    check_feasible,
    fitting_uniforms,
    least_reachable,
    limits_for,
    within_timing_spread,
)
from autotune.budget import Budget
from autotune.costs import build_costs, layer_options
from autotune.errors import InfeasibleBudgetError
from autotune.layers import compressible_layers
from autotune.targets import get_target
from tests.conftest import make_tiny_bert


@pytest.fixture(scope="module")
def costs():
    import torch

    model = make_tiny_bert()
    layers = compressible_layers(model)
    options = layer_options(layers, ["rtn"], ["int8-ch-sym", "int4-g32-asym"])
    inputs = {"input_ids": torch.randint(1000, 2000, (1, 16))}
    return build_costs(model, layers, options, get_target("cpu"), inputs)


def test_limits_take_the_budget_and_a_latency_margin(costs) -> None:
    budget = Budget.parse("30%,20ms,decode=4ms,5bits")
    limits = limits_for(budget, costs)
    assert limits["bytes"] == int(0.3 * costs.original_bytes)
    assert limits["bits"] == 5 * costs.total_weights
    assert limits["seconds"] == pytest.approx(0.020) and limits["decode_seconds"] == 0.004
    tighter = limits_for(budget, costs, latency_margin=0.05)
    assert tighter["seconds"] == pytest.approx(0.019)
    assert tighter["decode_seconds"] == pytest.approx(0.0038)
    assert tighter["bytes"] == limits["bytes"]


def test_a_relative_latency_limit_is_taken_against_the_originals_predicted_latency(
    costs,
) -> None:
    original = costs.original_totals()["latency_ms"]
    assert original == pytest.approx(
        1e3
        * (
            costs.fixed_seconds
            + sum(
                costs.seconds[n][[o.label for o in opts].index("keep")]
                for n, opts in costs.options.items()
            )
        )
    )
    limits = limits_for(Budget.parse("0.8x"), costs, latency_margin=0.05)
    assert limits["seconds"] == pytest.approx(0.95 * 0.8 * original / 1e3)
    tighter = limits_for(Budget.parse(f"0.8x,{0.5 * original}ms"), costs)
    assert tighter["seconds"] == pytest.approx(0.5 * original / 1e3)
    budget = Budget.parse("0.001x")
    with pytest.raises(InfeasibleBudgetError, match=r"0.001x the original's predicted latency"):
        check_feasible(budget, costs, limits_for(budget, costs))


def test_an_unreachable_limit_is_refused_naming_the_least_reachable(costs) -> None:
    check_feasible(Budget.parse("50%"), costs, limits_for(Budget.parse("50%"), costs))
    budget = Budget.parse("1ms")
    with pytest.raises(InfeasibleBudgetError, match=r"less a margin for timing noise"):
        check_feasible(budget, costs, limits_for(budget, costs, latency_margin=0.5))


def test_the_allocation_and_the_uniform_plans_that_fit(costs) -> None:
    budget = Budget.parse("30%")
    limits = limits_for(budget, costs)
    errors = {
        name: {
            o.label: {"keep": 0.0, "int8-ch-sym": 1.0, "int4-g32-asym": 3.0}[o.label] for o in opts
        }
        for name, opts in costs.options.items()
    }
    table, allocation = allocate_plan(budget, costs, limits, errors)
    plan = assignment_options(costs, table, allocation.assignment)
    assert set(plan) == set(costs.options)
    assert (
        costs.totals({n: costs.options[n].index(o) for n, o in plan.items()})["bytes"]
        <= (limits["bytes"])
    )
    uniforms = fitting_uniforms(costs, table, limits)
    assert "uniform keep" not in uniforms
    for options in uniforms.values():
        assert len({o.label for o in options.values()}) == 1
        total = costs.totals({n: costs.options[n].index(o) for n, o in options.items()})
        assert total["bytes"] <= limits["bytes"]


def test_kept_uniform_plans_are_those_with_the_least_summed_error(costs) -> None:
    budget = Budget.parse("60%")
    limits = limits_for(budget, costs)
    for best, worst in (("int8-ch-sym", "int4-g32-asym"), ("int4-g32-asym", "int8-ch-sym")):
        rank = {"keep": 0.0, best: 1.0, worst: 3.0}
        errors = {
            name: {o.label: rank[o.label] for o in opts} for name, opts in costs.options.items()
        }
        table, _ = allocate_plan(budget, costs, limits, errors)
        every = fitting_uniforms(costs, table, limits)
        assert set(every) == {f"uniform {best}", f"uniform {worst}"}
        kept = fitting_uniforms(costs, table, limits, keep=1)
        assert kept == {f"uniform {best}": every[f"uniform {best}"]}


def _without(costs, layers: set[str], label: str):
    """``costs`` with ``label`` not offered to ``layers``."""
    return costs.offering(lambda name, option: not (name in layers and option.label == label))


RANKS = {"keep": 0.0, "int8-ch-sym": 1.0, "int4-g32-asym": 3.0}


@pytest.mark.parametrize("room", ["float", "int8"])
def test_a_label_most_layers_take_is_a_uniform_plan_with_the_others_allocated(
    costs, room: str
) -> None:
    names = list(costs.options)
    lacking = {n for n in names if n.startswith("encoder.layer.0.attention")}
    partial = _without(costs, lacking, "int4-g32-asym")
    # room for the others in float, or just enough for them in int8
    other = "keep" if room == "float" else "int8-ch-sym"
    least = {
        n: [o.label for o in opts].index(other if n in lacking else "int4-g32-asym")
        for n, opts in partial.options.items()
    }
    budget = Budget.parse(f"{partial.totals(least)['bytes']:.0f}B")
    limits = limits_for(budget, partial)
    errors = {n: {o.label: RANKS[o.label] for o in opts} for n, opts in partial.options.items()}
    table, _ = allocate_plan(budget, partial, limits, errors)
    name = f"uniform int4-g32-asym on {len(names) - len(lacking)} of {len(names)} layers"
    uniforms = fitting_uniforms(partial, table, limits)
    assert name in uniforms
    options = uniforms[name]
    assert all(options[n].label == "int4-g32-asym" for n in names if n not in lacking)
    # the others take the least error that fits: float where it fits, else int8
    assert {options[n].label for n in lacking} == {other}
    totals = partial.totals({n: partial.options[n].index(o) for n, o in options.items()})
    assert totals["bytes"] <= limits["bytes"]


def test_a_label_fewer_than_half_the_layers_take_is_no_uniform_plan(costs) -> None:
    names = list(costs.options)
    partial = _without(costs, set(names[: len(names) // 2 + 1]), "int4-g32-asym")
    limits = limits_for(Budget.parse("60%"), partial)
    errors = {n: {o.label: RANKS[o.label] for o in opts} for n, opts in partial.options.items()}
    table, _ = allocate_plan(Budget.parse("60%"), partial, limits, errors)
    assert not any("int4" in name for name in fitting_uniforms(partial, table, limits))
    assert "uniform int8-ch-sym" in fitting_uniforms(partial, table, limits)


def test_a_calibrated_label_most_layers_take_is_no_uniform_plan() -> None:
    import torch

    model = make_tiny_bert()
    layers = compressible_layers(model)
    labels = ["int8-ch-sym", "int4-g32-asym", "gptq4-g32-asym-ao"]
    options = layer_options(layers, ["rtn", "gptq"], labels)
    inputs = {"input_ids": torch.randint(1000, 2000, (1, 16))}
    costs = build_costs(model, layers, options, get_target("cpu"), inputs)
    offered = [{o.label for o in opts} for opts in costs.options.values()]
    assert not all("gptq4-g32-asym-ao" in labels for labels in offered)
    rank = {"keep": 0.0, "int8-ch-sym": 1.0, "gptq4-g32-asym-ao": 2.0, "int4-g32-asym": 3.0}
    errors = {n: {o.label: rank[o.label] for o in opts} for n, opts in costs.options.items()}
    budget = Budget.parse("60%")
    limits = limits_for(budget, costs)
    table, _ = allocate_plan(budget, costs, limits, errors)
    names = set(fitting_uniforms(costs, table, limits))
    assert not any("gptq" in name for name in names)
    assert {"uniform int8-ch-sym", "uniform int4-g32-asym"} <= names


def test_a_latency_limit_within_the_timing_spread_is_raised_to_the_margin_over_the_fastest_plan(
    costs,
) -> None:
    budget = Budget.parse("50%")
    bytes_limit = limits_for(budget, costs)["bytes"]
    fastest = least_reachable(costs, {}, "seconds")
    fastest_within = least_reachable(costs, {"bytes": bytes_limit}, "seconds")
    assert fastest_within is not None and fastest_within > fastest  # float layers do not fit
    margin = 0.05
    for limit in (0.99 * fastest_within, fastest_within / (1 + TIMING_SPREAD) * 1.01):
        limits = {"bytes": bytes_limit, "seconds": limit * (1 - margin)}
        raised, which = within_timing_spread(budget, costs, limits, margin)
        assert which == ["seconds"] and raised["bytes"] == bytes_limit
        assert raised["seconds"] == pytest.approx(fastest_within * (1 + margin), rel=1e-5)
    # with no margin, a hair over the fastest
    limits = {"bytes": bytes_limit, "seconds": 0.99 * fastest_within}
    raised, _ = within_timing_spread(budget, costs, limits, 0.0)
    assert fastest_within < raised["seconds"] == pytest.approx(fastest_within, rel=1e-5)
    reachable = {"bytes": bytes_limit, "seconds": 2 * fastest_within}
    assert within_timing_spread(budget, costs, reachable, margin) == (reachable, [])


def test_a_latency_limit_beyond_the_timing_spread_is_refused(costs) -> None:
    budget = Budget.parse("1ms")
    fastest = least_reachable(costs, {}, "seconds")
    limits = {"seconds": 0.95 * fastest / (1 + TIMING_SPREAD) * 0.99}
    with pytest.raises(InfeasibleBudgetError):
        within_timing_spread(budget, costs, limits, 0.05)


def test_the_fastest_plan_within_limits_no_plan_meets_is_none(costs) -> None:
    assert least_reachable(costs, {"bytes": 0.01 * costs.original_bytes}, "seconds") is None
    assert least_reachable(costs, {}, "decode_seconds") is None  # not priced
