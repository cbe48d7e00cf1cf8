"""Bytes an ONNX export stores: the tensors of each (layer, option) and of the rest of the model.

A ``--runtime onnxruntime`` budget counts these, the initializers of the exported file, and
not autotune's own storage: MatMulNBits keeps float32 scales where autotune keeps float16, a
per-channel layer repeats its scale in every block of 128, the smoothing vector of ``w8a8`` is
float32. Each option's bytes come from the exporter's own code run on an empty layer of that
shape, so the price is the layout the export writes; the rest of the model is the float
model's export less the weights of the layers being priced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from autotune.export.base import ExportError
from autotune.export.onnx import PROTO_LIMIT, OnnxExporter, tensor_bytes
from autotune.export.onnx_edit import Edit, Site
from autotune.export.onnx_graph import PREFIX
from autotune.export.onnx_nodes import (
    embedding_tensors,
    quantized_linear_nodes,
    row_scaled,
    row_scaled_tensors,
    w8a8_nodes,
)
from autotune.export.onnx_packing import blocked_codes, embedding_block
from autotune.layers import LayerRef
from autotune.plan import Plan
from autotune.runtimes import BytePrices
from methods.base import LayerShape, Option
from methods.keep import KeepOption
from methods.quantized import QuantizedEmbedding, QuantizedLinear
from methods.registry import method_of
from methods.smoothquant import W8A8Linear
from methods.tied import tied_heads

_PRICED: dict[tuple[LayerShape, Option, bool], int] = {}


def option_bytes(shape: LayerShape, option: Option, tied: bool = False) -> int:
    """Bytes of the tensors the ONNX export writes for one layer of ``shape`` under
    ``option`` (its bias excluded: the export keeps the float model's); ``tied``: an
    embedding whose table tied output layers read too."""
    key = (shape, option, tied)
    if key not in _PRICED:
        _PRICED[key] = _written_bytes(shape, option, tied)
    return _PRICED[key]


def _written_bytes(shape: LayerShape, option: Option, tied: bool) -> int:
    module = method_of(option).empty(shape, option)
    edit, name, site = Edit(), "layer", Site(node=0, activation="x", output="y")
    if isinstance(module, QuantizedEmbedding) and row_scaled(module, tied):
        row_scaled_tensors(edit, name, module)
    elif isinstance(module, QuantizedEmbedding):
        block = embedding_block(module.cols, module.group_size)
        if block is None:
            raise ExportError(f"--format onnx cannot hold embedding option {option.label}")
        embedding_tensors(edit, name, blocked_codes(module, name, block), tied)
    elif isinstance(module, W8A8Linear):
        w8a8_nodes(edit, site, name, module)
    elif isinstance(module, QuantizedLinear):
        quantized_linear_nodes(edit, site, name, module, accuracy_level=0)
    else:
        raise ExportError(f"--format onnx cannot hold option {option.label}")
    return sum(len(t.raw_data) for t in edit.initializers)


def onnx_byte_prices(
    model: nn.Module, layers: Sequence[LayerRef], options: Mapping[str, list[Option]]
) -> BytePrices:
    """Each option's bytes in the export, ``keep`` as the float weight the export of the
    float ``model`` holds; the rest of the model as that export less those weights."""
    kept_plan = Plan(layers={"_default": KeepOption().to_dict()})
    graph, _ = OnnxExporter().build(model, kept_plan)
    sizes = {t.name: len(t.raw_data) for t in graph.graph.initializer}
    heads = tied_heads(model)
    per_layer: dict[str, list[int]] = {}
    weights = 0
    for ref in layers:
        weight = sizes.get(PREFIX + ref.name + ".weight")
        if weight is None:
            raise ExportError(
                f"--runtime onnxruntime: layer {ref.name!r} has no weight of its own in the "
                "ONNX export of the model"
            )
        weights += weight
        tied = bool(heads.get(ref.name))
        per_layer[ref.name] = [
            weight if isinstance(o, KeepOption) else option_bytes(ref.shape, o, tied)
            for o in options[ref.name]
        ]
    total = sum(sizes.values())
    return BytePrices(per_layer, fixed=total - weights, original=total)


def onnx_stored_bytes(compressed: nn.Module, plan: Plan) -> dict[str, int]:
    """``bytes``: the tensors of the ONNX export of ``compressed`` (built in memory, as
    ``autotune export --format onnx`` writes it); ``file_bytes``: the whole file, where it
    is one file (below protobuf's 2 GiB)."""
    model, _ = OnnxExporter().build(compressed, plan)
    stored = {"bytes": tensor_bytes(model)}
    if stored["bytes"] <= PROTO_LIMIT:
        stored["file_bytes"] = model.ByteSize()
    return stored
