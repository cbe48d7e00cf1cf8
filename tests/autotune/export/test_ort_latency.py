"""Per-layer latency measured inside ONNX Runtime (autotune.export.ort_latency). No assertion
compares speeds (timings are noisy): they check what is timed, how graph nodes are attributed
to layers, and that the caller's model is left as it was."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
transformers = pytest.importorskip("transformers")

from autotune.export import onnx as onnx_export  # noqa: E402
from autotune.export import ort_latency, ort_profile, ort_sessions  # noqa: E402
from autotune.export.base import ExportError  # noqa: E402
from autotune.export.onnx import OnnxExporter  # noqa: E402
from autotune.export.onnx_graph import export_float_graph  # noqa: E402
from autotune.layers import compressible_layers  # noqa: E402
from autotune.plan import Plan  # noqa: E402
from methods.base import LayerShape  # noqa: E402
from methods.codebook import CodebookOption  # noqa: E402
from methods.gptq import GPTQOption  # noqa: E402
from methods.keep import KeepOption  # noqa: E402
from methods.rtn import QuantOption  # noqa: E402
from methods.smoothquant import W8A8Option  # noqa: E402
from methods.tied import untie_output_embeddings  # noqa: E402
from tests.conftest import make_tiny_bert, make_tiny_llama  # noqa: E402

HELD = [KeepOption(), QuantOption(8, None, True), QuantOption(4, 32, True), W8A8Option(0)]
REFUSED = CodebookOption("nf", 4, 32)  # ONNX Runtime decodes no codebook levels
QUERY = "encoder.layer.0.attention.self.query"
MATMULS = {"MatMul", "Gemm", "FusedGemm", "MatMulNBits", "MatMulIntegerToFloat"}
GATHERS = {"Gather", "GatherBlockQuantized"}


def tokens(count: int = 16) -> dict[str, torch.Tensor]:
    return {"input_ids": (torch.arange(count)[None] * 37 + 5) % 3000 + 1}


def layer_names(model: torch.nn.Module) -> list[str]:
    return [ref.name for ref in compressible_layers(model, min_numel=0)]


Traced = tuple[torch.nn.Module, object]  # a model and its float ONNX graph


@pytest.fixture(scope="module")
def bert() -> Traced:
    model = make_tiny_bert()
    return model, export_float_graph(model, {})


@pytest.fixture(scope="module")
def llama() -> Traced:
    model = make_tiny_llama()
    assert untie_output_embeddings(model) == {"lm_head": "model.embed_tokens"}
    return model, export_float_graph(model, {})


@pytest.mark.parametrize("limit", [None, 0], ids=["in memory", "from files"])
def test_every_held_option_is_timed_and_the_model_unchanged(
    limit: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if limit is not None:  # as a model above protobuf's limit: files, tensors beside them
        monkeypatch.setattr(ort_sessions, "PROTO_LIMIT", limit)
        monkeypatch.setattr(onnx_export, "PROTO_LIMIT", limit)
    model = make_tiny_bert()  # hidden 64: no group of 128 divides the query layer
    names = layer_names(model)
    layers = {name: [*HELD, REFUSED] for name in names}
    layers[QUERY] = [*layers[QUERY], QuantOption(4, 128, True)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {name: model.get_submodule(name) for name in names}
    result = ort_latency.measure_in_ort(model, layers, tokens(), rounds=2)

    shapes = {name: LayerShape.of(modules[name]) for name in names}
    expected = {
        (shape, option.label)
        for shape in shapes.values()
        for option in HELD
        if not (shape.kind == "embedding" and option.method == "w8a8")
    }
    assert set(result.layers) == expected
    assert not any(label in (REFUSED.label, "int4-g128-sym") for _, label in result.layers)
    assert all(math.isfinite(s) and s > 0 for s in result.layers.values())
    assert result.whole > 0 and 0 <= result.rest < result.whole
    floats = sum(result.layers[(shapes[name], "keep")] for name in names)
    assert result.rest == pytest.approx(max(result.whole - floats, 0.0))
    assert all(model.get_submodule(name) is module for name, module in modules.items())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_each_variant_is_timed_beside_the_float_model_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One pair of sessions at a time (a variant and the float model), as a plan's export is
    confirmed and deployed; the float model's time pools its rounds beside every variant."""
    counts: list[int] = []
    real = ort_latency.run_rounds

    def counting(sessions, *args, **kwargs):
        counts.append(len(sessions))
        return real(sessions, *args, **kwargs)

    monkeypatch.setattr(ort_latency, "run_rounds", counting)
    model = make_tiny_bert()
    options = [KeepOption(), QuantOption(4, 32, True), QuantOption(8, None, True)]
    layers = {name: options for name in layer_names(model)}
    result = ort_latency.measure_in_ort(model, layers, tokens(), rounds=3)
    assert counts == [2, 2]
    assert result.whole > 0


def test_a_label_is_priced_at_its_wall_time_and_split_by_its_kernels() -> None:
    a, b = LayerShape("linear", 8, 8), LayerShape("linear", 8, 32)
    shapes = {"a1": a, "a2": a, "b": b}
    beside = [10.0, 12.0, 10.0]  # the float model's walls in the rounds beside int4's
    timed = {
        "keep": ort_latency._Timed(["a1", "a2", "b"], {"a1": 1.0, "a2": 1.0, "b": 2.0}, beside),
        "int4": ort_latency._Timed(
            ["a1", "b"], {"a1": 3.0, "a2": 9.0, "b": 9.0}, [9.0, 11.0, 30.0], beside
        ),
    }
    result = ort_latency._table(timed, shapes)
    assert result.whole == 10.0 and result.rest == 6.0
    # a1 and b together: the float seconds 3.0 and the median change -1.0, shared 1 : 3
    assert result.layers == {
        (a, "keep"): 1.0,
        (b, "keep"): 2.0,
        (a, "int4"): pytest.approx(0.5),
        (b, "int4"): pytest.approx(1.5),
    }


def test_a_label_swamped_by_noise_is_priced_at_its_profiled_kernels() -> None:
    """The variant ran faster than the float model by more than the swapped layers' float
    time (noise on a tiny model): its layers cost their profiled kernels, never nothing."""
    a = LayerShape("linear", 8, 8)
    shapes = {"a1": a, "a2": a}
    beside = [10.0, 10.0, 10.0]
    timed = {
        "keep": ort_latency._Timed(["a1", "a2"], {"a1": 1.0, "a2": 1.0}, beside),
        "int4": ort_latency._Timed(["a1", "a2"], {"a1": 0.5, "a2": 1.5}, [7.0] * 3, beside),
    }
    result = ort_latency._table(timed, shapes)
    assert result.layers[(a, "int4")] == pytest.approx(1.0)  # mean of 0.5 and 1.5


def test_a_variant_on_the_reused_trace_is_the_exporters_own_graph(bert: Traced) -> None:
    model, float_graph = bert
    exporter = OnnxExporter()
    options = {name: [QuantOption(4, 32, False)] for name in layer_names(model)}
    (variant,) = ort_latency.build_variants(model, options, exporter, {})
    reused = ort_latency.variant_graph(model, variant, exporter, float_graph)
    plan = Plan(layers={name: o.to_dict() for name, o in variant.options.items()})
    with ort_latency._swapped(model, variant.modules):
        traced, _ = exporter.build(model, plan)

    def content(graph) -> tuple:
        nodes = [(n.op_type, list(n.input), list(n.output)) for n in graph.graph.node]
        return nodes, sorted((t.name, t.raw_data) for t in graph.graph.initializer)

    assert content(reused) == content(traced)
    assert any(n.op_type == "MatMulNBits" for n in reused.graph.node)


def test_each_layer_of_a_variant_is_converted_from_its_own_weights(bert: Traced) -> None:
    """Copies of one conversion per shape would be stored once by the exporter (identical
    tensors), and a variant reading one weight per shape ran 1.16x faster than the export of
    the same plan on the demo: every layer gets its own codes, and the built graph keeps one
    weight per layer. A calibrated option is converted as its uncalibrated stand-in (no
    Hessian is needed), under its own label."""
    model, float_graph = bert
    exporter = OnnxExporter()
    names = [
        n for n in layer_names(model) if LayerShape.of(model.get_submodule(n)).kind == "linear"
    ]
    shape = LayerShape.of(model.get_submodule(QUERY))
    alike = [n for n in names if LayerShape.of(model.get_submodule(n)) == shape]
    assert len(alike) >= 4
    for option in (QuantOption(4, 32, True), GPTQOption(4, 32, True)):
        (variant,) = ort_latency.build_variants(model, {n: [option] for n in names}, exporter, {})
        assert set(variant.modules) == set(names)
        assert all(variant.options[n] == option for n in names)
        codes = [variant.modules[n].codes for n in alike]
        assert all(not torch.equal(codes[0], other) for other in codes[1:])
        for name in alike:  # each layer's own weight, within the 4-bit quantiser's error
            weight = model.get_submodule(name).weight.detach()
            decoded = variant.modules[name].dequantize(torch.float32)
            assert (decoded - weight).norm() < 0.2 * weight.norm()
    graph = ort_latency.variant_graph(model, variant, exporter, float_graph)
    weights = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert len({node.input[1] for node in weights}) == len(names)


def test_options_whose_exports_run_alike_are_timed_once() -> None:
    """GPTQ as RTN's storage; W8A8 whatever its pair-safe codes and smoothing strength, but
    smoothed or not, per channel or per tensor, 7- or 8-bit activations apart."""
    form = ort_latency.timing_form
    assert form(GPTQOption(4, 32, True)) == form(QuantOption(4, 32, True)) == "int4-g32-sym"
    assert form(QuantOption(4, 32, True)) != form(QuantOption(4, 32, False))
    smoothed = {form(W8A8Option(a, 8, pair_safe=p)) for a in (0.45, 0.75) for p in (False, True)}
    assert len(smoothed) == 1
    assert form(W8A8Option(0.0, 8)) == form(W8A8Option(0.0, 8, pair_safe=True))
    assert form(W8A8Option(0.0, 8)) not in smoothed
    assert form(W8A8Option(0.0, 8, "tensor")) != form(W8A8Option(0.0, 8))
    assert form(W8A8Option(0.0, 7)) != form(W8A8Option(0.0, 8))


def test_alike_options_share_one_variant_and_every_label_gets_its_price(bert: Traced) -> None:
    model, _ = bert
    names = [
        n for n in layer_names(model) if LayerShape.of(model.get_submodule(n)).kind == "linear"
    ]
    options = [KeepOption(), QuantOption(4, 32, True), GPTQOption(4, 32, True)]
    table = ort_latency.measure_in_ort(model, {n: options for n in names}, tokens(), rounds=2)
    shape = LayerShape.of(model.get_submodule(QUERY))
    assert table.layers[(shape, "gptq4-g32-sym-ao")] == table.layers[(shape, "int4-g32-sym")]
    variants = ort_latency.build_variants(model, {n: options for n in names}, OnnxExporter(), {})
    assert [v.label for v in variants] == ["int4-g32-sym"]


def _profiled(traced: Traced, label: str, folder: Path) -> ort_profile.ProfiledSession:
    """A profiled session of the model with every layer under ``label`` where it can be."""
    model, float_graph = traced
    names = layer_names(model)
    exporter = OnnxExporter()
    variant = ort_latency._Variant(label)
    if label != "keep":
        options = {name: [QuantOption(4, 32, True)] for name in names}
        (variant,) = ort_latency.build_variants(model, options, exporter, {})
    graph = ort_latency.variant_graph(model, variant, exporter, float_graph)
    aliases = ort_profile.layer_aliases(model, names)
    ort_profile.name_float_layers(graph.graph, aliases)
    return ort_profile.open_profiled(graph, aliases, 1, folder)


def _ops_by_layer(profiled: ort_profile.ProfiledSession) -> dict[str, set[str]]:
    optimized = onnx.load(str(profiled.folder / "optimized.onnx"), load_external_data=False)
    found: dict[str, set[str]] = {}
    for node in optimized.graph.node:
        for layer in profiled.owners.get(node.name, ()):
            found.setdefault(layer, set()).add(node.op_type)
    return found


@pytest.mark.parametrize("label", ["keep", "int4-g32-sym"])
def test_each_layer_owns_its_matmul_or_lookup(label: str, bert: Traced, tmp_path: Path) -> None:
    model = bert[0]
    profiled = _profiled(bert, label, tmp_path)
    ops = _ops_by_layer(profiled)
    for name in layer_names(model):
        kind = LayerShape.of(model.get_submodule(name)).kind
        assert ops.get(name, set()) & (GATHERS if kind == "embedding" else MATMULS), name
    assert not any("Softmax" in found or "LayerNormalization" in found for found in ops.values())
    feed = ort_sessions.feed_for(profiled.session, tokens())
    walls = [ort_sessions.timed_run(profiled.session, feed) for _ in range(3)]
    runs = profiled.layer_seconds(skip=1)
    assert len(runs) == 2 and all(set(run) == set(layer_names(model)) for run in runs)
    assert all(0 < sum(run.values()) < wall for run, wall in zip(runs, walls[1:], strict=True))


def test_a_layer_no_node_belongs_to_is_refused(bert: Traced, tmp_path: Path) -> None:
    model = bert[0]
    graph = onnx.ModelProto()
    graph.CopyFrom(bert[1])
    aliases = ort_profile.layer_aliases(model, [*layer_names(model), "encoder.absent"])
    ort_profile.name_float_layers(graph.graph, aliases)
    with pytest.raises(ExportError, match=r"encoder\.absent"):
        ort_profile.open_profiled(graph, aliases, 1, tmp_path)


@pytest.mark.parametrize("label", ["keep", "int4-g32-sym"])
def test_a_tied_output_layer_counts_as_its_embedding(
    label: str, llama: Traced, tmp_path: Path
) -> None:
    profiled = _profiled(llama, label, tmp_path)
    ops = _ops_by_layer(profiled)["model.embed_tokens"]
    assert ops & GATHERS and ops & MATMULS
    assert "lm_head" not in profiled.layers


def test_time_onnx_times_a_file_and_a_model(
    bert: Traced, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, float_graph = bert
    options = {name: [QuantOption(4, 32, True)] for name in layer_names(model)}
    (variant,) = ort_latency.build_variants(model, options, OnnxExporter(), {})
    path = tmp_path / "model.onnx"  # as the exporter writes it
    onnx_export._save(ort_latency.variant_graph(model, variant, OnnxExporter(), float_graph), path)
    for source in (path, bert[1]):
        p50, p90 = ort_sessions.time_onnx(source, tokens(), rounds=5, threads=1)
        assert 0 < p50 <= p90 < 1.0
    # a model above protobuf's limit runs from a file with its tensors beside it
    monkeypatch.setattr(ort_sessions, "PROTO_LIMIT", 0)
    monkeypatch.setattr(onnx_export, "PROTO_LIMIT", 0)
    assert 0 < ort_sessions.time_onnx(bert[1], tokens(), rounds=2, threads=1)[0] < 1.0
    with pytest.raises(ValueError, match="rounds"):
        ort_sessions.time_onnx(path, tokens(), rounds=0)
