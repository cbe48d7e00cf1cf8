"""Profiled ONNX Runtime sessions, their nodes attributed to the model's layers.

Float layers' nodes are named after their layer as the exporter names a compressed layer's
(:func:`name_float_layers`); a node of the graph ONNX Runtime optimised is a layer's by name
or by the values only that layer reads (:func:`node_owners`), and a
:class:`ProfiledSession` splits each run's kernel seconds among layers. Tied output layers
(:class:`methods.tied.TiedHead`) count as their embedding.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from autotune.export.base import ExportError
from autotune.export.onnx_graph import PREFIX
from autotune.export.ort_sessions import model_source, open_session, session_options
from methods.tied import TiedHead

KERNEL = "_kernel_time"  # suffix of a node's event in ONNX Runtime's profile


def layer_aliases(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """Layer of each name the graph may use: a layer is its own, a tied output layer counts
    as the embedding whose table it reads."""
    aliases = {name: name for name in names}
    for head, module in model.named_modules():
        if isinstance(module, TiedHead) and module.embedding_name in aliases:
            aliases[head] = module.embedding_name
    return aliases


def name_float_layers(graph: Any, aliases: Mapping[str, str]) -> None:
    """Name ``<layer>/timed_<op>_<i>`` the nodes that read a float layer's weight, and the matmul
    reading its transposed copy, as the exporter names the nodes of compressed layers; and
    the unnamed node reading a value the exporter named after a layer (the bias add after
    the product that replaced a ``Gemm``)."""
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for value in node.input:
            consumers.setdefault(value, []).append(node)
    counts: dict[str, int] = {}

    def rename(node: Any, layer: str) -> None:
        counts[layer] = counts.get(layer, 0) + 1
        node.name = f"{layer}/timed_{node.op_type}_{counts[layer]}"

    for node in graph.node:  # the bias add after a compressed Gemm's product
        if not node.name:
            owner = next(filter(None, (_named_owner(v, aliases) for v in node.input)), None)
            if owner is not None:
                rename(node, owner)
    initializers = {t.name for t in graph.initializer}
    for layer in dict.fromkeys(aliases.values()):
        weight = PREFIX + layer + ".weight"
        if weight not in initializers:
            continue
        for node in consumers.get(weight, []):
            rename(node, layer)
            if node.op_type == "Transpose":
                for reader in consumers.get(node.output[0], []):
                    rename(reader, layer)


def _named_owner(name: str, aliases: Mapping[str, str]) -> str | None:
    return aliases.get(name.split("/", 1)[0]) if "/" in name else None


def layer_values(graph: Any, aliases: Mapping[str, str]) -> dict[str, str]:
    """Values only a layer's nodes read (its weights, codes, scales and what its nodes pass
    one another), each with its layer; the layer's input and output are shared, not its."""
    owners: dict[str, set[str | None]] = {}
    for node in graph.node:
        owner = _named_owner(node.name, aliases)
        for value in node.input:
            owners.setdefault(value, set()).add(owner)
    own = {t.name for t in graph.initializer}
    own.update(v for n in graph.node if _named_owner(n.name, aliases) for v in n.output)
    own.difference_update(o.name for o in graph.output)
    return {
        value: next(iter(found))
        for value, found in owners.items()
        if value in own and len(found) == 1 and None not in found
    }


def node_owners(
    optimized: Any, values: Mapping[str, str], aliases: Mapping[str, str]
) -> dict[str, tuple[str, ...]]:
    """Layers of each node of the graph ONNX Runtime optimised: the layer its name starts
    with (``<layer>/``), else those whose values it reads (a node a fusion renamed); a node
    reading several layers' values is shared among them."""
    found: dict[str, tuple[str, ...]] = {}
    for node in optimized.graph.node:
        named = _named_owner(node.name, aliases)
        layers = (
            (named,)
            if named
            else tuple(dict.fromkeys(values[v] for v in node.input if v in values))
        )
        if layers and node.name:
            found[node.name] = layers
    return found


@dataclass
class ProfiledSession:
    """A profiled session of one variant and the layers each of its nodes belongs to."""

    session: Any
    owners: dict[str, tuple[str, ...]]
    folder: Path

    @property
    def layers(self) -> set[str]:
        return {layer for layers in self.owners.values() for layer in layers}

    def layer_seconds(self, skip: int = 0) -> list[dict[str, float]]:
        """Ends profiling: each layer's kernel seconds in every run after the first ``skip``."""
        events = json.loads(Path(self.session.end_profiling()).read_text())
        runs = sorted(
            e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"
        )
        totals = [dict.fromkeys(self.layers, 0.0) for _ in runs]
        for event in events:
            name = event.get("name", "")
            if event.get("cat") != "Node" or not name.endswith(KERNEL):
                continue
            layers = self.owners.get(name[: -len(KERNEL)])
            run = bisect.bisect_right(runs, event["ts"]) - 1
            if not layers or run < 0:
                continue
            for layer in layers:
                totals[run][layer] += event["dur"] * 1e-6 / len(layers)
        return totals[skip:]


def open_profiled(
    model: Any, aliases: Mapping[str, str], threads: int | None, folder: Path
) -> ProfiledSession:
    """A profiled session of the ``ModelProto`` ``model`` (its float layers named by
    :func:`name_float_layers`) with its nodes attributed to layers; every layer of
    ``aliases`` must own a node."""
    folder.mkdir(parents=True, exist_ok=True)
    values = layer_values(model.graph, aliases)
    return profiled_session(model_source(model, folder), values, aliases, threads, folder)


def profiled_session(
    source: bytes | str,
    values: Mapping[str, str],
    aliases: Mapping[str, str],
    threads: int | None,
    folder: Path,
) -> ProfiledSession:
    """A profiled session of ``source`` writing its profile and optimised graph in ``folder``,
    its nodes attributed by name or by ``values`` (:func:`layer_values`)."""
    import onnx

    session = open_session(source, session_options(threads, folder))
    optimized = onnx.load(str(folder / "optimized.onnx"), load_external_data=False)
    profiled = ProfiledSession(session, node_owners(optimized, values, aliases), folder)
    missing = sorted(set(aliases.values()) - profiled.layers)
    if missing:
        raise ExportError(
            f"no node of the ONNX Runtime graph could be attributed to layer {missing[0]!r}"
        )
    return profiled
