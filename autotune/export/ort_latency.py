"""Latency of each (layer shape, option) measured inside ONNX Runtime on this machine.

The ONNX Runtime counterpart of :func:`profilers.latency_table.measure_in_model`, with the
same result. For each option label, every layer that can take it (one the ONNX exporter
holds, whose conversion succeeds) is swapped to it at once, that variant is exported in
memory by the ONNX exporter (:meth:`OnnxExporter.build`: the model is traced once and each
variant is the exporter's edit of that graph), and CPU sessions run it; the unchanged float
model is one more variant, ``keep`` for every layer. The caller's model is restored.

Seconds are wall times of unprofiled sessions; ONNX Runtime's profiler only splits them among
layers. Profiling slows kernels unevenly (measured: the float model's layers little, a chain
of small nodes or a kernel making many parallel calls two to three times), so its times are
not taken as they are:

* ``keep``: each layer's profiled kernel seconds (one float matmul or lookup, little slowed);
  ``whole`` is the float model's unprofiled wall time and ``rest = whole - its layers``, so
  ``rest`` plus the float layers is ``whole`` by construction.
* another label: its variant's unprofiled wall time minus the float model's, per round, plus
  the swapped layers' float seconds, is the seconds of all its swapped layers together; they
  are shared among its layers in proportion to their profiled kernel seconds. A plan giving
  every layer that label is thus predicted at its export's wall time.

A profiled node is a layer's by name or by the values it reads (:func:`node_owners`). A bias
added by a node of its own is part of ``rest`` (ONNX Runtime fuses it into the next
normalisation or activation alike in every variant). Tied output layers
(:class:`methods.tied.TiedHead`) count as their embedding: the exporter writes them on the
embedding's codes. The unprofiled sessions are visited round-robin after warm-up runs, a few
unrecorded runs then one recorded run per visit, and every figure is a median, so that bursts
of load hit all variants alike.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autotune.export.base import ExportError
from autotune.export.onnx import PREFIX, PROTO_LIMIT, OnnxExporter, _save, export_float_graph
from autotune.plan import Plan
from methods.base import LayerShape, Option
from methods.errors import OptionError
from methods.registry import method_of
from methods.tied import TiedHead
from profilers.latency_table import InModelLatency
from profilers.observe import Observers

WARMUP = 2  # unrecorded runs of every session before the rounds
# unrecorded runs before the recorded one at each visit of a session: the first runs after
# other sessions ran are slower (measured up to a quarter for a float BERT), a steady run of
# one model (what :func:`time_onnx` times) is not
SETTLE = 3
KERNEL = "_kernel_time"  # suffix of a node's event in ONNX Runtime's profile
KEEP = "keep"
_TRACEABLE = (nn.Linear, nn.Embedding)  # their float stand-ins trace alike


# ------------------------------------------------------------------------ sessions


def session_options(threads: int | None = None, folder: Path | None = None) -> Any:
    """CPU session options: ``threads`` intra-op threads (default: torch's), idle threads
    not spinning; with ``folder``, profiling into it and the optimised graph written there."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if folder is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(folder / "profile")
        options.optimized_model_filepath = str(folder / "optimized.onnx")
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "optimized.data"
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
    return options


def model_source(model: Any, folder: Path, consume: bool = False) -> bytes | str:
    """What a session loads for a ``ModelProto``, bytes or a path: the proto's bytes, or
    above protobuf's limit a file written in ``folder`` with the tensors beside it (writing
    empties the proto's tensors: a copy is written unless ``consume``)."""
    import onnx

    if isinstance(model, (bytes, str)):
        return model
    if isinstance(model, Path):
        return str(model)
    if sum(len(t.raw_data) for t in model.graph.initializer) <= PROTO_LIMIT:
        return model.SerializeToString()
    if not consume:
        model, proto = onnx.ModelProto(), model
        model.CopyFrom(proto)
    path = Path(tempfile.mkdtemp(dir=folder)) / "model.onnx"
    _save(model, path)
    return str(path)


def open_session(source: bytes | str, options: Any) -> Any:
    """An ``InferenceSession`` on CPU of a :func:`model_source`."""
    import onnxruntime as ort

    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def feed_for(session: Any, inputs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The session's inputs from ``inputs``; a missing attention mask is all ones, missing
    token type ids all zeros."""
    ids = inputs["input_ids"]
    defaults = {"attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    feed = {}
    for arg in session.get_inputs():
        value = inputs.get(arg.name, defaults.get(arg.name))
        if value is None:
            raise ValueError(f"the ONNX model takes {arg.name!r}, which the inputs lack")
        feed[arg.name] = np.ascontiguousarray(value.detach().cpu().numpy())
    return feed


def timed_run(session: Any, feed: Mapping[str, np.ndarray]) -> float:
    """Wall seconds of one run."""
    start = time.perf_counter()
    session.run(None, dict(feed))
    return time.perf_counter() - start


def time_onnx(
    model_or_path: Any,
    inputs: Mapping[str, torch.Tensor],
    rounds: int = 20,
    *,
    threads: int | None = None,
) -> tuple[float, float]:
    """Median and 90th percentile wall seconds of an ONNX model (``ModelProto``, bytes or a
    path) run by ONNX Runtime on CPU on ``inputs``, after warm-up runs."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    with tempfile.TemporaryDirectory(prefix="autotune-ort-") as folder:
        source = model_source(model_or_path, Path(folder))
        session = open_session(source, session_options(threads))
        feed = feed_for(session, inputs)
        for _ in range(WARMUP):
            session.run(None, feed)
        times = [timed_run(session, feed) for _ in range(rounds)]
    return statistics.median(times), float(np.percentile(times, 90))


# --------------------------------------------------------------------- attribution


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
    return _profiled_session(model_source(model, folder), values, aliases, threads, folder)


def _profiled_session(
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


# ------------------------------------------------------------------------ variants


def _transposed_tables(model: nn.Module) -> set[str]:
    """Embeddings read by a tied GPT-2 ``Conv1D`` head, which the export keeps in float."""
    return {m.embedding_name for m in model.modules() if isinstance(m, TiedHead) and m.transposed}


def _copy(module: nn.Module) -> nn.Module:
    """A copy with storage of its own (kernel caches are rebuilt on first use)."""
    if hasattr(module, "_unpack"):
        module._unpack()
    return copy.deepcopy(module)


@dataclass
class _Variant:
    """One option label: the converted module and option of each layer that takes it."""

    label: str
    modules: dict[str, nn.Module] = field(default_factory=dict)
    options: dict[str, Option] = field(default_factory=dict)


def build_variants(
    model: nn.Module,
    layers: Mapping[str, Sequence[Option]],
    exporter: OnnxExporter,
    observers: Observers,
    progress: Callable[[int], None] | None = None,
) -> list[_Variant]:
    """One variant per label but ``keep``: each layer that can take it, converted (one
    conversion per shape, copied for the other layers of that shape)."""
    transposed = _transposed_tables(model)
    built: dict[tuple[LayerShape, str], nn.Module | None] = {}
    variants: dict[str, _Variant] = {}
    for name, options in layers.items():
        original = model.get_submodule(name)
        shape = LayerShape.of(original)
        for option in options:
            if option.method == "none" or name in transposed:
                continue
            if exporter.refusal(name, shape, option) is not None:
                continue
            key = (shape, option.label)
            if key not in built:
                try:
                    built[key] = method_of(option).convert(
                        original, option, observers.get((name, option.label))
                    )
                except OptionError:
                    built[key] = None
                if progress is not None and built[key] is not None:
                    progress(1)
                module = built[key]
            else:
                module = _copy(built[key]) if built[key] is not None else None
            if module is not None:
                variant = variants.setdefault(option.label, _Variant(option.label))
                variant.modules[name] = module
                variant.options[name] = option
    return list(variants.values())


@contextlib.contextmanager
def _swapped(model: nn.Module, modules: Mapping[str, nn.Module]):
    """``model`` with ``modules`` in place of its layers, restored on leaving."""
    originals = {name: model.get_submodule(name) for name in modules}
    try:
        for name, module in modules.items():
            model.set_submodule(name, module)
        yield model
    finally:
        for name, module in originals.items():
            model.set_submodule(name, module)


def variant_graph(
    model: nn.Module, variant: _Variant, exporter: OnnxExporter, float_graph: Any
) -> Any:
    """The exporter's in-memory ONNX model of ``model`` with ``variant``'s layers; the float
    trace is reused where every swapped layer is a plain linear or embedding layer (its
    float stand-in traces alike), else the variant is traced again."""
    import onnx

    plan = Plan(layers={name: option.to_dict() for name, option in variant.options.items()})
    reuse = all(type(model.get_submodule(n)) in _TRACEABLE for n in variant.modules)
    graph = None
    if reuse:
        graph = onnx.ModelProto()
        graph.CopyFrom(float_graph)
    with _swapped(model, variant.modules):
        proto, _ = exporter.build(model, plan, graph)
    return proto


# ---------------------------------------------------------------------- measuring


@dataclass
class _Timed:
    """A label's unprofiled session, the layers it times, and their profiled kernel seconds
    (medians over runs)."""

    session: Any
    layers: list[str]
    kernels: dict[str, float]


def measure_in_ort(
    model: nn.Module,
    layers: Mapping[str, Sequence[Option]],
    inputs: dict[str, torch.Tensor],
    *,
    observers: Observers | None = None,
    rounds: int = 7,
    progress: Callable[[int], None] | None = None,
    threads: int | None = None,
    settle: int = SETTLE,
) -> InModelLatency:
    """Time every option of ``layers`` (name -> options) inside ONNX Runtime sessions of
    ``model``'s ONNX export on ``inputs`` (see the module docstring). Options the export
    cannot hold, or that cannot be built, are left out of the table. ``settle``: unrecorded
    runs of a session before the recorded one at each visit."""
    if rounds < 1 or settle < 0:
        raise ValueError(f"rounds must be at least 1 and settle at least 0, got {rounds}, {settle}")
    exporter = OnnxExporter()
    shapes = {name: LayerShape.of(model.get_submodule(name)) for name in layers}
    variants = build_variants(model, layers, exporter, observers or {}, progress)
    with tempfile.TemporaryDirectory(prefix="autotune-ort-") as folder:
        timed = _open_sessions(
            model, list(layers), variants, exporter, inputs, threads, rounds, Path(folder)
        )
        walls = run_rounds([t.session for t in timed.values()], inputs, rounds, settle)
    return _table(timed, dict(zip(timed, walls, strict=True)), shapes)


def _table(
    timed: Mapping[str, _Timed],
    walls: Mapping[str, list[float]],
    shapes: Mapping[str, LayerShape],
) -> InModelLatency:
    """The table from the float layers' kernel seconds and every variant's wall seconds."""
    floats = timed[KEEP].kernels
    table = _by_shape(KEEP, floats, shapes)
    for label, variant in timed.items():
        if label == KEEP:
            continue
        base = sum(floats[name] for name in variant.layers)
        deltas = [w - f for w, f in zip(walls[label], walls[KEEP], strict=True)]
        total = max(statistics.median(deltas) + base, 0.0)
        kernels = {name: variant.kernels[name] for name in variant.layers}
        profiled = sum(kernels.values())
        share = {n: k / profiled if profiled else 1 / len(kernels) for n, k in kernels.items()}
        table.update(_by_shape(label, {n: total * f for n, f in share.items()}, shapes))
    whole = statistics.median(walls[KEEP])
    return InModelLatency(table, whole, max(whole - sum(floats.values()), 0.0))


def _by_shape(
    label: str, seconds: Mapping[str, float], shapes: Mapping[str, LayerShape]
) -> dict[tuple[LayerShape, str], float]:
    """Mean seconds of the layers of each shape."""
    found: dict[LayerShape, list[float]] = {}
    for name, value in seconds.items():
        found.setdefault(shapes[name], []).append(value)
    return {(shape, label): statistics.fmean(values) for shape, values in found.items()}


def _open_sessions(
    model: nn.Module,
    names: list[str],
    variants: list[_Variant],
    exporter: OnnxExporter,
    inputs: Mapping[str, torch.Tensor],
    threads: int | None,
    runs: int,
    root: Path,
) -> dict[str, _Timed]:
    """Per label, an unprofiled session and its layers' kernel seconds over ``runs``
    profiled runs (``keep``: every layer). A variant the export refuses is left out, with a
    warning; the float model must export."""
    aliases = layer_aliases(model, names)
    float_graph = export_float_graph(model, {})
    timed = {}
    for index, variant in enumerate([_Variant(KEEP), *variants]):
        layers = list(variant.modules) if index else names
        folder = root / str(index)
        folder.mkdir()
        try:
            graph = variant_graph(model, variant, exporter, float_graph)
            variant.modules.clear()  # the export holds their codes now
            name_float_layers(graph.graph, aliases)
            values = layer_values(graph.graph, aliases)
            source = model_source(graph, folder, consume=True)
            del graph
            profiled = _profiled_session(source, values, aliases, threads, folder)
        except ExportError as exc:
            if not index:
                raise
            warnings.warn(f"{variant.label} is not timed in ONNX Runtime: {exc}", stacklevel=3)
            continue
        kernels = _kernel_seconds(profiled, inputs, runs)
        del profiled
        session = open_session(source, session_options(threads))
        timed[variant.label] = _Timed(session, layers, kernels)
    return timed


def _kernel_seconds(
    profiled: ProfiledSession, inputs: Mapping[str, torch.Tensor], runs: int
) -> dict[str, float]:
    """Each layer's median kernel seconds over ``runs`` profiled runs after warm-up runs."""
    feed = feed_for(profiled.session, inputs)
    for _ in range(WARMUP + runs):
        profiled.session.run(None, feed)
    seconds = profiled.layer_seconds(WARMUP)
    return {layer: statistics.median(run[layer] for run in seconds) for layer in seconds[0]}


def run_rounds(
    sessions: Sequence[Any],
    inputs: Mapping[str, torch.Tensor],
    rounds: int,
    settle: int,
) -> list[list[float]]:
    """Warm-up runs, then ``rounds`` rounds visiting every session, the order reversed every
    other round: ``settle`` runs and one recorded run per visit. Wall seconds per session."""
    order = [(index, session, feed_for(session, inputs)) for index, session in enumerate(sessions)]
    for _, session, feed in order:
        for _ in range(WARMUP):
            session.run(None, feed)
    walls: list[list[float]] = [[] for _ in sessions]
    for round_index in range(rounds):
        for index, session, feed in order if round_index % 2 else reversed(order):
            for _ in range(settle):
                session.run(None, feed)
            walls[index].append(timed_run(session, feed))
    return walls
