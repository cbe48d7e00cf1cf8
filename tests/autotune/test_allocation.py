"""The allocator's view of a cost model: limits, feasibility, uniform plans."""

from __future__ import annotations

import pytest

from autotune.allocation import (
    allocate_plan,
    assignment_options,
    check_feasible,
    fitting_uniforms,
    limits_for,
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
