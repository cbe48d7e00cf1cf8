"""A named target's figures for llama.cpp, fitted to llama.cpp's timings (autotune.export.llama_fit)
and through ``autotune profile --runtime llama.cpp --fit-target``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from autotune.cli import main
from autotune.export.llama_fit import (
    FLOAT,
    TYPES,
    fit_llama_cpp,
    rated_type,
    type_files,
    uniform_types,
)
from autotune.profiling import profile_model
from autotune.runtimes import get_runtime
from autotune.targets import get_target, load_registry
from methods import ggml_quantizer
from methods.gguf import GGUFOption
from profilers.execution.adapters import adapter_for
from tests.autotune.export.test_gguf import make_model

NEEDS_LLAMA = pytest.mark.skipif(
    not ggml_quantizer.available(), reason="llama.cpp is not installed"
)


def test_uniform_types_are_those_every_layer_takes() -> None:
    wide = uniform_types(make_model())  # 256 wide: K-quants' super-blocks fit
    assert "Q4_K" in wide and "Q8_0" in wide and set(wide) <= set(TYPES)
    narrow = uniform_types(make_model_of_width(96))  # 96 = 3 blocks of 32, no super-block
    assert "Q4_0" in narrow and not any(t.endswith("_K") for t in narrow)
    for name in narrow:
        assert GGUFOption(name).tensor_type.fits(96)


def make_model_of_width(width: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def squared_log_error(fit_spec, observations) -> float:
    return float(sum(math.log(o.price(fit_spec) / o.seconds) ** 2 for o in observations))


@NEEDS_LLAMA
def test_the_fit_prices_the_timed_files_closer_than_the_targets_figures(monkeypatch) -> None:
    from autotune.export import llama_fit

    seen = []
    observe = llama_fit.llama_observations

    def recorded(*args, **kwargs):
        seen.extend(observe(*args, **kwargs))
        return seen

    monkeypatch.setattr(llama_fit, "llama_observations", recorded)
    model = make_model()
    ids = torch.randint(3, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    shapes = {"prompt": {"input_ids": ids}, "decode": adapter_for(model).decode_inputs(model, ids)}
    device = get_target("cpu")
    fit = fit_llama_cpp(model, device, shapes, rounds=2)
    types = uniform_types(model)
    rated = type_files(model)
    # every uniform type, the F32 file and every block type's file, at each shape
    assert len(seen) == 2 * (len(types) + 1 + len(rated))
    uniform = [o for o in seen if rated_type(o) is None]
    assert {o.label.rsplit(" ", 1)[1] for o in uniform} == {FLOAT, *types}
    assert {rated_type(o) for o in seen} - {None} == set(rated) >= {"IQ3_S", "IQ2_XXS", "Q4_K"}
    assert all(o.seconds > 0 and np.isfinite(o.price(device)) for o in seen)
    before = get_runtime("llama.cpp").spec_for(device)
    after = fit.spec.for_runtime("llama.cpp")
    assert squared_log_error(after, seen) <= squared_log_error(before, seen)
    # the device's own figures are kept for every other runtime
    assert fit.spec.op_overhead_s == device.op_overhead_s
    assert fit.spec.runtimes["llama.cpp"].kernels["gguf_block"].efficiency > 0
    rates = fit.spec.runtimes["llama.cpp"].block_rates
    assert set(rates) == set(rated) and rates["Q4_0"] == 1.0
    assert all(0 < rate < 100 for rate in rates.values())


@NEEDS_LLAMA
def test_profile_writes_a_target_file_whose_llama_cpp_figures_price_tunes(tmp_path: Path) -> None:
    model = make_model_of_width(256)
    batches = [{"input_ids": torch.randint(3, 512, (1, 16))} for _ in range(4)]
    profile = profile_model(
        model,
        get_target("cpu"),
        calibration=batches,
        seq_len=16,
        sensitivity="local",
        fit=True,
        runtime="llama.cpp",
    )
    assert all(
        label.startswith("gguf-") or label == "keep"
        for entry in profile.layers.values()
        for label in entry["options"]
    )
    assert "its figures for llama.cpp" in profile.summary()
    path = tmp_path / "fitted.json"
    entry = profile.fitted_target["entry"]
    path.write_text(json.dumps({"schema_version": 1, "targets": [entry]}))
    specs, _ = load_registry([path])
    fitted = specs[entry["name"]]
    assert fitted.runtimes["llama.cpp"].op_overhead_s == pytest.approx(
        entry["runtimes"]["llama.cpp"]["op_overhead_s"]
    )
    priced = get_runtime("llama.cpp").spec_for(fitted)
    assert priced.op_overhead_s == fitted.runtimes["llama.cpp"].op_overhead_s
    assert get_runtime("torch").spec_for(fitted).op_overhead_s == get_target("cpu").op_overhead_s


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--runtime", "onnxruntime", "--target", "cpu"], "priced with the device's own"),
        (["--runtime", "llama.cpp", "--target", "local"], "'local' is timed on this machine"),
    ],
)
def test_a_fit_llama_cpp_has_no_figures_for_is_refused_before_any_work(
    tmp_path: Path, capsys, argv: list[str], fragment: str
) -> None:
    out = tmp_path / "fitted.json"
    code = main(["profile", "tiny-lm", *argv, "--fit-target", str(out)])
    error = capsys.readouterr().err.strip()
    assert code == 2 and fragment in error and "\n" not in error
    assert not out.exists()
