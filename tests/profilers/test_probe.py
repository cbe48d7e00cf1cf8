"""Facts and micro-benchmarks of this machine (profilers.probe)."""

from __future__ import annotations

import math
import platform
from collections.abc import Iterator

import psutil
import pytest
import torch

from methods import kernels
from methods.smoothquant import has_vnni
from profilers.hardware import HardwareSpec
from profilers.probe import local_spec, machine_facts

FACT_KEYS = {
    "cpu",
    "isa",
    "physical_cores",
    "logical_cores",
    "torch_threads",
    "memory_bytes",
    "torch",
    "platform",
    "gpu",
}
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the probe takes the GPU path")


@pytest.fixture
def _one_thread() -> Iterator[None]:
    """Overrides the folder's single-thread fixture: probe the machine as it is configured."""
    yield


@pytest.fixture(scope="module")
def spec() -> HardwareSpec:
    return local_spec()


def test_machine_facts_keys_and_values() -> None:
    facts = machine_facts()
    assert set(facts) == FACT_KEYS
    assert isinstance(facts["cpu"], str) and facts["cpu"]
    assert isinstance(facts["isa"], str) and facts["isa"]
    assert facts["logical_cores"] >= 1
    assert facts["physical_cores"] is None or 1 <= facts["physical_cores"] <= facts["logical_cores"]
    assert facts["torch_threads"] == torch.get_num_threads()
    assert facts["memory_bytes"] == psutil.virtual_memory().total > 0
    assert facts["torch"] == torch.__version__
    assert isinstance(facts["platform"], str) and facts["platform"]


@cpu_only
def test_machine_facts_without_a_gpu() -> None:
    assert machine_facts()["gpu"] is None


def test_local_spec_is_probed_once(spec: HardwareSpec) -> None:
    assert local_spec() is spec


@cpu_only
def test_local_spec_describes_this_cpu(spec: HardwareSpec) -> None:
    facts = machine_facts()
    assert spec.name == "local"
    assert spec.kind == "cpu"
    assert spec.dense_dtype == "float32"
    assert spec.memory_bytes == facts["memory_bytes"]
    assert set(spec.probed) == FACT_KEYS
    assert spec.probed["cpu"] == facts["cpu"]
    assert facts["cpu"] in spec.description
    assert "all" in spec.sources
    x86 = platform.machine().lower() in {"x86_64", "amd64", "i386", "i686"}
    assert spec.int8_pairs_saturate == (x86 and not has_vnni())


@cpu_only
def test_local_spec_measures_positive_finite_figures(spec: HardwareSpec) -> None:
    assert math.isfinite(spec.bandwidth) and spec.bandwidth > 0
    assert {"float32", "bfloat16"} <= set(spec.peak_flops) <= {"float32", "bfloat16", "int8"}
    assert all(math.isfinite(p) and p > 0 for p in spec.peak_flops.values())
    assert 0 < spec.op_overhead_s < 1.0
    assert 0 < spec.efficiency <= 1
    assert spec.peak("float16") == spec.peak_flops["float32"]


@cpu_only
def test_local_spec_kernels_follow_torch_ops_and_kernel_policy(spec: HardwareSpec) -> None:
    has_int8 = hasattr(torch.ops.aten, "_weight_int8pack_mm")
    has_int4 = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    assert ("int8_weight_only" in spec.kernels) == has_int8
    assert ("int4_weight_only" in spec.kernels) == has_int4
    for kernel in spec.kernels.values():
        assert 0 < kernel.efficiency <= 1
        assert kernel.compute_dtype in spec.peak_flops
        assert kernel.source
    if has_int8:
        assert spec.kernels["int8_weight_only"].max_tokens == kernels.POLICY.int8_max_tokens
    if has_int4:
        assert spec.kernels["int4_weight_only"].max_tokens == kernels.POLICY.int4_max_tokens
    if has_int8 and has_int4:
        int8, int4 = spec.kernels["int8_weight_only"], spec.kernels["int4_weight_only"]
        assert int4.efficiency == pytest.approx(0.5 * int8.efficiency)
    has_fbgemm = "fbgemm" in torch.backends.quantized.supported_engines
    assert ("int8_dynamic" in spec.kernels) == has_fbgemm
    assert ("int8" in spec.peak_flops) == has_fbgemm


def test_local_spec_survives_a_round_trip(spec: HardwareSpec) -> None:
    assert HardwareSpec.from_dict(spec.to_dict()) == spec
