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
  MatMulNBits.
* w8a8: input divided by the smoothing vector, 7-bit dynamic per-tensor activation
  quantisation written out in standard ops exactly as autotune's reference computes it, then
  ``MatMulInteger`` on the int8 codes and a multiply by both scales.

Scales are written as float32 (the kernels want the activations' type), the bias is added
after the matmul as before. MatMulNBits keeps ``accuracy_level`` 0 by default (float
activations: the output is autotune's up to float32 accumulation order); an exporter made
with ``accuracy_level=4`` lets ONNX Runtime quantise activations to int8 for speed.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import io
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autotune.export.base import Exporter, ExportError, ExportResult, register_exporter
from autotune.io import write_atomic
from autotune.layers import compressible_layers
from autotune.plan import Plan
from methods import affine
from methods.base import KeepsStoredFormat, LayerShape, Option
from methods.quantized import QuantizedEmbedding, QuantizedLinear
from methods.smoothquant import W8A8Linear
from methods.tied import TiedHead

OPSET = 21
MS_DOMAIN = "com.microsoft"
PREFIX = "model."  # the exported wrapper holds the model under this attribute
MAX_BLOCK = 128  # block of a per-channel layer (its scale repeated per block)
PROTO_LIMIT = 2**31 - 2**26  # above this many initializer bytes, tensors go to external data
ACTIVATION_LEVELS = 127.0  # autotune's w8a8 quantises activations to 7 bits
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
}
EMBEDDINGS_HELD = (
    "keep embeddings in float, or quantise them per channel (width a multiple of 16) or in "
    "groups of a multiple of 16"
)


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


# ---------------------------------------------------------------------- the float graph


@dataclass(frozen=True)
class Signature:
    """The graph's inputs and outputs, and whether the model takes ``use_cache``."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    use_cache: bool


class _Outputs(nn.Module):
    """The model with named tensor inputs and a tuple of tensor outputs."""

    def __init__(self, model: nn.Module, signature: Signature) -> None:
        super().__init__()
        self.model = model
        self.signature = signature

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        given = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
        }
        kwargs = {k: given[k] for k in self.signature.inputs}
        if self.signature.use_cache:
            kwargs["use_cache"] = False
        out = self.model(**kwargs, return_dict=True)
        return tuple(out[k] for k in self.signature.outputs)


def model_signature(model: nn.Module, example: Mapping[str, torch.Tensor]) -> Signature:
    """What the exported graph takes and gives: ``logits`` of a causal LM, else
    ``last_hidden_state`` (and ``pooler_output`` where the model has one)."""
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params or getattr(model, "config", None) is None:
        raise ExportError(
            f"--format onnx needs a transformers model taking input_ids, got {type(model).__name__}"
        )
    inputs = tuple(k for k in ("input_ids", "attention_mask", "token_type_ids") if k in params)
    use_cache = "use_cache" in params
    kwargs: dict[str, Any] = {k: example[k] for k in inputs}
    if use_cache:
        kwargs["use_cache"] = False
    with torch.inference_mode():
        out = model(**kwargs, return_dict=True)
    wanted = ("logits",) if "logits" in out else ("last_hidden_state", "pooler_output")
    outputs = tuple(k for k in wanted if isinstance(out.get(k), torch.Tensor))
    if not outputs:
        raise ExportError(
            f"--format onnx found neither logits nor last_hidden_state in the outputs of "
            f"{type(model).__name__}"
        )
    return Signature(inputs, outputs, use_cache)


def example_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Two rows of eight tokens, the second with its last two masked (the trace must not take
    the unmasked shortcut)."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 100)
    ids = (torch.arange(16).reshape(2, 8) * 7 + 3) % max(vocab - 1, 1) + 1
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def float_skeleton(model: nn.Module, layers: Mapping[str, nn.Module]) -> nn.Module:
    """A copy of ``model`` with each compressed layer replaced by a float layer of its shape
    whose weight is never filled (its initializer is dropped before it is written). The
    compressed layers themselves are not copied: the copy meets the stand-ins in their place."""
    memo = {id(module): _stand_in(module) for module in layers.values()}
    return copy.deepcopy(model, memo).eval()


def _stand_in(module: nn.Module) -> nn.Module:
    """An uninitialised float layer of ``module``'s shape, with its float bias."""
    if isinstance(module, QuantizedEmbedding):
        table = nn.Embedding(
            module.num_embeddings, module.embedding_dim, module.padding_idx, device="meta"
        )
        return table.to_empty(device="cpu")
    bias = module.bias is not None
    linear = nn.Linear(module.cols, module.rows, bias=bias, device="meta").to_empty(device="cpu")
    if bias:
        linear.bias = nn.Parameter(module.bias.detach().float().clone(), requires_grad=False)
    return linear


def export_float_graph(model: nn.Module, layers: Mapping[str, nn.Module]) -> Any:
    """The ``ModelProto`` of ``model`` with float stand-ins for its compressed layers, whose
    weight initializers are left out (the nodes reading them are still there)."""
    if importlib.util.find_spec("onnxscript") is None:
        raise ExportError(
            "--format onnx needs onnxscript (torch's ONNX exporter): pip install onnxscript"
        )
    example = example_inputs(model)
    signature = model_signature(model, example)
    wrapper = _Outputs(float_skeleton(model, layers), signature)
    axes = {k: {0: "batch", 1: "sequence"} for k in signature.inputs}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                wrapper,
                (),
                kwargs={k: example[k] for k in signature.inputs},
                dynamo=True,
                optimize=False,
                opset_version=OPSET,
                input_names=list(signature.inputs),
                output_names=list(signature.outputs),
                dynamic_shapes=axes,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many kinds
            raise ExportError(f"--format onnx: torch.onnx.export failed: {exc}") from exc
    initializers = program.model.graph.initializers
    for name in layers:
        initializers.pop(PREFIX + name + ".weight", None)
    return program.model_proto


# -------------------------------------------------------------------- codes and layouts


def container_bits(bits: int) -> int:
    """The kernel's bit width that holds ``bits``-bit codes: 2, 4 or 8."""
    return 2 if bits == 2 else 4 if bits <= 4 else 8


def _largest_power_of_two_divisor(n: int) -> int:
    return n & -n


def linear_block(cols: int, group: int) -> int | None:
    """MatMulNBits block of a ``cols``-wide layer with groups of ``group`` (``cols`` for one
    per row), or ``None`` when its groups need DequantizeLinear."""
    if group == cols:
        divisor = min(_largest_power_of_two_divisor(cols), MAX_BLOCK)
        if divisor >= 16:
            return divisor
        return min(MAX_BLOCK, max(16, 1 << (cols - 1).bit_length()))
    divisor = _largest_power_of_two_divisor(group)
    return divisor if divisor >= 16 else None


def embedding_block(cols: int, group: int) -> int | None:
    """GatherBlockQuantized block (it must divide the width), or ``None``."""
    if group == cols:
        divisor = min(_largest_power_of_two_divisor(cols), MAX_BLOCK)
    else:
        divisor = _largest_power_of_two_divisor(group)
    return divisor if divisor >= 16 else None


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """``[rows, cols]`` codes below ``2**bits`` packed along each row, first code in the low
    bits (``cols`` a multiple of ``8 // bits``)."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    per = 8 // bits
    rows, cols = codes.shape
    parts = codes.reshape(rows, cols // per, per).astype(np.uint8)
    out = np.zeros((rows, cols // per), dtype=np.uint8)
    for i in range(per):
        out |= parts[:, :, i] << np.uint8(bits * i)
    return out


def _pad_columns(array: np.ndarray, cols: int) -> np.ndarray:
    if array.shape[1] == cols:
        return array
    padded = np.zeros((array.shape[0], cols), dtype=array.dtype)
    padded[:, : array.shape[1]] = array
    return padded


def whole_zero_points(module: QuantizedLinear | QuantizedEmbedding, name: str) -> np.ndarray:
    """``[rows, groups]`` zero points: ``2**(bits-1)`` when symmetric, else the whole ``z``
    whose ``-z * scale`` rounded to float16 is the stored offset (``round(-offset / scale)`` or
    a neighbour, where float16 rounding blurs a tiny offset)."""
    scales = module.scales.detach().cpu().float()
    if module.symmetric:
        return np.full(tuple(scales.shape), 1 << (module.bits - 1), dtype=np.uint8)
    zero = affine.whole_zero_points(module.scales, module.offsets, module.bits)
    if zero is None:
        raise ExportError(
            f"--format onnx cannot hold layer {name!r}: its asymmetric offsets are not "
            f"whole zero points (-z * scale, z in 0..{(1 << module.bits) - 1})"
        )
    return zero.numpy()


@dataclass
class Blocked:
    """One layer's codes in MatMulNBits' layout: ``codes`` ``[rows, blocks, block * bits / 8]``,
    float32 ``scales`` ``[rows, blocks]``, packed ``zero_points`` (``None``: the default
    ``2**(bits-1)``)."""

    bits: int
    block: int
    stored_bits: int
    group: int
    cols: int
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def blocks(self) -> int:
        return self.codes.shape[1]

    @property
    def label(self) -> str:
        """E.g. ``4-bit block 32``, ``8-bit block 128 (per-channel)``, ``4-bit block 16
        (3-bit codes, group 48)``."""
        notes = []
        if self.stored_bits != self.bits:
            notes.append(f"{self.stored_bits}-bit codes")
        if self.group == self.cols:
            notes.append("per-channel")
        elif self.group != self.block:
            notes.append(f"group {self.group}")
        extra = f" ({', '.join(notes)})" if notes else ""
        return f"{self.bits}-bit block {self.block}{extra}"


def blocked_codes(module: QuantizedLinear | QuantizedEmbedding, name: str, block: int) -> Blocked:
    """``module``'s codes, scales and zero points in MatMulNBits' block layout (each block
    inside one group, so it repeats its group's scale and zero point)."""
    rows, cols, bits, group = module.rows, module.cols, module.bits, module.group_size
    wide = container_bits(bits)
    blocks = -(-cols // block)
    groups_of = (np.arange(blocks) * block) // group
    codes = _pad_columns(module.unsigned_codes().cpu().numpy(), blocks * block)
    packed = pack_rows(codes, wide).reshape(rows, blocks, block * wide // 8)
    scales = module.scales.detach().cpu().float().numpy()[:, groups_of]
    zero_points = None
    if not (module.symmetric and bits == wide):
        zeros = whole_zero_points(module, name)[:, groups_of]
        per = 8 // wide
        zero_points = pack_rows(_pad_columns(zeros, -(-blocks // per) * per), wide)
    return Blocked(
        wide, block, bits, group, cols, packed, np.ascontiguousarray(scales), zero_points
    )


# ------------------------------------------------------------------------- graph edits


@dataclass
class Site:
    """Where a linear layer's weight is used: the node to replace (``MatMul`` or ``Gemm``),
    its activation input, the output, a bias for a ``Gemm``, and a ``Transpose`` to drop."""

    node: int
    activation: str
    output: str
    bias: str | None = None
    dropped: tuple[int, ...] = ()


@dataclass
class Edit:
    """Node replacements and new initializers, applied at the end in one pass."""

    replaced: dict[int, list[Any]] = field(default_factory=dict)
    dropped: set[int] = field(default_factory=set)
    initializers: list[Any] = field(default_factory=list)
    names: set[str] = field(default_factory=set)

    def tensor(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self._claim(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def uint4(self, name: str, array: np.ndarray) -> str:
        """A UINT4 initializer: two codes to a byte over the flattened tensor, low first."""
        from onnx import TensorProto

        self._claim(name)
        flat = array.reshape(-1).astype(np.uint8)
        if flat.size % 2:
            flat = np.concatenate([flat, np.zeros(1, np.uint8)])
        proto = TensorProto(name=name, data_type=TensorProto.UINT4, dims=list(array.shape))
        proto.raw_data = (flat[0::2] | (flat[1::2] << np.uint8(4))).tobytes()
        self.initializers.append(proto)
        return name

    def _claim(self, name: str) -> None:
        if name in self.names:
            raise ExportError(f"--format onnx: initializer {name!r} written twice")
        self.names.add(name)

    def replace(self, index: int, nodes: list[Any]) -> None:
        if index in self.replaced or index in self.dropped:
            raise ExportError("--format onnx: one graph node matched two layers")
        self.replaced[index] = nodes

    def apply(self, graph: Any) -> None:
        nodes = []
        for index, node in enumerate(graph.node):
            if index in self.dropped:
                continue
            nodes.extend(self.replaced.get(index, [node]))
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(self.initializers)


class _Graph:
    """Look-ups on a ``GraphProto``: which nodes read a value."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.readers: dict[str, list[tuple[int, int]]] = {}
        for index, node in enumerate(graph.node):
            for slot, name in enumerate(node.input):
                self.readers.setdefault(name, []).append((index, slot))

    def node(self, index: int) -> Any:
        return self.graph.node[index]

    def linear_site(self, index: int, slot: int, layer: str) -> Site:
        """The matmul a linear weight feeds: ``MatMul(x, Transpose(W))`` or
        ``Gemm(x, W, bias, transB=1)``; anything else is refused."""
        node = self.node(index)
        if node.op_type == "Transpose" and _ints(node, "perm") in (None, [1, 0]):
            readers = self.readers.get(node.output[0], [])
            if len(readers) == 1:
                (matmul, matmul_slot) = readers[0]
                reader = self.node(matmul)
                if reader.op_type == "MatMul" and matmul_slot == 1:
                    return Site(matmul, reader.input[0], reader.output[0], dropped=(index,))
        if node.op_type == "Gemm" and slot == 1 and _gemm_is_linear(node):
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            return Site(index, node.input[0], node.output[0], bias)
        raise ExportError(
            f"--format onnx: the weight of layer {layer!r} feeds a {node.op_type} node the "
            "exporter does not recognise as its matmul"
        )


def _attribute(node: Any, name: str) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return None


def _ints(node: Any, name: str) -> list[int] | None:
    value = _attribute(node, name)
    return None if value is None else list(value)


def _gemm_is_linear(node: Any) -> bool:
    def value(name: str, default: float) -> float:
        found = _attribute(node, name)
        return default if found is None else found

    return (
        value("transA", 0) == 0
        and value("transB", 0) == 1
        and value("alpha", 1.0) == 1.0
        and value("beta", 1.0) == 1.0
    )


def replace_layers(
    graph: Any,
    layers: Mapping[str, nn.Module],
    heads: Mapping[str, list[str]],
    accuracy_level: int = 0,
) -> dict[str, str]:
    """Replace every compressed layer's float matmul or lookup by nodes on its codes; returns
    the scheme each layer got. Each layer must be found exactly where expected: one matmul
    per linear layer, one lookup per embedding plus one matmul per tied output layer."""
    view = _Graph(graph)
    edit = Edit()
    labels: dict[str, str] = {}
    for name, module in layers.items():
        weight = PREFIX + name + ".weight"
        readers = view.readers.get(weight, [])
        if isinstance(module, QuantizedEmbedding):
            labels.update(
                _embedding(view, edit, name, module, readers, heads.get(name, []), accuracy_level)
            )
            continue
        if len(readers) != 1:
            raise ExportError(
                f"--format onnx: layer {name!r} is read by {len(readers)} graph nodes, not one"
            )
        site = view.linear_site(*readers[0], layer=name)
        if isinstance(module, W8A8Linear):
            labels[name] = w8a8_nodes(edit, site, name, module)
        else:
            labels[name] = quantized_linear_nodes(edit, site, name, module, accuracy_level)
    _check_replaced(graph, edit, layers)
    edit.apply(graph)
    return labels


def _check_replaced(graph: Any, edit: Edit, layers: Mapping[str, nn.Module]) -> None:
    """No node may still read a compressed layer's float weight."""
    kept = [
        node
        for index, node in enumerate(graph.node)
        if index not in edit.dropped and index not in edit.replaced
    ]
    weights = {PREFIX + name + ".weight": name for name in layers}
    for node in kept:
        for value in node.input:
            if value in weights:
                raise ExportError(
                    f"--format onnx: layer {weights[value]!r} is still read as a float weight"
                )


def _finish_site(edit: Edit, site: Site, nodes: list[Any], result: str) -> None:
    """Put ``nodes`` (computing ``result`` without bias) where the site's matmul was."""
    from onnx import helper

    if site.bias is not None:
        nodes.append(helper.make_node("Add", [result, site.bias], [site.output]))
    edit.replace(site.node, nodes)
    edit.dropped.update(site.dropped)


def quantized_linear_nodes(
    edit: Edit, site: Site, name: str, module: QuantizedLinear, accuracy_level: int
) -> str:
    block = linear_block(module.cols, module.group_size)
    result = site.output if site.bias is None else f"{name}/matmul"
    if block is None:
        nodes = _dequantize_matmul(edit, site.activation, result, name, module)
        label = f"DequantizeLinear {'uint4' if module.bits <= 4 else 'uint8'} "
        label += f"block {module.group_size}" + (
            f" ({module.bits}-bit codes)" if module.bits not in (4, 8) else ""
        )
    else:
        blocked = blocked_codes(module, name, block)
        codes = edit.tensor(f"{name}.codes", blocked.codes)
        nodes = [_matmul_nbits(edit, site.activation, result, name, codes, blocked, accuracy_level)]
        label = "MatMulNBits " + blocked.label
    _finish_site(edit, site, nodes, result)
    return label


def _matmul_nbits(
    edit: Edit,
    activation: str,
    output: str,
    name: str,
    codes: str,
    blocked: Blocked,
    accuracy_level: int,
    initializers: str | None = None,
) -> Any:
    """A MatMulNBits node; ``initializers`` names a layer whose scales and zero points it
    shares (a tied output layer), else they are written under ``name``."""
    from onnx import helper

    owner = initializers or name
    if initializers is None:
        edit.tensor(f"{owner}.scales", blocked.scales)
        if blocked.zero_points is not None:
            edit.tensor(f"{owner}.zero_points", blocked.zero_points)
    inputs = [activation, codes, f"{owner}.scales"]
    if blocked.zero_points is not None:
        inputs.append(f"{owner}.zero_points")
    attributes: dict[str, int] = {
        "K": blocked.cols,
        "N": blocked.rows,
        "bits": blocked.bits,
        "block_size": blocked.block,
    }
    if accuracy_level:
        attributes["accuracy_level"] = accuracy_level
    return helper.make_node(
        "MatMulNBits", inputs, [output], name=f"{name}/MatMulNBits", domain=MS_DOMAIN, **attributes
    )


def _dequantize_matmul(
    edit: Edit, activation: str, output: str, name: str, module: QuantizedLinear
) -> list[Any]:
    """Standard ONNX: blocked DequantizeLinear of the ``[cols, rows]`` codes, then MatMul."""
    from onnx import helper

    codes = module.unsigned_codes().cpu().numpy().T
    zeros = whole_zero_points(module, name).T
    scales = module.scales.detach().cpu().float().numpy().T
    write = edit.uint4 if module.bits <= 4 else edit.tensor
    inputs = [
        write(f"{name}.codes", np.ascontiguousarray(codes)),
        edit.tensor(f"{name}.scales", np.ascontiguousarray(scales)),
        write(f"{name}.zero_points", np.ascontiguousarray(zeros)),
    ]
    weight = f"{name}/weight"
    return [
        helper.make_node(
            "DequantizeLinear",
            inputs,
            [weight],
            name=f"{name}/DequantizeLinear",
            axis=0,
            block_size=module.group_size,
        ),
        helper.make_node("MatMul", [activation, weight], [output], name=f"{name}/MatMul"),
    ]


def _embedding(
    view: _Graph,
    edit: Edit,
    name: str,
    module: QuantizedEmbedding,
    readers: list[tuple[int, int]],
    heads: list[str],
    accuracy_level: int,
) -> dict[str, str]:
    """GatherBlockQuantized for the lookup and MatMulNBits for each tied output layer, all on
    the same codes, scales and zero points."""
    from onnx import helper

    lookups = [(i, s) for i, s in readers if view.node(i).op_type == "Gather" and s == 0]
    others = [(i, s) for i, s in readers if (i, s) not in lookups]
    if len(lookups) != 1 or len(others) != len(heads):
        raise ExportError(
            f"--format onnx: embedding {name!r} is read by {len(lookups)} lookups and "
            f"{len(others)} other nodes; expected one lookup and {len(heads)} tied output layers"
        )
    lookup = view.node(lookups[0][0])
    if (_attribute(lookup, "axis") or 0) != 0:
        raise ExportError(f"--format onnx: embedding {name!r} is gathered along another axis")
    block = embedding_block(module.cols, module.group_size)
    if block is None:
        raise ExportError(f"--format onnx cannot hold layer {name!r}: {EMBEDDINGS_HELD}")
    blocked = blocked_codes(module, name, block)
    data, nodes = embedding_tensors(edit, name, blocked, tied=bool(heads))
    inputs = [data, lookup.input[1], f"{name}.scales"]
    if blocked.zero_points is not None:
        inputs.append(f"{name}.zero_points")
    nodes.append(
        helper.make_node(
            "GatherBlockQuantized",
            inputs,
            [lookup.output[0]],
            name=f"{name}/GatherBlockQuantized",
            domain=MS_DOMAIN,
            gather_axis=0,
            quantize_axis=1,
            block_size=block,
            bits=blocked.bits,
        )
    )
    edit.replace(lookups[0][0], nodes)
    labels = {name: "GatherBlockQuantized " + blocked.label}
    for index, (node, slot) in enumerate(others):
        head = heads[index]
        site = view.linear_site(node, slot, layer=head)
        result = site.output if site.bias is None else f"{head}/matmul"
        matmul = _matmul_nbits(
            edit, site.activation, result, head, f"{name}.codes", blocked, accuracy_level, name
        )
        _finish_site(edit, site, [matmul], result)
    for head in heads:
        labels[head] = f"MatMulNBits {blocked.label} (tied to {name})"
    return labels


def embedding_tensors(edit: Edit, name: str, blocked: Blocked, tied: bool) -> tuple[str, list]:
    """Write an embedding's codes, scales and zero points; returns the name of the 2-D codes
    the lookup reads, and the nodes that make them (a ``Reshape`` of the 3-D codes that tied
    output layers read through MatMulNBits)."""
    from onnx import helper

    flat = blocked.codes.reshape(blocked.rows, -1)
    edit.tensor(f"{name}.scales", blocked.scales)
    if blocked.zero_points is not None:
        edit.tensor(f"{name}.zero_points", blocked.zero_points)
    if not tied:
        return edit.tensor(f"{name}.codes", flat), []
    codes = edit.tensor(f"{name}.codes", blocked.codes)
    shape = edit.tensor(f"{name}.codes_2d_shape", np.array(flat.shape, dtype=np.int64))
    data = f"{name}/codes_2d"
    return data, [helper.make_node("Reshape", [codes, shape], [data], name=f"{name}/Reshape")]


def w8a8_nodes(edit: Edit, site: Site, name: str, module: W8A8Linear) -> str:
    """Smoothing, then the dynamic per-tensor quantisation of the activations (8 bits:
    ``DynamicQuantizeLinear``; 7 bits: autotune's own, written out in standard ops), then
    ``MatMulInteger`` on the int8 codes and a multiply by both scales."""
    if module.activation_bits == 8:
        return _w8a8_fused(edit, site, name, module)
    return _w8a8_seven_bits(edit, site, name, module)


def _w8a8_fused(edit: Edit, site: Site, name: str, module: W8A8Linear) -> str:
    """``DynamicQuantizeLinear`` -> ``MatMulInteger`` -> ``Cast`` -> ``Mul`` by the product of
    both scales: the pattern ONNX Runtime fuses into its ``DynamicQuantizeMatMul`` kernel."""
    from onnx import TensorProto, helper

    nodes: list[Any] = []
    x = site.activation
    if module.smooth is not None:
        inverse = edit.tensor(f"{name}.smooth", module.smooth.detach().cpu().float().numpy())
        x = f"{name}/smoothed"
        nodes.append(helper.make_node("Div", [site.activation, inverse], [x], name=x))
    quantised, scale, zero = (f"{name}/{part}" for part in ("quantised", "scale", "zero_point"))
    nodes.append(
        helper.make_node(
            "DynamicQuantizeLinear", [x], [quantised, scale, zero], name=f"{name}/quantise"
        )
    )
    codes = edit.tensor(f"{name}.codes", module.portable_codes().cpu().numpy().T.astype(np.int8))
    scales = module.scales.detach().cpu().float().numpy()
    scales = edit.tensor(f"{name}.scales", scales.reshape(()) if scales.size == 1 else scales)
    product, product_f, factor = f"{name}/product", f"{name}/product_f", f"{name}/factor"
    result = site.output if site.bias is None else f"{name}/matmul"
    nodes += [
        helper.make_node("MatMulInteger", [quantised, codes, zero], [product], name=product),
        helper.make_node("Cast", [product], [product_f], name=product_f, to=TensorProto.FLOAT),
        helper.make_node("Mul", [scale, scales], [factor], name=factor),
        helper.make_node("Mul", [product_f, factor], [result], name=f"{name}/Mul"),
    ]
    _finish_site(edit, site, nodes, result)
    per, smoothed = _w8a8_scheme(module)
    return f"DynamicQuantizeLinear + MatMulInteger int8 {per}{smoothed}"


def _w8a8_seven_bits(edit: Edit, site: Site, name: str, module: W8A8Linear) -> str:
    """Autotune's 7-bit dynamic per-tensor quantisation (range widened to 0, its scalars in
    float64 as the reference takes them), written out in standard ops."""
    from onnx import TensorProto, helper

    nodes: list[Any] = []

    def op(kind: str, *inputs: str, **attributes: Any) -> str:
        output = f"{name}/{kind}_{len(nodes)}"
        nodes.append(helper.make_node(kind, list(inputs), [output], name=output, **attributes))
        return output

    def const(suffix: str, value: Any, dtype: Any = np.float64) -> str:
        return edit.tensor(f"{name}.{suffix}", np.asarray(value, dtype=dtype))

    def cast(value: str, to: int) -> str:
        return op("Cast", value, to=to)

    x = site.activation
    if module.smooth is not None:
        x = op("Div", x, const("smooth", module.smooth.detach().cpu().float(), np.float32))
    zero, levels = const("zero", 0.0), const("levels", ACTIVATION_LEVELS)
    low = op("Min", cast(op("ReduceMin", x, keepdims=0), TensorProto.DOUBLE), zero)
    high = op("Max", cast(op("ReduceMax", x, keepdims=0), TensorProto.DOUBLE), zero)
    scale64 = op("Max", op("Div", op("Sub", high, low), levels), const("epsilon", 2.0**-23))
    zero_point = op("Clip", op("Neg", op("Round", op("Div", low, scale64))), zero, levels)
    scale = cast(scale64, TensorProto.FLOAT)
    shifted = op("Add", op("Round", op("Div", x, scale)), cast(zero_point, TensorProto.FLOAT))
    bottom, top = const("bottom", 0.0, np.float32), const("top", ACTIVATION_LEVELS, np.float32)
    quantised = cast(op("Clip", shifted, bottom, top), TensorProto.UINT8)
    codes = const("codes", module.portable_codes().cpu().numpy().T, np.int8)
    product = op("MatMulInteger", quantised, codes, cast(zero_point, TensorProto.UINT8))
    factor = op("Mul", scale, const("scales", module.scales.detach().cpu().float(), np.float32))
    result = site.output if site.bias is None else f"{name}/matmul"
    product_f = cast(product, TensorProto.FLOAT)
    nodes.append(helper.make_node("Mul", [product_f, factor], [result], name=f"{name}/Mul"))
    _finish_site(edit, site, nodes, result)
    per, smoothed = _w8a8_scheme(module)
    return f"MatMulInteger int8 {per}, 7-bit dynamic activations{smoothed}"


def _w8a8_scheme(module: W8A8Linear) -> tuple[str, str]:
    """``per-tensor`` or ``per-channel``, and ``, smoothed`` where the layer is."""
    per = "per-tensor" if module.scales.numel() == 1 else "per-channel"
    return per, ", smoothed" if module.smooth is not None else ""


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
