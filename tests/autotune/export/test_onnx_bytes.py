"""Bytes of an ONNX export priced before it is built: each (layer, option) by the exporter's
own layout, the rest from the float model's export; the sum is the built file's tensors."""

from __future__ import annotations

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from autotune.apply import apply_plan
from autotune.export.onnx import OnnxExporter, tensor_bytes
from autotune.export.onnx_bytes import onnx_byte_prices, onnx_stored_bytes
from autotune.layers import compressible_layers
from autotune.plan import Plan
from methods.keep import KeepOption
from methods.registry import method_of
from methods.tied import untie_output_embeddings
from tests.autotune.export.test_onnx import (
    BERT_PLAN,
    LLAMA_PLAN,
    W8A8_FUSED_PLAN,
    W8A8_PLAN,
)
from tests.conftest import make_tiny_bert, make_tiny_llama

CASES = {
    "bert": (lambda: make_tiny_bert(hidden=96), BERT_PLAN),
    "llama, tied embedding": (make_tiny_llama, LLAMA_PLAN),
    "w8a8, 7-bit": (lambda: make_tiny_bert(hidden=96), W8A8_PLAN),
    "w8a8, fused": (lambda: make_tiny_bert(hidden=96), W8A8_FUSED_PLAN),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_priced_bytes_are_the_built_exports_tensor_bytes(case: str, tokenizer) -> None:
    make, plan = CASES[case]
    model = make()
    untie_output_embeddings(model)  # as a tune does: a tied table is one layer
    layers = compressible_layers(model, min_numel=0)  # the plans compress small layers too
    chosen = plan.resolve([ref.name for ref in layers], strict=False)
    options = {ref.name: [KeepOption(), chosen[ref.name]] for ref in layers}
    prices = onnx_byte_prices(model, layers, options)
    predicted = prices.fixed + sum(
        prices.per_layer[ref.name][0 if chosen[ref.name].method == "none" else 1] for ref in layers
    )
    compressed = apply_plan(model, plan, tokenizer=tokenizer)
    built, _ = OnnxExporter().build(compressed, plan)
    assert predicted == tensor_bytes(built)
    stored = onnx_stored_bytes(compressed, plan)
    assert stored["bytes"] == predicted
    assert stored["file_bytes"] == built.ByteSize() > predicted


def test_keep_is_the_float_export_and_formats_cost_more_than_autotunes_storage() -> None:
    """Every layer kept prices the float model's export; MatMulNBits' float32 scales (and a
    per-channel scale repeated per block) cost more than autotune's float16 ones."""
    model = make_tiny_bert(hidden=96)
    layers = compressible_layers(model)
    kept = Plan(layers={"_default": KeepOption().to_dict()})
    float_bytes = tensor_bytes(OnnxExporter().build(model, kept)[0])
    int8 = Plan(layers={"_default": {"method": "rtn", "bits": 8, "group_size": None}})
    chosen = int8.resolve([ref.name for ref in layers], strict=False)
    options = {ref.name: [KeepOption(), chosen[ref.name]] for ref in layers}
    prices = onnx_byte_prices(model, layers, options)
    assert prices.original == float_bytes
    assert prices.fixed + sum(p[0] for p in prices.per_layer.values()) == float_bytes
    for ref in layers:
        option = chosen[ref.name]
        own = method_of(option).cost(ref.shape, option).weight_bytes
        assert prices.per_layer[ref.name][1] > own


def test_validate_recounts_the_bytes_in_the_export_of_an_onnxruntime_plan(tokenizer) -> None:
    """A plan for ONNX Runtime is checked against its export's tensors, recomputed: the
    prediction passes, and a prediction of autotune's own storage fails."""
    from autotune.validate import validate_plan

    model = make_tiny_bert(hidden=96)
    compressed = apply_plan(model, BERT_PLAN)
    exported = onnx_stored_bytes(compressed, BERT_PLAN)["bytes"]
    own = sum(t.numel() * t.element_size() for t in compressed.state_dict().values())
    for predicted, holds in ((exported, True), (own, False)):
        plan = Plan(
            layers=BERT_PLAN.layers,
            budget={"spec": f"{exported}B"},
            target={"name": "cpu", "runtime": "onnxruntime"},
            predicted={"bytes": predicted},
        )
        result = validate_plan(plan, model, tokenizer=tokenizer, measure_latency=False)
        checks = {check.name: check.holds for check in result.checks}
        assert checks == {"memory": True, "predicted bytes": holds}
        assert result.measured["bytes"] == exported
        assert result.measured["bytes_counted_in"] == "onnxruntime"


@pytest.mark.parametrize(("symmetric", "zero_bytes"), [(True, 0), (False, 1)])
def test_an_untied_per_channel_embedding_stores_one_scale_per_row(
    symmetric: bool, zero_bytes: int
) -> None:
    """Plain 8-bit rows with a float32 scale (and a zero point) per row; a tied table keeps
    MatMulNBits' blocks of 128, which repeat each row's scale three times on 384-wide rows."""
    from autotune.export.onnx_bytes import option_bytes
    from methods.base import LayerShape
    from methods.rtn import QuantOption

    shape = LayerShape(kind="embedding", rows=1000, cols=384)
    option = QuantOption(bits=8, group_size=None, symmetric=symmetric)
    assert option_bytes(shape, option) == 1000 * (384 + 4 + zero_bytes)
    zero_points = 0 if symmetric else 1000 * 3
    reshape = 16  # the 2-D shape the lookup reads the tied head's 3-D codes with
    assert option_bytes(shape, option, tied=True) == 1000 * (384 + 3 * 4) + zero_points + reshape
