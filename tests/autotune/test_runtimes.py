"""Runtimes a plan is tuned for: which options each holds, which targets it runs on, and
that a tune for one offers only those options and prices that runtime's kernels."""

from __future__ import annotations

import dataclasses

import pytest

from autotune.layers import LayerRef
from autotune.runtimes import RUNTIMES, RuntimeChoiceError, get_runtime
from autotune.targets import get_target
from methods.base import LayerShape
from methods.codebook import CodebookOption
from methods.fp8 import Fp8Option
from methods.keep import KeepOption
from methods.registry import option_from_dict
from methods.rtn import QuantOption
from profilers.kernel_support import RUNTIME_KERNELS, runtimes
from profilers.roofline import layer_latency

SQUARE = LayerShape("linear", rows=256, cols=256)


def test_every_runtime_is_registered_with_its_kernels() -> None:
    assert set(RUNTIMES) == set(runtimes())
    for name, runtime in RUNTIMES.items():
        assert runtime.name == name
        assert runtime.device_kinds
        if name != "torch":
            assert runtime.export_format is not None
            assert set(RUNTIME_KERNELS[name]) <= set(runtime.device_kinds)


def test_unknown_runtime_is_refused_naming_the_allowed_ones() -> None:
    with pytest.raises(RuntimeChoiceError, match="allowed: torch, vllm, onnxruntime"):
        get_runtime("tensorrt")


def test_torch_runs_every_option() -> None:
    torch_runtime = get_runtime("torch")
    for option in (QuantOption(3, 64, False), CodebookOption("nf", 4, 64)):
        assert torch_runtime.refusal("layer", SQUARE, option) is None


@pytest.mark.parametrize(
    ("option", "held"),
    [
        (QuantOption(4, 128, True), True),
        (QuantOption(4, 32, False), False),  # exported as int5 without zero points
        (QuantOption(4, None, True), True),
        (QuantOption(8, None, True), True),
        (QuantOption(8, None, False), False),  # Marlin's int8 is symmetric only
        (QuantOption(3, 64, True), False),
        (QuantOption(4, 16, True), False),
        (CodebookOption("nf", 4, 64), False),
    ],
)
def test_vllm_holds_what_marlin_runs(option, held: bool) -> None:
    why = get_runtime("vllm").refusal("layer", SQUARE, option)
    assert (why is None) == held, why


def test_vllm_refuses_shapes_off_marlin_tiles() -> None:
    why = get_runtime("vllm").refusal(
        "layer", LayerShape("linear", rows=96, cols=256), QuantOption(4, 128, True)
    )
    assert why is not None and "96 x 256" in why


def test_targets_a_runtime_does_not_run_on_are_refused() -> None:
    with pytest.raises(RuntimeChoiceError, match="vllm runs on gpu targets; cpu is a cpu"):
        get_runtime("vllm").check_target(get_target("cpu"), "cpu")
    with pytest.raises(RuntimeChoiceError, match="onnxruntime runs on cpu targets"):
        get_runtime("onnxruntime").check_target(get_target("a100"), "a100")
    with pytest.raises(RuntimeChoiceError, match="--target local would time autotune's"):
        get_runtime("vllm").check_target(get_target("a100"), "local")
    get_runtime("onnxruntime").check_target(get_target("local"), "local")  # timed in ORT
    get_runtime("torch").check_target(get_target("a100"), "a100")


def test_restrict_keeps_keep_and_drops_refused_options() -> None:
    layers = [LayerRef("a", SQUARE)]
    offered = {"a": [KeepOption(), QuantOption(4, 128, True), QuantOption(3, 64, True)]}
    kept = get_runtime("vllm").restrict(layers, offered)
    assert kept == {"a": [KeepOption(), QuantOption(4, 128, True)]}


def test_a_gpu_target_prices_int4_as_vllms_kernel_and_as_dequantise_for_torch() -> None:
    """On a GPU, autotune's modules dequantise; vLLM runs Marlin at every token count: the
    same layer is priced faster for vLLM at one token and above the token limit the target
    gives the kernel (where autotune's modules would dequantise)."""
    spec = get_target("a100")
    vllm_spec = get_runtime("vllm").spec_for(spec)
    assert vllm_spec.runtime == "vllm" and spec.runtime == "torch"
    big = LayerShape("linear", rows=4096, cols=4096)
    option = QuantOption(4, 128, True)
    assert layer_latency(big, option, vllm_spec, 1) < layer_latency(big, option, spec, 1)
    limit = spec.kernels["int4_weight_only"].max_tokens
    assert limit is not None
    above = limit * 4
    assert layer_latency(big, option, vllm_spec, above) < layer_latency(big, option, spec, above)
    # in vLLM, quantised weights beat 16-bit ones while the call is bandwidth-bound
    assert layer_latency(big, option, vllm_spec, above) < layer_latency(
        big, KeepOption(), vllm_spec, above
    )


@pytest.mark.parametrize("target", ["a100", "cpu"])
def test_llama_cpp_prices_its_quantised_types_on_its_block_kernel(target: str) -> None:
    """In llama.cpp every quantised GGML type runs a kernel that reads the packed blocks, on
    CPUs and GPUs: at one token a layer is priced by its stored bytes over its type's block
    rate where the target has one (Q4_K about half of Q8_0's time), not as autotune's
    dequantising modules (rebuilding the float weight); its float types run dense."""
    from methods.gguf import GGUFOption
    from profilers.roofline import format_in_runtime

    spec = get_target(target)
    llama = get_runtime("llama.cpp").spec_for(spec)
    kernel = llama.kernels["gguf_block"]
    big = LayerShape("linear", rows=4096, cols=4096)
    q4, q8, f16 = GGUFOption("Q4_K"), GGUFOption("Q8_0"), GGUFOption("F16")
    assert format_in_runtime(big, q4, "llama.cpp") == "gguf_block"
    assert format_in_runtime(big, f16, "llama.cpp") == "dense"
    assert format_in_runtime(big, q4, "torch") == "dequantize"
    seconds = {o.label: layer_latency(big, o, llama, 1) for o in (q4, q8, f16)}
    cost = q4.tensor_type.row_bytes(4096) * 4096
    moved = cost + (4096 + 4096) * 4
    overhead = 1 * llama.op_overhead_s  # one matrix-multiplication node
    rates = {o.label: llama.block_rates.get(o.type, 1.0) for o in (q4, q8)}
    assert seconds[q4.label] == pytest.approx(
        moved / llama.bandwidth / kernel.efficiency / rates[q4.label] + overhead
    )
    assert seconds[q4.label] < seconds[q8.label] < seconds[f16.label]
    bytes_ratio = q4.tensor_type.row_bytes(4096) / q8.tensor_type.row_bytes(4096)
    bytes_ratio *= rates[q8.label] / rates[q4.label]
    assert (seconds[q4.label] - overhead) / (seconds[q8.label] - overhead) == pytest.approx(
        bytes_ratio, rel=0.01
    )
    assert seconds[q4.label] < layer_latency(big, q4, spec, 1)  # torch: dequantised


def test_a_tied_head_in_llama_cpp_runs_the_block_kernel_on_the_tables_type() -> None:
    from autotune.latency_models import head_latency
    from methods.gguf import GGUFOption
    from profilers.roofline import layer_latency as linear_latency

    class Head:
        bias = None
        transposed = False

    llama = get_runtime("llama.cpp").spec_for(get_target("cpu"))
    table = LayerShape("embedding", rows=32000, cols=4096)
    option = GGUFOption("Q6_K")
    linear = LayerShape("linear", rows=32000, cols=4096)
    priced = head_latency([Head()], table, option, llama, 1)  # type: ignore[list-item]
    assert priced == pytest.approx(linear_latency(linear, option, llama, 1, fmt="gguf_block"))
    assert priced < linear_latency(linear, option, llama, 1, fmt="dequantize")


def test_runtime_survives_the_plan_round_trip() -> None:
    from profilers.hardware import HardwareSpec

    spec = get_runtime("vllm").spec_for(get_target("a100"))
    assert HardwareSpec.from_dict(spec.to_dict()) == spec
    old = {k: v for k, v in dataclasses.asdict(spec).items() if k != "runtime"}
    assert HardwareSpec.from_dict(old).runtime == "torch"  # plans from before runtimes


def tune_bert_for_vllm(tokenizer, budget: str, target: str = "a100", **settings):
    """A small BERT (hidden 128: Marlin's tiles fit) and its tune for vLLM on ``target``
    (``a100``) with short calibration; the float embedding table (vLLM's export keeps it) is
    most of it."""
    from autotune.tuner import autotune
    from tests.conftest import make_tiny_bert

    model = make_tiny_bert(hidden=128)
    result = autotune(
        model,
        budget,
        target,
        tokenizer=tokenizer,
        runtime="vllm",
        measure=False,
        progress=False,
        seq_len=32,
        calibration_windows=8,
        sensitivity_windows=2,
        selection_windows=4,
        heldout_windows=4,
        **settings,
    )
    return model, result


def test_tune_for_vllm_offers_only_what_vllm_runs(tokenizer) -> None:
    model, result = tune_bert_for_vllm(tokenizer, "97%", search="allocator")
    assert result.plan.target["runtime"] == "vllm"
    vllm = get_runtime("vllm")
    compressed = 0
    for ref, option in result.plan.layer_options(model).items():
        assert vllm.refusal(ref.name, ref.shape, option) is None, (ref.name, option)
        compressed += not isinstance(option, KeepOption)
    assert compressed


def test_plan_options_parse_as_runtimes_see_them() -> None:
    option = option_from_dict({"method": "gptq", "bits": 4, "group_size": 128, "symmetric": True})
    assert get_runtime("vllm").kernel_refusal(SQUARE, option) is None  # type: ignore[attr-defined]


def test_onnxruntime_offers_w8a8_as_its_fused_int8_kernel_runs_it() -> None:
    """Each W8A8 option becomes 8-bit activations (DynamicQuantizeLinear), with weight scales
    per channel and per tensor, smoothed as offered and not at all; 7-bit activations are
    refused for ONNX Runtime, and each form is offered once."""
    from methods.smoothquant import W8A8Option

    runtime = get_runtime("onnxruntime")
    layers = [LayerRef("a", SQUARE)]
    offered = {"a": [KeepOption(), W8A8Option(0.45), W8A8Option(0.6)]}
    labels = [o.label for o in runtime.restrict(layers, offered)["a"]]
    assert labels == [
        "keep",
        "w8a8-a8-sq0.45",
        "w8a8-a8-tensor-sq0.45",
        "w8a8-a8",
        "w8a8-a8-tensor",
        "w8a8-a8-sq0.6",
        "w8a8-a8-tensor-sq0.6",
    ]
    assert "8 bits" in runtime.refusal("a", SQUARE, W8A8Option(0.6))
    assert runtime.refusal("a", SQUARE, W8A8Option(0.6, activation_bits=8)) is None
    assert get_runtime("torch").restrict(layers, offered) == offered
    assert "int8_dynamic" in RUNTIME_KERNELS["onnxruntime"]["cpu"]


@pytest.mark.parametrize("saturate", [True, False])
def test_onnxruntime_takes_pair_safe_codes_where_int8_pair_sums_saturate(saturate: bool) -> None:
    """On a CPU target whose 8-bit dot products saturate pair sums (x86 without VNNI),
    ONNX Runtime's W8A8 forms have pair-safe codes and full-range ones are refused in one
    line naming what is allowed; elsewhere full-range codes stay (pair-safe ones asked for
    are kept)."""
    from methods.smoothquant import W8A8Option

    spec = dataclasses.replace(get_target("cpu"), int8_pairs_saturate=saturate)
    runtime = get_runtime("onnxruntime").for_target(spec)
    layers = [LayerRef("a", SQUARE)]
    offered = {"a": [W8A8Option(0), W8A8Option(0, pair_safe=True)]}
    labels = [o.label for o in runtime.restrict(layers, offered)["a"]]
    full = W8A8Option(0, activation_bits=8)
    if saturate:
        assert labels == ["w8a8-a8-pairsafe", "w8a8-a8-pairsafe-tensor"]
        refusal = runtime.refusal("a", SQUARE, full)
        assert refusal is not None and "allowed there: pair_safe true" in refusal
    else:
        assert labels == [
            "w8a8-a8",
            "w8a8-a8-tensor",
            "w8a8-a8-pairsafe",
            "w8a8-a8-pairsafe-tensor",
        ]
        assert runtime.refusal("a", SQUARE, full) is None
    builtin = get_runtime("onnxruntime").for_target(get_target("cpu"))  # an AVX2 machine
    assert builtin.pair_safe  # type: ignore[attr-defined]


def test_llama_cpp_offers_its_tensor_types_only() -> None:
    from methods.gguf import GGUFOption

    runtime = get_runtime("llama.cpp")
    assert runtime.methods(get_target("cpu")) == ("gguf",)
    layers = [LayerRef("blk", SQUARE)]
    offered = {"blk": [KeepOption(), QuantOption(4, 32, True), GGUFOption("Q4_0")]}
    kept = runtime.restrict(layers, offered)["blk"]
    assert [o.label for o in kept] == ["keep", "gguf-q4_0"]
    assert "no llama.cpp tensor type" in runtime.refusal("blk", SQUARE, QuantOption(4, 32, True))


@pytest.mark.slow
@pytest.mark.parametrize(("family", "budget"), [("llama", 2_200_000), ("gpt2", 1_600_000)])
def test_tune_for_llama_cpp_is_within_budget_in_the_gguf_files_own_bytes(
    tmp_path, bpe_tokenizer, family: str, budget: int
) -> None:
    """The plan's bytes are the GGUF file's, predicted and recounted alike, within the
    budget; the export written afterwards is that size; llama.cpp's own held-out error is
    recorded beside the torch modules' and close to it (float files: Llama about 7.4 MB,
    GPT-2 with its tied table about 10.8 MB)."""
    from autotune.export import export_plan
    from autotune.export.llama_cpp import available
    from tests.autotune.export.test_gguf import make_model, tune_for_llama_cpp

    tokenizer = bpe_tokenizer
    result = tune_for_llama_cpp(budget, tokenizer, family)
    measured = result.plan.measured
    assert measured["bytes_counted_in"] == "gguf"
    assert measured["bytes"] == result.plan.predicted["bytes"] <= budget
    written = export_plan(
        result.plan,
        make_model(family, tied=family == "gpt2"),
        "gguf",
        tmp_path / "m.gguf",
        tokenizer=tokenizer,
    )
    assert written.bytes == measured["bytes"]
    in_runtime = measured["in_runtime"]
    if not available():
        assert "llama-cpp-python" in in_runtime["skipped"]
        return
    assert in_runtime["runtime"] == "llama.cpp"
    assert (
        0.5 * measured["heldout_error"]
        < in_runtime["heldout_error"]
        < 2 * measured["heldout_error"]
    )


LLAMA_BLOCK = [
    f"model.layers.0.{part}"
    for part in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]


def test_vllm_ties_the_layers_it_fuses_and_no_other_runtime_does() -> None:
    attention = [f"encoder.layer.1.attention.self.{p}" for p in ("query", "key", "value")]
    names = [*LLAMA_BLOCK, *attention, "encoder.layer.1.attention.output.dense"]
    assert get_runtime("vllm").tied_layers(names) == [
        tuple(LLAMA_BLOCK[:3]),
        tuple(LLAMA_BLOCK[4:6]),
        tuple(attention),
    ]
    assert all(get_runtime(n).tied_layers(names) == [] for n in RUNTIMES if n != "vllm")


def test_vllm_keeps_a_fused_group_in_float_when_one_member_is_not_tuned() -> None:
    """vLLM refuses a fused matrix whose shards are partly quantised: with the key layer
    left out of the tune (kept in float), the query and value layers stay float too."""
    names = [n for n in LLAMA_BLOCK if not n.endswith("k_proj")]
    layers = [LayerRef(name, SQUARE) for name in names]
    offered = {name: [KeepOption(), QuantOption(4, 128, True)] for name in names}
    kept = get_runtime("vllm").restrict(layers, offered)
    for name in names:
        partly_tuned = name.endswith(("q_proj", "v_proj"))
        assert kept[name] == ([KeepOption()] if partly_tuned else offered[name]), name


def test_a_plan_splitting_a_fused_group_is_refused_for_vllm_in_one_line() -> None:
    int4, int8 = QuantOption(4, 128, True), QuantOption(8, None, True)
    options = {name: int4 for name in LLAMA_BLOCK}
    vllm = get_runtime("vllm")
    assert vllm.tie_refusal(options) is None
    options["model.layers.0.mlp.up_proj"] = int8
    why = vllm.tie_refusal(options)
    assert why is not None and "\n" not in why
    assert "model.layers.0.mlp.gate_proj, model.layers.0.mlp.up_proj" in why
    assert int8.label in why and int4.label in why
    del options["model.layers.0.mlp.up_proj"]  # left out of the plan: kept in float
    assert "keep" in (vllm.tie_refusal(options) or "")
    assert get_runtime("torch").tie_refusal(options) is None


@pytest.mark.parametrize("engine", ["tpe", "nsga2"])
def test_every_engine_keeps_vllms_fused_groups_whole(tokenizer, engine: str) -> None:
    """Optuna's samplers search the tied table too (the Pareto front's plans expanded)."""
    model, result = tune_bert_for_vllm(tokenizer, "95.5%", search=engine, max_evals=8)
    assert result.plan.search["engine"] == engine
    options = {ref.name: o for ref, o in result.plan.layer_options(model).items()}
    vllm = get_runtime("vllm")
    assert vllm.tie_refusal(options) is None
    groups = vllm.tied_layers(list(options))
    front = result.plan.search.get("pareto", [])
    assert bool(front) == (engine == "nsga2")
    for point in front:  # each plan of the front, by label per layer
        assert all(len({point["layers"][name] for name in group}) == 1 for group in groups)


def test_tune_for_vllm_gives_each_fused_group_one_option(tokenizer) -> None:
    """The evolutionary search and the allocator both search the tied groups as one layer:
    the plan mixes options across groups and never inside one."""
    # 94.2% is the least this model can be stored in
    model, result = tune_bert_for_vllm(tokenizer, "95.5%", max_evals=6)
    options = {ref.name: o for ref, o in result.plan.layer_options(model).items()}
    vllm = get_runtime("vllm")
    groups = vllm.tied_layers(list(options))
    assert len(groups) == 2
    assert vllm.tie_refusal(options) is None
    assert len({o.label for o in options.values()}) > 1  # a mixed plan, whole groups
    assert result.plan.search["engine"] == "evolution"
    # the plan says which matrix vLLM loads, made of which layers, with which kernel
    matrices = result.plan.export["matrices"]
    for group in groups:
        fused = matrices[group[0].rpartition(".")[0] + ".qkv_proj"]
        assert fused["layers"] == list(group) and fused["option"] == options[group[0]].label
    for matrix, entry in matrices.items():
        assert entry["option"] == options[entry.get("layers", [matrix])[0]].label
    assert {"encoder.layer.1.output.dense", "pooler.dense"} <= set(matrices)
    kernels = {m["kernel"] for m in matrices.values()}
    assert "unquantized (16-bit float)" in kernels
    assert any(k.startswith("Marlin W") for k in kernels)
    # validate recomputes the groups from the plan's layers: a hand-edited split fails
    from autotune.validate import validate_plan

    def fused_check(plan) -> object:
        checks = validate_plan(plan, model, tokenizer=tokenizer, measure_latency=False).checks
        (check,) = [c for c in checks if c.name == "fused layers (vllm)"]
        return check

    assert fused_check(result.plan).holds
    key = groups[0][1]
    other = next(o for o in options.values() if o.label != options[key].label)
    edited = dataclasses.replace(result.plan, layers={**result.plan.layers, key: other.to_dict()})
    check = fused_check(edited)
    assert not check.holds and key in check.measured


def test_vllm_names_the_kernel_of_each_option() -> None:
    from autotune.runtimes import vllm_kernel

    assert vllm_kernel(QuantOption(4, 128, True)) == "Marlin W4A16, groups of 128"
    assert vllm_kernel(QuantOption(8, None, True)) == "Marlin W8A16, per channel"
    assert vllm_kernel(KeepOption()) == "unquantized (16-bit float)"


@pytest.mark.parametrize(
    ("target", "weight_only", "with_inputs"),
    [("h100", True, True), ("rtx4090", True, True), ("a100", True, False), ("t4", False, False)],
)
def test_vllm_runs_fp8_where_the_gpu_has_its_kernels(
    target: str, weight_only: bool, with_inputs: bool
) -> None:
    """Marlin's FP8 weight-only kernel from Ampere on; FP8 inputs on Ada and Hopper only."""
    vllm = get_runtime("vllm").for_target(get_target(target))
    assert (vllm.refusal("layer", SQUARE, Fp8Option(False)) is None) == weight_only
    why = vllm.refusal("layer", SQUARE, Fp8Option(True))
    assert (why is None) == with_inputs
    if not with_inputs:
        assert "FP8 tensor cores" in why
    off_tiles = LayerShape("linear", rows=96, cols=256)
    if weight_only:
        assert "96 x 256" in vllm.refusal("layer", off_tiles, Fp8Option(False))
    if with_inputs:  # CUTLASS needs multiples of 16 only
        assert vllm.refusal("layer", off_tiles, Fp8Option(True)) is None


def test_fp8_is_searched_by_default_only_where_a_runtime_runs_its_kernels() -> None:
    from autotune.costs import default_methods

    def methods(runtime: str, target: str) -> tuple[str, ...]:
        chosen = get_runtime(runtime)
        spec = get_target(target)
        return default_methods(chosen.for_target(spec).spec_for(spec))

    assert "fp8" in methods("vllm", "h100") and "fp8" in methods("vllm", "a100")
    assert "fp8" not in methods("vllm", "t4")
    assert "fp8" not in methods("torch", "h100")  # autotune's modules only decode it
    assert "fp8" not in methods("torch", "cpu") and "fp8" not in methods("onnxruntime", "cpu")


def test_h100_prices_fp8_inputs_on_its_fp8_tensor_cores() -> None:
    """16,384 tokens through a 4096 x 4096 layer are compute-bound: FP8 inputs run at twice
    the 16-bit rate. One token is bandwidth-bound: FP8 weights move int8's bytes."""
    spec = get_runtime("vllm").spec_for(get_target("h100"))
    big = LayerShape("linear", rows=4096, cols=4096, dtype="float16")
    options = (Fp8Option(True), KeepOption())
    prompt = {o.label: layer_latency(big, o, spec, 16384) for o in options}
    assert prompt["fp8-ch-a8"] < 0.6 * prompt["keep"]
    weight_only = layer_latency(big, Fp8Option(False), spec, 1)
    int8 = layer_latency(big, QuantOption(8, None, True), spec, 1)
    assert weight_only == pytest.approx(int8, rel=0.01)
    assert weight_only < 0.7 * layer_latency(big, KeepOption(), spec, 1)
    torch_spec = get_target("h100")  # autotune's modules decode the weight on every call
    assert layer_latency(big, Fp8Option(False), torch_spec, 1) > 1.5 * weight_only


def test_vllm_names_the_fp8_kernels() -> None:
    from autotune.runtimes import vllm_kernel

    assert vllm_kernel(Fp8Option(False)) == "Marlin FP8 W8A16, per channel"
    assert vllm_kernel(Fp8Option(True)).startswith("CUTLASS FP8 W8A8")


def test_tune_for_vllm_on_h100_with_fp8_exports_what_it_planned(tokenizer, tmp_path) -> None:
    """An FP8 tune for vLLM on H100: every tuned matrix is FP8 (weight-only or with FP8
    inputs, fused groups whole), the plan names the kernels, and the compressed-tensors export
    holds one float-quantized group per FP8 form."""
    import json

    from autotune.export.base import export_plan
    from autotune.runtimes import vllm_kernel

    model, result = tune_bert_for_vllm(tokenizer, "97%", "h100", methods=["fp8"])
    options = {ref.name: o for ref, o in result.plan.layer_options(model).items()}
    vllm = get_runtime("vllm")
    assert vllm.tie_refusal(options) is None
    tuned = {name: o for name, o in options.items() if not isinstance(o, KeepOption)}
    assert tuned and all(isinstance(o, Fp8Option) for o in tuned.values())
    kernels = {m["kernel"] for m in result.plan.export["matrices"].values()}
    assert kernels & {vllm_kernel(o) for o in tuned.values()} == {
        vllm_kernel(o) for o in tuned.values()
    }
    export_plan(result.plan, model, "compressed-tensors", tmp_path / "out", tokenizer=tokenizer)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    labels = {o.label for o in tuned.values()}
    assert set(config["config_groups"]) == labels
    assert {g["format"] for g in config["config_groups"].values()} == {"float-quantized"}
