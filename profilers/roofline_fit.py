"""Calibrate a target's roofline against latencies measured on that hardware.

A named target's efficiency factors (how close dense matmuls, each kernel and the per-operator
dispatch come to the datasheet figures) are fitted, by least squares on the log of the ratio,
to per-layer times measured inside a model on the real device, plus the measured time of the
rest of the model. The result is a new spec whose roofline reproduces the measurements; its
sources say where every fitted figure came from.

A runtime that runs its own graph (llama.cpp) gets figures of its own in the entry
(:class:`profilers.hardware.RuntimePrices`), fitted by :func:`fit_runtime` to whole-model
times measured in that runtime (:class:`ModelObservation`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import least_squares
from scipy.stats import spearmanr
from torch import nn

from methods.base import LayerShape, Option, is_weight_layer
from profilers.execution.observe import Observers
from profilers.hardware import HardwareSpec, KernelSpec, RuntimePrices
from profilers.latency_table import measure_in_model
from profilers.opcount import rest_of_model
from profilers.roofline import RestOfModel, layer_latency, rest_latency


@dataclass(frozen=True)
class LayerObservation:
    shape: LayerShape
    option: Option
    tokens: int
    seconds: float


@dataclass(frozen=True)
class RestObservation:
    rest: RestOfModel
    seconds: float


@dataclass(frozen=True)
class ModelObservation:
    """A whole model's time measured in a runtime, and its roofline price on a spec."""

    label: str
    price: Callable[[HardwareSpec], float]
    seconds: float


@dataclass
class Fit:
    spec: HardwareSpec
    before: dict[str, float]
    after: dict[str, float]


def _predict(spec: HardwareSpec, observations: list) -> np.ndarray:
    out = []
    for obs in observations:
        if isinstance(obs, LayerObservation):
            out.append(layer_latency(obs.shape, obs.option, spec, obs.tokens))
        elif isinstance(obs, ModelObservation):
            out.append(obs.price(spec))
        else:
            out.append(rest_latency(obs.rest, spec))
    return np.asarray(out)


def accuracy(spec: HardwareSpec, observations: list) -> dict[str, float]:
    """Median absolute relative error and Spearman rank correlation of the predictions."""
    predicted = _predict(spec, observations)
    measured = np.asarray([o.seconds for o in observations])
    relative = np.abs(predicted - measured) / measured
    rho = float(spearmanr(predicted, measured).statistic) if len(measured) > 2 else math.nan
    return {"median_abs_rel_error": float(statistics.median(relative)), "spearman": rho}


def _with(spec: HardwareSpec, params: np.ndarray, kernel_names: list[str]) -> HardwareSpec:
    efficiency, overhead = math.exp(params[0]), math.exp(params[1])
    kernels = dict(spec.kernels)
    for name, value in zip(kernel_names, params[2:], strict=True):
        kernels[name] = dataclasses.replace(kernels[name], efficiency=min(math.exp(value), 1.0))
    return dataclasses.replace(
        spec, efficiency=min(efficiency, 1.0), op_overhead_s=overhead, kernels=kernels
    )


def fit_target(
    spec: HardwareSpec, observations: list, *, name: str | None = None, source: str = ""
) -> Fit:
    """``spec`` with its dense efficiency, per-operator overhead and kernel efficiencies fitted
    to ``observations`` (layer times and rest-of-model times measured on the device)."""
    if len(observations) < 3:
        raise ValueError("fitting a target needs at least three observations")
    kernels = dict(spec.kernels)
    for path in ("dequantize", "lookup"):  # paths that get an efficiency of their own
        kernels.setdefault(path, KernelSpec(spec.dense_dtype, None, spec.efficiency, "fitted"))
    spec = dataclasses.replace(spec, kernels=kernels)
    kernel_names = sorted(spec.kernels)
    start = np.log(
        [spec.efficiency, max(spec.op_overhead_s, 1e-7)]
        + [spec.kernels[k].efficiency for k in kernel_names]
    )
    measured = np.log([o.seconds for o in observations])

    def residuals(params: np.ndarray) -> np.ndarray:
        return np.log(_predict(_with(spec, params, kernel_names), observations)) - measured

    upper = np.concatenate(([0.0, math.log(1e-2)], np.zeros(len(kernel_names))))
    lower = np.concatenate(
        ([math.log(1e-3), math.log(1e-8)], np.full(len(kernel_names), math.log(1e-3)))
    )
    result = least_squares(
        residuals, np.clip(start, lower + 1e-9, upper - 1e-9), bounds=(lower, upper)
    )
    fitted = _with(spec, result.x, kernel_names)
    note = f"fitted to {len(observations)} latencies measured {source}".strip()
    sources = dict(fitted.sources)
    sources.update({"efficiency": note, "op_overhead_s": note})
    kernels = {
        k: dataclasses.replace(v, source=f"{note}; was: {v.source}") if k in spec.kernels else v
        for k, v in fitted.kernels.items()
    }
    fitted = dataclasses.replace(fitted, name=name or fitted.name, sources=sources, kernels=kernels)
    return Fit(fitted, accuracy(spec, observations), accuracy(fitted, observations))


RATE_BOUNDS = (0.02, 50.0)  # a block type's rate, relative to the reference type's


def fit_runtime(
    spec: HardwareSpec,
    runtime: str,
    observations: Sequence[ModelObservation],
    kernels: Sequence[str],
    *,
    source: str = "",
    block_types: Sequence[str] = (),
    reference: str | None = None,
) -> Fit:
    """``spec`` with figures of its own for ``runtime``: its dense efficiency, the overhead
    of one operation, each of ``kernels``' efficiency and the peak of their compute types,
    and a block rate (:attr:`~profilers.hardware.HardwareSpec.block_rates`) for each of
    ``block_types`` but ``reference`` (whose rate is 1, so that the kernel's efficiency
    keeps the level and the rates the spread), fitted to whole-model ``observations``;
    ``before`` is the spec as the runtime priced it until now."""
    rated = [t for t in block_types if t != reference]
    if len(observations) < 2 + 2 * len(kernels) + len(rated):
        raise ValueError(f"fitting {runtime}'s figures needs more measured models or shapes")
    base = spec.for_runtime(runtime)
    dtypes = sorted({base.kernels[k].compute_dtype for k in kernels})
    count = 2 + len(kernels) + len(dtypes)
    start = np.log(
        [base.efficiency, max(base.op_overhead_s, 1e-7)]
        + [base.kernels[k].efficiency for k in kernels]
        + [base.peak(d) for d in dtypes]
        + [base.block_rates.get(t, 1.0) for t in rated]
    )
    low_rate, high_rate = RATE_BOUNDS
    lower = np.log([1e-3, 1e-9] + [1e-3] * len(kernels) + [1e8] * len(dtypes))
    upper = np.log([1.0, 1e-2] + [1.0] * len(kernels) + [1e16] * len(dtypes))
    lower = np.concatenate((lower, np.full(len(rated), math.log(low_rate))))
    upper = np.concatenate((upper, np.full(len(rated), math.log(high_rate))))
    note = f"fitted to {len(observations)} latencies measured in {runtime} {source}".strip()

    def prices(params: np.ndarray) -> RuntimePrices:
        values = np.exp(params)
        fitted = {
            k: dataclasses.replace(base.kernels[k], efficiency=float(min(v, 1.0)), source=note)
            for k, v in zip(kernels, values[2 : 2 + len(kernels)], strict=True)
        }
        peaks = dict(zip(dtypes, map(float, values[2 + len(kernels) : count]), strict=True))
        rates = {t: float(v) for t, v in zip(rated, values[count:], strict=True)}
        if reference is not None and rated:
            rates[reference] = 1.0
        sources = {"efficiency": note, "op_overhead_s": note}
        sources.update({f"peak_flops.{d}": note for d in dtypes})
        if rates:
            sources["block_rates"] = f"{note}; relative to {reference}"
        return RuntimePrices(
            efficiency=float(min(values[0], 1.0)),
            op_overhead_s=float(values[1]),
            peak_flops=peaks,
            kernels=fitted,
            sources=sources,
            block_rates=dict(sorted(rates.items())),
        )

    def with_prices(params: np.ndarray) -> HardwareSpec:
        return dataclasses.replace(spec, runtimes={**spec.runtimes, runtime: prices(params)})

    measured = np.log([o.seconds for o in observations])

    def residuals(params: np.ndarray) -> np.ndarray:
        priced = _predict(with_prices(params).for_runtime(runtime), list(observations))
        return np.log(priced) - measured

    result = least_squares(
        residuals, np.clip(start, lower + 1e-9, upper - 1e-9), bounds=(lower, upper)
    )
    fitted = with_prices(result.x)
    return Fit(
        fitted,
        accuracy(base, list(observations)),
        accuracy(fitted.for_runtime(runtime), list(observations)),
    )


def observe(
    model: nn.Module,
    options: Mapping[str, Sequence[Option]],
    inputs: Sequence[dict[str, torch.Tensor]],
    *,
    observers: Observers | None = None,
    rounds: int = 7,
) -> list:
    """Layer and rest-of-model times measured inside ``model`` for each input shape.

    ``options`` should list every weight layer (those not compressed with ``keep`` only), so
    that the measured rest of the model is what the roofline's rest describes."""
    labels = {o.label: o for opts in options.values() for o in opts}
    weight_layers = [m for m in model.modules() if is_weight_layer(m)]
    observations: list = []
    for batch in inputs:
        tokens = int(batch["input_ids"].numel())
        timed = measure_in_model(model, options, batch, observers=observers, rounds=rounds)
        for (shape, label), seconds in timed.layers.items():
            observations.append(LayerObservation(shape, labels[label], tokens, seconds))
        rest = rest_of_model(model, batch, weight_layers)
        observations.append(RestObservation(rest, max(timed.rest, 1e-7)))
    return observations
