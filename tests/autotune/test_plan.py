from __future__ import annotations

import json
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
