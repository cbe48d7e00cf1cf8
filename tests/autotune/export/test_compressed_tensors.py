"""The compressed-tensors export: a folder plain transformers loads (autotune not imported),
whose weights are autotune's stored codes and whose outputs are autotune's."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

from autotune.apply import apply_plan  # noqa: E402
from autotune.export.base import ExportError, export_plan, get_exporter  # noqa: E402
from autotune.export.compressed_tensors import REFUSED, Scheme  # noqa: E402
from autotune.plan import Plan  # noqa: E402
from methods.base import LayerShape  # noqa: E402
from methods.fp8 import Fp8Linear, Fp8Option, round_inputs  # noqa: E402
from methods.quantized import QuantizedLinear  # noqa: E402
from methods.registry import get_method, registered_methods  # noqa: E402
from tests.conftest import make_tiny_bert, make_tiny_llama  # noqa: E402

FORMAT = "compressed-tensors"
IDS = [[2, 15, 99, 731, 1200, 3000, 7, 42, 5, 3]]


def rtn(bits: int, group: int | None, symmetric: bool) -> dict:
    return {"method": "rtn", "bits": bits, "group_size": group, "symmetric": symmetric}


# int4 group sym (default), int4 group asym, int8 per-channel sym and asym, int3 asym,
# gptq int4 sym, and a kept layer; the tied lm_head stays float with its embedding
LLAMA_PLAN = Plan(
    layers={
        "_default": rtn(4, 32, True),
        r"re:model\.layers\.\d+\.mlp\.up_proj": rtn(4, 32, False),
        r"re:model\.layers\.\d+\.self_attn\.v_proj": rtn(8, None, True),
        r"re:model\.layers\.\d+\.self_attn\.o_proj": rtn(8, None, False),
        "model.layers.0.mlp.gate_proj": rtn(3, 32, False),
        "model.layers.1.mlp.gate_proj": {
            "method": "gptq",
            "bits": 4,
            "group_size": 32,
            "symmetric": True,
        },
        "model.layers.1.mlp.down_proj": {"method": "none"},
        "model.embed_tokens": {"method": "none"},
    },
    calibration={"seq_len": 32, "calibration_windows": 4, "batch_size": 4},
)
# symmetric codes only: the loaded weights are autotune's dequantised weights, bit for bit
BERT_PLAN = Plan(
    layers={
        "_default": rtn(4, 32, True),
        r"re:encoder\.layer\.\d+\.intermediate\.dense": rtn(8, None, True),
        "encoder.layer.1.output.dense": {"method": "none"},
        r"re:embeddings\..*": {"method": "none"},
    }
)
# FP8 weight-only and with FP8 inputs beside packed int4: a mixed-precision config
FP8_PLAN = Plan(
    layers={
        "_default": {"method": "fp8", "activations": False},
        r"re:model\.layers\.\d+\.self_attn\.[qkv]_proj": {"method": "fp8", "activations": True},
        r"re:model\.layers\.\d+\.self_attn\.o_proj": rtn(4, 32, True),
        "model.layers.1.mlp.down_proj": {"method": "none"},
        "model.embed_tokens": {"method": "none"},
    }
)

LOAD = """
import sys
import torch
import transformers
from safetensors.torch import save_file

ids = torch.tensor({ids})
for folder, auto in {folders}:
    model, info = getattr(transformers, auto).from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        out = model(input_ids=ids)
    first = out.logits if hasattr(out, "logits") else out.last_hidden_state
    weights = {{
        name + ".weight": module.weight.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }}
    save_file({{"output": first.contiguous(), **weights}}, folder + "-loaded.safetensors")
assert "autotune" not in sys.modules and "methods" not in sys.modules
"""


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def output(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(IDS))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> dict:
    """Both models exported, autotune's compressed twins, and what plain transformers loaded
    from the folders in a process that never imports autotune."""
    root = tmp_path_factory.mktemp("ct-export")
    cases = {
        "llama": (make_tiny_llama(), LLAMA_PLAN, "AutoModelForCausalLM"),
        "bert": (make_tiny_bert(), BERT_PLAN, "AutoModel"),
        "fp8": (make_tiny_llama(), FP8_PLAN, "AutoModelForCausalLM"),
    }
    found = {}
    for key, (model, plan, auto) in cases.items():
        before = state_copy(model)
        result = export_plan(plan, model, FORMAT, root / key, tokenizer=tokenizer)
        found[key] = {
            "model": model,
            "before": before,
            "result": result,
            "compressed": apply_plan(model, plan, tokenizer=tokenizer),
            "folder": root / key,
            "auto": auto,
        }
    folders = [(str(v["folder"]), v["auto"]) for v in found.values()]
    script = LOAD.format(ids=IDS, folders=folders)
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=root
    )
    assert run.returncode == 0, run.stderr[-4000:]
    for case in found.values():
        case["loaded"] = load_file(f"{case['folder']}-loaded.safetensors")
    return found


def quantized_layers(model: torch.nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def zero_points(module: QuantizedLinear) -> torch.Tensor:
    return torch.round(-module.offsets.float() / module.scales.float())


def float_twin(case: dict, exact_offsets: bool) -> torch.nn.Module:
    """The float model with each quantised weight set to autotune's dequantised weight, or with
    ``exact_offsets`` to its codes decoded with whole zero points, ``s * (u - z)``, instead of
    the float16-rounded offsets ``m = -z * s``."""
    twin = copy.deepcopy(case["model"])
    for name, module in quantized_layers(case["compressed"]).items():
        weight = module.dequantize(torch.float32)
        if exact_offsets and not module.symmetric:
            exact = -zero_points(module) * module.scales.float()
            shift = (exact - module.offsets.float()).repeat_interleave(module.group_size, dim=1)
            weight = weight + shift
        twin.get_submodule(name).weight.data.copy_(weight)
    return twin


@pytest.mark.parametrize("key", ["llama", "bert"])
def test_plain_transformers_gives_autotunes_outputs(exported: dict, key: str) -> None:
    """The loaded model is autotune's codes decoded with whole zero points, to float32
    rounding. Against autotune's compressed model it differs by the rounding of autotune's
    int8/int4 kernels and, for asymmetric layers, by the float16 rounding of the offsets."""
    case = exported[key]
    loaded = case["loaded"]["output"]
    ours = output(case["compressed"])
    scale = ours.abs().max().item()

    def error(other: torch.Tensor) -> float:
        return (loaded - other).abs().max().item() / scale

    exact = error(output(float_twin(case, exact_offsets=True)))
    dequantised = error(output(float_twin(case, exact_offsets=False)))
    autotune = error(ours)
    quantisation = (output(case["model"]) - ours).abs().max().item() / scale
    print(
        f"{key}: max |loaded - x| / max |autotune's output|, x = codes with whole zero points: "
        f"{exact:.1e}; autotune's dequantised weights in float: {dequantised:.1e}; autotune's "
        f"compressed model: {autotune:.1e} (its own quantisation error: {quantisation:.1e})"
    )
    assert exact < 1e-6
    if key == "bert":  # symmetric codes only: the very same weights
        assert dequantised < 1e-6
    else:  # the offsets' float16 rounding
        assert dequantised < 1e-3
    assert autotune < 5e-3
    assert autotune < quantisation / 5


def per_column(groups: torch.Tensor, module: QuantizedLinear) -> torch.Tensor:
    return groups.float().repeat_interleave(module.group_size, dim=1)


@pytest.mark.parametrize("key", ["llama", "bert"])
def test_loaded_weights_are_autotunes_dequantised_weights(exported: dict, key: str) -> None:
    case = exported[key]
    loaded = case["loaded"]
    for name, module in quantized_layers(case["compressed"]).items():
        ours = module.dequantize(torch.float32)
        theirs = loaded[f"{name}.weight"]
        if module.symmetric:
            assert torch.equal(theirs, ours), name
        else:  # s * (u - z) against s * u + m: m is -z * s rounded to float16
            exact = per_column(-zero_points(module) * module.scales.float(), module)
            rounding = (per_column(module.offsets, module) - exact).abs()
            assert ((theirs - ours).abs() <= rounding + 1e-6 * ours.abs().max()).all(), name
            assert (rounding <= exact.abs() * 2.0**-11).all(), name
    for name, module in case["compressed"].named_modules():
        if type(module) is torch.nn.Linear:
            assert torch.equal(loaded[f"{name}.weight"], module.weight), name


def test_codes_and_scales_are_autotunes_stored_ones(exported: dict) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    case = exported["llama"]
    tensors = load_file(case["folder"] / "model.safetensors")
    for name, module in quantized_layers(case["compressed"]).items():
        codes = module.unsigned_codes().to(torch.int16)
        assert torch.equal(tensors[f"{name}.weight_scale"], module.scales), name
        if module.symmetric:
            signed = codes - 2 ** (module.bits - 1)
        else:
            zero = zero_points(module).to(torch.int16)
            signed = codes - zero.repeat_interleave(module.group_size, dim=1)
        scheme = Scheme.of(module)
        if scheme.format == "pack-quantized":
            shape = tensors[f"{name}.weight_shape"].tolist()
            assert shape == [module.rows, module.cols]
            packed = tensors[f"{name}.weight_packed"]
            assert torch.equal(unpack_from_int32(packed, scheme.bits, shape).short(), signed)
            assert f"{name}.weight_zero_point" not in tensors
        else:  # 8-bit asymmetric: int8 codes u - 128 and zero points z - 128
            assert torch.equal(tensors[f"{name}.weight"].short(), codes - 128), name
            zero = tensors[f"{name}.weight_zero_point"].short()
            assert torch.equal(zero, zero_points(module).short() - 128), name


def test_one_config_group_per_written_scheme_and_kept_layers_ignored(exported: dict) -> None:
    case = exported["llama"]
    config = json.loads((case["folder"] / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["quantization_status"] == "compressed"
    assert config["format"] == "mixed-precision"
    groups = {
        label: (group["format"], group["weights"]["num_bits"], group["weights"]["strategy"])
        for label, group in config["config_groups"].items()
    }
    # int3 asym is written int4 sym, int4 asym int5 sym; gptq int4 g32 sym joins rtn's group
    assert groups == {
        "int4-g32-sym": ("pack-quantized", 4, "group"),
        "int5-g32-sym": ("pack-quantized", 5, "group"),
        "int8-ch-sym": ("pack-quantized", 8, "channel"),
        "int8-ch-asym": ("int-quantized", 8, "channel"),
    }
    targets = {name: label for label, g in config["config_groups"].items() for name in g["targets"]}
    assert targets["model.layers.0.mlp.gate_proj"] == "int4-g32-sym"  # int3 asym
    assert targets["model.layers.1.mlp.gate_proj"] == "int4-g32-sym"  # gptq
    assert targets["model.layers.1.mlp.up_proj"] == "int5-g32-sym"
    assert targets["model.layers.0.self_attn.o_proj"] == "int8-ch-asym"
    assert set(config["ignore"]) == {"model.layers.1.mlp.down_proj", "lm_head"}
    assert set(targets) | set(config["ignore"]) == {
        n for n, m in make_tiny_llama().named_modules() if isinstance(m, torch.nn.Linear)
    }
    kept = {"model.layers.1.mlp.down_proj": "float", "model.embed_tokens": "float"}
    assert case["result"].layers == targets | kept


@pytest.mark.parametrize("key", ["llama", "bert"])
def test_the_folder_holds_the_model_tokenizer_and_plan(exported: dict, key: str) -> None:
    case = exported[key]
    folder, result = case["folder"], case["result"]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "plan.json", "tokenizer.json"} <= names
    assert (
        json.loads((folder / "plan.json").read_text())["layers"]
        == (LLAMA_PLAN if key == "llama" else BERT_PLAN).layers
    )
    files = [folder / n for n in names]
    assert result.format == FORMAT and result.path == folder
    assert result.bytes == sum(f.stat().st_size for f in files)


@pytest.mark.parametrize("key", ["llama", "bert"])
def test_checkpoint_bytes_are_autotunes_stored_bytes(exported: dict, key: str) -> None:
    """Symmetric layers take exactly autotune's bytes (plus 16 for ``weight_shape``); asymmetric
    ones trade the float16 offsets for a wider code (below 8 bits) or an int8 zero point; the
    float tensors are the same; the file adds only its JSON header."""
    case = exported[key]
    file = case["folder"] / "model.safetensors"
    sizes = {k: v.numel() * v.element_size() for k, v in load_file(file).items()}
    header = int.from_bytes(file.read_bytes()[:8], "little")
    assert file.stat().st_size == 8 + header + sum(sizes.values())
    quantized = quantized_layers(case["compressed"])
    ours = {k: v.numel() * v.element_size() for k, v in case["compressed"].state_dict().items()}
    for name, module in quantized.items():
        written = sum(v for k, v in sizes.items() if k.startswith(f"{name}.weight"))
        codes = module.rows * module.cols * Scheme.of(module).bits // 8
        if module.symmetric:
            assert written == module.stored_weight_bytes() + 16, name
        elif module.bits < 8:  # one more bit per code, no offsets, weight_shape
            assert written == codes + module.scales.numel() * 2 + 16, name
        else:  # int8 zero points instead of float16 offsets
            assert written == module.stored_weight_bytes() - module.scales.numel(), name
    is_float = {k for k in ours if k.rpartition(".")[0] not in quantized or k.endswith(".bias")}
    assert {k: v for k, v in sizes.items() if k in is_float} == {k: ours[k] for k in is_float}
    assert all(k in is_float or k.rpartition(".")[0] in quantized for k in sizes)
    stored = sum(ours.values())
    print(
        f"{key}: model.safetensors {file.stat().st_size} B, autotune's compressed state "
        f"{stored} B ({file.stat().st_size / stored - 1:+.3%}; JSON header {8 + header} B)"
    )
    if key == "bert":  # symmetric only: autotune's bytes, weight_shape and the header
        assert file.stat().st_size == stored + 16 * len(quantized) + 8 + header


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_librarys_decompressor_reads_every_bit_width(
    bits: int, group: int | None, symmetric: bool
) -> None:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from autotune.export.compressed_tensors import layer_tensors
    from methods.registry import option_from_dict

    torch.manual_seed(bits)
    linear = torch.nn.Linear(96, 24)
    option = option_from_dict(rtn(bits, group, symmetric))
    module = registered_methods()["rtn"].convert(linear, option)
    scheme = Scheme.of(module)
    tensors = layer_tensors(module, "layer")
    tensors["weight_scale"] = tensors["weight_scale"].float()  # as a float32 model loads it
    args = QuantizationScheme(targets=["layer"], weights=scheme.args(), format=scheme.format)
    weight = BaseCompressor.get_value_from_registry(scheme.format).decompress(tensors, args)
    weight = weight["weight"].float()
    ours = module.dequantize(torch.float32)
    if symmetric:
        assert torch.equal(weight, ours)
    else:
        exact = per_column(-zero_points(module) * module.scales.float(), module)
        assert torch.allclose(weight, ours - per_column(module.offsets, module) + exact)
    assert scheme.bits == (bits if symmetric or bits == 8 else bits + 1)


def test_offsets_that_are_no_whole_zero_point_are_refused() -> None:
    from autotune.export.compressed_tensors import layer_tensors
    from methods.registry import option_from_dict

    module = registered_methods()["rtn"].convert(
        torch.nn.Linear(64, 8), option_from_dict(rtn(4, 32, False))
    )
    module.offsets[0, 0] += module.scales[0, 0] / 3
    with pytest.raises(ExportError, match=r"'layer'.*not whole zero points"):
        layer_tensors(module, "layer")


def test_the_users_model_is_not_changed(exported: dict) -> None:
    for case in exported.values():
        after = case["model"].state_dict()
        assert after.keys() == case["before"].keys()
        assert all(torch.equal(after[k], v) for k, v in case["before"].items())
        assert not any(isinstance(m, QuantizedLinear) for m in case["model"].modules())


def test_fp8_layers_load_as_autotunes_weights_and_input_rounding(exported: dict) -> None:
    """FP8 layers load as autotune's decoded weights bit for bit, and transformers rounds the
    inputs of the FP8-activation layers per token as autotune's module does: the loaded model
    is the float model with autotune's weights and that rounding, to float32 rounding."""
    case = exported["fp8"]
    compressed, loaded = case["compressed"], case["loaded"]
    written = {
        n: m for n, m in compressed.named_modules() if isinstance(m, (Fp8Linear, QuantizedLinear))
    }
    assert sum(isinstance(m, Fp8Linear) for m in written.values()) == 11
    assert sum(isinstance(m, Fp8Linear) and m.activations for m in written.values()) == 6
    twin = copy.deepcopy(case["model"])
    for name, module in written.items():
        weight = module.dequantize(torch.float32)
        assert torch.equal(loaded[f"{name}.weight"], weight), name
        twin.get_submodule(name).weight.data.copy_(weight)
        if isinstance(module, Fp8Linear) and module.activations:
            twin.get_submodule(name).register_forward_pre_hook(lambda _, a: (round_inputs(a[0]),))
    ours, reference = output(compressed), output(twin)
    scale = ours.abs().max().item()
    assert (loaded["output"] - reference).abs().max().item() / scale < 1e-6
    assert (loaded["output"] - ours).abs().max().item() / scale < 5e-3  # int4 kernel rounding
    without_rounding = copy.deepcopy(twin)
    for module in without_rounding.modules():
        module._forward_pre_hooks.clear()
    assert (loaded["output"] - output(without_rounding)).abs().max().item() / scale > 1e-4


def test_fp8_groups_are_float_quantized_with_dynamic_token_inputs(exported: dict) -> None:
    case = exported["fp8"]
    config = json.loads((case["folder"] / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mixed-precision"
    groups = config["config_groups"]
    assert set(groups) == {"fp8-ch", "fp8-ch-a8", "int4-g32-sym"}
    for label in ("fp8-ch", "fp8-ch-a8"):
        group = groups[label]
        assert group["format"] == "float-quantized"
        assert (group["weights"]["type"], group["weights"]["num_bits"]) == ("float", 8)
        assert group["weights"]["strategy"] == "channel"
    assert groups["fp8-ch"]["input_activations"] is None
    inputs = groups["fp8-ch-a8"]["input_activations"]
    assert (inputs["type"], inputs["num_bits"], inputs["strategy"]) == ("float", 8, "token")
    assert inputs["dynamic"] is True
    assert len(groups["fp8-ch-a8"]["targets"]) == 6
    tensors = load_file(case["folder"] / "model.safetensors")
    name = "model.layers.0.mlp.up_proj"
    module = case["compressed"].get_submodule(name)
    assert tensors[f"{name}.weight"].dtype == torch.float8_e4m3fn
    assert tensors[f"{name}.weight_scale"].shape == (module.rows, 1)
    written = sum(v.numel() * v.element_size() for k, v in tensors.items() if k.startswith(name))
    cost = get_method("fp8").cost(LayerShape.of(case["model"].get_submodule(name)), Fp8Option())
    assert written == cost.bytes  # the plan's bytes: codes and float32 scales


REFUSED_PLANS = {
    "codebook": ({"method": "codebook", "format": "nf", "bits": 4, "group_size": 32}, "codebook"),
    "svd": ({"method": "svd", "rank": 8}, "low-rank"),
    "w8a8": ({"method": "w8a8"}, "smoothing"),
    "outliers": ({"method": "outliers", "bits": 4, "group_size": 32}, "outlier"),
    "magnitude": ({"method": "magnitude", "sparsity": 0.5}, "sparse"),
}


@pytest.mark.parametrize("method", sorted(REFUSED_PLANS))
def test_a_layer_the_format_cannot_hold_is_refused_before_anything_is_written(
    tmp_path: Path, method: str
) -> None:
    option, reason = REFUSED_PLANS[method]
    layer = "encoder.layer.0.attention.self.query"
    plan = Plan(layers={r"re:encoder\..*": rtn(4, 32, True), layer: option})
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=rf"'{layer}'.*{reason}.*allowed: rtn or gptq"):
        export_plan(plan, make_tiny_bert(), FORMAT, out)
    assert list(tmp_path.iterdir()) == []


def test_a_refused_export_leaves_an_existing_folder_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    plan = Plan(layers={"encoder.layer.0.attention.self.query": {"method": "svd", "rank": 8}})
    with pytest.raises(ExportError, match="low-rank"):
        export_plan(plan, make_tiny_bert(), FORMAT, out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]


@pytest.mark.parametrize("runtime", ["vllm", None])
def test_a_plan_for_vllm_splitting_a_fused_group_is_refused(
    tmp_path: Path, runtime: str | None
) -> None:
    """vLLM loads a block's query, key and value as one matrix: a plan tuned for it that
    gives them different schemes is refused before anything is written; the same plan
    without a runtime (for transformers, which does not fuse them) is written."""
    plan = Plan(
        layers={
            r"re:encoder\..*": rtn(4, 32, True),
            "encoder.layer.1.attention.self.key": rtn(8, None, True),
        },
        target={"runtime": runtime} if runtime else {},
    )
    out = tmp_path / "out"
    if runtime is None:
        export_plan(plan, make_tiny_bert(), FORMAT, out)
        assert (out / "config.json").is_file()
        return
    with pytest.raises(ExportError, match=r"cannot run in vllm: .*attention\.self\.query.*"):
        export_plan(plan, make_tiny_bert(), FORMAT, out)
    assert list(tmp_path.iterdir()) == []


def test_structured_pruning_is_refused(tmp_path: Path) -> None:
    plan = Plan(
        layers={r"re:encoder\..*": rtn(4, 32, True)},
        structure={"kept": {"encoder.layer.0.output.dense": list(range(96))}},
    )
    with pytest.raises(ExportError, match="structured pruning"):
        export_plan(plan, make_tiny_bert(), FORMAT, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tied", [False, True])
def test_a_quantised_embedding_is_refused(tmp_path: Path, tied: bool) -> None:
    model = make_tiny_llama() if tied else make_tiny_bert()
    name = "model.embed_tokens" if tied else "embeddings.word_embeddings"
    for layers in ({name: rtn(8, None, True)}, {"_default": rtn(4, 32, True)}):
        with pytest.raises(ExportError, match=rf"'{name}'.*keep embeddings in float"):
            export_plan(Plan(layers=layers), model, FORMAT, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_a_quantised_conv1d_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=3072, n_embd=64, n_layer=1, n_head=4, n_positions=64, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    plan = Plan(layers={r"re:.*attn\.c_attn": rtn(4, 32, True)})
    with pytest.raises(ExportError, match=r"'transformer\.h\.0\.attn\.c_attn'.*Conv1D"):
        export_plan(plan, model, FORMAT, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_every_registered_method_gets_a_deliberate_answer() -> None:
    exporter = get_exporter(FORMAT)
    linear = LayerShape("linear", 64, 128)
    embedding = LayerShape("embedding", 3072, 64)
    held = {"none", "rtn", "gptq", "fp8"}
    assert set(registered_methods()) <= held | set(REFUSED)
    for name, method in registered_methods().items():
        option = method.option_type()
        why = exporter.refusal("layer", linear, option)
        if name in held:
            assert why is None, name
        else:
            assert why and "allowed: rtn or gptq" in why, name
        if name in ("rtn", "gptq"):
            assert "keep embeddings in float" in exporter.refusal("emb", embedding, option)
        if name == "fp8":
            assert "allowed: rtn or gptq" in exporter.refusal("emb", embedding, option)
    assert exporter.refusal("emb", embedding, registered_methods()["none"].option_type()) is None


def test_importing_the_exporter_does_not_import_compressed_tensors() -> None:
    script = (
        "import sys; import autotune.export.compressed_tensors as m; "
        "assert 'compressed_tensors' not in sys.modules; print(m.CompressedTensorsExporter.name)"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == FORMAT
