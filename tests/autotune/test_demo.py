"""The promise of the README, on the real pretrained demo model (about two minutes).

``autotune tune demo --budget 15MB --target cpu`` must fit 15 MB, predict its bytes within
0.5% of what is measured, beat the best uniform plan on held-out data, and pass
``autotune validate``; the budget edited down to 10 MB must fail it, and another model must be
refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autotune.apply import apply_plan
from autotune.cli import main
from autotune.saved import load_compressed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_plan(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "plan.json"
    assert (
        main(
            # the default search, shortened to keep the suite quick
            [
                "tune",
                "demo",
                "--budget",
                "15MB",
                "--target",
                "cpu",
                "-o",
                str(out),
                "--quiet",
                "--max-evals",
                "15",
            ]
        )
        == 0
    )
    return out


def test_demo_plan_fits_and_beats_uniform(demo_plan: Path) -> None:
    plan = json.loads(demo_plan.read_text())
    predicted, measured = plan["predicted"], plan["measured"]
    assert measured["bytes"] <= 15_000_000
    assert abs(measured["bytes"] - predicted["bytes"]) <= 0.005 * measured["bytes"]
    uniform = measured["best_uniform"]
    assert uniform["bytes"] <= 15_000_000
    assert measured["heldout_error"] < uniform["heldout_error"]
    assert plan["search"]["engine"] == "evolution"
    run = plan["search"]["engine_run"]
    assert run["best_error"] <= run["allocator_error"]
    # the plan kept is the searched plan with the least error on the selection split; its
    # predicted error is its calibration error
    selection = plan["search"]["selection"]
    chosen = plan["search"]["chosen"]
    assert selection["errors"][chosen] == min(selection["errors"].values())
    expected = {"evolution": run["best_error"], "allocator": run["allocator_error"]}
    if chosen in expected:
        assert plan["predicted"]["error"] == pytest.approx(expected[chosen], rel=1e-9)


def test_demo_validate_exit_codes(
    demo_plan: Path, tiny_bert_dir: Path, tmp_path: Path, capsys
) -> None:
    assert main(["validate", str(demo_plan), "demo", "--quiet"]) == 0
    plan = json.loads(demo_plan.read_text())
    plan["budget"]["spec"] = "10MB"
    edited = tmp_path / "plan10.json"
    edited.write_text(json.dumps(plan))
    capsys.readouterr()
    assert main(["validate", str(edited), "demo", "--quiet"]) == 1
    assert "FAIL memory" in capsys.readouterr().out
    assert main(["validate", str(demo_plan), str(tiny_bert_dir), "--quiet"]) == 2


def test_demo_saved_model(demo_plan: Path, tmp_path: Path) -> None:
    out = tmp_path / "saved"
    assert main(["apply", str(demo_plan), "demo", "-o", str(out), "--quiet"]) == 0
    predicted = json.loads(demo_plan.read_text())["predicted"]["bytes"]
    on_disk = (out / "model.safetensors").stat().st_size
    assert abs(on_disk - predicted) <= 0.005 * predicted
    reloaded = load_compressed(out)
    direct = apply_plan("demo", demo_plan)
    ids = torch.randint(1000, 20000, (2, 16))
    with torch.inference_mode():
        assert torch.equal(
            reloaded(input_ids=ids).last_hidden_state, direct(input_ids=ids).last_hidden_state
        )
