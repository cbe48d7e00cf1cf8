"""Export to one ONNX file that ONNX Runtime runs on CPU, each compressed layer in its own codes.

The graph is the float model exported by ``torch.onnx.export`` (the dynamo exporter, without
its graph optimiser, so that every weight keeps its parameter name); each compressed layer's
weight initializer and the ``MatMul`` (or ``Gemm``) that reads it are then replaced by nodes
that read autotune's stored codes, scales and zero points, never a re-quantisation:

* rtn / gptq linear layers: ``com.microsoft::MatMulNBits`` (ONNX Runtime's CPU kernel takes 2,
  4 and 8 bits, blocks of a power of 2 from 16). A group that is not a power of 2 but a
  multiple of 16 is cut into blocks of its largest power-of-2 divisor, each block repeating
  the group's scale and zero point; one group per row (per channel) is cut into blocks of up
  to 128 with the row's scale repeated (the last block padded where the width is not a
  multiple). 3-bit codes are held in the 4-bit layout, 5- to 7-bit codes in the 8-bit one:
  the same codes with the zero point they need, in a wider container. Other group sizes
  use standard ``DequantizeLinear`` (opset 21, blocked, uint4 or uint8 codes) and ``MatMul``.
* symmetric ``b``-bit codes ``u`` decode as ``s * (u - 2**(b-1))``: MatMulNBits' default zero
  point. Asymmetric offsets ``m = -z * s`` (float16) are written as their whole zero points
  ``z`` (checked to give back ``m`` exactly), so the weights are ``s * (u - z)``: autotune's
  up to the float16 rounding of ``m``.
* rtn / gptq embeddings: ``com.microsoft::GatherBlockQuantized`` on the same packed layout;
  a tied output layer (:class:`methods.tied.TiedHead`) reads the very same codes through
  MatMulNBits. An untied table with one group per row and 5- to 8-bit codes is plain 8-bit
  rows with a float32 scale (and zero point) per row instead, gathered by standard
  ``Gather``, ``Cast``, ``Sub`` and ``Mul``: GatherBlockQuantized would repeat the row's scale
  in every block of at most 128.
* w8a8: input divided by the smoothing vector, 7-bit dynamic per-tensor activation
  quantisation written out in standard ops exactly as autotune's reference computes it, then
  ``MatMulInteger`` on the int8 codes and a multiply by both scales.

Scales are written as float32 (the kernels want the activations' type), the bias is added
after the matmul as before. MatMulNBits keeps ``accuracy_level`` 0 by default (float
activations: the output is autotune's up to float32 accumulation order); an exporter made
with ``accuracy_level=4`` lets ONNX Runtime quantise activations to int8 for speed.

This module holds the exporter, its checks of the model and plan, and the file it writes;
the float graph is :mod:`autotune.export.onnx_graph`'s, the code layouts
:mod:`autotune.export.onnx_packing`'s, the graph edits :mod:`autotune.export.onnx_edit`'s
and the replacement nodes :mod:`autotune.export.onnx_nodes`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autotune.export.base import Exporter, ExportError, ExportResult, register_exporter
from autotune.export.onnx_graph import export_float_graph
from autotune.export.onnx_nodes import MS_DOMAIN, replace_layers
from autotune.export.onnx_packing import EMBEDDINGS_HELD, embedding_block
from autotune.io import write_atomic
from autotune.layers import compressible_layers
from autotune.plan import Plan
from methods.base import KeepsStoredFormat, LayerShape, Option
from methods.quantized import QuantizedEmbedding, QuantizedLinear
from methods.smoothquant import W8A8Linear
from methods.tied import TiedHead

PROTO_LIMIT = 2**31 - 2**26  # above this many initializer bytes, tensors go to external data
QUANTISED = ("rtn", "gptq")
HELD = (
    "allowed: keep, rtn or gptq with 2 to 8 bits (linear layers: any group size; "
    "embeddings: per channel or groups of a multiple of 16), w8a8 on linear layers"
)
REFUSED = {
    "codebook": "codebook levels (NF4/FP4/Lloyd) are no integer grid ONNX Runtime decodes",
    "outliers": "float16 outlier columns beside the codes have no ONNX Runtime kernel",
    "magnitude": "ONNX Runtime's CPU kernels hold no sparse weights (the zeros would be stored)",
    "wanda": "ONNX Runtime's CPU kernels hold no sparse weights (the zeros would be stored)",
    "sparsegpt": "ONNX Runtime's CPU kernels hold no sparse weights (the zeros would be stored)",
    "svd": "low-rank factor pairs are not written by the ONNX exporter",
    "whitened_svd": "low-rank factor pairs are not written by the ONNX exporter",
    "fisher_svd": "low-rank factor pairs are not written by the ONNX exporter",
    "fp8": "ONNX Runtime's CPU provider has no FP8 matmul (the export is for CPUs)",
}


class OnnxExporter(Exporter):
    """One ``.onnx`` file for ONNX Runtime's CPU provider (see the module docstring)."""

    name = "onnx"
    requires = ("onnx", "onnxruntime")
    install = '"autotune[export]"'
    writes = "file"
    description = (
        "one ONNX file for ONNX Runtime (CPU): MatMulNBits / GatherBlockQuantized / "
        "DequantizeLinear on the plan's own codes"
    )

    def __init__(self, accuracy_level: int = 0) -> None:
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0 to 4, got {accuracy_level}")
        self.accuracy_level = accuracy_level

    def refusal(self, layer: str, shape: LayerShape, option: Option) -> str | None:
        method = option.method
        if method == "none":
            return None
        if method in QUANTISED:
            bits = int(getattr(option, "bits", 0))
            if not 2 <= bits <= 8:
                return f"{option.label}: ONNX Runtime's kernels hold 2 to 8 bits; {HELD}"
            if shape.kind == "embedding":
                group = getattr(option, "group_size", None) or shape.cols
                if embedding_block(shape.cols, group) is None:
                    return f"{option.label}: {EMBEDDINGS_HELD}"
            return None
        if method == "w8a8":
            return None if shape.kind == "linear" else f"{option.label}: {HELD}"
        why = REFUSED.get(method, f"{method} has no ONNX form")
        return f"{option.label}: {why}; {HELD}"

    def write(
        self, compressed: nn.Module, plan: Plan, out: Path, tokenizer: Any = None
    ) -> ExportResult:
        model, labels = self.build(compressed, plan)
        out = Path(out)
        _save(model, out)
        for ref in compressible_layers(compressed, min_numel=0):
            labels.setdefault(ref.name, "float")
        return ExportResult(self.name, out, _written_bytes(out), labels)

    def build(
        self, compressed: nn.Module, plan: Plan, float_graph: Any = None
    ) -> tuple[Any, dict[str, str]]:
        """The ``ModelProto`` of ``compressed`` (in memory, not checked) and the scheme each
        compressed layer got. ``float_graph``: the graph :func:`export_float_graph` traced
        for the float model ``compressed`` was made from, with no layers left out, reused
        instead of a new trace (it is changed in place; the weights the compressed layers
        replace are dropped as initializers nothing reads)."""
        layers = compressed_modules(compressed)
        _check_plan(plan, compressed, layers)
        heads = _tied_heads(compressed, layers)
        model = export_float_graph(compressed, layers) if float_graph is None else float_graph
        labels = replace_layers(model.graph, layers, heads, self.accuracy_level)
        _finish(model, plan)
        return model, labels


# ---------------------------------------------------------------------------- the model


def compressed_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The compressed layers of ``model`` by name; refuses storage the format cannot hold and
    weights that are not float32."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding, W8A8Linear)):
            found[name] = module
        elif isinstance(module, TiedHead):
            continue
        elif isinstance(module, KeepsStoredFormat) or type(module).__module__.startswith(
            "methods."
        ):
            raise ExportError(
                f"--format onnx cannot hold layer {name!r}: {type(module).__name__} storage "
                f"has no ONNX form; {HELD}"
            )
    for name, tensor in [*model.named_parameters(), *_float_buffers(found)]:
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            raise ExportError(
                f"--format onnx exports float32 models; {name!r} is {tensor.dtype} "
                "(apply the plan to the model in float32)"
            )
    return found


def _float_buffers(layers: Mapping[str, nn.Module]) -> Iterable[tuple[str, torch.Tensor]]:
    for name, module in layers.items():
        bias = getattr(module, "bias", None)
        if bias is not None:
            yield f"{name}.bias", bias
        if isinstance(module, QuantizedEmbedding):
            yield f"{name} (output)", torch.empty(0, dtype=module.output_dtype)


def _check_plan(plan: Plan, model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
    """Every compressed layer is one the plan compresses, with the stored format it says, and
    every layer the plan compresses is compressed."""
    floats = [ref.name for ref in compressible_layers(model, min_numel=0)]
    for name, option in plan.resolve(floats, strict=False).items():
        if option.method != "none":
            raise ExportError(
                f"layer {name!r} is planned as {option.label} but holds a float weight"
            )
    options = plan.resolve(list(layers), strict=False)
    for name, module in layers.items():
        option = options[name]
        if isinstance(module, W8A8Linear):
            fits = option.method == "w8a8"
        else:
            group = getattr(option, "group_size", None) or module.cols
            fits = option.method in QUANTISED and (
                getattr(option, "bits", None),
                group,
                getattr(option, "symmetric", None),
            ) == (module.bits, module.group_size, module.symmetric)
        if not fits:
            raise ExportError(
                f"layer {name!r} holds {type(module).__name__} storage the plan does not "
                f"give it ({option.label})"
            )


def _tied_heads(model: nn.Module, layers: Mapping[str, nn.Module]) -> dict[str, list[str]]:
    """``{embedding name: [names of the output layers that read its table]}``."""
    heads: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, TiedHead) and module.embedding_name in layers:
            if module.transposed:
                raise ExportError(
                    f"--format onnx cannot hold the tied output layer {name!r} of a "
                    f"Conv1D model; {EMBEDDINGS_HELD}"
                )
            heads.setdefault(module.embedding_name, []).append(name)
    return heads


# ---------------------------------------------------------------------------- the file


def _finish(model: Any, plan: Plan) -> None:
    """Declare the contrib domain where it is used, drop initializers nothing reads and the
    exporter's per-node debug metadata (about 2 kB a node), and record the plan."""
    from onnx import helper

    graph = model.graph
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    helper.set_model_props(model, {"autotune.plan": plan.to_json()})
    used = {name for node in graph.node for name in node.input}
    used.update(output.name for output in graph.output)
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    uses_contrib = any(node.domain == MS_DOMAIN for node in graph.node)
    if uses_contrib and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def tensor_bytes(model: Any) -> int:
    """Bytes of every initializer of a ``ModelProto``."""
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _save(model: Any, out: Path) -> None:
    """Write atomically: one file, or above the protobuf limit the ``.onnx`` file with its
    tensors in ``<name>.data`` beside it (written first, the model file last)."""
    import onnx

    data = out.with_name(out.name + ".data")
    if tensor_bytes(model) <= PROTO_LIMIT:
        onnx.checker.check_model(model)
        write_atomic(out, lambda tmp: onnx.save_model(model, tmp))
        data.unlink(missing_ok=True)
        return

    def writer(tmp: str) -> None:
        onnx.save_model(
            model,
            tmp,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
        onnx.checker.check_model(tmp)

    data.unlink(missing_ok=True)  # the external data writer appends
    try:
        write_atomic(out, writer)
    except BaseException:
        data.unlink(missing_ok=True)
        raise


def _written_bytes(out: Path) -> int:
    data = out.with_name(out.name + ".data")
    return out.stat().st_size + (data.stat().st_size if data.exists() else 0)


register_exporter(OnnxExporter())
