"""Latency models: how each (layer, option) of a model is given seconds on a target.

A named target is priced by its roofline; ``local`` is timed on this machine inside the
model: in autotune's torch modules, or, for ``--runtime onnxruntime``, inside ONNX Runtime
sessions of the model's export, and for ``--runtime llama.cpp`` in llama.cpp. Each model is
a :class:`LatencyModel`; the first registered one that :meth:`~LatencyModel.serves` a target
prices it
(:func:`latency_model_for`), and :func:`register_latency_model` adds one ahead of the rest.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from autotune.layers import LayerRef
from autotune.model_memo import ModelMemo
from methods.base import LayerShape, Option, is_weight_layer
from methods.keep import KeepOption
from methods.tied import TiedHead
from profilers.execution.observe import Observers
from profilers.hardware import HardwareSpec
from profilers.latency_table import InModelLatency, measure_in_model
from profilers.measure import LatencyStats, latency_stats
from profilers.opcount import rest_of_model
from profilers.paired_timing import Limit
from profilers.roofline import RestOfModel, format_in_runtime, layer_latency, rest_latency


@dataclass
class Pricing:
    """What a latency model prices: the layers and their options, the model's other weight
    layers (kept as they are), tied output heads per embedding, and the inputs."""

    model: nn.Module
    layers: Sequence[LayerRef]
    options: dict[str, list[Option]]
    others: Sequence[LayerRef]
    heads: dict[str, list[TiedHead]]
    inputs: dict[str, torch.Tensor]
    observers: Observers | None = None
    progress: Callable[[int], None] | None = None
    run: Callable[..., Any] | None = None  # the forward pass a roofline counts

    @property
    def tokens(self) -> int:
        return int(self.inputs["input_ids"].numel())


class LatencyModel(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    measures: ClassVar[bool] = False  # times (layer shape, option)s on this machine
    measures_decode: ClassVar[bool] = False  # :meth:`measure` also times decode inputs

    @abstractmethod
    def serves(self, spec: HardwareSpec) -> bool:
        """Whether this model prices ``spec``."""

    def runs_here(self) -> bool:
        """Whether what it times with is installed on this machine."""
        return True

    @abstractmethod
    def price(self, spec: HardwareSpec, job: Pricing) -> tuple[dict[str, list[float]], float]:
        """Seconds of each layer under each option, and of everything else."""

    def measure(
        self,
        compressed: nn.Module,
        plan: Any,
        original: nn.Module | Path | None,
        inputs: dict,
        limit: Limit | None = None,
    ) -> dict[str, LatencyStats] | None:
        """The compressed model's (``"model"``) and the original's (``"baseline"``; a
        reference file in the runtime's format as it is, :mod:`autotune.reference_file`) latency
        where this model times them elsewhere than autotune's modules, in rounds that visit
        both, for longer where a ``limit`` is given (up to
        :data:`~profilers.paired_timing.ROUNDS_TO_SETTLE` times the usual rounds) until its
        verdict is settled; ``None``: the result is timed in autotune's modules
        (:func:`autotune.measured_figures.measure_model`)."""
        return None


class Roofline(LatencyModel):
    name = "roofline"
    description = "the named target's roofline: bytes moved and operations over its peaks"

    def serves(self, spec: HardwareSpec) -> bool:
        return spec.name != "local"

    def price(self, spec, job):
        return roofline_prices(spec, job, job_rest(job))


def job_rest(job: Pricing) -> RestOfModel:
    """What the job's forward pass computes outside its weight layers (traced once; the
    roofline's prices on any spec follow from it)."""
    model = job.model
    counted = [m for m in model.modules() if is_weight_layer(m) or isinstance(m, TiedHead)]
    return rest_of_model(model, job.inputs, counted, job.run)


def roofline_prices(
    spec: HardwareSpec, job: Pricing, rest: RestOfModel
) -> tuple[dict[str, list[float]], float]:
    """The roofline's seconds of every option of every layer (tied heads included) and of
    the fixed rest (``rest`` and the kept weight layers) on ``spec``."""
    tokens = job.tokens

    def seconds(ref: LayerRef, option: Option) -> float:
        own = layer_latency(ref.shape, option, spec, tokens)
        heads = job.heads.get(ref.name, [])
        return own + head_latency(heads, ref.shape, option, spec, tokens)

    latency = {ref.name: [seconds(ref, o) for o in job.options[ref.name]] for ref in job.layers}
    fixed = rest_latency(rest, spec) + sum(seconds(r, KeepOption()) for r in job.others)
    return latency, fixed


class TorchTimed(LatencyModel):
    name = "torch-timed"
    description = (
        "timed on this machine inside the model, each (layer shape, option) with its real "
        "module (see profilers.latency_table)"
    )
    measures = True

    def serves(self, spec: HardwareSpec) -> bool:
        return spec.name == "local"

    def price(self, spec, job):
        if job.run is not None:
            raise ValueError("the local target times the model in memory: it takes no run")
        timed: dict[str, list[Option]] = {ref.name: job.options[ref.name] for ref in job.layers}
        timed.update({ref.name: [KeepOption()] for ref in job.others})
        result = self.time(job, timed)
        return per_layer(job, result.layers), result.rest + sum(
            result.layers[(ref.shape, "keep")] for ref in job.others
        )

    def time(self, job: Pricing, timed: dict[str, list[Option]]) -> InModelLatency:
        """Every option of ``timed`` (layer -> options) timed inside the model."""
        return measure_in_model(
            job.model,
            timed,
            job.inputs,
            observers=job.observers,
            progress=job.progress,
            also_timed=job.heads,
        )


class OnnxRuntimeTimed(TorchTimed):
    name = "onnxruntime-timed"
    description = (
        "timed on this machine inside ONNX Runtime sessions of the model's ONNX export, each "
        "(layer shape, option) as the exporter writes it (see autotune.export.ort_latency)"
    )

    def serves(self, spec: HardwareSpec) -> bool:
        return spec.name == "local" and spec.runtime == "onnxruntime"

    def runs_here(self) -> bool:
        return importlib.util.find_spec("onnxruntime") is not None

    def time(self, job: Pricing, timed: dict[str, list[Option]]) -> InModelLatency:
        """Every option of ``timed`` timed inside ONNX Runtime sessions of the export (tied
        heads are found by the exporter)."""
        from autotune.export.ort_latency import measure_in_ort

        return measure_in_ort(
            job.model, timed, job.inputs, observers=job.observers, progress=job.progress
        )

    def measure(self, compressed, plan, original, inputs, limit=None):
        """Both models exported to ONNX (``original`` as it is where it is a file) and timed
        in ONNX Runtime, visited in turn and settled at each visit as the options were when
        they were priced."""
        import tempfile

        from autotune.export.onnx import OnnxExporter
        from autotune.export.ort_sessions import (
            SETTLE,
            model_source,
            open_session,
            run_rounds,
            session_options,
        )

        exporter = OnnxExporter()
        graphs = {"model": exporter.build(compressed, plan)[0]}
        if isinstance(original, Path):  # a reference file (autotune.reference_file)
            graphs["baseline"] = original
        elif original is not None:  # the same at every check of a tune: exported once
            graphs["baseline"] = _FLOAT_EXPORTS.get(original, float_onnx_export)
        with tempfile.TemporaryDirectory(prefix="autotune-ort-") as folder:
            sessions = [
                open_session(model_source(g, Path(folder)), session_options())
                for g in graphs.values()
            ]

            def settled(walls: list[list[float]]) -> bool:
                return limit is not None and limit.settles(dict(zip(graphs, walls, strict=True)))

            rounds = ORT_ROUNDS if limit is None else limit.rounds(ORT_ROUNDS)
            walls = run_rounds(sessions, inputs, rounds, SETTLE, settled)
        times = dict(zip(graphs, walls, strict=True))
        return {name: latency_stats(values) for name, values in times.items()}


ORT_ROUNDS = 30


def float_onnx_export(model: nn.Module) -> Any:
    """The float model's ONNX export (a ``ModelProto``)."""
    from autotune.export.onnx import OnnxExporter
    from autotune.plan import Plan

    kept = Plan(layers={"_default": KeepOption().to_dict()})
    return OnnxExporter().build(model, kept)[0]


# the original's export, timed beside the plan at each latency check and at the end
_FLOAT_EXPORTS: ModelMemo[Any] = ModelMemo()


class LlamaCppTimed(TorchTimed):
    name = "llama.cpp-timed"
    measures_decode = True
    description = (
        "timed on this machine in llama.cpp, one GGUF file per option label (see "
        "autotune.export.llama_latency)"
    )

    def serves(self, spec: HardwareSpec) -> bool:
        return spec.name == "local" and spec.runtime == "llama.cpp"

    def runs_here(self) -> bool:
        from autotune.export.llama_cpp import available

        return available()

    def time(self, job: Pricing, timed: dict[str, list[Option]]) -> InModelLatency:
        from autotune.export.llama_latency import measure_in_llama_cpp

        return measure_in_llama_cpp(
            job.model, timed, job.inputs, progress=job.progress, observers=job.observers
        )

    def measure(self, compressed, plan, original, inputs, limit=None):
        """The plan's GGUF file and the float model's (``original`` as it is where it is a
        file), timed in llama.cpp in turn."""
        import tempfile

        from autotune.export.gguf import GGUFExporter
        from autotune.export.llama_latency import measure_files

        exporter = GGUFExporter()
        with tempfile.TemporaryDirectory(prefix="autotune-llama-") as folder:
            paths = {"model": Path(folder) / "model.gguf"}
            exporter.write(compressed, plan, paths["model"])
            if isinstance(original, Path):  # a reference file (autotune.reference_file)
                paths["baseline"] = original
            elif original is not None:
                paths["baseline"] = Path(folder) / "float.gguf"
                exporter.write(original, None, paths["baseline"])
            return measure_files(paths, inputs, limit=limit)


def per_layer(job: Pricing, timed: dict[tuple[LayerShape, str], float]) -> dict[str, list[float]]:
    """Each layer's seconds per option from timings per (shape, label); an option that was
    not timed (it could not be built) costs infinity, so it is never chosen."""
    return {
        ref.name: [timed.get((ref.shape, o.label), float("inf")) for o in job.options[ref.name]]
        for ref in job.layers
    }


def head_latency(
    heads: Sequence[TiedHead],
    shape: LayerShape,
    option: Option,
    spec: HardwareSpec,
    tokens: int,
) -> float:
    """Seconds of the tied output layers reading an embedding table of ``shape`` stored as
    ``option``: a linear layer of the table's shape that runs the int8 kernel where the
    option's format names it and dequantises otherwise (a tied head has no int4 kernel), or,
    in llama.cpp, the block kernel its output matmul runs on the table's type."""
    total = 0.0
    for head in heads:
        linear = LayerShape("linear", shape.rows, shape.cols, head.bias is not None, shape.dtype)
        fmt = format_in_runtime(linear, option, spec.runtime)
        if fmt not in ("dense", "gguf_block") and (fmt != "int8_weight_only" or head.transposed):
            fmt = "dequantize"
        total += layer_latency(linear, option, spec, tokens, fmt=fmt)
    return total


LATENCY_MODELS: list[LatencyModel] = []


def register_latency_model(model: LatencyModel) -> LatencyModel:
    """Add ``model`` ahead of those registered before (a more specific one first)."""
    LATENCY_MODELS.insert(0, model)
    return model


def measuring_model(spec: HardwareSpec) -> LatencyModel:
    """The latency model that times a result on this machine where ``spec``'s runtime runs
    it: the one that serves ``local`` in that runtime (a plan priced on a named target's
    roofline for llama.cpp is still timed in llama.cpp here, not in autotune's modules), or
    autotune's modules where that runtime is not installed."""
    here = latency_model_for(dataclasses.replace(spec, name="local"))
    if here.runs_here():
        return here
    return latency_model_for(dataclasses.replace(spec, name="local", runtime="torch"))


def latency_model_for(spec: HardwareSpec) -> LatencyModel:
    for model in LATENCY_MODELS:
        if model.serves(spec):
            return model
    raise ValueError(f"no latency model prices target {spec.name!r}")


for _model in (Roofline(), TorchTimed(), OnnxRuntimeTimed(), LlamaCppTimed()):
    register_latency_model(_model)
