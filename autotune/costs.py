"""The options offered to each layer, and their costs on a target."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autotune.latency_models import Pricing, latency_model_for
from autotune.layers import LayerRef, compressible_layers, weight_numel
from autotune.runtimes import get_runtime
from methods.base import Option
from methods.errors import OptionError
from methods.keep import KeepOption
from methods.registry import get_method, method_of
from methods.tied import tied_heads
from profilers.execution.observe import Observers
from profilers.hardware import HardwareSpec
from profilers.kernel_support import FP8_KERNELS, runs_kernel
from profilers.measure import model_bytes

DEFAULT_METHODS = ("rtn",)


def default_methods(
    spec: HardwareSpec, calibrated: Sequence[str] = (), for_speed: bool = True
) -> tuple[str, ...]:
    """RTN everywhere and the ``calibrated`` methods (GPTQ when the model is in memory: the
    executor says which), plus W8A8 where the target runs dynamic int8 matmuls fast (CPUs
    with fbgemm) and autotune's W8A8 module calls that kernel on such a device; elsewhere
    W8A8 would only run its float reference; FP8 where the runtime runs the target's FP8
    kernels (vLLM on Ampere and later), since autotune's own modules only decode it.

    W8A8 only trades error for speed: it stores its weights as the int8 weight-only options
    do (with a smoothing vector on top where it smooths) and rounds the activations too, so
    without ``for_speed`` (a budget that bounds no latency) it is left out: measured end to
    end on 31 of the demo's layers, each had more error than the layer's best 8-bit
    weight-only option per channel."""
    methods = (*DEFAULT_METHODS, *calibrated)
    if for_speed and _runs(spec, "int8_dynamic"):
        methods = (*methods, "w8a8")
    if any(_runs(spec, kernel) for kernel in FP8_KERNELS):
        methods = (*methods, "fp8")
    return methods


def _runs(spec: HardwareSpec, kernel: str) -> bool:
    """Whether ``spec`` lists ``kernel`` and the runtime it is priced for runs it there."""
    return kernel in spec.kernels and runs_kernel(kernel, spec.kind, spec.runtime)


def layer_options(
    layers: Sequence[LayerRef],
    methods: Sequence[str] = DEFAULT_METHODS,
    labels: Sequence[str] | None = None,
) -> dict[str, list[Option]]:
    """Keep plus every grid option of every method that supports the layer, per layer; with
    ``labels``, only the options of those labels (e.g. ``int8-ch-sym``). A label no layer is
    offered is refused, naming the labels there are."""
    chosen = [get_method(m) for m in methods]
    options: dict[str, list[Option]] = {}
    for ref in layers:
        opts: list[Option] = [KeepOption()]
        for method in chosen:
            if method.supports(ref.shape):
                opts.extend(method.grid(ref.shape))
        options[ref.name] = opts
    if labels is None:
        return options
    offered = {o.label for opts in options.values() for o in opts}
    unknown = sorted(set(labels) - offered)
    if unknown:
        raise OptionError(
            f"no layer is offered option(s) {', '.join(unknown)} by method(s) "
            f"{', '.join(methods)}; offered: {', '.join(sorted(offered))}"
        )
    wanted = {*labels, KeepOption().label}
    return {name: [o for o in opts if o.label in wanted] for name, opts in options.items()}


def drop_undercalibrated(
    layers: Sequence[LayerRef], options: dict[str, list[Option]], observers: Observers
) -> dict[str, int]:
    """Remove, in place, calibrated options of layers whose observer saw fewer calibration
    tokens than the layer has inputs: their statistics (``X^T X`` above all) are then
    rank-deficient, and a method fitted to them reproduces the calibration tokens almost
    exactly while failing on others (a BERT pooler sees one token per window). Returns the
    number of options removed per layer."""
    dropped: dict[str, int] = {}
    for ref in layers:
        keep: list[Option] = []
        for option in options[ref.name]:
            observer = observers.get((ref.name, option.label))
            tokens = getattr(observer, "tokens", None)
            if isinstance(tokens, int) and tokens < ref.shape.cols:
                dropped[ref.name] = dropped.get(ref.name, 0) + 1
                observers.pop((ref.name, option.label))
            else:
                keep.append(option)
        options[ref.name] = keep
    return dropped


@dataclass
class CostModel:
    """Exact bytes, stored weight bits and roofline seconds of every (layer, option), plus
    what the rest of the model costs. Totals of an assignment are exact in bytes.

    ``seconds`` are those of one forward pass at the latency shape (the prefill of a causal
    LM); ``decode_seconds``, when known, those of one decode step (see :meth:`with_decode`).
    """

    layers: list[LayerRef]
    options: dict[str, list[Option]]
    bytes: dict[str, list[int]]
    weight_bits: dict[str, list[int]]
    seconds: dict[str, list[float]]
    fixed_bytes: int
    fixed_weight_bits: int
    fixed_seconds: float
    total_weights: int
    original_bytes: int
    tokens: int
    decode_seconds: dict[str, list[float]] | None = None
    fixed_decode_seconds: float = 0.0

    def with_decode(self, decode: CostModel) -> CostModel:
        """This model with the seconds of ``decode`` (the same layers and options priced at
        a decode step's shape) as its decode seconds."""
        self.decode_seconds = decode.seconds
        self.fixed_decode_seconds = decode.fixed_seconds
        return self

    def only(self, label: str) -> CostModel:
        """This model with each layer offered only its option ``label`` (which every layer
        must have, as ``keep``)."""
        return self.offering(lambda name, option: option.label == label)

    def offering(self, offered: Callable[[str, Option], bool]) -> CostModel:
        """This model with each layer offered only the options ``offered(layer, option)``
        keeps, their costs with them."""

        def pick(table: dict[str, list]) -> dict[str, list]:
            return {
                n: [v for o, v in zip(self.options[n], values, strict=True) if offered(n, o)]
                for n, values in table.items()
            }

        return dataclasses.replace(
            self,
            options=pick(self.options),
            bytes=pick(self.bytes),
            weight_bits=pick(self.weight_bits),
            seconds=pick(self.seconds),
            decode_seconds=None if self.decode_seconds is None else pick(self.decode_seconds),
        )

    def original_totals(self) -> dict[str, float]:
        """:meth:`totals` with every layer kept: the original model's figures."""
        return self.totals(
            {n: [o.label for o in opts].index("keep") for n, opts in self.options.items()}
        )

    def totals(self, choice: dict[str, int]) -> dict[str, float]:
        """``bytes``, ``avg_bits``, ``latency_ms`` and, when known, ``decode_ms`` of an
        assignment (option indices)."""
        total_bytes = self.fixed_bytes + sum(self.bytes[n][i] for n, i in choice.items())
        bits = self.fixed_weight_bits + sum(self.weight_bits[n][i] for n, i in choice.items())
        seconds = self.fixed_seconds + sum(self.seconds[n][i] for n, i in choice.items())
        totals = {
            "bytes": total_bytes,
            "avg_bits": bits / self.total_weights,
            "latency_ms": 1e3 * seconds,
        }
        if self.decode_seconds is not None:
            decode = self.fixed_decode_seconds + sum(
                self.decode_seconds[n][i] for n, i in choice.items()
            )
            totals["decode_ms"] = 1e3 * decode
        return totals


def pricing_job(
    model: nn.Module,
    layers: Sequence[LayerRef],
    options: dict[str, list[Option]],
    inputs: dict[str, torch.Tensor],
    observers: Observers | None = None,
    progress=None,
    run: Callable[..., Any] | None = None,
) -> Pricing:
    """What a latency model prices: ``layers`` with their options, the model's other weight
    layers kept, the tied output heads, at the shape of ``inputs``."""
    chosen = {r.name for r in layers}
    others = [r for r in compressible_layers(model, min_numel=0) if r.name not in chosen]
    return Pricing(
        model, layers, options, others, tied_heads(model), inputs, observers, progress, run
    )


def build_costs(
    model: nn.Module,
    layers: Sequence[LayerRef],
    options: dict[str, list[Option]],
    spec: HardwareSpec,
    latency_inputs: dict[str, torch.Tensor],
    progress=None,
    observers: Observers | None = None,
    run: Callable[..., Any] | None = None,
    tokenizer: Any = None,
) -> CostModel:
    """Price every option of every layer on ``spec`` at the shape of ``latency_inputs``.

    The latency model that serves ``spec`` (:mod:`autotune.latency_models`) gives the
    seconds: a named target's roofline, or ``local`` timed inside the model, every distinct
    (layer shape, option) with its real module and the rest of the model as the measured
    forward pass minus its layers. An embedding that tied output layers read
    (:class:`methods.tied.TiedHead`) is charged their matmul too, under the same option.
    ``run(**latency_inputs)`` makes the forward pass the roofline counts (default: the model
    itself; a model streamed from disk passes its block-at-a-time pass). Bytes are autotune's
    stored bytes, or those of the runtime's export where it prices them
    (:meth:`autotune.runtimes.Runtime.byte_prices`; ``tokenizer`` for an export that
    holds it).
    """
    tokens = int(latency_inputs["input_ids"].numel())
    job = pricing_job(model, layers, options, latency_inputs, observers, progress, run)
    latency, fixed_seconds = latency_model_for(spec).price(spec, job)
    per_bytes: dict[str, list[int]] = {}
    per_bits: dict[str, list[int]] = {}
    variable_bytes = 0
    for ref in layers:
        costs = [method_of(o).cost(ref.shape, o) for o in options[ref.name]]
        per_bytes[ref.name] = [c.bytes for c in costs]
        per_bits[ref.name] = [8 * c.weight_bytes for c in costs]
        variable_bytes += KeepCost.bytes(ref)
    fixed_bits = sum(8 * KeepCost.weight_bytes(r) for r in job.others)
    original = model_bytes(model)
    fixed_bytes = original - variable_bytes
    exported = get_runtime(spec.runtime).byte_prices(model, layers, options, tokenizer)
    if exported is not None:  # the runtime's export stores them otherwise
        per_bytes, fixed_bytes, original = exported.per_layer, exported.fixed, exported.original
    return CostModel(
        layers=list(layers),
        options=options,
        bytes=per_bytes,
        weight_bits=per_bits,
        seconds=latency,
        fixed_bytes=fixed_bytes,
        fixed_weight_bits=fixed_bits,
        fixed_seconds=fixed_seconds,
        total_weights=weight_numel(model),
        original_bytes=original,
        tokens=tokens,
    )


class KeepCost:
    """Bytes of a layer left as it is."""

    @staticmethod
    def bytes(ref: LayerRef) -> int:
        return method_of(KeepOption()).cost(ref.shape, KeepOption()).bytes

    @staticmethod
    def weight_bytes(ref: LayerRef) -> int:
        return method_of(KeepOption()).cost(ref.shape, KeepOption()).weight_bytes
