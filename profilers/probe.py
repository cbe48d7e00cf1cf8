"""Probe this machine: what it is (cores, memory, ISA, GPU) and what it does (micro-benchmarks).

The result is a :class:`HardwareSpec` named ``local`` whose peak figures were measured here a
moment ago, so the roofline of the ``local`` target describes this machine rather than a
datasheet.
"""

from __future__ import annotations

import os
import platform
import time
from functools import cache
from typing import Any

import psutil
import torch

from methods import kernels
from methods.smoothquant import has_vnni
from profilers.hardware import HardwareSpec, KernelSpec

_X86 = frozenset({"x86_64", "amd64", "i386", "i686"})


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_facts() -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    facts: dict[str, Any] = {
        "name": props.name,
        "memory_bytes": int(props.total_memory),
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
    }
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        facts["memory_clock_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        facts["sm_clock_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)
        facts["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception as exc:  # pynvml missing or NVML unavailable in this container
        facts["nvml"] = f"unavailable: {type(exc).__name__}"
    return facts


def int8_pairs_saturate() -> bool:
    """Whether this CPU's 8-bit dot products saturate pair sums in 16 bits: x86 without
    VNNI (see :attr:`HardwareSpec.int8_pairs_saturate`)."""
    return platform.machine().lower() in _X86 and not has_vnni()


def machine_facts() -> dict[str, Any]:
    """What this machine is, without timing anything."""
    return {
        "cpu": _cpu_name(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": int(psutil.virtual_memory().total),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "gpu": _gpu_facts(),
    }


def _best_time(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _matmul_peak(device: str, dtype: torch.dtype, size: int) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    return 2 * size**3 / _best_time(lambda: a @ b)


def _copy_bandwidth(device: str, megabytes: int) -> float:
    src = torch.empty(megabytes * 2**18, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best_time(lambda: dst.copy_(src))


def _int8_dynamic_peak(size: int = 1024, tokens: int = 256) -> float:
    """FLOP/s of fbgemm's dynamic int8 linear (W8A8) on a ``size`` x ``size`` layer."""
    from methods.smoothquant import SmoothQuantW8A8, W8A8Option

    layer = torch.nn.Linear(size, size)
    module = SmoothQuantW8A8().convert(layer, W8A8Option(alpha=0.0))
    x = torch.randn(tokens, size)
    return 2 * size * size * tokens / _best_time(lambda: module(x))


def _op_overhead() -> float:
    x = torch.zeros(1)
    calls = 2000

    def many() -> None:
        for _ in range(calls):
            torch.add(x, x)

    return _best_time(many, repeats=3) / calls


def _int8_kernel_efficiency(bandwidth: float) -> float:
    rows, cols = 2048, 2048
    codes = torch.randint(-127, 127, (rows, cols), dtype=torch.int8)
    scales = torch.ones(rows, dtype=torch.float16)
    x = torch.randn(1, cols)
    seconds = _best_time(lambda: kernels.int8_matmul(x, codes, scales), repeats=10)
    return min(1.0, (rows * cols / bandwidth) / seconds)


@cache
def local_spec() -> HardwareSpec:
    """Measure this machine (about a second) and describe it as a hardware spec."""
    facts = machine_facts()
    gpu = facts["gpu"]
    if gpu is not None:
        peak = {
            "float32": _matmul_peak("cuda", torch.float32, 4096),
            "float16": _matmul_peak("cuda", torch.float16, 4096),
            "bfloat16": _matmul_peak("cuda", torch.bfloat16, 4096),
        }
        return HardwareSpec(
            name="local",
            kind="gpu",
            description=f"this machine: {gpu['name']} (measured)",
            memory_bytes=gpu["memory_bytes"],
            bandwidth=_copy_bandwidth("cuda", 512),
            peak_flops=peak,
            dense_dtype="float16",
            efficiency=0.7,
            op_overhead_s=8e-6,
            kernels={},
            sources={"all": "measured on this machine by autotune's probe"},
            probed=facts,
        )
    bandwidth = _copy_bandwidth("cpu", 64)
    peak = {
        "float32": _matmul_peak("cpu", torch.float32, 1024),
        "bfloat16": _matmul_peak("cpu", torch.bfloat16, 256),
    }
    kernel_table = {}
    if hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        kernel_table["int8_weight_only"] = KernelSpec(
            "float32",
            kernels.POLICY.int8_max_tokens,
            _int8_kernel_efficiency(bandwidth),
            "measured on this machine",
        )
    if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        kernel_table["int4_weight_only"] = KernelSpec(
            "float32",
            kernels.POLICY.int4_max_tokens,
            kernel_table.get("int8_weight_only", KernelSpec()).efficiency * 0.5,
            "assumed half the int8 kernel's efficiency (unpacking nibbles)",
        )
    if "fbgemm" in torch.backends.quantized.supported_engines:
        peak["int8"] = _int8_dynamic_peak()
        kernel_table["int8_dynamic"] = KernelSpec(
            "int8", None, 0.5, "fbgemm quantized::linear_dynamic; times are measured per layer"
        )
    return HardwareSpec(
        name="local",
        kind="cpu",
        description=f"this machine: {facts['cpu']}, {facts['torch_threads']} threads (measured)",
        memory_bytes=facts["memory_bytes"],
        bandwidth=bandwidth,
        peak_flops=peak,
        dense_dtype="float32",
        efficiency=0.5,
        op_overhead_s=_op_overhead(),
        int8_pairs_saturate=int8_pairs_saturate(),
        kernels=kernel_table,
        sources={"all": "measured on this machine by autotune's probe", "pid": str(os.getpid())},
        probed=facts,
    )
