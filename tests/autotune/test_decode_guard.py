"""A memory budget's decode step held to the runtime's reference (autotune.decode_guard)."""

from __future__ import annotations

import math

import pytest

from autotune.costs import CostModel
from autotune.decode_guard import checked_slack, decode_guard, guard_rule
from autotune.errors import AutotuneError
from autotune.layers import LayerRef
from autotune.runtimes import get_runtime
from methods.base import LayerShape
from methods.gguf import GGUFOption
from methods.keep import KeepOption

LABELS = ("slow", "fast", "big")


def cost_model() -> CostModel:
    """Two layers, each with a slow small type, a fast one of the same bytes and a big
    one; decode seconds per option."""
    shape = LayerShape("linear", 256, 256)
    layers = [LayerRef("a", shape), LayerRef("b", shape)]
    options = {r.name: [GGUFOption(t) for t in ("IQ3_S", "Q3_K", "Q8_0")] for r in layers}
    return CostModel(
        layers=layers,
        options=options,
        bytes={"a": [100, 100, 300], "b": [100, 100, 300]},
        weight_bits={"a": [800, 800, 2400], "b": [800, 800, 2400]},
        seconds={"a": [1.0, 1.0, 1.0], "b": [1.0, 1.0, 1.0]},
        fixed_bytes=10,
        fixed_weight_bits=0,
        fixed_seconds=0.0,
        total_weights=2 * 256 * 256,
        original_bytes=1000,
        tokens=1,
        decode_seconds={"a": [4.0, 1.0, 2.0], "b": [4.0, 1.0, 2.0]},
        fixed_decode_seconds=0.5,
    )


def labels_of(costs: CostModel, index: int) -> dict[str, str]:
    return {name: options[index].label for name, options in costs.options.items()}


REFERENCES = {"all slow": 0, "all fast": 1, "all big": 2}


def references(costs: CostModel) -> dict[str, dict[str, str]]:
    return {name: labels_of(costs, index) for name, index in REFERENCES.items()}


@pytest.mark.parametrize(
    ("value", "slack"),
    [(None, None), ("runtime", "runtime"), ("off", None), (0.1, 0.1), ("0", 0.0)],
)
def test_a_slack_is_a_fraction_off_or_the_runtimes(value, slack) -> None:
    assert checked_slack(value) == slack


@pytest.mark.parametrize("value", [-0.1, "fast", math.nan, math.inf, True])
def test_another_slack_is_refused_in_one_line(value) -> None:
    with pytest.raises(AutotuneError) as caught:
        checked_slack(value)
    assert "\n" not in str(caught.value) and "'off'" in str(caught.value)


def test_the_rule_takes_the_largest_reference_that_fits_the_bytes_and_the_faster_of_equals() -> (
    None
):
    costs = cost_model()
    rule = guard_rule(costs, {"bytes": 610.0}, references(costs), 0.05)
    assert rule is not None and rule.reference == "all big"
    assert rule.reference_bytes == 610 and rule.reference_s == pytest.approx(4.5)
    rule = guard_rule(costs, {"bytes": 609.0}, references(costs), 0.05)
    assert rule is not None and rule.reference == "all fast"  # as large as "all slow"
    assert rule.reference_s == pytest.approx(2.5)
    # a latency limit does not choose the reference
    rule = guard_rule(costs, {"bytes": 609.0, "decode_seconds": 0.1}, references(costs), 0.05)
    assert rule is not None and rule.reference == "all fast"


def test_no_rule_without_a_fitting_reference_or_decode_prices() -> None:
    costs = cost_model()
    assert guard_rule(costs, {"bytes": 200.0}, references(costs), 0.05) is None
    assert guard_rule(costs, {"bytes": 1000.0}, {}, 0.05) is None
    costs.decode_seconds = None
    assert guard_rule(costs, {"bytes": 1000.0}, references(costs), 0.05) is None


def test_the_limit_is_the_slack_over_the_fastest_plan_as_good_as_the_reference() -> None:
    costs = cost_model()
    rule = guard_rule(costs, {"bytes": 210.0}, {"all slow": labels_of(costs, 0)}, 0.1)
    assert rule is not None and rule.reference_s == pytest.approx(8.5)
    # the fast type is as good as the slow one on layer b only
    errors = {"a": {"gguf-iq3_s": 1.0, "gguf-q3_k": 2.0, "gguf-q8_0": 0.1}}
    errors["b"] = {"gguf-iq3_s": 1.0, "gguf-q3_k": 1.0, "gguf-q8_0": 0.1}
    guard = decode_guard(rule, costs, {"bytes": 210.0}, errors)
    assert guard.reference_error == pytest.approx(2.0)
    assert guard.fastest_s == pytest.approx(0.5 + 4.0 + 1.0)  # a slow, b fast
    assert guard.limit_s == pytest.approx(1.1 * 5.5)
    assert guard.to_dict()["limit_ms"] == pytest.approx(1e3 * 1.1 * 5.5)
    # equal errors: both layers fast; the bytes of the big type stay out of reach
    errors["a"]["gguf-q3_k"] = 1.0
    assert decode_guard(rule, costs, {"bytes": 210.0}, errors).fastest_s == pytest.approx(2.5)
    # more bytes: the big type (better and faster than slow) joins
    rule = guard_rule(costs, {"bytes": 420.0}, {"all slow": labels_of(costs, 0)}, 0.1)
    errors["a"]["gguf-q3_k"] = 2.0
    assert decode_guard(rule, costs, {"bytes": 420.0}, errors).fastest_s == pytest.approx(3.5)


def test_llama_cpps_references_are_its_pure_files_with_its_fallbacks() -> None:
    offered = [GGUFOption(t) for t in ("Q8_0", "Q6_K", "Q5_0", "Q4_K", "Q4_0", "Q3_K")]
    narrow = [o for o in offered if not o.type.endswith("_K")] + [KeepOption()]
    plans = get_runtime("llama.cpp").reference_plans({"wide": offered, "narrow": narrow})
    assert plans["llama-quantize --pure Q4_K"] == {"wide": "gguf-q4_k", "narrow": "gguf-q5_0"}
    assert plans["llama-quantize --pure Q6_K"] == {"wide": "gguf-q6_k", "narrow": "gguf-q8_0"}
    assert plans["llama-quantize --pure Q3_K"] == {"wide": "gguf-q3_k", "narrow": "gguf-q4_0"}
    # a type a layer is not offered falls back as llama.cpp's rows do (Q2_K to Q4_0); F16
    # is not offered, nor Q5_K's fallback Q5_1: no such file
    assert plans["llama-quantize --pure Q2_K"] == {"wide": "gguf-q4_0", "narrow": "gguf-q4_0"}
    pure = {f"llama-quantize --pure {t}" for t in ("Q8_0", "Q6_K", "Q4_K", "Q3_K", "Q2_K")}
    assert set(plans) == pure
    assert get_runtime("torch").reference_plans({"wide": offered}) == {}


def tune_small_llama(tokenizer, budget: str = "2200000B", **settings):
    from tests.autotune.export.test_gguf import tune_for_llama_cpp

    return tune_for_llama_cpp(budget, tokenizer, measure=False, **settings)


def test_a_memory_tune_for_llama_cpp_is_searched_within_its_decode_guard(bpe_tokenizer) -> None:
    plan = tune_small_llama(bpe_tokenizer).plan
    guard = plan.search["decode_guard"]
    assert guard["reference"].startswith("llama-quantize --pure ")
    assert guard["reference_bytes"] <= 2_200_000
    assert guard["fastest_as_good_ms"] <= guard["reference_ms"] * (1 + 1e-9)
    assert guard["limit_ms"] == pytest.approx(1.05 * guard["fastest_as_good_ms"], rel=1e-5)
    assert plan.predicted["decode_ms"] <= guard["limit_ms"] * (1 + 1e-6)
    free = tune_small_llama(bpe_tokenizer, decode_slack="off").plan
    assert "decode_guard" not in free.search
    # a slack of the caller's own
    bounded = tune_small_llama(bpe_tokenizer, decode_slack=0.2)
    assert bounded.plan.search["decode_guard"]["slack"] == 0.2
    # a budget with a decode limit of its own is held to that alone
    bounded = tune_small_llama(bpe_tokenizer, "2200000B,decode=100ms")
    assert "decode_guard" not in bounded.plan.search
