"""The ONNX export: a file ONNX Runtime runs on CPU whose compressed layers read autotune's own
codes (MatMulNBits, GatherBlockQuantized, DequantizeLinear, MatMulInteger) and whose outputs
are autotune's compressed model's."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

from autotune.apply import apply_plan  # noqa: E402
from autotune.export import onnx as onnx_export  # noqa: E402
from autotune.export.base import ExportError, check_plan, export_plan, get_exporter  # noqa: E402
from autotune.export.onnx_graph import FOLDED_ELEMENTS, OPSET, PREFIX  # noqa: E402
from autotune.export.onnx_packing import container_bits  # noqa: E402
from autotune.plan import Plan  # noqa: E402
from methods.base import LayerShape  # noqa: E402
from methods.quantized import QuantizedEmbedding, QuantizedLinear  # noqa: E402
from methods.registry import registered_methods  # noqa: E402
from methods.smoothquant import has_vnni  # noqa: E402
from tests.conftest import make_tiny_bert, make_tiny_llama  # noqa: E402

FORMAT = "onnx"
CALIBRATION = {"seq_len": 32, "calibration_windows": 4, "batch_size": 4}


def rtn(bits: int, group: int | None, symmetric: bool) -> dict:
    return {"method": "rtn", "bits": bits, "group_size": group, "symmetric": symmetric}


# hidden 96, intermediate 192: per-channel widths that are not powers of 2, a group of 48
# (blocks of 16), a group of 24 (DequantizeLinear), 2-, 3-, 4-, 5- and 8-bit codes
BERT_PLAN = Plan(
    layers={
        "_default": rtn(4, 32, True),
        r"re:encoder\.layer\.0\.attention\.self\..*": rtn(4, 32, False),
        r"re:encoder\.layer\.\d+\.intermediate\.dense": rtn(8, None, True),
        "encoder.layer.1.attention.self.query": rtn(4, None, False),
        "encoder.layer.1.attention.self.value": rtn(2, 32, True),
        "encoder.layer.1.output.dense": rtn(3, 48, False),
        "encoder.layer.0.output.dense": rtn(5, 24, True),
        "encoder.layer.1.attention.output.dense": {"method": "none"},
        "embeddings.word_embeddings": rtn(8, None, True),
        "embeddings.position_embeddings": rtn(6, None, False),
        "embeddings.token_type_embeddings": {"method": "none"},
    }
)
# a tied, asymmetric 4-bit embedding table (its lm_head reads the same codes), 2-bit and
# 8-bit per-channel asymmetric layers, a GPTQ layer and a kept one
LLAMA_PLAN = Plan(
    layers={
        "_default": rtn(4, 32, True),
        r"re:model\.layers\.\d+\.mlp\.up_proj": rtn(2, 32, False),
        "model.layers.0.self_attn.v_proj": rtn(8, None, False),
        "model.layers.1.mlp.gate_proj": {
            "method": "gptq",
            "bits": 4,
            "group_size": 32,
            "symmetric": False,
        },
        "model.layers.1.mlp.down_proj": {"method": "none"},
        "model.embed_tokens": rtn(4, 32, False),
    },
    calibration=CALIBRATION,
)
W8A8_PLAN = Plan(
    layers={
        "_default": {"method": "none"},
        r"re:encoder\.layer\.\d+\.intermediate\.dense": {"method": "w8a8", "alpha": 0.5},
        "encoder.layer.0.attention.self.query": {"method": "w8a8", "alpha": 0},
    },
    calibration=CALIBRATION,
)
EXPECTED_OPS = {
    "bert": {"MatMulNBits": 11, "DequantizeLinear": 1, "GatherBlockQuantized": 0},
    "llama": {"MatMulNBits": 14, "DequantizeLinear": 0, "GatherBlockQuantized": 1},
    "w8a8": {"MatMulInteger": 3, "MatMulNBits": 0},
}


def inputs(key: str) -> dict[str, torch.Tensor]:
    """Fixed inputs, 24 tokens; the encoder's second row padded at the end."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 3000, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    if key == "llama":
        return {"input_ids": ids, "attention_mask": mask}
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def main_output(model: torch.nn.Module, feed: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        out = model(**feed)
    first = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return first.numpy()


def run_onnx(path: Path, feed: dict[str, torch.Tensor]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feed.items()})


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def exact_twin(model: torch.nn.Module, compressed: torch.nn.Module) -> torch.nn.Module:
    """The float model with each quantised weight set to its codes decoded with whole zero
    points, ``s * (u - z)``: what the exported file computes."""
    twin = copy.deepcopy(model)
    for name, module in compressed.named_modules():
        if not isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            continue
        weight = module.dequantize(torch.float32)
        if not module.symmetric:
            scales, offsets = module.scales.float(), module.offsets.float()
            exact = -torch.round(-offsets / scales) * scales
            weight = weight + (exact - offsets).repeat_interleave(module.group_size, dim=1)
        twin.get_submodule(name).weight.data.copy_(weight)
    return twin


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> dict:
    """Each model exported, with autotune's compressed twin and the file's outputs."""
    root = tmp_path_factory.mktemp("onnx-export")
    cases = {
        "bert": (make_tiny_bert(hidden=96), BERT_PLAN),
        "llama": (make_tiny_llama(), LLAMA_PLAN),
        "w8a8": (make_tiny_bert(hidden=96), W8A8_PLAN),
    }
    found = {}
    for key, (model, plan) in cases.items():
        before = state_copy(model)
        path = root / f"{key}.onnx"
        result = export_plan(plan, model, FORMAT, path, tokenizer=tokenizer)
        feed = inputs(key)
        found[key] = {
            "model": model,
            "plan": plan,
            "before": before,
            "result": result,
            "path": path,
            "compressed": apply_plan(model, plan, tokenizer=tokenizer),
            "feed": feed,
            "outputs": run_onnx(path, feed),
        }
    return found


@pytest.mark.parametrize("key", ["bert", "llama"])
def test_onnx_runtime_gives_autotunes_outputs(exported: dict, key: str) -> None:
    """The file computes the stored codes (to float32 accumulation order) and so autotune's
    compressed model, up to the float16 rounding of asymmetric offsets and the bfloat16
    activations of autotune's own int4/int8 kernels; far closer than the plan to the float
    model, so it cannot be the float model exported."""
    case = exported[key]
    ours = case["outputs"][0]
    feed = case["feed"]
    autotune = main_output(case["compressed"], feed)
    twin = main_output(exact_twin(case["model"], case["compressed"]), feed)
    plan_error = relative(autotune, main_output(case["model"], feed))
    to_twin, to_autotune = relative(ours, twin), relative(ours, autotune)
    print(
        f"\n{key}: relative error of ONNX Runtime's output against the exact decode of the "
        f"codes {to_twin:.1e}, against autotune's compressed model {to_autotune:.1e}; "
        f"the plan's own error against the float model {plan_error:.1e}"
    )
    assert to_twin < 1e-5
    assert to_autotune < 2e-3
    assert to_autotune < plan_error / 50
    if key == "bert":  # the pooler runs 2 tokens: autotune's int4 kernel, bfloat16 activations
        pooled = case["compressed"](**feed).pooler_output.detach().numpy()
        pooler_error = relative(case["outputs"][1], pooled)
        print(f"bert pooler_output against autotune's: {pooler_error:.1e}")
        assert pooler_error < 1e-2


def test_w8a8_matches_autotunes_dynamic_int8(exported: dict) -> None:
    """Smoothing, 7-bit per-tensor activations and int8 codes as autotune computes them."""
    case = exported["w8a8"]
    autotune = main_output(case["compressed"], case["feed"])
    error = relative(case["outputs"][0], autotune)
    plan_error = relative(autotune, main_output(case["model"], case["feed"]))
    print(f"\nw8a8: against autotune's compressed model {error:.1e}; plan error {plan_error:.1e}")
    assert error < 1e-4
    assert error < plan_error / 50


def op_counts(path: Path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("key", ["bert", "llama", "w8a8"])
def test_each_compressed_layer_gets_its_low_bit_op(exported: dict, key: str) -> None:
    case = exported[key]
    counts = op_counts(case["path"])
    for op, expected in EXPECTED_OPS[key].items():
        assert counts[op] == expected, (op, counts)
    layers = case["result"].layers
    if key == "bert":
        assert layers["encoder.layer.0.intermediate.dense"] == (
            "MatMulNBits 8-bit block 32 (per-channel)"
        )
        assert layers["encoder.layer.1.output.dense"] == (
            "MatMulNBits 4-bit block 16 (3-bit codes, group 48)"
        )
        assert layers["encoder.layer.0.output.dense"].startswith("DequantizeLinear uint8 block 24")
        assert layers["encoder.layer.1.attention.self.value"] == "MatMulNBits 2-bit block 32"
        # one scale per row, not repeated per block: plain uint8 rows, gathered with it
        assert layers["embeddings.word_embeddings"] == (
            "Gather int8 + row scales (8-bit per-channel)"
        )
        assert layers["embeddings.position_embeddings"] == (
            "Gather uint8 + row zero points + row scales (6-bit per-channel)"
        )
        assert layers["encoder.layer.1.attention.output.dense"] == "float"
    if key == "llama":
        assert layers["model.embed_tokens"] == "GatherBlockQuantized 4-bit block 32"
        assert layers["lm_head"] == "MatMulNBits 4-bit block 32 (tied to model.embed_tokens)"
        assert layers["model.layers.1.mlp.down_proj"] == "float"


@pytest.mark.parametrize("key", ["bert", "llama"])
def test_the_file_holds_codes_not_float_weights(exported: dict, key: str) -> None:
    """No float tensor stands for a compressed layer: its float weight is gone, its codes are
    integers of the packed size, and the float tensors left are the kept layers' and the rest
    of the model's (plus float32 scales)."""
    case = exported[key]
    model = onnx.load(str(case["path"]))
    initializers = {t.name: t for t in model.graph.initializer}
    compressed = {
        n: m
        for n, m in case["compressed"].named_modules()
        if isinstance(m, (QuantizedLinear, QuantizedEmbedding))
    }
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    for name, module in compressed.items():
        assert PREFIX + name + ".weight" not in initializers
        codes = initializers[f"{name}.codes"]
        integers = (onnx.TensorProto.UINT8, onnx.TensorProto.UINT4, onnx.TensorProto.INT8)
        assert codes.data_type in integers
        wide = container_bits(module.bits)
        assert len(codes.raw_data) <= module.rows * (module.cols + 64) * wide // 8
    floats = sum(  # constants folded from shapes (attention's scale) are a few elements
        len(t.raw_data)
        for name, t in initializers.items()
        if t.data_type in float_types
        and not name.endswith(".scales")
        and math.prod(t.dims) > FOLDED_ELEMENTS
    )
    kept = sum(
        p.numel() * 4
        for n, p in [*case["model"].named_parameters(), *case["model"].named_buffers()]
        if p.is_floating_point()
        and not (n.endswith(".weight") and n.removesuffix(".weight") in compressed)
    )
    assert floats <= kept
    model_bytes = sum(p.numel() * 4 for p in case["model"].parameters())
    assert case["result"].bytes == case["path"].stat().st_size
    assert case["result"].bytes < 0.45 * model_bytes


def test_the_users_model_is_not_changed(exported: dict) -> None:
    for case in exported.values():
        after = case["model"].state_dict()
        assert case["before"].keys() == after.keys()
        assert all(torch.equal(case["before"][k], after[k]) for k in after)
        assert not any(
            isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in case["model"].modules()
        )


def test_graph_inputs_and_outputs(exported: dict) -> None:
    bert = onnx.load(str(exported["bert"]["path"]))
    llama = onnx.load(str(exported["llama"]["path"]))
    assert [i.name for i in bert.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in bert.graph.output] == ["last_hidden_state", "pooler_output"]
    assert [i.name for i in llama.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in llama.graph.output] == ["logits"]
    assert {o.domain: o.version for o in bert.opset_import}[""] == OPSET


# ------------------------------------------------------------------------------ refusals

HELD = {"none", "rtn", "gptq", "w8a8"}


@pytest.mark.parametrize("method", sorted(registered_methods()))
def test_every_method_gets_a_deliberate_answer(method: str) -> None:
    exporter = get_exporter(FORMAT)
    registered = registered_methods()[method]
    shape = LayerShape("linear", 96, 192, True)
    option = registered.grid(shape)[0]
    why = exporter.refusal("some.layer", shape, option)
    if method in HELD:
        assert why is None
    else:
        assert why is not None and option.label in why and "allowed" in why


def test_embedding_groups_the_kernel_cannot_take_are_refused() -> None:
    exporter = get_exporter(FORMAT)
    shape = LayerShape("embedding", 1000, 96)
    assert exporter.refusal("emb", shape, get_option(rtn(4, 32, True))) is None
    assert exporter.refusal("emb", shape, get_option(rtn(3, None, False))) is None
    why = exporter.refusal("emb", shape, get_option(rtn(4, 24, True)))
    assert why is not None and "keep embeddings in float" in why
    narrow = LayerShape("embedding", 1000, 40)
    assert "keep embeddings in float" in exporter.refusal(
        "emb", narrow, get_option(rtn(8, None, True))
    )


def get_option(data: dict):
    from methods.registry import option_from_dict

    return option_from_dict(data)


@pytest.mark.parametrize(
    ("option", "words"),
    [
        ({"method": "codebook", "format": "nf4", "bits": 4, "group_size": 32}, "codebook"),
        ({"method": "svd", "fraction": 0.25}, "low-rank"),
        ({"method": "magnitude", "sparsity": 0.5}, "sparse"),
        (rtn(4, 8, True), "keep embeddings in float"),
    ],
)
def test_refused_plans_name_the_layer_and_write_nothing(
    tmp_path: Path, option: dict, words: str
) -> None:
    model = make_tiny_bert()
    layer = "embeddings.word_embeddings" if words.startswith("keep") else "pooler.dense"
    plan = Plan(layers={"_default": {"method": "none"}, layer: option})
    out = tmp_path / "model.onnx"
    with pytest.raises(ExportError) as caught:
        export_plan(plan, model, FORMAT, out)
    assert layer in str(caught.value) and words in str(caught.value)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_importing_the_exporter_imports_no_onnx() -> None:
    code = (
        "import sys, autotune.export.onnx; "
        "assert not {'onnx', 'onnxruntime'} & set(sys.modules), sorted(sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_registration() -> None:
    exporter = get_exporter(FORMAT)
    assert isinstance(exporter, onnx_export.OnnxExporter)
    assert exporter.requires == ("onnx", "onnxruntime") and exporter.writes == "file"
    assert exporter.install == '"autotune[export]"'


def test_external_data_and_int8_activations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the protobuf limit (lowered here) the tensors go to ``<file>.data``; an exporter
    with ``accuracy_level=4`` lets ONNX Runtime quantise activations (slightly less exact)."""
    monkeypatch.setattr(onnx_export, "PROTO_LIMIT", 0)
    model = make_tiny_bert()
    plan = Plan(layers={"_default": rtn(4, 32, True)})
    exporter = onnx_export.OnnxExporter(accuracy_level=4)
    check_plan(exporter, model, plan)
    compressed = apply_plan(model, plan)
    out = tmp_path / "bert.onnx"
    result = exporter.write(compressed, plan, out)
    data = tmp_path / "bert.onnx.data"
    assert data.exists() and result.bytes == out.stat().st_size + data.stat().st_size
    assert out.stat().st_size < data.stat().st_size
    graph = onnx.load(str(out), load_external_data=False).graph
    levels = {
        a.i
        for n in graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }
    assert levels == {4}
    feed = inputs("bert")
    ours = run_onnx(out, feed)[0]
    autotune = main_output(compressed, feed)
    plan_error = relative(autotune, main_output(model, feed))
    assert relative(ours, autotune) < plan_error / 5


def test_a_model_that_is_not_the_plans_is_refused(tmp_path: Path) -> None:
    """``write`` checks the compressed model against the plan before any export work."""
    model = make_tiny_bert()
    int4 = Plan(layers={"_default": rtn(4, 32, True)})
    int8 = Plan(layers={"_default": rtn(8, None, True)})
    kept = Plan(layers={"_default": {"method": "none"}})
    exporter = onnx_export.OnnxExporter()
    out = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match="storage the plan does not give it"):
        exporter.write(apply_plan(model, int4), int8, out)
    with pytest.raises(ExportError, match="holds a float weight"):
        exporter.write(apply_plan(model, kept), int8, out)
    assert not out.exists()


W8A8_FUSED_PLAN = Plan(
    layers={
        "_default": {"method": "none"},
        r"re:encoder\.layer\.\d+\.intermediate\.dense": {
            "method": "w8a8",
            "alpha": 0.5,
            "activation_bits": 8,
        },
        r"re:encoder\.layer\.\d+\.attention\.self\.(query|value)": {
            "method": "w8a8",
            "alpha": 0,
            "activation_bits": 8,
            "weight_scales": "tensor",
        },
        "encoder.layer.0.attention.self.key": {"method": "w8a8", "alpha": 0, "activation_bits": 8},
    },
    calibration=CALIBRATION,
)


def _pair_safe(plan: Plan, safe: bool) -> Plan:
    layers = {
        key: {**value, "pair_safe": safe} if value["method"] == "w8a8" else value
        for key, value in plan.layers.items()
    }
    return Plan(layers=layers, calibration=plan.calibration)


@pytest.mark.parametrize("pair_safe", [False, True])
def test_eight_bit_w8a8_runs_onnx_runtimes_fused_int8_matmul(
    tmp_path: Path, tokenizer, pair_safe: bool
) -> None:
    """8-bit activations are written as DynamicQuantizeLinear -> MatMulInteger -> scales,
    which ONNX Runtime fuses into its dynamic int8 kernels (no MatMulInteger is left after
    its optimiser); the output is autotune's model up to the rounding of activations. With
    pair-safe codes that holds on every CPU; with full-range ones only where VNNI sums the
    pairs."""
    model = make_tiny_bert(hidden=96)
    path = tmp_path / "fused.onnx"
    plan = _pair_safe(W8A8_FUSED_PLAN, pair_safe)
    result = export_plan(plan, model, FORMAT, path, tokenizer=tokenizer)
    codes = ", pair-safe" if pair_safe else ""
    assert result.layers["encoder.layer.0.intermediate.dense"] == (
        f"DynamicQuantizeLinear + MatMulInteger int8 per-channel{codes}, smoothed"
    )
    assert result.layers["encoder.layer.1.attention.self.value"] == (
        f"DynamicQuantizeLinear + MatMulInteger int8 per-tensor{codes}"
    )
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts = op_counts(tmp_path / "optimised.onnx")
    assert counts["MatMulInteger"] == 0
    assert counts["DynamicQuantizeMatMul"] + counts["MatMulIntegerToFloat"] == 7, counts
    feed = inputs("bert")
    ours = session.run(None, {k: v.numpy() for k, v in feed.items()})[0]
    compressed = apply_plan(model, plan, tokenizer=tokenizer)
    autotune = main_output(compressed, feed)
    plan_error = relative(autotune, main_output(model, feed))
    error = relative(ours, autotune)
    print(f"\nfused w8a8: against autotune's model {error:.1e}; plan error {plan_error:.1e}")
    if has_vnni() or pair_safe:
        assert error < plan_error / 5
    else:  # ONNX Runtime's u8s8 kernels sum pairs in 16 bits there, which can saturate
        assert error < plan_error * 10
