"""A budget's multiples of a reference file: refusals, the planning scale, and a tune in
llama.cpp whose checks time the plan beside that file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autotune.budget import Budget
from autotune.cli import main
from autotune.errors import AutotuneError, PlanError
from autotune.reference_file import (
    ReferenceFile,
    file_sha256,
    in_terms_of_reference,
    open_reference,
    planning_budget,
    reference_multiples,
)
from autotune.runtimes import get_runtime
from methods import ggml_quantizer
from profilers.measure import latency_stats


def _file(tmp_path: Path, name: str, content: bytes = b"not a model") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("runtime", "budget", "target", "name", "fragment"),
    [
        ("torch", "50%,1x", "local", "r.onnx", "runtime torch loads none"),
        ("vllm", "50%,1x", "local", "r.onnx", "runtime vllm loads none"),
        ("onnxruntime", "50%,1x", "cpu", "r.onnx", "use --target local"),
        ("onnxruntime", "50%,1x", "local", "r.gguf", "is not a .onnx file"),
        ("llama.cpp", "50%,decode=1x", "local", "r.onnx", "is not a .gguf file"),
        ("onnxruntime", "50%,20ms", "local", "r.onnx", "has none"),
        ("onnxruntime", "50%,decode=1x", "local", "r.onnx", "for latency terms only"),
        ("onnxruntime", "50%,1x", "local", "r.onnx", "is not an ONNX model"),
        ("llama.cpp", "50%,decode=1x", "local", "r.gguf", "is not a GGUF file"),
    ],
)
def test_a_reference_the_runtime_cannot_time_beside_the_plan_is_refused_in_one_line(
    tmp_path: Path, runtime: str, budget: str, target: str, name: str, fragment: str
) -> None:
    if runtime == "onnxruntime":
        pytest.importorskip("onnx")
    if runtime == "llama.cpp":
        pytest.importorskip("gguf")
    path = _file(tmp_path, name)
    with pytest.raises(AutotuneError) as refused:
        open_reference(path, get_runtime(runtime), Budget.parse(budget), target)
    assert fragment in str(refused.value) and "\n" not in str(refused.value)


def test_a_missing_reference_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AutotuneError, match="does not exist"):
        open_reference(tmp_path / "r.onnx", get_runtime("onnxruntime"), Budget.parse("1x"), "local")


def test_the_cli_refuses_a_bad_reference_before_loading_the_model(tmp_path: Path, capsys) -> None:
    path = _file(tmp_path, "r.gguf")
    args = ["--budget", "50%,1x", "--runtime", "onnxruntime", "--relative-to", str(path)]
    assert main(["tune", str(tmp_path / "no-model"), *args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a .onnx file" in err and "\n" not in err


def test_the_file_is_recorded_by_its_bytes_and_hash(tmp_path: Path) -> None:
    path = _file(tmp_path, "r.onnx", b"x" * 3000)
    found = ReferenceFile.of(path)
    assert found.bytes == 3000 and found.sha256 == file_sha256(path)
    assert found.matches(found.to_dict())
    other = ReferenceFile.of(_file(tmp_path, "s.onnx", b"x" * 2999 + b"y"))
    assert not other.matches(found.to_dict())


def test_the_plan_is_searched_under_the_reference_on_the_original_scale() -> None:
    budget = Budget.parse("50%,0.9x,decode=2x,decode=5ms")
    planned = planning_budget(budget, {"decode": 0.5})
    # the decode multiple is of a file at half the original's time; the prefill one is not
    assert planned.decode_ratio == pytest.approx(1.0) and planned.latency_ratio == 0.9
    assert planned.decode_ms == 5 and planned.size_ratio == budget.size_ratio


def test_a_budget_no_plan_is_predicted_to_meet_is_refused_in_the_users_terms() -> None:
    budget = Budget.parse("2MB,decode=1x")
    planned = planning_budget(budget, {"decode": 0.677})
    message = f"budget {planned.spec} cannot be met: the lowest predicted decode latency is"
    said = in_terms_of_reference(
        message, budget, planned, ReferenceFile(Path("q4.gguf"), 1, "0"), {"decode": 0.677}
    )
    assert said.startswith(
        "budget 2MB,decode=1x (reference file q4.gguf: decode step 0.677x the original's "
        "here) cannot be met"
    )


def test_the_references_multiple_is_the_median_of_the_rounds_ratios() -> None:
    """Both timed in the same rounds: the median of reference over original per round."""
    model_ms = [2.0, 2.0, 4.0, 2.0, 2.0]
    file_ms = [1.0, 1.2, 1.0, 1.4, 1.1]  # round 3's slow original would skew medians' ratio
    calls = []

    def measure(original, plan, reference, inputs, limit=None):
        calls.append((original, reference))
        return {"model": latency_stats(model_ms), "baseline": latency_stats(file_ms)}

    ref = ReferenceFile(Path("r.gguf"), 1, "0")
    budget = Budget.parse("50%,decode=1x")
    found = reference_multiples(measure, "original", {"latency": {}, "decode": {}}, budget, ref)
    assert set(found) == {"decode"}  # only the phase whose multiple is of the file
    assert found["decode"] == pytest.approx(0.55)
    assert calls == [("original", Path("r.gguf"))]


def _batches() -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": torch.randint(3, 4096, (1, 16))} for _ in range(6)]


def _tune_for_llama_cpp(model, budget: str, batches: list, **settings):
    """A quick tune of a small causal LM for llama.cpp on this machine."""
    from autotune.tuner import autotune

    return autotune(
        model,
        budget,
        "local",
        runtime="llama.cpp",
        calibration=batches,
        progress=False,
        search="allocator",
        latency_seq_len=16,
        seq_len=16,
        sensitivity_windows=2,
        heldout_windows=2,
        **settings,
    )


@pytest.mark.skipif(not ggml_quantizer.available(), reason="llama.cpp is not installed")
def test_a_decode_budget_of_a_gguf_file_is_checked_beside_that_file(tmp_path: Path) -> None:
    """Every check of the tune, the final measurement and ``validate`` time the plan beside
    the reference file; ``validate`` refuses a plan without its file or with another."""
    from autotune.apply import apply_plan
    from autotune.export.gguf import GGUFExporter
    from autotune.plan import Plan
    from autotune.validate import validate_plan
    from tests.autotune.export.test_gguf import make_model

    model = make_model()
    reference = tmp_path / "q4_k.gguf"
    pure = Plan(layers={"_default": {"method": "gguf", "type": "Q4_K"}})
    GGUFExporter().write(apply_plan(model, pure), pure, reference)
    batches = _batches()
    # 2x: under load the per-type table and the file's own timing stray from each other
    result = _tune_for_llama_cpp(
        model, f"{reference.stat().st_size}B,decode=2x", batches, relative_to=reference
    )
    plan = result.plan
    recorded = plan.search["relative_to"]
    assert recorded["sha256"] == file_sha256(reference)
    assert recorded["bytes"] == reference.stat().st_size
    assert set(recorded["multiple_of_original"]) == {"decode"}
    checks = plan.search["latency_checks"]
    assert checks and all(c["budget"] == "decode" for c in checks)
    for check in checks:  # each budget is 2x the reference file's time in its own rounds
        assert "original_ms" not in check
        assert check["budget_ms"] == pytest.approx(2 * check["reference_ms"], abs=2e-6)
    baseline = plan.measured["baseline"]
    assert baseline["reference_file"]["sha256"] == recorded["sha256"]
    assert result.report.holds()["decode"] == (baseline["decode_ratio"]["p50"] <= 2)
    report = str(result.report)
    assert "x reference (same rounds)" in report and "reference file q4_k.gguf's" in report
    saved = tmp_path / "plan.json"
    plan.save(saved)
    assert Plan.load(saved).search["relative_to"] == recorded
    tampered = json.loads(saved.read_text())
    tampered["search"]["relative_to"]["sha256"] = "not a hash"
    saved.write_text(json.dumps(tampered))
    with pytest.raises(PlanError, match="relative_to/sha256"):
        Plan.load(saved)

    with pytest.raises(PlanError, match="pass it"):
        validate_plan(plan, model, calibration=batches, heldout=batches)
    other = _file(tmp_path, "other.gguf", reference.read_bytes() + b"\0")
    with pytest.raises(PlanError, match="not the one the plan was tuned against"):
        validate_plan(plan, model, calibration=batches, heldout=batches, relative_to=other)
    checked = validate_plan(
        plan, model, calibration=batches, heldout=batches, relative_to=reference
    )
    decode = next(c for c in checked.checks if c.name == "decode p50")
    assert "reference file q4_k.gguf's (timed in the same rounds)" in decode.expected
    assert " ms against " in decode.measured  # the plan's p50 against the file's

    # the plan's GGUF file, validated: run in llama.cpp beside the reference file itself
    exported = tmp_path / "plan.gguf"
    GGUFExporter().write(result.model, plan, exported)
    with pytest.raises(PlanError, match="pass it"):
        validate_plan(plan, model, compressed=exported, heldout=batches)
    from_file = validate_plan(
        plan, model, compressed=exported, heldout=batches, relative_to=reference
    )
    decode = next(c for c in from_file.checks if c.name == "decode p50")
    assert "reference file q4_k.gguf's (timed in the same rounds)" in decode.expected
    assert from_file.measured["decode"]["p50_ms"] > 0
    assert from_file.measured["baseline_decode"]["p50_ms"] > 0


@pytest.mark.skipif(not ggml_quantizer.available(), reason="llama.cpp is not installed")
def test_a_gguf_file_of_a_local_plan_is_timed_in_llama_cpp_when_validated(
    tmp_path: Path,
) -> None:
    """A multiple of the original: the file beside the original's F32 file, in llama.cpp."""
    from autotune.export.gguf import GGUFExporter
    from autotune.validate import validate_plan
    from tests.autotune.export.test_gguf import make_model

    model = make_model()
    batches = _batches()
    result = _tune_for_llama_cpp(model, "40%,decode=5x", batches)
    exported = tmp_path / "plan.gguf"
    GGUFExporter().write(result.model, result.plan, exported)
    checked = validate_plan(result.plan, model, compressed=exported, heldout=batches)
    decode = next(c for c in checked.checks if c.name == "decode p50")
    assert "<= 5x the original's (timed in the same rounds)" in decode.expected
    assert checked.measured["baseline_decode"]["p50_ms"] > 0
    untimed = validate_plan(
        result.plan, model, compressed=exported, heldout=batches, measure_latency=False
    )
    assert not next(c for c in untimed.checks if c.name == "decode p50").holds


def test_a_latency_budget_of_an_onnx_file_is_checked_beside_that_file(
    tmp_path: Path, tokenizer
) -> None:
    """In ONNX Runtime the reference file is timed as it is, beside each plan's export."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from autotune.latency_models import float_onnx_export
    from autotune.tuner import autotune
    from tests.conftest import make_tiny_bert

    model = make_tiny_bert()
    reference = tmp_path / "float.onnx"
    onnx.save(float_onnx_export(model), str(reference))
    result = autotune(
        model,
        "40%,1.5x",
        "local",
        runtime="onnxruntime",
        relative_to=reference,
        tokenizer=tokenizer,
        option_labels=["int8-ch-sym", "int4-g32-sym", "keep"],
        progress=False,
        search="allocator",
        latency_seq_len=16,
        seq_len=32,
        calibration_windows=8,
        sensitivity_windows=2,
        heldout_windows=4,
    )
    plan = result.plan
    assert set(plan.search["relative_to"]["multiple_of_original"]) == {"latency"}
    checks = plan.search["latency_checks"]
    assert checks
    for check in checks:
        # both recorded to 1e-6 ms
        assert check["budget_ms"] == pytest.approx(1.5 * check["reference_ms"], abs=2e-6)
    baseline = plan.measured["baseline"]
    assert baseline["reference_file"]["file"] == "float.onnx"
    assert result.report.holds()["latency"] == (baseline["latency_ratio"]["p50"] <= 1.5)
