"""A plan's latency on its named target, recomputed by the roofline, never read back.

``validate`` and the report do not trust ``plan.predicted["latency_ms"]`` (anyone can edit a
JSON file): they price the plan's per-layer options again on the target spec the plan holds,
with the cost model the tuner uses (:func:`autotune.costs.build_costs`). With the model at
hand (:func:`plan_roofline`) everything is recomputed: the layers' shapes, the tied output
layers and the rest of the model (attention, norms, per-operator overhead). From the plan
alone (:func:`profile_roofline`) the layers are repriced from the shapes in the plan's
profile and added to the uncompressed model's latency as priced when the plan was tuned.
Either figure is a prediction, labelled ``predicted (roofline)``, never a measurement.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from autotune.costs import build_costs
from autotune.plan import Plan
from methods.base import LayerShape
from methods.keep import KeepOption
from profilers.execution.adapters import adapter_for
from profilers.hardware import HardwareSpec
from profilers.kernel_support import DEVICE_KINDS, unrun_kernels
from profilers.roofline import layer_latency

LABEL = "predicted (roofline)"
PHASES = ("latency", "decode")  # budget terms: prefill (one forward pass) and a decode step


@dataclass(frozen=True)
class RooflineLatency:
    """Milliseconds a plan takes on its target by the roofline, per phase (``latency`` is
    the prefill, ``decode`` one decode step; ``None`` when not priced) and how it was priced.
    ``source`` says what was recomputed: ``model`` (everything) or ``plan`` (the layers)."""

    target: str
    latency_ms: float | None
    decode_ms: float | None
    source: str
    notes: tuple[str, ...] = ()

    def ms(self, phase: str) -> float | None:
        if phase not in PHASES:
            raise ValueError(f"unknown latency phase {phase!r}; allowed: {', '.join(PHASES)}")
        return self.latency_ms if phase == "latency" else self.decode_ms

    def describe(self) -> str:
        what = "recomputed from the model" if self.source == "model" else "layers repriced"
        return f"{LABEL}, {self.target}, {what}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def target_spec(plan: Plan) -> HardwareSpec:
    """The target spec stored in the plan; refused for ``local``, which is measured."""
    name = plan.target.get("name")
    if not plan.target or name == "local":
        raise ValueError(f"plan target {name!r} has no roofline: only named targets are priced")
    return HardwareSpec.from_dict(plan.target)


def kernel_notes(spec: HardwareSpec) -> tuple[str, ...]:
    """One line per kernel ``spec`` lists that its runtime does not run on its device."""
    device = DEVICE_KINDS[spec.kind]
    runner = "autotune's modules" if spec.runtime == "torch" else spec.runtime
    return tuple(
        f"{name} listed by {spec.name} but not run by {runner} on {device}: priced as dequantize"
        for name in unrun_kernels(spec.kernels, spec.kind, spec.runtime)
    )


def plan_roofline(
    plan: Plan,
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    decode_tokens: torch.Tensor | None = None,
) -> RooflineLatency:
    """Price ``plan`` on its target for ``model`` (uncompressed, as the plan was made for):
    one forward pass of ``inputs`` and, with ``decode_tokens`` (``batch x context`` ids), one
    decode step against a cache of the tokens before the last."""
    spec = target_spec(plan)
    work = plan.shaped(copy.deepcopy(model))
    resolved = plan.layer_options(work, strict=False)
    layers = list(resolved)
    options = {ref.name: [option] for ref, option in resolved.items()}
    choice = dict.fromkeys(options, 0)

    def priced(step_inputs: dict[str, Any]) -> float:
        costs = build_costs(work, layers, options, spec, step_inputs)
        return costs.totals(choice)["latency_ms"]

    decode = None
    if decode_tokens is not None:
        decode = priced(adapter_for(work).decode_inputs(work, decode_tokens))
    return RooflineLatency(spec.name, priced(inputs), decode, "model", kernel_notes(spec))


def profile_roofline(plan: Plan) -> RooflineLatency | None:
    """Price ``plan`` from the plan alone: each profiled layer's option minus the layer kept,
    repriced on the plan's target from the shape its profile records, added to the
    uncompressed model's latency recorded at tuning time. ``None`` if the plan lacks them."""
    layers = (plan.profile or {}).get("layers") or {}
    predicted = plan.predicted or {}
    if not layers or plan.target.get("name") in (None, "local"):
        return None
    spec = target_spec(plan)
    options = plan.resolve(list(layers), strict=False)
    keep = KeepOption()
    phases: dict[str, float | None] = {}
    for phase in PHASES:
        base = predicted.get(f"original_{phase}_ms")
        shape = predicted.get(f"{phase}_shape")
        if base is None or shape is None:
            phases[phase] = None
            continue
        tokens = int(shape[0]) * (1 if phase == "decode" else int(shape[1]))
        delta = 0.0
        for name, entry in layers.items():
            layer = LayerShape(entry["kind"], *entry["shape"], dtype=entry.get("dtype", "float32"))
            own = layer_latency(layer, options[name], spec, tokens)
            delta += own - layer_latency(layer, keep, spec, tokens)
        phases[phase] = float(base) + 1e3 * delta
    return RooflineLatency(
        spec.name, phases["latency"], phases["decode"], "plan", kernel_notes(spec)
    )
