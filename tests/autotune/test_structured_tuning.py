"""Structured pruning inside a tune: the plan records it, apply and load replay it."""

from __future__ import annotations

import pytest
import torch

from autotune.apply import apply_plan
from autotune.cli import main
from autotune.errors import AutotuneError
from autotune.saved import load_compressed, save_compressed
from autotune.tuner import autotune
from profilers.measure import model_bytes
from tests.conftest import make_tiny_bert

SMALL = {"seq_len": 32, "calibration_windows": 8, "sensitivity_windows": 2, "heldout_windows": 4}


@pytest.fixture(scope="module")
def pruned(tokenizer):
    model = make_tiny_bert()
    result = autotune(
        model,
        "30%",
        "cpu",
        tokenizer=tokenizer,
        progress=False,
        search="allocator",
        structured={"ffn": 0.25, "heads": 0.5},
        **SMALL,
    )
    return model, result


def test_layers_shrink_and_bytes_stay_exact(pruned) -> None:
    model, result = pruned
    plan = result.plan
    kept = plan.structure["kept"]
    assert len(kept) == 4  # two FFN and two attention groups
    assert len(kept["encoder.layer.0.output.dense"]) == 96  # 128 neurons, a quarter removed
    assert len(kept["encoder.layer.0.attention.output.dense"]) == 2  # 4 heads, half removed
    assert plan.structure["removed_parameters"] > 0
    assert model_bytes(result.model) == plan.predicted["bytes"] == plan.measured["bytes"]
    assert plan.predicted["bytes"] <= 0.30 * model_bytes(model)
    assert model.encoder.layer[0].output.dense.in_features == 128  # the user's model is whole


def test_apply_and_saved_model_replay_the_structure(pruned, tokenizer, tmp_path) -> None:
    model, result = pruned
    applied = apply_plan(model, result.plan)
    batch = tokenizer(["structured pruning keeps shapes consistent"], return_tensors="pt")
    with torch.no_grad():
        expected = result.model(**batch).last_hidden_state
        assert torch.equal(applied(**batch).last_hidden_state, expected)
    save_compressed(applied, result.plan, tmp_path / "saved")
    loaded = load_compressed(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, expected)


def test_quality_is_judged_against_the_unpruned_model(pruned, tokenizer) -> None:
    """The error of keeping every remaining layer is the error of pruning alone: above 0."""
    _, result = pruned
    keep = next(c for c in result.plan.search["candidates"] if c["name"] == "allocator")
    assert keep["calibration_error"] > 0
    assert result.plan.measured["heldout_error"] > 0


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ({"ffn": 1.0}, r"allowed: \[0, 1\)"),
        ({"ffn": -0.1}, r"allowed: \[0, 1\)"),
        ({"experts": 0.5}, "allowed: ffn, heads"),
    ],
)
def test_bad_fractions_are_refused_before_any_work(tokenizer, fractions, message) -> None:
    with pytest.raises(AutotuneError, match=message):
        autotune(make_tiny_bert(), "30%", "cpu", tokenizer=tokenizer, structured=fractions)


def test_cli_refuses_a_bad_fraction_with_exit_2(tiny_bert_dir, capsys) -> None:
    argv = ["tune", str(tiny_bert_dir), "--budget", "30%", "--target", "cpu"]
    assert main([*argv, "--prune-ffn", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "allowed: [0, 1)" in err[0]


def test_report_says_what_was_removed(pruned) -> None:
    _, result = pruned
    line = result.report.structure_line()
    assert line is not None and "25% of FFN neurons" in line and "50% of attention heads" in line
    assert line in str(result.report)
