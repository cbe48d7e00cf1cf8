"""Roofline latency of layers and whole models on a hardware spec.

time = max(FLOPs / peak, bytes / bandwidth) / efficiency, per layer, where bytes count the
stored weight (codes, scales and offsets included) and the activations in and out. A layer
whose format has no fast kernel on the device (or a call above the kernel's token limit)
runs dequantised: the float weight is written and read back, which the bytes reflect. So
does a format whose kernel the device has but autotune's modules do not call there
(:mod:`profilers.kernel_support`: on GPUs every quantised layer runs the dequantising path).
"""

from __future__ import annotations

from dataclasses import dataclass

from methods.base import LayerShape, Option
from methods.registry import method_of
from profilers.hardware import HardwareSpec, KernelSpec
from profilers.kernel_support import (
    EVERY_TOKEN_COUNT,
    OWN_RUNTIME,
    RUNTIME_KERNEL_OPS,
    runs_kernel,
)

ACTIVATION_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
# operators one call of a layer dispatches, by how it computes (each costs op_overhead_s):
# autotune's modules, and llama.cpp's one matrix-multiplication node per layer
OPS_PER_CALL = {"dense": 2, "lookup": 8, "kernel": 8, "dequantize": 14, "gguf_block": 1}


@dataclass(frozen=True)
class RestOfModel:
    """What a model computes outside its compressible layers, for one forward pass."""

    flops: float
    ops: int
    activation_bytes: float
    dtype: str = "float32"


PATHS = ("dense", "dequantize", "lookup")  # ways to compute that are not a kernel


def _efficiency(spec: HardwareSpec, path: str) -> float:
    """A path's own fitted efficiency (``kernels["dequantize"]``, ``kernels["lookup"]``) if
    the spec has one, else the dense efficiency."""
    entry = spec.kernels.get(path)
    return entry.efficiency if entry is not None else spec.efficiency


def priced_kernel(spec: HardwareSpec, fmt: str, tokens: int) -> KernelSpec | None:
    """The kernel a call of ``tokens`` rows in format ``fmt`` is priced with on ``spec``:
    one the spec lists, its runtime (autotune's modules unless the plan is tuned for another
    runtime) runs on its kind of device, and whose token limit
    the call is within; ``None`` for the float paths."""
    kernel = spec.kernels.get(fmt) if fmt not in PATHS else None
    if kernel is None or not runs_kernel(fmt, spec.kind, spec.runtime):
        return None
    if fmt in EVERY_TOKEN_COUNT.get(spec.runtime, ()):
        return kernel
    return kernel if kernel.max_tokens is None or tokens <= kernel.max_tokens else None


def format_in_runtime(shape: LayerShape, option: Option, runtime: str) -> str:
    """How a linear layer computes in ``runtime``: autotune's modules as the method says;
    llama.cpp's quantised GGML types in its block kernel (``gguf_block``; its float types as
    dense matmuls); in another runtime it is exported to, integer weight-only layers (``rtn``,
    ``gptq``) as that runtime's int4 or symmetric int8 weight-only kernel and ``fp8`` layers as
    its FP8 weight-only or dynamic-activation kernel (whether it has one is
    :func:`priced_kernel`'s question), anything else dequantised."""
    method = method_of(option)
    if runtime == "llama.cpp" and option.method == "gguf":
        return "dense" if option.tensor_type.is_float else "gguf_block"  # type: ignore[attr-defined]
    if runtime != OWN_RUNTIME and option.method == "fp8":
        return "fp8_dynamic" if option.activations else "fp8_weight_only"  # type: ignore[attr-defined]
    if runtime == OWN_RUNTIME or option.method not in ("rtn", "gptq"):
        return method.runtime_format(shape, option)
    bits = getattr(option, "bits", None)
    if bits == 4:
        return "int4_weight_only"
    if bits == 8 and getattr(option, "symmetric", False):
        return "int8_weight_only"
    return "dequantize"


def layer_latency(
    shape: LayerShape, option: Option, spec: HardwareSpec, tokens: int, *, fmt: str | None = None
) -> float:
    """Seconds one call of this layer takes for ``tokens`` input rows on ``spec``:
    ``max(FLOPs / peak, bytes / bandwidth) / efficiency`` plus per-operator overhead.
    ``fmt`` overrides how a linear layer computes (the method's ``runtime_format``): a module
    that reads another's storage, such as a tied output layer, may run it another way."""
    method = method_of(option)
    cost = method.cost(shape, option)
    act = ACTIVATION_BYTES.get(shape.dtype, 4)
    if shape.kind == "embedding":
        per_row = cost.weight_bytes / max(shape.rows, 1)
        moved = tokens * (per_row + shape.cols * act)
        plain = option.method == "none"
        efficiency = spec.efficiency if plain else _efficiency(spec, "lookup")
        ops = OPS_PER_CALL["dense" if plain else "lookup"]
        return moved / spec.bandwidth / efficiency + ops * spec.op_overhead_s
    flops = cost.flops_per_token * tokens
    activations = tokens * (shape.cols + shape.rows) * act
    fmt = fmt or format_in_runtime(shape, option, spec.runtime)
    kernel = priced_kernel(spec, fmt, tokens)
    if kernel is not None:
        moved = cost.weight_bytes + cost.other_bytes + activations
        roof = max(flops / spec.peak(kernel.compute_dtype), moved / spec.bandwidth)
        roof /= block_rate(spec, fmt, option) if tokens == 1 else 1.0
        ops = RUNTIME_KERNEL_OPS.get(spec.runtime, {}).get(fmt) or OPS_PER_CALL.get(
            fmt, OPS_PER_CALL["kernel"]
        )
        return roof / kernel.efficiency + ops * spec.op_overhead_s
    if fmt == "dense":
        moved = cost.bytes + activations
        seconds = max(flops / spec.peak(shape.dtype), moved / spec.bandwidth) / spec.efficiency
        return seconds + OPS_PER_CALL["dense"] * spec.op_overhead_s
    float_weight = method.rebuilt_numel(shape, option) * act
    moved = cost.bytes + 2 * float_weight + activations
    roof = max(flops / spec.peak(shape.dtype), moved / spec.bandwidth)
    return roof / _efficiency(spec, "dequantize") + OPS_PER_CALL["dequantize"] * spec.op_overhead_s


def block_rate(spec: HardwareSpec, fmt: str, option: Option) -> float:
    """The speed of a block kernel's matrix-vector product of this option's type, relative
    to the kernel's (``spec.block_rates``; 1 for other kernels and unlisted types)."""
    if fmt != "gguf_block":
        return 1.0
    return spec.block_rates.get(getattr(option, "type", ""), 1.0)


def rest_latency(rest: RestOfModel, spec: HardwareSpec) -> float:
    """Seconds for everything outside the compressible layers (attention, norms, overhead)."""
    compute = max(rest.flops / spec.peak(rest.dtype), rest.activation_bytes / spec.bandwidth)
    return compute / spec.efficiency + rest.ops * spec.op_overhead_s
