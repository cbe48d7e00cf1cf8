"""Latency of each (layer shape, option) measured inside ONNX Runtime on this machine.

The ONNX Runtime counterpart of :func:`profilers.latency_table.measure_in_model`, with the
same result. For each timing form (the options whose exports run the same nodes on tensors
of the same sizes: :func:`timing_form`), every layer that can take such an option (one the
ONNX exporter holds, whose conversion from the layer's own weights succeeds) is swapped to
it at once, that variant is exported in
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
* another form: its variant's unprofiled wall time minus the float model's, per round, plus
  the swapped layers' float seconds, is the seconds of all its swapped layers together; they
  are shared among its layers in proportion to their profiled kernel seconds. A plan giving
  every layer an option of that form is thus predicted at its export's wall time. Where the
  difference is swamped by noise (no time left for the layers, which happens on tiny
  models), their profiled kernel seconds stand in: a layer never costs nothing.

A profiled node is a layer's by name or by the values it reads
(:func:`autotune.export.ort_profile.node_owners`). A bias added by a node of its own is part
of ``rest`` (ONNX Runtime fuses it into the next normalisation or activation alike in every
variant). Tied output layers (:class:`methods.tied.TiedHead`) count as their embedding: the
exporter writes them on the embedding's codes.

Each variant's unprofiled session is timed beside the float model's alone, in rounds that
alternate between the two after warm-up runs (a few unrecorded runs then one recorded run
per visit), and every figure is a median, so that bursts of load hit both alike. One pair
at a time, not every variant in turn: with eight sessions visited in turn the demo's int8
variant measured 0.67-0.74x the float model's time against 0.56-0.64x beside the float
model alone, which is how a plan's export is confirmed and how it runs when deployed.

The sessions and their timing are :mod:`autotune.export.ort_sessions`'s, the profiled
sessions and their attribution :mod:`autotune.export.ort_profile`'s; this module builds the
variants and makes the table.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autotune.export.base import ExportError
from autotune.export.onnx import OnnxExporter
from autotune.export.onnx_graph import export_float_graph
from autotune.export.ort_profile import (
    ProfiledSession,
    layer_aliases,
    layer_values,
    name_float_layers,
    profiled_session,
)
from autotune.export.ort_sessions import (
    SETTLE,
    WARMUP,
    feed_for,
    model_source,
    open_session,
    run_rounds,
    session_options,
)
from autotune.plan import Plan
from methods.base import LayerShape, Option
from methods.errors import OptionError
from methods.registry import method_of
from methods.smoothquant import W8A8Option
from methods.tied import TiedHead
from profilers.execution.observe import Observers
from profilers.latency_table import InModelLatency

KEEP = "keep"
_TRACEABLE = (nn.Linear, nn.Embedding)  # their float stand-ins trace alike


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


# the smoothing strength standing for every smoothed W8A8 option in its timing form
SMOOTHED = 0.5


def timing_form(option: Option) -> str:
    """The label standing for every option whose export runs the same nodes on tensors of
    the same sizes, timed once for all: a calibrated option's stand-in (GPTQ: RTN's storage),
    W8A8 without its pair-safe codes and smoothing strength (smoothed or not still differs).
    Timing alike variants apart gave the search several noisy prices of one cost, and it
    chose the luckiest."""
    option = method_of(option).stand_in(option) or option
    if isinstance(option, W8A8Option):
        alpha = SMOOTHED if option.alpha else 0.0
        option = dataclasses.replace(option, pair_safe=False, alpha=alpha)
    return option.label


def build_variants(
    model: nn.Module,
    layers: Mapping[str, Sequence[Option]],
    exporter: OnnxExporter,
    observers: Observers,
    progress: Callable[[int], None] | None = None,
) -> list[_Variant]:
    """One variant per timing form (:func:`timing_form`) but ``keep``: each layer that can
    take an option of that form, converted from its own weights. Copies of one conversion
    would time wrong: the exporter stores identical tensors once, and a variant reading one
    weight per shape ran 1.16x faster than the export of the same plan on the demo. A
    calibrated option is converted as its uncalibrated stand-in where it has one (the same
    storage, hence the same kernels and time, without a solve per layer); a layer whose
    conversion fails takes a copy of another layer's of its shape, or is left out.
    ``progress`` counts each (shape, label) once."""
    transposed = _transposed_tables(model)
    built: dict[tuple[LayerShape, str], nn.Module] = {}
    counted: set[tuple[LayerShape, str]] = set()
    variants: dict[str, _Variant] = {}
    for name, options in layers.items():
        original = model.get_submodule(name)
        shape = LayerShape.of(original)
        for option in options:
            if option.method == "none" or name in transposed:
                continue
            if exporter.refusal(name, shape, option) is not None:
                continue
            form = timing_form(option)
            variant = variants.setdefault(form, _Variant(form))
            if name not in variant.modules:
                module = _convert(original, option, name, observers, built.get((shape, form)))
                if module is not None:
                    built.setdefault((shape, form), module)
                    variant.modules[name] = module
                    variant.options[name] = option
            if progress is not None and (shape, option.label) not in counted:
                counted.add((shape, option.label))
                progress(1)
    return [variant for variant in variants.values() if variant.modules]


def _convert(
    original: nn.Module,
    option: Option,
    name: str,
    observers: Observers,
    fallback: nn.Module | None,
) -> nn.Module | None:
    """``original`` converted to ``option`` (as its stand-in where it has one), else a copy
    of ``fallback`` (a layer of its shape), else ``None``."""
    timed = method_of(option).stand_in(option) or option
    try:
        return method_of(timed).convert(original, timed, observers.get((name, timed.label)))
    except OptionError:
        return _copy(fallback) if fallback is not None else None


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
    """A label's layers, their profiled kernel seconds (medians over runs), and the wall
    seconds of its unprofiled session and of the float model's beside it, round by round."""

    layers: list[str]
    kernels: dict[str, float]
    walls: list[float] = field(default_factory=list)
    float_walls: list[float] = field(default_factory=list)


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
        timed = _time_variants(
            model, list(layers), variants, exporter, inputs, threads, rounds, settle, Path(folder)
        )
    table = _table(timed, shapes)
    for name, options in layers.items():  # every label at its timing form's seconds
        for option in options:
            form = table.layers.get((shapes[name], timing_form(option)))
            if form is not None:
                table.layers.setdefault((shapes[name], option.label), form)
    return table


def _table(timed: Mapping[str, _Timed], shapes: Mapping[str, LayerShape]) -> InModelLatency:
    """The table from the float layers' kernel seconds and every variant's wall seconds
    against the float model's beside it."""
    floats = timed[KEEP].kernels
    table = _by_shape(KEEP, floats, shapes)
    for label, variant in timed.items():
        if label == KEEP:
            continue
        base = sum(floats[name] for name in variant.layers)
        deltas = [w - f for w, f in zip(variant.walls, variant.float_walls, strict=True)]
        kernels = {name: variant.kernels[name] for name in variant.layers}
        profiled = sum(kernels.values())
        total = statistics.median(deltas) + base
        if total <= 0:  # noise larger than the layers' time: their profiled kernels instead
            total = profiled or base
        share = {n: k / profiled if profiled else 1 / len(kernels) for n, k in kernels.items()}
        table.update(_by_shape(label, {n: total * f for n, f in share.items()}, shapes))
    whole = statistics.median(timed[KEEP].walls)
    return InModelLatency(table, whole, max(whole - sum(floats.values()), 0.0))


def _by_shape(
    label: str, seconds: Mapping[str, float], shapes: Mapping[str, LayerShape]
) -> dict[tuple[LayerShape, str], float]:
    """Mean seconds of the layers of each shape."""
    found: dict[LayerShape, list[float]] = {}
    for name, value in seconds.items():
        found.setdefault(shapes[name], []).append(value)
    return {(shape, label): statistics.fmean(values) for shape, values in found.items()}


def _time_variants(
    model: nn.Module,
    names: list[str],
    variants: list[_Variant],
    exporter: OnnxExporter,
    inputs: Mapping[str, torch.Tensor],
    threads: int | None,
    runs: int,
    settle: int,
    root: Path,
) -> dict[str, _Timed]:
    """Per label, its layers' kernel seconds over ``runs`` profiled runs (``keep``: every
    layer) and its unprofiled session's wall seconds over ``runs`` rounds beside the float
    model's session, one variant at a time. A variant the export refuses is left out, with a
    warning; the float model must export."""
    aliases = layer_aliases(model, names)
    float_graph = export_float_graph(model, {})
    timed: dict[str, _Timed] = {}
    float_session = None
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
            profiled = profiled_session(source, values, aliases, threads, folder)
        except ExportError as exc:
            if not index:
                raise
            warnings.warn(f"{variant.label} is not timed in ONNX Runtime: {exc}", stacklevel=3)
            continue
        kernels = _kernel_seconds(profiled, inputs, runs)
        del profiled
        session = open_session(source, session_options(threads))
        timed[variant.label] = entry = _Timed(layers, kernels)
        if not index:
            float_session = session
            continue
        float_walls, entry.walls = run_rounds([float_session, session], inputs, runs, settle)
        entry.float_walls = float_walls
        timed[KEEP].walls += float_walls
        del session
    if not timed[KEEP].walls:  # no variant: the float model alone
        (timed[KEEP].walls,) = run_rounds([float_session], inputs, runs, settle)
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
