from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from autotune.errors import FingerprintMismatchError, PlanError
from autotune.fingerprint import fingerprint
from autotune.plan import SCHEMA_VERSION, Plan
from methods import KeepOption, QuantOption
from tests.conftest import make_tiny_bert

INT4 = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}
INT8 = {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True}
NAMES = [
    "embeddings.word_embeddings",
    "encoder.layer.0.attention.self.query",
    "encoder.layer.0.attention.self.key",
    "encoder.layer.1.attention.self.query",
    "encoder.layer.1.output.dense",
    "pooler.dense",
]


def test_save_load_round_trip(tmp_path: Path) -> None:
    plan = Plan(layers={"_default": INT8, "pooler.dense": INT4}, budget={"spec": "15MB"})
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded.to_dict() == plan.to_dict()
    assert loaded.schema_version == SCHEMA_VERSION
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_json_is_deterministic_apart_from_the_timestamp() -> None:
    a = Plan(layers={"pooler.dense": INT4}, created="t0")
    b = Plan(layers={"pooler.dense": INT4}, created="t0")
    assert a.to_json() == b.to_json()


def test_resolution_order_exact_then_pattern_then_default() -> None:
    plan = Plan(
        layers={
            "_default": INT8,
            r"re:encoder\.layer\.\d+\.attention\..*": INT4,
            "re:.*query": {"method": "none"},
            "encoder.layer.1.attention.self.query": {"method": "none"},
            "embeddings.word_embeddings": {"method": "none"},
        }
    )
    resolved = plan.resolve(NAMES)
    assert resolved["encoder.layer.0.attention.self.query"] == QuantOption(4, 32, False)
    assert resolved["encoder.layer.0.attention.self.key"] == QuantOption(4, 32, False)
    assert resolved["encoder.layer.1.attention.self.query"] == KeepOption()
    assert resolved["encoder.layer.1.output.dense"] == QuantOption(8, None, True)
    assert resolved["embeddings.word_embeddings"] == KeepOption()


def test_without_default_unmatched_layers_are_kept() -> None:
    resolved = Plan(layers={"pooler.dense": INT4}).resolve(NAMES)
    assert resolved["pooler.dense"] == QuantOption(4, 32, False)
    assert all(resolved[n] == KeepOption() for n in NAMES if n != "pooler.dense")


def test_strict_resolution_refuses_unknown_names_and_idle_patterns() -> None:
    with pytest.raises(PlanError, match="does not have"):
        Plan(layers={"decoder.fc": INT4}).resolve(NAMES)
    with pytest.raises(PlanError, match="matches no layer"):
        Plan(layers={"re:lm_head.*": INT4}).resolve(NAMES)
    assert Plan(layers={"re:lm_head.*": INT4}).resolve(NAMES, strict=False)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "not valid JSON"),
        ('{"schema_version": 1, "layers": {', "is it truncated"),
        ("[1, 2]", "must hold a JSON object"),
        (json.dumps({"layers": {}}), "schema_version"),
        (json.dumps({"schema_version": 1, "layers": {"a": {"bits": 4}}}), "method"),
        (json.dumps({"schema_version": 99, "layers": {}}), "newer than this autotune"),
        (json.dumps({"schema_version": 1, "layers": {"a": {"method": "zip"}}}), "unknown method"),
        (
            json.dumps({"schema_version": 1, "layers": {"a": {"method": "rtn", "bitz": 4}}}),
            "unknown field",
        ),
        (json.dumps({"schema_version": 1, "layers": {"re:(": INT4}}), "not a valid regex"),
    ],
)
def test_bad_plan_files(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(PlanError) as info:
        Plan.load(path)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_plan_file(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "absent.json")


def test_fingerprint_mismatch_names_both_fingerprints() -> None:
    mine, other = make_tiny_bert(seed=0), make_tiny_bert(seed=1)
    plan = Plan(layers={"pooler.dense": INT4}, model={"fingerprint": fingerprint(mine)})
    plan.check_model(mine)
    with pytest.raises(FingerprintMismatchError) as info:
        plan.check_model(other)
    message = str(info.value)
    assert fingerprint(mine)["weights"][:12] in message
    assert fingerprint(other)["weights"][:12] in message
    with pytest.warns(UserWarning, match="fingerprint"):
        plan.check_model(other, strict=False)


def test_fingerprint_tracks_structure_and_weights() -> None:
    model = make_tiny_bert()
    first = fingerprint(model)
    assert fingerprint(model) == first
    model.pooler.dense.bias.data[0] += 1
    changed = fingerprint(model)
    assert changed["structure"] == first["structure"]
    assert changed["weights"] != first["weights"]
    assert fingerprint(make_tiny_bert(layers=1))["structure"] != first["structure"]


def test_version_1_plans_load_through_the_migration(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"schema_version": 1, "layers": {"pooler.dense": INT4}}))
    plan = Plan.load(path)
    assert plan.schema_version == SCHEMA_VERSION == 2
    assert plan.profile == {}
    plan.save(path)
    assert json.loads(path.read_text())["schema_version"] == 2


@pytest.mark.parametrize(("version", "fragment"), [(0, "no migration"), ("1", "schema_version")])
def test_unreadable_versions(tmp_path: Path, version, fragment: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"schema_version": version, "layers": {}}))
    with pytest.raises(PlanError, match=fragment):
        Plan.load(path)


def test_tied_layers_are_recorded_in_the_model_entry() -> None:
    tied = {"lm_head": "transformer.wte"}
    plan = Plan.from_dict(Plan(layers={"transformer.wte": INT8}, model={"tied": tied}).to_dict())
    assert plan.model["tied"] == tied
    with pytest.raises(PlanError, match="model/tied/lm_head"):
        Plan.from_dict(
            {"schema_version": SCHEMA_VERSION, "layers": {}, "model": {"tied": {"lm_head": 1}}}
        )


def _plan_with(**sections: object) -> dict:
    return {"schema_version": SCHEMA_VERSION, "layers": {"_default": INT8}, **sections}


def _rtn(**fields: object) -> dict:
    return {"layers": {"_default": {"method": "rtn", "bits": 4, "group_size": 32} | fields}}


@pytest.mark.parametrize(
    ("sections", "fragment"),
    [
        (_rtn(bits=4.0), "layers/_default/bits: 4.0 is not of type 'integer'"),
        (_rtn(bits=99), "layers/_default/bits: 99 is greater than the maximum"),
        (_rtn(symmetric="no"), "layers/_default/symmetric: 'no' is not of type 'boolean'"),
        (_rtn(group_size=True), "layers/_default/group_size: True is not of type"),
        (_rtn(group_size=0), "layers/_default/group_size: 0 is less than the minimum"),
        ({"layers": {"_default": {"method": ["rtn"]}}}, "layers/_default/method"),
        ({"calibration": {"seq_len": "abc"}}, "calibration/seq_len: 'abc' is not of type"),
        ({"calibration": {"seq_len": 10**8}}, "calibration/seq_len"),
        ({"calibration": {"heldout_windows": [1]}}, "calibration/heldout_windows: [1]"),
        ({"predicted": {"bytes": "abc"}}, "predicted/bytes: 'abc' is not of type 'integer'"),
        ({"predicted": {"bytes": 10**16}}, "predicted/bytes"),
        ({"predicted": {"latency_shape": [1]}}, "predicted/latency_shape"),
        ({"measured": {"heldout_error": "x"}}, "measured/heldout_error: 'x' is not of type"),
        ({"measured": {"best_uniform": {"option": "x"}}}, "measured: 'heldout_error' is a"),
        (
            {"measured": {"heldout_error": 0.1, "best_uniform": {"option": "x"}}},
            "measured/best_uniform: 'heldout_error' is a required property",
        ),
        ({"measured": {"metric": "mse"}}, "measured/metric"),
        ({"search": {"engine_run": {"stopped": "x"}}}, "search/engine_run"),
        ({"search": {"candidates": [{"bytes": 1}]}}, "search/candidates/0: 'name' is a required"),
        ({"profile": {"layers": {"a": {"kind": "linear"}}}}, "profile/layers/a: 'shape' is a"),
        ({"target": {"name": "x", "bandwidth": 1e15}}, "target/bandwidth"),
        ({"budget": {"spec": "1" * 201 + "MB"}}, "budget/spec"),
    ],
)
def test_fields_the_code_reads_are_typed_and_bounded(sections: dict, fragment: str) -> None:
    with pytest.raises(PlanError) as info:
        Plan.from_dict(_plan_with(**sections))
    message = str(info.value)
    assert "does not fit the plan schema at " + fragment in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("sections", "fragment"),
    [
        ({"budget": {"spec": "1e400GB"}}, "plan: budget: the number in budget term '1e400GB'"),
        ({"budget": {"spec": "15MB", "colour": 1}}, "unknown budget field 'colour'"),
        ({"budget": {"memory": 1.5}}, "whole number of bytes"),
        ({"target": {"name": "x", "kind": "gpu"}}, "target is not a hardware spec"),
        ({"target": {"name": "cpu"}}, "target 'cpu' has a name but no hardware figures"),
        ({"layers": {"_default": {"method": "gptq", "damp": None}}}, "'damp' must be a finite"),
        ({"layers": {"_default": {"method": "w8a8", "alpha": None}}}, "'alpha' must be a finite"),
        ({"layers": {"_default": {"method": "svd", "rank": 4.0}}}, "rank: 4.0 is not of type"),
        ({"model": {"x": {1, 2}}}, "model/x: a set is not a JSON value"),
        ({"search": {"seconds": float("inf")}}, "search/seconds: inf is not a finite number"),
    ],
)
def test_budget_target_options_and_values_are_checked_on_load(
    sections: dict, fragment: str
) -> None:
    with pytest.raises(PlanError) as info:
        Plan.from_dict(_plan_with(**sections))
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"schema_version": 2, "layers": {}, "predicted": {"bytes": 1e400}}', "1e400 is out of"),
        ('{"schema_version": 2, "layers": {}, "predicted": {"bytes": NaN}}', "NaN is not a JSON"),
        ("[" * 100_000 + "]" * 100_000, "nests arrays and objects more than 64 deep"),
        ('{"a":' * 100_000 + "1" + "}" * 100_000, "nests arrays and objects more than 64 deep"),
    ],
)
def test_plan_files_beyond_json_limits(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(PlanError) as info:
        Plan.load(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_a_latin1_plan_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(json.dumps(_plan_with(created="café"), ensure_ascii=False).encode("latin-1"))
    with pytest.raises(PlanError, match="is not UTF-8 text"):
        Plan.load(path)


def test_a_catastrophic_pattern_is_refused_within_a_second() -> None:
    plan = Plan(layers={"re:(a|aa)+$": INT4})
    names = ["a" * 64 + "!", "pooler.dense"]
    started = time.perf_counter()
    with pytest.raises(PlanError, match=r"took more than 0.5 s to match") as info:
        plan.resolve(names, strict=False)
    assert time.perf_counter() - started < 1.0
    assert "re:(a|aa)+$" in str(info.value) and "\n" not in str(info.value)


def test_patterns_keep_the_syntax_of_re() -> None:
    plan = Plan(layers={r"re:(?!pooler).*\.query": INT4, r"re:pool(?P<x>e)r\.\w+": INT8})
    resolved = plan.resolve(NAMES, strict=False)
    assert resolved["encoder.layer.0.attention.self.query"] == QuantOption(4, 32, False)
    assert resolved["pooler.dense"] == QuantOption(8, None, True)
    with pytest.raises(PlanError, match="not a valid regex"):
        Plan.from_dict(_plan_with(layers={"re:" + "(" * 400 + ")" * 400: INT4}))


def test_a_calibration_longer_than_the_models_positions_is_refused() -> None:
    model = make_tiny_bert()  # 128 positions
    Plan(layers={}, calibration={"seq_len": 128}).check_model(model)
    with pytest.raises(PlanError, match=r"calibration\.seq_len is 100000 tokens, beyond the model"):
        Plan(layers={}, calibration={"seq_len": 100_000}).check_model(model)
    with pytest.raises(PlanError, match="budget does not fit this model"):
        Plan(layers={}, budget={"spec": "20ms", "seq_len": 4096}).check_model(model)


def test_a_real_plan_round_trips_through_from_dict() -> None:
    path = Path(__file__).resolve().parents[2] / "examples" / "hand_written_plan.json"
    plan = Plan.load(path)
    assert Plan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()
