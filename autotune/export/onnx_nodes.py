"""The nodes that replace each compressed layer's float matmul or lookup in the ONNX graph.

:func:`replace_layers` finds every compressed layer where the float graph reads its weight
and writes nodes on autotune's stored codes: ``MatMulNBits`` (or blocked
``DequantizeLinear`` and ``MatMul``) for rtn / gptq linear layers, ``GatherBlockQuantized``
for embeddings with ``MatMulNBits`` for their tied output layers, and ``MatMulInteger`` after
a dynamic activation quantisation for w8a8 layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from autotune.export.base import ExportError
from autotune.export.onnx_edit import Edit, GraphView, Site, finish_site, node_attribute
from autotune.export.onnx_graph import PREFIX
from autotune.export.onnx_packing import (
    EMBEDDINGS_HELD,
    Blocked,
    blocked_codes,
    container_bits,
    embedding_block,
    linear_block,
    whole_zero_points,
)
from methods.quantized import QuantizedEmbedding, QuantizedLinear
from methods.smoothquant import W8A8Linear

MS_DOMAIN = "com.microsoft"
ACTIVATION_LEVELS = 127.0  # autotune's w8a8 quantises activations to 7 bits


def replace_layers(
    graph: Any,
    layers: Mapping[str, nn.Module],
    heads: Mapping[str, list[str]],
    accuracy_level: int = 0,
) -> dict[str, str]:
    """Replace every compressed layer's float matmul or lookup by nodes on its codes; returns
    the scheme each layer got. Each layer must be found exactly where expected: one matmul
    per linear layer, one lookup per embedding plus one matmul per tied output layer."""
    view = GraphView(graph)
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
    finish_site(edit, site, nodes, result)
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
    view: GraphView,
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
    if (node_attribute(lookup, "axis") or 0) != 0:
        raise ExportError(f"--format onnx: embedding {name!r} is gathered along another axis")
    if row_scaled(module, tied=bool(heads)):
        nodes = _row_scaled_lookup(edit, name, module, lookup.input[1], lookup.output[0])
        edit.replace(lookups[0][0], nodes)
        codes = "int8" if module.symmetric else "uint8 + row zero points"
        return {name: f"Gather {codes} + row scales ({module.bits}-bit per-channel)"}
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
        finish_site(edit, site, [matmul], result)
    for head in heads:
        labels[head] = f"MatMulNBits {blocked.label} (tied to {name})"
    return labels


class _Chain:
    """Nodes written one after another under a layer's name, each output named
    ``{layer}/{op}_{index}`` unless given."""

    def __init__(self, layer: str) -> None:
        self.layer = layer
        self.nodes: list[Any] = []

    def op(self, kind: str, *inputs: str, out: str | None = None, **attributes: Any) -> str:
        from onnx import helper

        result = out or f"{self.layer}/{kind}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(kind, list(inputs), [result], name=result, **attributes))
        return result


def row_scaled(module: QuantizedEmbedding, tied: bool) -> bool:
    """Whether an embedding is written as plain 8-bit rows with one scale per row: one group
    per row in the 8-bit container, read by no tied output layer. GatherBlockQuantized would
    repeat each row's scale in every block of at most 128 (three times on a 384-wide row)."""
    return not tied and module.group_size == module.cols and container_bits(module.bits) == 8


def row_scaled_tensors(
    edit: Edit, name: str, module: QuantizedEmbedding
) -> tuple[str, str, str | None]:
    """Write a :func:`row_scaled` embedding's ``[rows, cols]`` codes, ``[rows, 1]`` float32
    scales and, when asymmetric, ``[rows, 1]`` uint8 zero points (``None`` when symmetric,
    whose codes are written int8, less their middle ``2**(bits-1)``); their names."""
    codes = module.unsigned_codes().cpu().numpy().astype(np.int16)
    scales = module.scales.detach().cpu().float().numpy().reshape(-1, 1)
    scale_name = edit.tensor(f"{name}.scales", np.ascontiguousarray(scales))
    if module.symmetric:
        centred = (codes - (1 << (module.bits - 1))).astype(np.int8)
        return edit.tensor(f"{name}.codes", centred), scale_name, None
    zeros = whole_zero_points(module, name).reshape(-1, 1).astype(np.uint8)
    code_name = edit.tensor(f"{name}.codes", codes.astype(np.uint8))
    return code_name, scale_name, edit.tensor(f"{name}.zero_points", zeros)


def _row_scaled_lookup(
    edit: Edit, name: str, module: QuantizedEmbedding, ids: str, output: str
) -> list[Any]:
    """Standard ONNX: the looked-up rows' codes gathered and made float, less their rows'
    zero points where asymmetric, times their rows' scales."""
    from onnx import TensorProto

    codes, scales, zeros = row_scaled_tensors(edit, name, module)
    chain = _Chain(name)
    op = chain.op
    rows = op("Cast", op("Gather", codes, ids, axis=0), to=TensorProto.FLOAT)
    if zeros is not None:
        zero = op("Cast", op("Gather", zeros, ids, axis=0), to=TensorProto.FLOAT)
        rows = op("Sub", rows, zero)
    op("Mul", rows, op("Gather", scales, ids, axis=0), out=output)
    return chain.nodes


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
    finish_site(edit, site, nodes, result)
    per, smoothed = _w8a8_scheme(module)
    return f"DynamicQuantizeLinear + MatMulInteger int8 {per}{smoothed}"


def _w8a8_seven_bits(edit: Edit, site: Site, name: str, module: W8A8Linear) -> str:
    """Autotune's 7-bit dynamic per-tensor quantisation (range widened to 0, its scalars in
    float64 as the reference takes them), written out in standard ops."""
    from onnx import TensorProto, helper

    chain = _Chain(name)
    nodes, op = chain.nodes, chain.op

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
    finish_site(edit, site, nodes, result)
    per, smoothed = _w8a8_scheme(module)
    return f"MatMulInteger int8 {per}, 7-bit dynamic activations{smoothed}"


def _w8a8_scheme(module: W8A8Linear) -> tuple[str, str]:
    """``per-tensor`` or ``per-channel`` (with ``, pair-safe`` where its codes are), and
    ``, smoothed`` where the layer is."""
    per = "per-tensor" if module.scales.numel() == 1 else "per-channel"
    per += ", pair-safe" if module.pair_safe else ""
    return per, ", smoothed" if module.smooth is not None else ""
