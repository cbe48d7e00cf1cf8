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

One block kernel does not run every type at one speed: in a decode step on small-lm, IQ3_S
took 2.1x Q4_K's time at 3.44 bits per weight against 4.5 (its prompts ran at Q4_K's speed).
So every block type a plan can take (the i-quants too, encoded for timing with a flat
importance matrix where llama.cpp needs one: the codes change nothing of the speed) also
gets a file, its linear layers in that type and its embeddings in Q4_0, and a **block rate**
(:attr:`profilers.hardware.HardwareSpec.block_rates`) fitted with the figures above: the
speed of the kernel's matrix-vector product of that type relative to Q4_0's (1), so the
kernel's efficiency keeps the level and the rates the spread between types.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autotune.costs import pricing_job
from autotune.latency_models import job_rest, roofline_prices
from autotune.layers import compressible_layers
from methods.base import Option
from methods.gguf import GGUFOption
from methods.gguf_types import NEEDS_IMATRIX
from methods.keep import KeepOption
from methods.observers import ChannelObserver
from methods.registry import method_of
from profilers.hardware import HardwareSpec
from profilers.roofline_fit import Fit, ModelObservation, fit_runtime

RUNTIME = "llama.cpp"
# plain types (no importance matrix needed) of every kind of block llama.cpp's CPU kernels run
TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "IQ4_NL", "Q3_K", "Q2_K")
# every block type a plan can take, each timed for its block rate
RATE_TYPES = (
    *(t for t in TYPES if t != "F16"),
    *("Q5_1", "Q4_1", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS"),
)
KERNELS = ("gguf_block",)
REFERENCE = "Q4_0"  # the block type whose rate is 1
ROUNDS = 7
FLOAT = "F32"


def uniform_types(model: nn.Module) -> list[str]:
    """The types of :data:`TYPES` that every compressible layer of ``model`` takes."""
    layers = compressible_layers(model)
    return [name for name in TYPES if all(takes(r, GGUFOption(name)) for r in layers)]


def type_option(name: str) -> GGUFOption:
    """The option a file of type ``name`` is written with (an importance matrix where
    llama.cpp needs one)."""
    return GGUFOption(name, imatrix=name in NEEDS_IMATRIX)


def takes(ref: Any, option: GGUFOption) -> bool:
    """Whether a layer can take ``option`` (its block fits the row; imatrix: linear only)."""
    shape = ref.shape
    if option.imatrix and shape.kind != "linear":
        return False
    return method_of(option).supports(shape) and option.tensor_type.fits(shape.cols)


def type_files(model: nn.Module, types: Sequence[str] = RATE_TYPES) -> dict[str, dict[str, Option]]:
    """Per block type every linear layer of ``model`` takes: those layers in that type, the
    embeddings (and so a tied output layer) in :data:`REFERENCE`, so that the files differ
    in their linear layers only."""
    layers = compressible_layers(model)
    linear = [r for r in layers if r.shape.kind == "linear"]
    anchor = GGUFOption(REFERENCE)
    embeddings = {r.name: anchor for r in layers if r.shape.kind != "linear" and takes(r, anchor)}
    files = {}
    for name in types:
        option = type_option(name)
        if linear and all(takes(r, option) for r in linear):
            files[name] = {**embeddings, **{r.name: option for r in linear}}
    return files


def flat_importance(model: nn.Module, files: Mapping[str, Mapping[str, Option]]) -> dict:
    """Observers of a flat importance matrix for the options that need one: the codes differ
    from a calibrated matrix's, the speed does not."""
    cols = {r.name: r.shape.cols for r in compressible_layers(model)}
    observers: dict[tuple[str, str], ChannelObserver] = {}
    for chosen in files.values():
        for layer, option in chosen.items():
            if isinstance(option, GGUFOption) and option.imatrix:
                observer = ChannelObserver(cols[layer])
                observer.sumsq = torch.ones(observer.cols, dtype=torch.float64)
                observer.tokens = observer.calls = 1
                observers[(layer, option.label)] = observer
    return observers


def llama_observations(
    model: nn.Module,
    shapes: Mapping[str, Mapping[str, Any]],
    tokenizer: Any = None,
    rounds: int = ROUNDS,
    rated: bool = False,
) -> list[ModelObservation]:
    """Each uniform file's time in llama.cpp at each shape, with its roofline price; with
    ``rated``, also each block type's file (labelled ``rate <TYPE>``, see the module)."""
    from autotune.export.llama_latency import measure_files, write_variants

    layers = compressible_layers(model)
    variants: dict[str, dict[str, Option]] = {FLOAT: {}}
    variants.update({t: {r.name: GGUFOption(t) for r in layers} for t in uniform_types(model)})
    if rated:
        variants.update({f"rate {t}": chosen for t, chosen in type_files(model).items()})
    labels = {o.label: o for chosen in variants.values() for o in chosen.values()}
    plans = {KeepOption().label: KeepOption(), **labels}
    options = {r.name: list(plans.values()) for r in layers}
    index = {label: i for i, label in enumerate(plans)}
    observations: list[ModelObservation] = []
    with tempfile.TemporaryDirectory(prefix="autotune-llama-fit-") as folder:
        observers = flat_importance(model, variants)
        paths = write_variants(model, variants, Path(folder), tokenizer, observers)
        for shape, inputs in shapes.items():
            measured = measure_files(paths, inputs, rounds)
            job = pricing_job(model, layers, options, dict(inputs))
            rest = job_rest(job)
            for name, chosen in variants.items():
                picked = {
                    r.name: index[chosen[r.name].label] if r.name in chosen else 0 for r in layers
                }
                observations.append(
                    ModelObservation(
                        f"{type(model).__name__} {shape} {name}",
                        _plan_price(job, rest, picked),
                        measured[name].p50_ms / 1e3,
                    )
                )
    return observations


def _plan_price(job: Any, rest: Any, picked: Mapping[str, int]):
    """The roofline's seconds of the plan giving each layer its ``picked`` option."""

    def price(spec: HardwareSpec) -> float:
        latency, fixed = roofline_prices(spec, job, rest)
        return sum(latency[name][i] for name, i in picked.items()) + fixed

    return price


def rated_type(observation: ModelObservation) -> str | None:
    """The block type an observation of a type's file times (``None``: a uniform file)."""
    words = observation.label.rsplit(" ", 2)
    return words[2] if words[1] == "rate" else None


def fit_llama_cpp(
    model: nn.Module,
    spec: HardwareSpec,
    shapes: Mapping[str, Mapping[str, Any]],
    tokenizer: Any = None,
    kernels: Sequence[str] = KERNELS,
    rounds: int = ROUNDS,
) -> Fit:
    """``spec`` (a named target) with llama.cpp's figures fitted to ``model``'s uniform files
    timed in llama.cpp at ``shapes``, with a block rate per type (see the module's
    docstring)."""
    observations = llama_observations(model, shapes, tokenizer, rounds, rated=True)
    types = sorted({t for t in map(rated_type, observations) if t is not None})
    described = ", ".join(shapes)
    return fit_runtime(
        spec,
        RUNTIME,
        observations,
        kernels,
        source=f"on {type(model).__name__}'s uniform and per-type GGUF files ({described})",
        block_types=types,
        reference=REFERENCE if REFERENCE in types else None,
    )
