from __future__ import annotations

import time

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
        ("0.7x", "latency_ratio", 0.7),
        ("prefill=1.2X", "latency_ratio", 1.2),
        ("decode=0.5x", "decode_ratio", 0.5),
    ],
)
def test_single_terms(text: str, field: str, value: float) -> None:
    budget = Budget.parse(text)
    assert getattr(budget, field) == value
    others = {
        "memory_bytes",
        "avg_bits",
        "size_ratio",
        "latency_ms",
        "decode_ms",
        "latency_ratio",
        "decode_ratio",
    } - {field}
    assert all(getattr(budget, name) is None for name in others)


def test_combination_and_whitespace() -> None:
    budget = Budget.parse(" 8GB , 20ms ")
    assert budget.memory_bytes == 8_000_000_000
    assert budget.latency_ms == 20.0


@pytest.mark.parametrize(
    "text",
    [
        "15MB",
        "8GiB",
        "1.000001GB",
        "4.5bits,25%",
        "8GB,20ms",
        "999B",
        "4GB,20ms,decode=2.5ms",
        "15MB,0.7x",
        "4GB,decode=0.45x,3ms",
    ],
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
        {"memory": "15MB", "speed": "0.7x"},
        {"speed": 0.7, "decode_speed": "0.5x"},
        {"latency_ratio": 1.5, "decode": "decode=0.5x"},
        {"latency": "0.7x", "decode": "0.5x"},
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


def _refused_quickly(spec: object, fragment: str) -> None:
    started = time.perf_counter()
    with pytest.raises(BudgetError) as info:
        Budget.parse(spec)
    assert time.perf_counter() - started < 1.0
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("1e400GB", "out of range (1e-30 to 1e30)"),
        ("1e400ms", "out of range"),
        ("1e999999MB", "out of range"),
        ("1e-400ms", "out of range"),
        ("9" * 5002 + "MB", "at most 200 characters, this one has 5,004"),
        ("9" * 100_001 + "MB", "at most 200 characters, this one has 100,003"),
        ("1" * 190 + ".5x", "out of range"),
        ("15 MB MB", "malformed budget term"),
        ("1001TB", "at most 1 PB"),
        ("86401s", "at most one day"),
        ("0.5us", "at least 1us"),
        ("0.00000001%", "at least 0.0000001%"),
        ("65bits", "at most 64"),
        ("0e999999MB", "must be positive"),
        ("1.0000000000000000000000000000001B", "not a whole number of bytes"),
    ],
)
def test_numbers_are_bounded_in_text(text: str, fragment: str) -> None:
    _refused_quickly(text, fragment)


def test_backtracking_text_is_read_in_linear_time() -> None:
    for spec in ("1" * 199 + "x", " " * 199 + "1", "a" * 198 + "=1", "1." + "1" * 197 + "."):
        _refused_quickly(spec, "")


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"memory": float("inf")}, "must be a finite number"),
        ({"memory": 10**400}, "at most 1 PB"),
        ({"latency": 10**400}, "out of range"),
        ({"latency": float("nan")}, "must be a finite number"),
        ({"bandwidth": 1}, "unknown budget field 'bandwidth'"),
        ({"ratio": 1e-300}, "at least 0.0000001%"),
        ({"memory": 1.5}, "whole number of bytes"),
        ({"memory": [1]}, "must be a number or a string"),
        ({"spec": ["15MB"]}, "spec must be a string"),
        ({"memory": "15MB", "batch_size": 1.0}, "batch size must be a whole number"),
        ({"memory": "15MB", "seq_len": 10**8}, "sequence length must be a whole number"),
        ({"memory": "15MB", "context": True}, "context must be a whole number"),
        ({"memory": "15MB", "kv_dtype": ["float16"]}, "unknown KV cache dtype"),
        ({1: "15MB"}, "unknown budget field 1"),
        ({"spec": "15MB", "memory": "16MB"}, "sets memory_bytes twice"),
    ],
)
def test_dict_fields_are_typed_and_bounded(spec: dict, fragment: str) -> None:
    _refused_quickly(spec, fragment)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"memory_bytes": 1.5}, "whole number of bytes"),
        ({"memory_bytes": "15MB"}, "whole number of bytes"),
        ({"latency_ms": "20ms"}, "must be a number"),
        ({"latency_ms": 10**400}, "out of range"),
        ({"latency_ms": float("inf")}, "finite"),
        ({"avg_bits": True}, "must be a number"),
        ({"avg_bits": 4, "batch_size": 0}, "batch size must be a whole number from 1"),
        ({"avg_bits": 4, "kv_dtype": ["x"]}, "unknown KV cache dtype"),
    ],
)
def test_keyword_fields_are_typed_and_bounded(fields: dict, fragment: str) -> None:
    with pytest.raises(BudgetError, match=fragment):
        Budget(**fields)


def test_keywords_of_parse_are_checked_too() -> None:
    with pytest.raises(BudgetError, match="unknown budget field 'colour'"):
        Budget.parse("15MB", colour="red")
    with pytest.raises(BudgetError, match="twice"):
        Budget.parse("15MB", memory_bytes=10)
    assert Budget.parse(None, memory_bytes=10) == Budget(memory_bytes=10)
    assert Budget.parse(Budget(memory_bytes=10), seq_len=7).seq_len == 7


@pytest.mark.parametrize(
    "budget",
    [
        Budget(size_ratio=0.07),
        Budget(avg_bits=4.123456789),
        Budget(latency_ms=0.1 + 0.2),
        Budget(decode_ms=86_400_000.0, latency_ms=1e-3),
        Budget(memory_bytes=10**15 - 1),
        Budget(avg_bits=4, kv_dtype="bfloat16"),
        Budget(memory_bytes=1536, context=4096, kv_dtype="float8", batch_size=3, seq_len=9),
    ],
)
def test_accepted_budgets_survive_their_own_round_trip(budget: Budget) -> None:
    assert Budget.parse(budget.to_dict()) == budget
    shape = {k: getattr(budget, k) for k in ("batch_size", "seq_len", "context", "kv_dtype")}
    assert Budget.parse(budget.spec, **shape) == budget


def test_a_latency_relative_to_the_original_is_the_tighter_of_both_terms() -> None:
    budget = Budget.parse("15MB,0.7x,decode=0.5x")
    assert budget.bounds_latency and budget.bounds_decode
    assert budget.latency_ms is None and budget.decode_ms is None
    assert budget.latency_limit_ms(10.0) == pytest.approx(7.0)
    assert budget.decode_limit_ms(4.0) == pytest.approx(2.0)
    both = Budget.parse("0.7x,5ms")
    assert both.latency_limit_ms(10.0) == 5.0 and both.latency_limit_ms(6.0) == pytest.approx(4.2)
    assert "0.7x the original's" in budget.describe()
    assert budget.phase_limit_ms("decode", 4.0) == pytest.approx(2.0)
    assert budget.phase_ratio("latency") == 0.7 and both.phase_ms("latency") == 5.0
    with pytest.raises(ValueError, match="unknown latency phase"):
        budget.phase_ms("prefill")
    assert Budget.parse({"latency": "0.7x"}) == Budget(latency_ratio=0.7)
    assert Budget.parse({"decode": "0.5x"}) == Budget(decode_ratio=0.5)
    assert Budget.parse("15MB").latency_limit_ms(None) is None
    assert not Budget.parse("15MB").bounds_latency
    with pytest.raises(ValueError, match="needs its latency"):
        budget.latency_limit_ms(None)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("0.7x,0.8x", "relative to the original twice"),
        ("decode=0.5x,decode=0.6x", "decode latency relative to the original twice"),
        ("0x", "must be positive"),
        ("2000x", "at most 1000x"),
        ("0.0001x", "at least 0.001x"),
        ("memory=0.5x", "only latency terms take a phase"),
    ],
)
def test_relative_latency_terms_are_bounded(text: str, fragment: str) -> None:
    with pytest.raises(BudgetError, match=fragment):
        Budget.parse(text)


def test_a_timing_settles_the_terms_it_can_judge() -> None:
    from profilers.paired_timing import Limit

    budget = Budget.parse("0.7x,9ms")
    assert budget.timing_limit("latency", beside=True) == Limit(9.0, 0.7)
    assert budget.timing_limit("latency", beside=False) == Limit(9.0, None)
    assert Budget.parse("0.7x").timing_limit("latency", beside=False) is None  # none timed
    assert Budget.parse("decode=0.5x").timing_limit("latency", beside=True) is None
    assert Budget.parse("decode=0.5x").timing_limit("decode", beside=True) == Limit(None, 0.5)
