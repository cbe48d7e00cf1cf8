"""Hardware specifications as data: what the cost model needs to know of a device."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class KernelSpec:
    """A weight format that has a fast kernel on the device.

    ``max_tokens``: the kernel is used for calls of at most this many tokens (``None``: all);
    above it the layer runs dequantised. ``compute_dtype`` names the peak the kernel computes
    at; ``efficiency`` is the fraction of peak memory bandwidth it reaches on its traffic.
    """

    compute_dtype: str = "bfloat16"
    max_tokens: int | None = None
    efficiency: float = 0.5
    source: str = ""


@dataclass(frozen=True)
class HardwareSpec:
    """Peak figures of one device; every figure carries a source in ``sources``."""

    name: str
    kind: Literal["cpu", "gpu"]
    description: str
    memory_bytes: int
    bandwidth: float
    peak_flops: dict[str, float]
    dense_dtype: str = "float32"
    efficiency: float = 0.6
    op_overhead_s: float = 5e-6
    # an x86 CPU without VNNI: its 8-bit dot products (``vpmaddubsw``) add each pair of
    # unsigned-by-signed products in 16 bits with saturation, so int8 kernels that take
    # 8-bit activations (ONNX Runtime's, fbgemm's) need weights of 7 bits to be exact
    int8_pairs_saturate: bool = False
    kernels: dict[str, KernelSpec] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    probed: dict[str, Any] = field(default_factory=dict)
    # what runs the model: autotune's own modules (``torch``) or a runtime it exports to
    # (see profilers.kernel_support.RUNTIME_KERNELS); set by a tune's ``runtime``
    runtime: str = "torch"

    def peak(self, dtype: str) -> float:
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        return self.peak_flops[self.dense_dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> HardwareSpec:
        data = dict(data)
        data["kernels"] = {k: KernelSpec(**v) for k, v in data.get("kernels", {}).items()}
        data["peak_flops"] = {k: float(v) for k, v in data["peak_flops"].items()}
        return HardwareSpec(**data)
