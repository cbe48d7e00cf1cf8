"""Sensitivity tables cached on disk (profilers.cache)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from methods.keep import KeepOption
from methods.rtn import QuantOption
from profilers.cache import SensitivityCache, batches_digest, default_cache_dir, table_key
from profilers.sensitivity import measure_sensitivity
from tests.profilers.profiler_helpers import Batch, make_bert

LAYERS = ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"]
OPTIONS = [KeepOption(), QuantOption(8, None, True), QuantOption(2, 32, False)]
RUN = len(OPTIONS) - 1  # options run end to end: keep's error is 0 without a forward pass
FINGERPRINT = {"structure": "s" * 64, "weights": "w" * 64}


def _options() -> dict[str, list]:
    return {name: list(OPTIONS) for name in LAYERS}


def test_keys_follow_model_calibration_and_kind(batches: list[Batch]) -> None:
    digest = batches_digest(batches)
    key = table_key(FINGERPRINT, digest, "end-to-end")
    assert key == table_key(dict(FINGERPRINT), batches_digest(batches), "end-to-end")
    assert key != table_key({**FINGERPRINT, "weights": "v" * 64}, digest, "end-to-end")
    assert key != table_key(FINGERPRINT, digest, "fisher")
    changed = [dict(b) for b in batches]
    changed[0]["input_ids"] = changed[0]["input_ids"].clone()
    changed[0]["input_ids"][0, 0] += 1
    assert batches_digest(changed) != digest


def test_a_full_hit_runs_no_forward_pass(
    batches: list[Batch], tmp_path: Path, call_counter
) -> None:
    model = make_bert()
    key = table_key(FINGERPRINT, batches_digest(batches), "end-to-end")
    first = measure_sensitivity(model, _options(), batches, cache=SensitivityCache(tmp_path, key))
    assert first.evaluations == len(LAYERS) * RUN
    calls = call_counter(model)
    cache = SensitivityCache(tmp_path, key)
    second = measure_sensitivity(model, _options(), batches, cache=cache)
    assert calls == [0]
    assert second.evaluations == 0 and cache.hits == len(LAYERS) * len(OPTIONS)
    assert second.errors == first.errors and second.metric == first.metric


def test_a_partial_cache_measures_only_what_is_missing(
    batches: list[Batch], tmp_path: Path
) -> None:
    model = make_bert()
    key = table_key(FINGERPRINT, batches_digest(batches), "end-to-end")
    first = measure_sensitivity(model, _options(), batches, cache=SensitivityCache(tmp_path, key))
    path = SensitivityCache(tmp_path, key).path
    data = json.loads(path.read_text())
    del data["entries"][LAYERS[1]]
    path.write_text(json.dumps(data))
    again = measure_sensitivity(model, _options(), batches, cache=SensitivityCache(tmp_path, key))
    assert again.evaluations == RUN
    assert again.errors == first.errors


def test_refused_options_are_cached_as_refused(batches: list[Batch], tmp_path: Path) -> None:
    model = make_bert()  # width 32: no group of 128 divides it
    options = {LAYERS[0]: [KeepOption(), QuantOption(4, 128, False)]}
    key = table_key(FINGERPRINT, batches_digest(batches), "end-to-end")
    first = measure_sensitivity(model, options, batches, cache=SensitivityCache(tmp_path, key))
    assert "int4-g128-asym" in first.skipped[LAYERS[0]]
    again = measure_sensitivity(model, options, batches, cache=SensitivityCache(tmp_path, key))
    assert again.evaluations == 0
    assert "int4-g128-asym" in again.skipped[LAYERS[0]]
    assert again.errors == first.errors


def test_a_damaged_cache_file_is_ignored(batches: list[Batch], tmp_path: Path) -> None:
    key = table_key(FINGERPRINT, batches_digest(batches), "end-to-end")
    cache = SensitivityCache(tmp_path, key)
    cache.path.parent.mkdir(parents=True)
    cache.path.write_text("{not json")
    table = measure_sensitivity(
        make_bert(), _options(), batches, cache=SensitivityCache(tmp_path, key)
    )
    assert table.evaluations == len(LAYERS) * RUN
    assert json.loads(cache.path.read_text())["metric"] == "nmse"


def test_default_folder_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AUTOTUNE_CACHE", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("AUTOTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "autotune"


def test_model_is_unchanged_by_a_cached_run(batches: list[Batch], tmp_path: Path) -> None:
    model = make_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    key = table_key(FINGERPRINT, batches_digest(batches), "end-to-end")
    for _ in range(2):
        measure_sensitivity(model, _options(), batches, cache=SensitivityCache(tmp_path, key))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
