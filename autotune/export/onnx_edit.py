"""Edits of an ONNX graph: where a linear layer's weight is used, and its replacement.

:class:`GraphView` finds which nodes read a value and the matmul a linear weight feeds
(:class:`Site`); :class:`Edit` gathers node replacements and new initializers and applies
them in one pass; :func:`finish_site` puts a layer's new nodes where its matmul was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autotune.export.base import ExportError


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


class GraphView:
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


def node_attribute(node: Any, name: str) -> Any:
    """The value of ``node``'s attribute ``name``, or ``None`` where it has none."""
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return None


def _ints(node: Any, name: str) -> list[int] | None:
    value = node_attribute(node, name)
    return None if value is None else list(value)


def _gemm_is_linear(node: Any) -> bool:
    def value(name: str, default: float) -> float:
        found = node_attribute(node, name)
        return default if found is None else found

    return (
        value("transA", 0) == 0
        and value("transB", 0) == 1
        and value("alpha", 1.0) == 1.0
        and value("beta", 1.0) == 1.0
    )


def finish_site(edit: Edit, site: Site, nodes: list[Any], result: str) -> None:
    """Put ``nodes`` (computing ``result`` without bias) where the site's matmul was."""
    from onnx import helper

    if site.bias is not None:
        nodes.append(helper.make_node("Add", [result, site.bias], [site.output]))
    edit.replace(site.node, nodes)
    edit.dropped.update(site.dropped)
