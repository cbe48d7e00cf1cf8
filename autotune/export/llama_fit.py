"""A named target's figures for llama.cpp, fitted to llama.cpp's own timings on the device.

llama.cpp runs one graph node per operation, with far less dispatch per node than autotune's
torch modules, which the target's own figures were fitted to: priced with them, a decode step
of tiny-lm came out over 20x llama.cpp's measured time. :func:`fit_llama_cpp` writes one GGUF
file per plain type that every layer of the model takes (and the all-F32 file), times them all in
llama.cpp in turn at each shape (a prompt, a decode step), and fits the target's
``runtimes["llama.cpp"]`` figures (:func:`profilers.roofline_fit.fit_runtime`): the dense
efficiency of its float matmuls, the overhead of one node, the block kernel's efficiency and
the peak of its 8-bit dot products. Each file is priced as the roofline prices a plan of that
type for ``--runtime llama.cpp``, so the fit's figures are what a tune's prices use.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from autotune.costs import pricing_job
from autotune.latency_models import job_rest, roofline_prices
from autotune.layers import compressible_layers
from methods.base import Option
from methods.gguf import GGUFOption
from methods.keep import KeepOption
from methods.registry import method_of
from profilers.hardware import HardwareSpec
from profilers.roofline_fit import Fit, ModelObservation, fit_runtime

RUNTIME = "llama.cpp"
# plain types (no importance matrix needed) of every kind of block llama.cpp's CPU kernels run
TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "IQ4_NL", "Q3_K", "Q2_K")
KERNELS = ("gguf_block",)
ROUNDS = 7
FLOAT = "F32"


def uniform_types(model: nn.Module) -> list[str]:
    """The types of :data:`TYPES` that every compressible layer of ``model`` takes."""
    layers = compressible_layers(model)
    return [
        name
        for name in TYPES
        if all(
            method_of(GGUFOption(name)).supports(r.shape)
            and GGUFOption(name).tensor_type.fits(r.shape.cols)
            for r in layers
        )
    ]


def llama_observations(
    model: nn.Module,
    shapes: Mapping[str, Mapping[str, Any]],
    tokenizer: Any = None,
    rounds: int = ROUNDS,
) -> list[ModelObservation]:
    """Each uniform file's time in llama.cpp at each shape, with its roofline price."""
    from autotune.export.llama_latency import measure_files, write_variants

    layers = compressible_layers(model)
    types = uniform_types(model)
    plans: dict[str, Option] = {FLOAT: KeepOption()}
    plans.update({t: GGUFOption(t) for t in types})
    options = {r.name: list(plans.values()) for r in layers}
    variants = {FLOAT: {}, **{t: {r.name: plans[t] for r in layers} for t in types}}
    observations: list[ModelObservation] = []
    with tempfile.TemporaryDirectory(prefix="autotune-llama-fit-") as folder:
        paths = write_variants(model, variants, Path(folder), tokenizer)
        for shape, inputs in shapes.items():
            measured = measure_files(paths, inputs, rounds)
            job = pricing_job(model, layers, options, dict(inputs))
            rest = job_rest(job)
            for index, name in enumerate(plans):
                observations.append(
                    ModelObservation(
                        f"{type(model).__name__} {shape} {name}",
                        _uniform_price(job, rest, index),
                        measured[name].p50_ms / 1e3,
                    )
                )
    return observations


def _uniform_price(job: Any, rest: Any, index: int):
    """The roofline's seconds of the plan giving every layer its ``index``-th option."""

    def price(spec: HardwareSpec) -> float:
        latency, fixed = roofline_prices(spec, job, rest)
        return sum(seconds[index] for seconds in latency.values()) + fixed

    return price


def fit_llama_cpp(
    model: nn.Module,
    spec: HardwareSpec,
    shapes: Mapping[str, Mapping[str, Any]],
    tokenizer: Any = None,
    kernels: Sequence[str] = KERNELS,
    rounds: int = ROUNDS,
) -> Fit:
    """``spec`` (a named target) with llama.cpp's figures fitted to ``model``'s uniform files
    timed in llama.cpp at ``shapes`` (see the module's docstring)."""
    observations = llama_observations(model, shapes, tokenizer, rounds)
    described = ", ".join(shapes)
    return fit_runtime(
        spec,
        RUNTIME,
        observations,
        kernels,
        source=f"on {type(model).__name__}'s uniform GGUF files ({described})",
    )
