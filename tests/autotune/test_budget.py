from __future__ import annotations

import pytest

from autotune.budget import Budget
from autotune.errors import BudgetError


@pytest.mark.parametrize(
    ("text", "field", "value"),
    [
        ("15MB", "memory_bytes", 15_000_000),
        ("8GB", "memory_bytes", 8_000_000_000),
        ("8GiB", "memory_bytes", 8 * 2**30),
        ("512KiB", "memory_bytes", 512 * 1024),
        ("123B", "memory_bytes", 123),
        ("1.5MB", "memory_bytes", 1_500_000),
        ("4.5bits", "avg_bits", 4.5),
        ("25%", "size_ratio", 0.25),
        ("20ms", "latency_ms", 20.0),
        ("1.5s", "latency_ms", 1500.0),
        ("800us", "latency_ms", 0.8),
        ("prefill=20ms", "latency_ms", 20.0),
        ("decode=5ms", "decode_ms", 5.0),
        ("Decode = 250us", "decode_ms", 0.25),
    ],
)
def test_single_terms(text: str, field: str, value: float) -> None:
    budget = Budget.parse(text)
    assert getattr(budget, field) == value
    others = {"memory_bytes", "avg_bits", "size_ratio", "latency_ms", "decode_ms"} - {field}
    assert all(getattr(budget, name) is None for name in others)


def test_combination_and_whitespace() -> None:
    budget = Budget.parse(" 8GB , 20ms ")
    assert budget.memory_bytes == 8_000_000_000
    assert budget.latency_ms == 20.0


@pytest.mark.parametrize(
    "text",
    ["15MB", "8GiB", "1.000001GB", "4.5bits,25%", "8GB,20ms", "999B", "4GB,20ms,decode=2.5ms"],
)
def test_spec_round_trips_exactly(text: str) -> None:
    budget = Budget.parse(text)
    assert Budget.parse(budget.spec) == budget


@pytest.mark.parametrize(
    "spec",
    [
        {"memory": "15MB"},
        {"memory_bytes": 15_000_000, "latency": 20},
        {"spec": "15MB", "batch_size": 4, "seq_len": 32},
        {"bits": 4, "ratio": "30%"},
        {"memory": "1GB", "decode": "4ms", "context": 512},
        {"prefill": 30, "decode_ms": 2.5},
    ],
)
def test_dict_forms(spec: dict) -> None:
    budget = Budget.parse(spec)
    assert Budget.from_dict(budget.to_dict()) == budget


def test_keywords_set_shape() -> None:
    budget = Budget.parse("20ms", batch_size=2, seq_len=16)
    assert (budget.batch_size, budget.seq_len) == (2, 16)
    assert Budget.parse(Budget(memory_bytes=10)) == Budget(memory_bytes=10)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("15XB", "unknown unit 'XB'"),
        ("", "malformed budget"),
        ("abc", "malformed budget term"),
        ("8GB,,20ms", "malformed budget"),
        ("15MB,16MB", "twice"),
        ("0ms", "must be positive"),
        ("150%", "at most 100%"),
        ("1.5B", "whole number of bytes"),
        ("-3MB", "malformed"),
        ("decode=5MB", "only latency terms take a phase"),
        ("token=5ms", "only latency terms take a phase"),
        ("20ms,prefill=10ms", "constrains latency (prefill) twice"),
        ("decode=0ms", "must be positive"),
    ],
)
def test_malformed_budgets_say_what_is_allowed(text: str, fragment: str) -> None:
    with pytest.raises(BudgetError) as info:
        Budget.parse(text)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_unknown_dict_field_is_refused() -> None:
    with pytest.raises(BudgetError, match="unknown budget field 'memroy'"):
        Budget.parse({"memroy": "15MB"})


def test_empty_budget_is_refused() -> None:
    with pytest.raises(BudgetError, match="sets no constraint"):
        Budget()


def test_memory_limit_combines_absolute_and_share() -> None:
    budget = Budget.parse("15MB,10%")
    assert budget.memory_limit(100_000_000) == 10_000_000
    assert budget.memory_limit(300_000_000) == 15_000_000


def test_decode_context_is_the_serving_context_or_else_the_sequence_length() -> None:
    assert Budget.parse("decode=5ms", seq_len=64).decode_context == 64
    budget = Budget.parse("decode=5ms", seq_len=64, context=1024, batch_size=4)
    assert budget.decode_context == 1024
    assert "per token at batch 4 with 1024 tokens of context" in budget.describe()


def test_shapes_beyond_the_models_positions_are_refused() -> None:
    Budget.parse("20ms", seq_len=64).check_positions(64)
    Budget.parse("20ms").check_positions(None)
    with pytest.raises(BudgetError, match="beyond the model's 64 positions"):
        Budget.parse("20ms", seq_len=128).check_positions(64)
    with pytest.raises(BudgetError, match="128 tokens of context"):
        Budget.parse("decode=2ms", seq_len=16, context=128).check_positions(64)
