"""The latency-model registry: each model serves its targets and prices every option."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from autotune.costs import layer_options
from autotune.latency_models import (
    LATENCY_MODELS,
    LlamaCppTimed,
    OnnxRuntimeTimed,
    Pricing,
    TorchTimed,
    latency_model_for,
    measuring_model,
)
from autotune.layers import compressible_layers
from autotune.runtimes import get_runtime
from autotune.targets import get_target
from methods import ggml_quantizer
from methods.tied import tied_heads
from tests.conftest import make_tiny_bert

TARGETS = {
    "roofline": "cpu",
    "torch-timed": "local",
    "onnxruntime-timed": "local",
    "llama.cpp-timed": "local",
}
RUNTIMES = {"onnxruntime-timed": "onnxruntime", "llama.cpp-timed": "llama.cpp"}


def _spec(model_name: str):
    spec = get_target(TARGETS[model_name])
    runtime = RUNTIMES.get(model_name)
    return dataclasses.replace(spec, runtime=runtime) if runtime else spec


def _job(model_name: str = "") -> Pricing:
    """Options of the runtime the latency model serves on a model it runs."""
    if model_name == "llama.cpp-timed":
        pytest.importorskip("llama_cpp")
        from tests.autotune.export.test_gguf import make_model

        model, methods, labels = make_model(), ("gguf",), ["gguf-q8_0", "gguf-q4_k", "keep"]
    else:
        model, methods, labels = make_tiny_bert(), ("rtn",), ["int8-ch-sym", "int4-g32-sym", "keep"]
    layers = compressible_layers(model)
    chosen = {r.name for r in layers}
    others = [r for r in compressible_layers(model, min_numel=0) if r.name not in chosen]
    options = layer_options(layers, methods, labels)
    ids = torch.randint(5, 1000, (1, 16))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return Pricing(model, layers, options, others, tied_heads(model), inputs)


@pytest.mark.parametrize("model", LATENCY_MODELS, ids=lambda m: m.name)
def test_every_latency_model_prices_every_option_of_a_target_it_serves(model) -> None:
    assert model.description
    spec = _spec(model.name)
    assert latency_model_for(spec) is model
    job = _job(model.name)
    latency, fixed = model.price(spec, job)
    assert set(latency) == {ref.name for ref in job.layers}
    for ref in job.layers:
        seconds = latency[ref.name]
        assert len(seconds) == len(job.options[ref.name])
        assert all(math.isfinite(s) and s > 0 for s in seconds)
    assert math.isfinite(fixed) and fixed >= 0


def test_a_named_target_is_never_timed_here_and_local_never_priced_by_roofline() -> None:
    assert not latency_model_for(get_target("a100")).measures
    assert latency_model_for(get_target("local")).measures


@pytest.mark.parametrize(
    ("runtime", "target", "timed_by"),
    [
        ("llama.cpp", "cpu", LlamaCppTimed),
        ("llama.cpp", "a100", LlamaCppTimed),
        ("onnxruntime", "cpu", OnnxRuntimeTimed),
        ("torch", "cpu", TorchTimed),
        ("vllm", "a100", TorchTimed),
    ],
)
def test_a_result_is_timed_here_where_its_runtime_runs_it_whatever_priced_it(
    runtime: str, target: str, timed_by: type
) -> None:
    spec = get_runtime(runtime).spec_for(get_target(target))
    assert type(measuring_model(spec)) is timed_by


def test_without_its_runtime_installed_a_result_is_timed_in_autotunes_modules(
    monkeypatch,
) -> None:
    monkeypatch.setattr(LlamaCppTimed, "runs_here", lambda self: False)
    spec = get_runtime("llama.cpp").spec_for(get_target("cpu"))
    assert type(measuring_model(spec)) is TorchTimed


@pytest.mark.skipif(not ggml_quantizer.available(), reason="llama.cpp is not installed")
def test_a_llama_cpp_tune_on_a_named_target_is_measured_in_llama_cpp() -> None:
    from autotune.tuner import autotune
    from tests.autotune.export.test_gguf import make_model

    batches = [{"input_ids": torch.randint(3, 4096, (1, 16))} for _ in range(8)]
    result = autotune(
        make_model(),
        "40%,decode=1000ms",
        "cpu",
        runtime="llama.cpp",
        calibration=batches,
        progress=False,
        search="allocator",
        latency_seq_len=16,
        seq_len=16,
        sensitivity_windows=2,
        heldout_windows=2,
    )
    measured = result.plan.measured
    assert measured["timed_in"] == LlamaCppTimed.name
    # llama.cpp's float file beside the plan's, at the prompt and at a decode step
    assert measured["decode_p50_ms"] > 0 and measured["baseline"]["decode_p50_ms"] > 0
    assert "latency timed in llama.cpp" in str(result.report)


def test_a_tune_for_onnxruntime_on_local_is_timed_and_measured_in_onnxruntime(tokenizer) -> None:
    pytest.importorskip("onnxruntime")
    from autotune.tuner import autotune

    result = autotune(
        make_tiny_bert(),
        "40%,1000ms",
        "local",
        runtime="onnxruntime",
        tokenizer=tokenizer,
        progress=False,
        search="allocator",
        latency_seq_len=16,
        seq_len=32,
        calibration_windows=8,
        sensitivity_windows=2,
        heldout_windows=4,
    )
    measured = result.plan.measured
    assert measured["timed_in"] == "onnxruntime-timed"
    assert measured["latency_p50_ms"] > 0 and measured["baseline"]["latency_p50_ms"] > 0
    assert result.plan.target["runtime"] == "onnxruntime"
    # the budget counts the export's tensors: predicted to the byte, recounted in the export
    assert measured["bytes_counted_in"] == "onnx"
    assert measured["bytes"] == result.plan.predicted["bytes"] < measured["file_bytes"]
    assert measured["bytes"] != measured["state_dict_bytes"]
    assert all(
        entry.get("method") in ("none", "rtn", "w8a8") for entry in result.plan.layers.values()
    )


def test_the_original_is_exported_once_for_every_onnx_runtime_measurement(monkeypatch) -> None:
    """A tune times the original beside each checked plan: its export is made once."""
    pytest.importorskip("onnxruntime")
    from autotune import latency_models
    from autotune.apply import apply_plan
    from autotune.plan import Plan

    model = make_tiny_bert(hidden=64)
    exports: list[object] = []
    real = latency_models.float_onnx_export
    monkeypatch.setattr(latency_models, "float_onnx_export", lambda m: exports.append(m) or real(m))
    timed = latency_models.OnnxRuntimeTimed()
    inputs = {"input_ids": torch.randint(1, 500, (1, 8))}
    for bits in (8, 4):
        plan = Plan(layers={"_default": {"method": "rtn", "bits": bits, "group_size": 32}})
        found = timed.measure(apply_plan(model, plan), plan, model, inputs)
        assert set(found) == {"model", "baseline"} and found["baseline"].p50_ms > 0
    assert exports == [model]  # (a model changed in place: tests/autotune/test_model_memo.py)
