"""Property-based fuzzing of everything that reads user input: budgets (text, dict and
keyword forms), plans (``Plan.from_dict`` on JSON-like data, ``Plan.load`` on file bytes),
target files (through ``load_registry``, as ``--target-file`` reads them) and safetensors
headers.

Inputs start valid (so that the accepting paths are exercised too) and are then damaged: a
value anywhere replaced by junk (wrong types, NaN, huge or nested values), text cut short,
re-encoded as latin-1, nested deep, or replaced by random bytes. Two properties hold for
every input: the only errors that escape are the project's own, each one line
(:class:`AutotuneError`, i.e. ``BudgetError``, ``PlanError``, ``TargetError``,
``ModelLoadError``, ``CalibrationError``; and ``OptionError``), and whatever is accepted
survives its own round trip unchanged.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import methods  # noqa: F401  (registers the built-in methods)
from autotune.budget import KV_DTYPES, MAX_MEMORY_BYTES, Budget
from autotune.errors import AutotuneError
from autotune.plan import SCHEMA_VERSION, Plan
from autotune.safetensors_check import DTYPE_BITS, check_safetensors
from autotune.targets import (
    MAX_BANDWIDTH,
    MAX_PEAK_FLOPS,
    MIN_BANDWIDTH,
    MIN_PEAK_FLOPS,
    load_registry,
)
from methods.base import LayerShape
from methods.errors import OptionError
from methods.registry import registered_methods

PROJECT_ERRORS = (AutotuneError, OptionError)
FUZZ = settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _one_line(exc: BaseException) -> None:
    assert str(exc) and "\n" not in str(exc), repr(exc)


# ------------------------------------------------------------------------- damage

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.sampled_from([10**400, -1, 0, 1, 4.0, 2**40, 10**15 + 1, 1e-300, "abc", "1e400"]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
junk = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def _replace(data: Any, path: list[int], value: Any) -> Any:
    """``data`` with the value ``path`` leads to (each step an index, modulo the keys or
    items there) replaced by ``value``; a copy, ``data`` is not changed."""
    if not path or not isinstance(data, (dict, list)) or not data:
        return value
    if isinstance(data, dict):
        key = list(data)[path[0] % len(data)]
        return {**data, key: _replace(data[key], path[1:], value)}
    index = path[0] % len(data)
    return [*data[:index], _replace(data[index], path[1:], value), *data[index + 1 :]]


def damaged(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Valid data, a third of the time with one value somewhere replaced by junk."""
    paths = st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=4)
    return st.one_of(valid, valid, st.builds(_replace, valid, paths, junk))


def _file_bytes(text: str, how: int, cut: float) -> bytes:
    """``text`` as file bytes: whole, cut short, latin-1, nested deep, or a number out of
    range spliced in."""
    if how == 1:
        return text.encode()[: int(len(text) * cut)]
    if how == 2:
        return (text[: int(len(text) * cut)] + "é" + text[int(len(text) * cut) :]).encode(
            "latin-1", errors="replace"
        )
    if how == 3:
        depth = int(1 + 200 * cut)
        return ("[" * depth + text + "]" * depth).encode()
    if how == 4:
        return text.replace(": ", ": 1e400, ", 1).encode()
    return text.encode()


def file_bytes(documents: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """JSON files of ``documents`` (mostly whole, else damaged), or random bytes."""
    texts = documents.map(lambda d: json.dumps(d, allow_nan=True, default=str))
    hows = st.sampled_from([0, 0, 0, 0, 0, 1, 2, 3, 4])
    files = st.builds(_file_bytes, texts, hows, st.floats(0, 1))
    return st.one_of(files, files, files, st.binary(max_size=64))


# ------------------------------------------------------------------------------ budgets

MEMORY_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20}


def _memory_term(amount: int, unit: str) -> str:
    return f"{amount}{unit}"


valid_terms = {
    "memory": st.builds(
        _memory_term, st.integers(min_value=1, max_value=10**6), st.sampled_from(list(MEMORY_UNITS))
    ),
    "latency": st.builds(
        lambda phase, v, u: f"{phase}{v:g}{u}",
        st.sampled_from(["", "prefill="]),
        st.floats(min_value=0.001, max_value=1000),
        st.sampled_from(["ms", "s", "us"]),
    ),
    "decode": st.floats(min_value=0.01, max_value=1000).map(lambda v: f"decode={v:.6g}ms"),
    "bits": st.floats(min_value=0.01, max_value=64).map(lambda v: f"{v:.5g}bits"),
    "ratio": st.floats(min_value=0.001, max_value=100).map(lambda v: f"{v:.4g}%"),
}
valid_spec = st.lists(
    st.sampled_from(list(valid_terms)), min_size=1, max_size=4, unique=True
).flatmap(lambda kinds: st.tuples(*(valid_terms[k] for k in kinds)).map(",".join))
random_terms = st.builds(
    lambda p, n, sp, u: f"{p}{n}{sp}{u}",
    st.sampled_from(["", "prefill=", "decode=", "Decode = ", "token="]),
    st.one_of(
        st.from_regex(r"[0-9]{1,6}(\.[0-9]{1,5})?([eE][+-]?[0-9]{1,3})?", fullmatch=True),
        st.integers(min_value=0, max_value=300).map(lambda n: "9" * n),
        st.sampled_from(["1e400", "1e999999", "0e5", ".5", "5.", "-3", "1e-400", "0x10", "٣"]),
    ),
    st.sampled_from(["", " "]),
    st.sampled_from(["B", "TB", "TiB", "ms", "s", "µs", "bits", "bit", "%", "XB", "", "m s"]),
)
budget_text = st.one_of(
    valid_spec,
    valid_spec,
    st.lists(random_terms, min_size=1, max_size=3).map(",".join),
    st.text(max_size=40),
    st.text(alphabet="0123456789.eE+-,=%µ abcdefgimnpstuBKMGTi", max_size=60),
)


def _budget_or_none(spec: str, shape: dict[str, Any]) -> Budget | None:
    try:
        return Budget.parse(spec, **shape)
    except AutotuneError:  # e.g. 0.001us, below the smallest latency
        return None


valid_budgets = st.builds(
    _budget_or_none,
    valid_spec,
    st.fixed_dictionaries(
        {},
        optional={
            "batch_size": st.integers(1, 64),
            "seq_len": st.integers(1, 4096),
            "context": st.integers(1, 4096),
            "kv_dtype": st.sampled_from(list(KV_DTYPES)),
        },
    ),
).filter(lambda budget: budget is not None)
valid_budget_dicts = valid_budgets.map(lambda b: b.to_dict()) | valid_budgets.map(
    lambda b: {k: v for k, v in b.fields().items() if v is not None}
)


def _round_trips(budget: Budget) -> None:
    assert Budget.parse(budget.to_dict()) == budget
    assert Budget.from_dict(json.loads(json.dumps(budget.to_dict()))) == budget
    shape = {k: getattr(budget, k) for k in ("batch_size", "seq_len", "context", "kv_dtype")}
    assert Budget.parse(budget.spec, **shape) == budget
    assert len(budget.spec) <= 200


@FUZZ
@given(budget_text)
def test_budget_text(text: str) -> None:
    try:
        budget = Budget.parse(text)
    except PROJECT_ERRORS as exc:
        _one_line(exc)
        return
    _round_trips(budget)


@FUZZ
@given(damaged(valid_budget_dicts))
def test_budget_dict(data: dict[str, Any]) -> None:
    try:
        budget = Budget.parse(data)
    except PROJECT_ERRORS as exc:
        _one_line(exc)
        return
    _round_trips(budget)


@FUZZ
@given(damaged(valid_budgets.map(lambda b: b.fields())), st.booleans())
def test_budget_keywords(fields: dict[str, Any], through_parse: bool) -> None:
    try:
        budget = Budget.parse(None, **fields) if through_parse else Budget(**fields)
    except PROJECT_ERRORS as exc:
        _one_line(exc)
        return
    for name in ("latency_ms", "decode_ms", "avg_bits", "size_ratio"):
        value = getattr(budget, name)
        assert value is None or (isinstance(value, float) and math.isfinite(value))
    assert budget.memory_bytes is None or 1 <= budget.memory_bytes <= MAX_MEMORY_BYTES
    _round_trips(budget)


# -------------------------------------------------------------------------------- plans

SHAPE = LayerShape("linear", 64, 128, True)
GRID = sorted(
    (
        option.to_dict()
        for m in registered_methods().values()
        if m.supports(SHAPE)
        for option in m.grid(SHAPE)
    ),
    key=json.dumps,
)
LAYER_KEYS = [
    "_default",
    "pooler.dense",
    "encoder.layer.0.query",
    r"re:encoder\.layer\.\d+\..*",
    "re:(?!pooler).*",
    "re:(a|aa)+$",
]
NAMES = ["pooler.dense", "encoder.layer.0.query", "a" * 12, "a.b"]
SPEC = next(iter(load_registry()[0].values())).to_dict()
byte_counts = st.integers(min_value=0, max_value=10**9)
milliseconds = st.floats(min_value=0, max_value=1e4)
errors = st.none() | st.floats(min_value=0, max_value=10)
SECTIONS = {
    "tool": st.just({"name": "autotune", "version": "0.1.0"}),
    "created": st.just("2026-01-01T00:00:00+00:00"),
    "model": st.fixed_dictionaries(
        {"source": st.just("demo"), "class": st.just("BertModel")},
        optional={"tied": st.just({"lm_head": "wte"})},
    ),
    "target": st.sampled_from([{"name": "local"}, {"name": "cpu"}, SPEC]),
    "budget": valid_budget_dicts,
    "calibration": st.fixed_dictionaries(
        {"source": st.just("python-stdlib-docstrings")},
        optional={
            "seq_len": st.integers(1, 512),
            "heldout_windows": st.integers(1, 64),
            "batch_size": st.integers(1, 16),
        },
    ),
    "predicted": st.fixed_dictionaries(
        {},
        optional={
            "bytes": byte_counts,
            "original_bytes": byte_counts,
            "avg_bits": st.floats(0, 32),
            "latency_ms": milliseconds,
            "latency_shape": st.tuples(st.integers(1, 8), st.integers(1, 512)).map(list),
            "error": errors,
            "metric": st.sampled_from(["kl", "nmse"]),
            "memory_breakdown": st.fixed_dictionaries(
                {
                    "kv_cache": byte_counts,
                    "activations": byte_counts,
                    "total": byte_counts,
                    "batch_size": st.integers(1, 8),
                    "context": st.integers(1, 512),
                    "kv_dtype": st.sampled_from(list(KV_DTYPES)),
                }
            ),
        },
    ),
    "measured": st.none()
    | st.fixed_dictionaries(
        {"heldout_error": st.floats(0, 10), "bytes": byte_counts},
        optional={
            "latency_p50_ms": milliseconds,
            "best_uniform": st.fixed_dictionaries(
                {"option": st.just("int4-g32-asym"), "heldout_error": st.floats(0, 1)},
                optional={"bytes": byte_counts},
            ),
            "streamed": st.just({"blocks": 3, "checkpoint_bytes": 10, "peak_rss_bytes": 10}),
        },
    ),
    "search": st.fixed_dictionaries(
        {},
        optional={
            "chosen": st.just("allocator"),
            "seconds": st.floats(0, 100),
            "candidates": st.lists(
                st.fixed_dictionaries(
                    {"name": st.just("allocator")}, optional={"bytes": byte_counts}
                ),
                max_size=2,
            ),
            "engine_run": st.just(
                {
                    "full_evaluations": 1.0,
                    "stopped": "budget",
                    "best_error": 0.1,
                    "allocator_error": 0.2,
                }
            ),
        },
    ),
    "profile": st.just(
        {"metric": "nmse", "layers": {"pooler.dense": {"kind": "linear", "shape": [8, 8]}}}
    ),
    "structure": st.just({"fractions": {"ffn": 0.25}}),
}
valid_plans = st.builds(
    lambda version, layers, sections: {"schema_version": version, "layers": layers, **sections},
    st.sampled_from([SCHEMA_VERSION, SCHEMA_VERSION, 1]),
    st.dictionaries(st.sampled_from(LAYER_KEYS), st.sampled_from(GRID), max_size=3),
    st.fixed_dictionaries({}, optional=SECTIONS),
)


def _plan_round_trips(plan: Plan) -> None:
    assert Plan.from_dict(plan.to_dict()) == plan
    assert Plan.from_dict(json.loads(plan.to_json())) == plan
    try:
        plan.resolve(NAMES, strict=False)
    except PROJECT_ERRORS as exc:
        _one_line(exc)


@FUZZ
@given(damaged(valid_plans))
def test_plan_from_dict(data: Any) -> None:
    try:
        plan = Plan.from_dict(data)
    except PROJECT_ERRORS as exc:
        _one_line(exc)
        return
    _plan_round_trips(plan)


@FUZZ
@given(file_bytes(damaged(valid_plans)))
def test_plan_load(workdir: Path, raw: bytes) -> None:
    path = workdir / "plan.json"
    path.write_bytes(raw)
    try:
        plan = Plan.load(path)
    except PROJECT_ERRORS as exc:
        _one_line(exc)
        return
    _plan_round_trips(plan)


# ------------------------------------------------------------------------------ targets

BUILTIN = [
    {k: v for k, v in spec.to_dict().items() if k not in ("probed", "runtime")}
    for spec in load_registry()[0].values()
]


def _entry(entry: dict[str, Any], name: str, scale: float) -> dict[str, Any]:
    return {**entry, "name": name, "bandwidth": entry["bandwidth"] * scale}


valid_entries = st.builds(
    _entry, st.sampled_from(BUILTIN), st.sampled_from(["x", "my-gpu", "t4"]), st.just(1.0)
)
odd_entries = st.builds(
    _entry,
    st.sampled_from(BUILTIN),
    st.sampled_from(["x", "local", "Bad Name", "a" * 101]),
    st.sampled_from([1.0, 1e-6, 1e3, 1e-300]),
)
entries = st.one_of(valid_entries, valid_entries, valid_entries, odd_entries)
target_documents = damaged(
    st.one_of(entries, st.lists(entries, max_size=2).map(lambda t: {"targets": t}))
)


@FUZZ
@given(file_bytes(target_documents))
def test_target_files(workdir: Path, raw: bytes) -> None:
    path = workdir / "targets.json"
    path.write_bytes(raw)
    try:
        specs, _ = load_registry([path])
    except PROJECT_ERRORS as exc:
        _one_line(exc)
        return
    for spec in specs.values():
        assert MIN_BANDWIDTH <= spec.bandwidth <= MAX_BANDWIDTH
        assert isinstance(spec.memory_bytes, int) and 1 <= spec.memory_bytes <= MAX_MEMORY_BYTES
        assert all(MIN_PEAK_FLOPS <= v <= MAX_PEAK_FLOPS for v in spec.peak_flops.values())


# ---------------------------------------------------------------------- safetensors files

tensors = st.lists(
    st.tuples(
        st.sampled_from(sorted(DTYPE_BITS)),
        st.lists(st.integers(min_value=0, max_value=4), max_size=3),
    ),
    max_size=3,
)


def _header(specs: list[tuple[str, list[int]]]) -> tuple[dict[str, Any], int]:
    """A valid header for tensors of these dtypes and shapes, laid out one after another
    (each rounded up to whole bytes by a wider first dimension), and the data length."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for index, (dtype, shape) in enumerate(specs):
        bits = DTYPE_BITS[dtype]
        dims = [2 * d for d in shape] if bits < 8 else shape
        size = math.prod(dims) * bits // 8
        header[f"t{index}"] = {
            "dtype": dtype,
            "shape": dims,
            "data_offsets": [offset, offset + size],
        }
        offset += size
    return header, offset


def _safetensors_bytes(layout: tuple[dict[str, Any], int], extra: int, shift: int) -> bytes:
    header, data = layout
    body = json.dumps(header, allow_nan=True, default=str).encode()
    length = 2**40 if shift == 99 else max(0, len(body) + shift)
    return struct.pack("<Q", length) + body + b"\0" * (data + extra)


safetensors_files = st.builds(
    _safetensors_bytes,
    st.builds(
        lambda layout, path, value, damage: (
            (_replace(layout[0], path, value), layout[1]) if damage else layout
        ),
        tensors.map(_header),
        st.lists(st.integers(0, 50), min_size=1, max_size=3),
        junk,
        st.booleans(),
    ),
    st.sampled_from([0, 0, 0, 1, -1]),
    st.sampled_from([0, 0, 0, 0, -1, 1, 99]),
) | st.binary(max_size=24)


@FUZZ
@given(safetensors_files)
def test_safetensors_headers(workdir: Path, raw: bytes) -> None:
    path = workdir / "model.safetensors"
    path.write_bytes(raw)
    try:
        found = check_safetensors(path)
    except PROJECT_ERRORS as exc:
        _one_line(exc)
        assert str(path) in str(exc)
        return
    (length,) = struct.unpack("<Q", raw[:8])
    data = len(raw) - 8 - length
    spans = sorted((info.begin, info.end) for info in found.values() if info.end > info.begin)
    for info in found.values():
        assert 0 <= info.begin <= info.end <= data
        assert (info.end - info.begin) * 8 == math.prod(info.shape) * DTYPE_BITS[info.dtype]
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # no overlaps
