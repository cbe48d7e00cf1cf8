"""GGUF types timed in llama.cpp: how a variant's time is split among layers, that every
offered option gets a time, and that ``--runtime llama.cpp --target local`` uses it."""

from __future__ import annotations

import pytest
import torch

from autotune.export.llama_latency import KEEP, shape_of, split, timing_form
from autotune.latency_models import LlamaCppTimed, latency_model_for
from autotune.layers import LayerRef
from autotune.runtimes import get_runtime
from autotune.targets import get_target
from methods import ggml_quantizer
from methods.base import LayerShape
from methods.gguf import GGUFOption
from methods.keep import KeepOption

SMALL, LARGE = LayerShape("linear", 10, 10), LayerShape("linear", 30, 10)


def test_each_variant_is_its_layers_sum_and_a_mixed_plan_the_sum_of_its_shares() -> None:
    refs = {"a": LayerRef("a", SMALL), "b": LayerRef("b", LARGE)}
    q4, q8 = GGUFOption("Q4_0"), GGUFOption("Q8_0")
    timed = {"a": [KeepOption(), q4, q8], "b": [KeepOption(), q4, q8]}
    labels = {q4.label: {"a": q4, "b": q4}, q8.label: {"a": q8, "b": q8}}
    seconds = {KEEP: 8.0, q4.label: 4.0, q8.label: 6.0}
    result = split(seconds, labels, timed, refs)
    for label, total in seconds.items():
        assert result.layers[(SMALL, label)] + result.layers[(LARGE, label)] == pytest.approx(total)
    # the larger layer carries three quarters of every gain
    assert result.layers[(LARGE, KEEP)] - result.layers[(LARGE, q4.label)] == pytest.approx(3.0)
    assert result.layers[(SMALL, KEEP)] - result.layers[(SMALL, q4.label)] == pytest.approx(1.0)
    assert result.rest == 0.0 and result.whole == 8.0


def test_an_importance_matrix_is_timed_as_its_plain_type_unless_llama_cpp_needs_it() -> None:
    assert timing_form(GGUFOption("Q4_K", True)) == GGUFOption("Q4_K")
    assert timing_form(GGUFOption("IQ2_XXS", True)) == GGUFOption("IQ2_XXS", True)
    assert timing_form(KeepOption()) == KeepOption()


def test_the_shape_of_prefill_and_decode_inputs() -> None:
    class Cache:
        def get_seq_length(self) -> int:
            return 127

    assert shape_of({"input_ids": torch.zeros(2, 16)}) == (2, 16, 0)
    assert shape_of({"input_ids": torch.zeros(1, 1), "cache": Cache()}) == (1, 1, 127)


def test_local_targets_of_llama_cpp_are_timed_in_llama_cpp() -> None:
    runtime = get_runtime("llama.cpp")
    runtime.check_target(get_target("local"), "local")  # no longer refused
    assert isinstance(latency_model_for(runtime.spec_for(get_target("local"))), LlamaCppTimed)
    assert not isinstance(latency_model_for(runtime.spec_for(get_target("cpu"))), LlamaCppTimed)


@pytest.mark.skipif(not ggml_quantizer.available(), reason="llama.cpp is not installed")
def test_every_offered_option_gets_a_time_from_llama_cpp() -> None:
    from autotune.export.llama_latency import measure_in_llama_cpp
    from autotune.layers import compressible_layers
    from tests.autotune.export.test_gguf import make_model

    model = make_model()
    layers = compressible_layers(model)
    offered = [KeepOption(), GGUFOption("Q4_K"), GGUFOption("Q8_0")]
    timed = {ref.name: offered for ref in layers}
    result = measure_in_llama_cpp(model, timed, {"input_ids": torch.zeros(1, 8)}, rounds=2)
    for ref in layers:
        for option in offered:
            assert result.layers[(ref.shape, option.label)] >= 0.0
    assert result.whole > 0.0


@pytest.mark.skipif(not ggml_quantizer.available(), reason="llama.cpp is not installed")
def test_timing_a_model_with_learned_positions_stays_within_its_table(tmp_path) -> None:
    """GPT-2 has 128 position rows here; llama.cpp aborts the process on a lookup past them.
    A decode step at the last position and generation after a full-length prompt are
    timed within the table."""
    from autotune.export import export_plan
    from autotune.export.llama_cpp import speeds_in_llama_cpp
    from autotune.export.llama_latency import measure_in_llama_cpp
    from autotune.layers import compressible_layers
    from autotune.plan import Plan
    from tests.autotune.export.test_gguf import make_model

    class Cache:
        def get_seq_length(self) -> int:
            return 127

    model = make_model("gpt2")
    layers = compressible_layers(model)
    timed = {ref.name: [KeepOption(), GGUFOption("Q8_0")] for ref in layers}
    timed["transformer.wpe"] = [KeepOption()]
    decode = {"input_ids": torch.zeros(1, 1), "cache": Cache()}
    result = measure_in_llama_cpp(model, timed, decode, rounds=1)
    assert result.whole > 0.0
    path = tmp_path / "m.gguf"
    export_plan(Plan(layers={"_default": {"method": "none"}}), model, "gguf", path)
    (speed,) = speeds_in_llama_cpp({"m": path}, list(range(3, 131)), rounds=1).values()
    assert speed.generate_tokens_per_s > 0.0
