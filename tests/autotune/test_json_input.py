"""JSON read from users: size, depth, encoding and numbers bounded, one error line each."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from autotune.errors import PlanError, TargetError
from autotune.json_input import check_json_value, check_schema, parse_json, read_json


def _refused(text: str | bytes, fragment: str, **limits) -> str:
    started = time.perf_counter()
    with pytest.raises(PlanError) as info:
        parse_json(text, "plan.json", PlanError, **limits)
    assert time.perf_counter() - started < 1.0
    message = str(info.value)
    assert fragment in message and "plan.json" in message
    assert "\n" not in message
    return message


@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_nesting_100000_deep_is_one_error_not_a_recursion_error(opening: str) -> None:
    closing = "]" if opening == "[" else "}"
    _refused(opening * 100_000 + closing * 100_000, "more than 64 deep")


def test_nesting_is_counted_outside_strings_only() -> None:
    text = '{"a": "' + "[" * 1000 + '\\"{{{", "b": [[1]]}'
    assert parse_json(text, "x", PlanError) == {"a": "[" * 1000 + '"{{{', "b": [[1]]}
    _refused("[[[1]]]", "more than 2 deep", max_depth=2)
    assert parse_json("[[1]]", "x", PlanError, max_depth=2) == [[1]]


def test_latin1_text_is_refused_naming_the_byte() -> None:
    _refused('{"notes": "café"}'.encode("latin-1"), "not UTF-8 text (byte 14 is 0xe9)")


def test_utf8_with_a_byte_order_mark_is_read() -> None:
    assert parse_json("\ufeff[1]".encode(), "x", PlanError) == [1]
    assert parse_json("\ufeff[1]", "x", PlanError) == [1]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"bytes": 1e400}', "1e400 is out of range"),
        ('{"bytes": -1e400}', "out of range"),
        ('{"bytes": NaN}', "NaN is not a JSON number"),
        ('{"bytes": Infinity}', "Infinity is not a JSON number"),
        ('{"bytes": -Infinity}', "-Infinity is not a JSON number"),
        ('{"bytes": ' + "9" * 5002 + "}", "5002 digits"),
        ('{"bytes": ' + "9" * 100_001 + "}", "100001 digits"),
        ("{not json", "not valid JSON"),
        ('{"a": 1', "is it truncated?"),
    ],
)
def test_numbers_beyond_range_and_broken_text_are_refused(text: str, fragment: str) -> None:
    _refused(text, fragment)


def test_non_finite_numbers_pass_only_when_asked() -> None:
    data = parse_json('{"a": NaN, "b": 1e400}', "config.json", PlanError, finite=False)
    assert data["b"] == float("inf")


def test_size_is_bounded_before_parsing(tmp_path: Path) -> None:
    _refused("[" + "1," * 100 + "1]", "at most 50 are read", max_bytes=50)
    file = tmp_path / "big.json"
    file.write_text("[" + " " * 100 + "]")
    with pytest.raises(TargetError, match="at most 10 are read"):
        read_json(file, TargetError, max_bytes=10)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match=r"target file '/nonexistent\.json' does not exist"):
        read_json("/nonexistent.json", TargetError, what="target file")
    with pytest.raises(TargetError, match="does not exist"):
        read_json(tmp_path, TargetError)  # a folder is not a file


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"a": {1, 2}}, "a: a set is not a JSON value"),
        ({"a": (1, 2)}, "a tuple is not a JSON value"),
        ({"a": [float("inf")]}, "a/0: inf is not a finite number"),
        ({"a": float("nan")}, "nan is not a finite number"),
        ({1: "x"}, "key 1 is not a string"),
        ({"a": 10**400}, "integer out of range"),
        ({"a": b"x"}, "a bytes is not a JSON value"),
    ],
)
def test_python_values_that_json_cannot_hold_are_refused(value: object, fragment: str) -> None:
    with pytest.raises(PlanError, match="plan") as info:
        check_json_value(value, "plan", PlanError)
    assert fragment in str(info.value)


def test_deep_python_values_are_walked_without_recursion() -> None:
    deep: list = []
    inner = deep
    for _ in range(100_000):
        inner.append([])
        inner = inner[0]
    started = time.perf_counter()
    with pytest.raises(PlanError, match="more than 64 deep"):
        check_json_value(deep, "plan", PlanError)
    assert time.perf_counter() - started < 1.0
    check_json_value({"a": [1, 2.5, None, True, "x", {"b": []}]}, "plan", PlanError)


def test_schema_integers_are_strict() -> None:
    schema = {"type": "object", "properties": {"bits": {"type": "integer"}}}
    check_schema({"bits": 4}, schema, "plan", PlanError)
    for bad in (4.0, True, "4"):
        with pytest.raises(PlanError, match="bits"):
            check_schema({"bits": bad}, schema, "plan", PlanError)
