"""Fitting a target's roofline to measured latencies (profilers.roofline_fit)."""

from __future__ import annotations

import dataclasses

import pytest

from methods.base import LayerShape
from methods.keep import KeepOption
from methods.rtn import QuantOption
from profilers.hardware import HardwareSpec, KernelSpec, RuntimePrices
from profilers.roofline import RestOfModel, layer_latency, rest_latency
from profilers.roofline_fit import (
    LayerObservation,
    ModelObservation,
    RestObservation,
    accuracy,
    fit_runtime,
    fit_target,
)

SHAPES = [LayerShape("linear", 384, 384, True), LayerShape("linear", 1536, 384, True)]
OPTIONS = [
    KeepOption(),
    QuantOption(8, None, True),
    QuantOption(4, 32, False),
    QuantOption(3, 32, True),
]
REST = RestOfModel(flops=2e8, ops=120, activation_bytes=4e6)


def spec(efficiency: float, overhead: float, kernel: float) -> HardwareSpec:
    return HardwareSpec(
        name="test",
        kind="cpu",
        description="made up",
        memory_bytes=2**34,
        bandwidth=4e10,
        peak_flops={"float32": 1e12},  # small calls are memory-bound: kernels identifiable
        efficiency=efficiency,
        op_overhead_s=overhead,
        kernels={"int8_weight_only": KernelSpec("float32", 16, kernel, "made up")},
    )


def observations(truth: HardwareSpec) -> list:
    out: list = []
    for tokens in (1, 16, 128):
        for shape in SHAPES:
            for option in OPTIONS:
                out.append(
                    LayerObservation(
                        shape, option, tokens, layer_latency(shape, option, truth, tokens)
                    )
                )
        out.append(RestObservation(REST, rest_latency(REST, truth)))
    return out


def test_the_fit_recovers_the_spec_that_produced_the_times() -> None:
    truth = spec(0.3, 2e-5, 0.6)
    start = spec(0.9, 1e-6, 0.1)
    fit = fit_target(start, observations(truth), name="fitted", source="in a test")
    assert fit.after["median_abs_rel_error"] < 1e-3
    assert fit.before["median_abs_rel_error"] > 0.1
    assert fit.spec.efficiency == pytest.approx(0.3, rel=1e-3)
    assert fit.spec.op_overhead_s == pytest.approx(2e-5, rel=1e-3)
    assert fit.spec.kernels["int8_weight_only"].efficiency == pytest.approx(0.6, rel=2e-2)
    assert fit.spec.name == "fitted"
    assert "in a test" in fit.spec.sources["efficiency"]
    assert HardwareSpec.from_dict(fit.spec.to_dict()) == fit.spec


def test_accuracy_reports_rank_and_relative_error() -> None:
    truth = spec(0.3, 2e-5, 0.6)
    data = observations(truth)
    perfect = accuracy(truth, data)
    assert perfect["median_abs_rel_error"] == pytest.approx(0.0, abs=1e-12)
    assert perfect["spearman"] == pytest.approx(1.0)
    slower = dataclasses.replace(truth, op_overhead_s=4e-5)
    assert accuracy(slower, data)["median_abs_rel_error"] > 0


def test_too_few_observations() -> None:
    with pytest.raises(ValueError, match="three"):
        fit_target(spec(0.5, 1e-6, 0.5), observations(spec(0.3, 2e-5, 0.6))[:2])


RUNTIME = "onnxruntime"  # runs the int4 kernel (QuantOption(4, 32, False)) on CPUs
INT4 = "int4_weight_only"


def runtime_truth() -> HardwareSpec:
    """A device whose own figures differ from how a runtime runs on it."""
    device = spec(0.3, 2e-5, 0.6)
    kernels = {**device.kernels, INT4: KernelSpec("float32", None, 0.5, "made up")}
    fast = RuntimePrices(
        efficiency=0.8,
        op_overhead_s=1e-6,
        peak_flops={"float32": 4e11},
        kernels={INT4: KernelSpec("float32", None, 0.9, "made up")},
    )
    return dataclasses.replace(device, kernels=kernels, runtimes={RUNTIME: fast})


def model_observations(truth: HardwareSpec) -> list[ModelObservation]:
    """Whole-model times: every layer one option, plus the rest, at three token counts."""

    def price(option, tokens: int):
        def seconds(spec_: HardwareSpec) -> float:
            own = sum(layer_latency(s, option, spec_, tokens) for s in SHAPES)
            return own + rest_latency(REST, spec_)

        return seconds

    out = []
    for tokens in (1, 16, 128):
        for option in OPTIONS:
            seconds = price(option, tokens)
            out.append(ModelObservation(f"{option.label} x{tokens}", seconds, seconds(truth)))
    return out


def test_a_runtime_gets_figures_of_its_own_and_the_device_keeps_its_figures() -> None:
    truth = runtime_truth()
    data = [
        dataclasses.replace(o, seconds=o.price(truth.for_runtime(RUNTIME)))
        for o in model_observations(truth)
    ]
    device = dataclasses.replace(truth, runtimes={})
    fit = fit_runtime(device, RUNTIME, data, [INT4], source="in a test")
    assert fit.before["median_abs_rel_error"] > 0.3
    assert fit.after["median_abs_rel_error"] < 1e-3
    fitted = fit.spec.runtimes[RUNTIME]
    assert fitted.efficiency == pytest.approx(0.8, rel=1e-2)
    assert fitted.op_overhead_s == pytest.approx(1e-6, rel=1e-2)
    assert fitted.kernels[INT4].efficiency == pytest.approx(0.9, rel=2e-2)
    assert "in a test" in fitted.sources["op_overhead_s"]
    # the device's own figures, which other runtimes are priced with, are untouched
    assert dataclasses.replace(fit.spec, runtimes={}) == device
    assert HardwareSpec.from_dict(fit.spec.to_dict()) == fit.spec


def test_a_runtime_fit_needs_enough_observations() -> None:
    data = model_observations(runtime_truth())[:3]
    with pytest.raises(ValueError, match="more measured"):
        fit_runtime(runtime_truth(), RUNTIME, data, [INT4])
