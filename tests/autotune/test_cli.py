"""The command line as a user drives it: exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from autotune.apply import apply_plan
from autotune.cli import main
from autotune.saved import load_compressed

FAST = ["--quiet"]


@pytest.fixture(scope="module")
def tuned_plan(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plan ``autotune tune`` writes; what it printed is kept beside it (``.stdout``)."""
    out = tmp_path_factory.mktemp("cli") / "plan.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(
            [
                "tune",
                str(tiny_bert_dir),
                "--budget",
                "35%",
                "--target",
                "cpu",
                "-o",
                str(out),
                *FAST,
                "--max-evals",
                "10",
            ]
        )
    assert code == 0
    out.with_suffix(".stdout").write_text(printed.getvalue())
    return out


def test_tune_writes_a_plan_and_prints_the_report(tuned_plan: Path) -> None:
    plan = json.loads(tuned_plan.read_text())
    assert plan["budget"]["spec"] == "35%"
    assert plan["measured"]["bytes"] == plan["predicted"]["bytes"]
    printed = tuned_plan.with_suffix(".stdout").read_text()
    assert f"plan written to {tuned_plan}" in printed
    assert f"to save the compressed model: autotune apply {tuned_plan}" in printed
    layers = [name for name in plan["layers"] if name != "_default"]
    assert layers and all(name in printed for name in layers)  # the layer table


def test_validate_holds(tuned_plan: Path, tiny_bert_dir: Path, capsys) -> None:
    assert main(["validate", str(tuned_plan), str(tiny_bert_dir), *FAST]) == 0
    assert "plan holds" in capsys.readouterr().out


def test_validate_reports_a_broken_budget(
    tuned_plan: Path, tiny_bert_dir: Path, tmp_path: Path, capsys
) -> None:
    plan = json.loads(tuned_plan.read_text())
    plan["budget"]["spec"] = "10%"
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(plan))
    assert main(["validate", str(edited), str(tiny_bert_dir), *FAST]) == 1
    out = capsys.readouterr().out
    assert "FAIL memory" in out and "budget 10%" in out


def test_validate_reports_a_quality_regression(
    tuned_plan: Path, tiny_bert_dir: Path, tmp_path: Path, capsys
) -> None:
    plan = json.loads(tuned_plan.read_text())
    plan["measured"]["heldout_error"] /= 100
    edited = tmp_path / "stricter.json"
    edited.write_text(json.dumps(plan))
    assert main(["validate", str(edited), str(tiny_bert_dir), "--json", *FAST]) == 1
    report = json.loads(capsys.readouterr().out)
    failed = [c["name"] for c in report["checks"] if not c["holds"]]
    assert failed == ["held-out error (nmse)"]


def test_validate_refuses_a_plan_for_another_model(
    tuned_plan: Path, other_bert_dir: Path, capsys
) -> None:
    assert main(["validate", str(tuned_plan), str(other_bert_dir), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("autotune: error: plan was made for model fingerprint")
    assert "\n" not in err


def test_apply_saves_a_model_that_reloads_identically(
    tuned_plan: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "compressed"
    assert main(["apply", str(tuned_plan), str(tiny_bert_dir), "-o", str(out), *FAST]) == 0
    reloaded = load_compressed(out)
    direct = apply_plan(str(tiny_bert_dir), tuned_plan)
    ids = torch.randint(1000, 2000, (2, 10))
    with torch.inference_mode():
        assert torch.equal(
            reloaded(input_ids=ids).last_hidden_state, direct(input_ids=ids).last_hidden_state
        )


def test_targets_lists_the_registry(capsys) -> None:
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("cpu", "a100-40gb", "h100", "t4", "local"))
    assert main(["targets", "--json"]) == 0
    assert {t["name"] for t in json.loads(capsys.readouterr().out)} >= {"cpu", "l4"}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--budget", "15XB", "--target", "cpu"], "unknown unit 'XB'"),
        (["--budget", "15MB", "--target", "tpu"], "unknown target 'tpu'"),
        (["--budget", "1KB", "--target", "cpu"], "cannot be met"),
        (["--budget", "15MB,decode=5MB", "--target", "cpu"], "only latency terms take a phase"),
        (["--budget", "50%,decode=5ms", "--target", "cpu"], "for causal language models"),
        (["--budget", "50%", "--target", "cpu", "--runtime", "vllm"], "vllm runs on gpu"),
        (["--budget", "50%", "--target", "cpu", "--runtime", "trt"], "unknown runtime 'trt'"),
        (
            ["--budget", "50%", "--target", "cpu", "--export", "m.gguf"],
            "--export writes the --runtime's format and torch has none",
        ),
        (
            ["--budget", "50%", "--target", "cpu", "--runtime", "llama.cpp"],
            "--format gguf writes gpt2, llama, mistral, qwen2, qwen3 models",
        ),
        (
            ["--budget", "50%", "--target", "local", "--runtime", "vllm"],
            "would time autotune's torch modules",
        ),
    ],
)
def test_bad_tune_input_is_one_line_exit_2_and_writes_nothing(
    tiny_bert_dir: Path, tmp_path: Path, capsys, args: list[str], fragment: str
) -> None:
    out = tmp_path / "plan.json"
    assert main(["tune", str(tiny_bert_dir), *args, "-o", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_missing_model_path(tmp_path: Path, capsys) -> None:
    assert main(["tune", str(tmp_path / "nope"), "--budget", "15MB", *FAST]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["garbage", '{"schema_version": 1, "layers": {'])
def test_broken_plan_files(tiny_bert_dir: Path, tmp_path: Path, capsys, content: str) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(content)
    assert main(["validate", str(plan), str(tiny_bert_dir), *FAST]) == 2
    assert main(["apply", str(plan), str(tiny_bert_dir), "-o", str(tmp_path / "out"), *FAST]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def console_script() -> str:
    """The installed ``autotune`` entry point of this interpreter's environment (its scripts
    folder, or the folder of ``sys.executable``), not one elsewhere on ``PATH``."""
    folders = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    for folder in folders:
        found = shutil.which("autotune", path=folder)
        if found:
            return found
    pytest.fail(f"the autotune console script is not installed in {folders}")


def test_console_script_is_installed() -> None:
    script = console_script()
    result = subprocess.run([script, "--version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"autotune {importlib.metadata.version('autotune')}"
    usage = subprocess.run([script, "tune"], capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and usage.stdout == ""
    assert usage.stderr.splitlines() == [
        "autotune tune: error: the following arguments are required: model, --budget; "
        "run 'autotune tune --help' for usage"
    ]


def test_validate_a_saved_compressed_model(
    tuned_plan: Path, tiny_bert_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "saved"
    assert main(["apply", str(tuned_plan), str(tiny_bert_dir), "-o", str(out), *FAST]) == 0
    assert (
        main(["validate", str(tuned_plan), str(tiny_bert_dir), "--compressed", str(out), *FAST])
        == 0
    )
    (out / "model.safetensors").unlink()
    capsys.readouterr()
    assert (
        main(["validate", str(tuned_plan), str(tiny_bert_dir), "--compressed", str(out), *FAST])
        == 2
    )
    assert "lacks model.safetensors" in capsys.readouterr().err


def test_a_saved_model_of_another_plan_is_refused(
    tuned_plan: Path, tiny_bert_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "saved"
    assert main(["apply", str(tuned_plan), str(tiny_bert_dir), "-o", str(out), *FAST]) == 0
    plan = json.loads(tuned_plan.read_text())
    first = next(k for k in plan["layers"] if k != "_default")
    plan["layers"][first] = {"method": "none"}
    other = tmp_path / "other.json"
    other.write_text(json.dumps(plan))
    capsys.readouterr()
    assert main(["validate", str(other), str(tiny_bert_dir), "--compressed", str(out), *FAST]) == 2
    assert "another plan" in capsys.readouterr().err


def test_pytest_helper(tuned_plan: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    from autotune.testing import assert_plan_holds

    result = assert_plan_holds(str(tiny_bert_dir), tuned_plan, measure_latency=False)
    assert result.ok
    plan = json.loads(tuned_plan.read_text())
    plan["budget"]["spec"] = "5%"
    plan["measured"]["heldout_error"] /= 100
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(plan))
    with pytest.raises(AssertionError) as info:
        assert_plan_holds(str(tiny_bert_dir), broken, measure_latency=False)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{broken} no longer holds:"
    assert any(line.startswith("  memory: measured") for line in lines)
    assert any(line.startswith("  held-out error (nmse): measured") for line in lines)


def test_export_refuses_an_unknown_format_and_writes_nothing(
    tuned_plan: Path, tiny_bert_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "model.engine"
    args = ["export", str(tuned_plan), str(tiny_bert_dir), "--format", "tensorrt", "-o", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown export format 'tensorrt'; allowed: compressed-tensors, gguf, onnx" in err
    assert "\n" not in err and list(tmp_path.iterdir()) == []


def test_a_plan_tuned_for_onnxruntime_exports_and_runs_there(
    tiny_bert_dir: Path, tmp_path: Path, capsys
) -> None:
    ort = pytest.importorskip("onnxruntime")
    plan, model_file = tmp_path / "plan.json", tmp_path / "model.onnx"
    tune = ["tune", str(tiny_bert_dir), "--budget", "40%", "--target", "cpu"]
    assert (
        main([*tune, "--runtime", "onnxruntime", "-o", str(plan), *FAST, "--search", "allocator"])
        == 0
    )
    printed = capsys.readouterr().out
    assert f"autotune export {plan} {tiny_bert_dir} --format onnx -o OUT" in printed
    assert json.loads(plan.read_text())["target"]["runtime"] == "onnxruntime"
    code = main(
        [
            "export",
            str(plan),
            str(tiny_bert_dir),
            "--format",
            "onnx",
            "-o",
            str(model_file),
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["format"] == "onnx" and model_file.stat().st_size == result["bytes"]
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.ones((1, 8), dtype=np.int64) for i in session.get_inputs()}
    (hidden, *_) = session.run(None, feeds)
    assert hidden.shape[:2] == (1, 8) and np.isfinite(hidden).all()


@pytest.mark.slow
def test_tune_for_llama_cpp_exports_a_gguf_that_validates(
    tmp_path: Path, capsys, bpe_tokenizer
) -> None:
    """``tune --runtime llama.cpp --export`` writes the plan and its GGUF file, whose size the
    plan predicted; ``validate --compressed`` reads the file back and passes (exit 0)."""
    from tests.autotune.export.test_gguf import make_model

    folder = tmp_path / "llama"
    make_model().save_pretrained(folder)
    bpe_tokenizer.save_pretrained(folder)
    plan, gguf = tmp_path / "plan.json", tmp_path / "m.gguf"
    tune = ["tune", str(folder), "--budget", "2.4MB", "--target", "cpu", "--runtime", "llama.cpp"]
    assert main([*tune, "-o", str(plan), "--export", str(gguf), "--search", "allocator"]) == 0
    out = capsys.readouterr().out
    assert f"gguf export written to {gguf}" in out
    assert json.loads(plan.read_text())["measured"]["bytes"] == gguf.stat().st_size <= 2_400_000
    validate = ["validate", str(plan), str(folder), "--compressed", str(gguf)]
    assert main([*validate, "--runtime", "llama.cpp"]) == 0
    assert main([*validate, "--runtime", "onnxruntime"]) == 2
    assert "tuned for runtime llama.cpp, not onnxruntime" in capsys.readouterr().err
