"""Hardware specifications as data: what the cost model needs to know of a device."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
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
class RuntimePrices:
    """How one runtime's graph runs on the device, where it differs from autotune's own
    modules (the figures the spec's own fields were fitted to): its dense efficiency, the
    overhead of one of its graph nodes, peaks and kernels as it reaches them, and their
    sources. A field left ``None`` or out keeps the device's figure."""

    efficiency: float | None = None
    op_overhead_s: float | None = None
    peak_flops: dict[str, float] = field(default_factory=dict)
    kernels: dict[str, KernelSpec] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    # per block type (GGML's name): the speed of the block kernel's matrix-vector product of
    # it (see HardwareSpec.block_rates)
    block_rates: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The target-file form: only the figures it sets."""
        return {k: v for k, v in asdict(self).items() if v not in (None, {})}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> RuntimePrices:
        data = dict(data)
        data["kernels"] = {k: KernelSpec(**v) for k, v in data.get("kernels", {}).items()}
        data["peak_flops"] = {k: float(v) for k, v in data.get("peak_flops", {}).items()}
        data["block_rates"] = {k: float(v) for k, v in data.get("block_rates", {}).items()}
        return RuntimePrices(**data)


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
    # figures of runtimes whose graphs run otherwise than autotune's modules (llama.cpp's
    # one node per operation), applied by :meth:`for_runtime`
    runtimes: dict[str, RuntimePrices] = field(default_factory=dict)
    # per block type of a block kernel (GGML's type name): the speed of its matrix-vector
    # product (a call of one token: a decode step) relative to the kernel's roofline, which
    # it divides (llama.cpp's i-quants look their values up in grids: in a decode step on
    # small-lm IQ3_S took 2.2x Q4_K's time at 3.44 bits per weight against 4.5, while its
    # prompts ran at Q4_K's speed); a type not listed has 1
    block_rates: dict[str, float] = field(default_factory=dict)

    def for_runtime(self, runtime: str) -> HardwareSpec:
        """This device as ``runtime`` runs on it: the runtime's own figures (where the entry
        has them) over the device's, sources included; the result holds no other runtime's."""
        prices = self.runtimes.get(runtime, RuntimePrices())
        changed: dict[str, Any] = {}
        if prices.efficiency is not None:
            changed["efficiency"] = prices.efficiency
        if prices.op_overhead_s is not None:
            changed["op_overhead_s"] = prices.op_overhead_s
        return replace(
            self,
            runtime=runtime,
            runtimes={},
            peak_flops={**self.peak_flops, **prices.peak_flops},
            kernels={**self.kernels, **prices.kernels},
            sources={**self.sources, **prices.sources},
            block_rates={**self.block_rates, **prices.block_rates},
            **changed,
        )

    def peak(self, dtype: str) -> float:
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        return self.peak_flops[self.dense_dtype]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["runtimes"] = {k: v.to_dict() for k, v in self.runtimes.items()}
        for empty in ("runtimes", "block_rates"):
            if not data[empty]:
                del data[empty]
        return data

    @staticmethod
    def from_dict(data: dict[str, Any]) -> HardwareSpec:
        data = dict(data)
        data["kernels"] = {k: KernelSpec(**v) for k, v in data.get("kernels", {}).items()}
        data["peak_flops"] = {k: float(v) for k, v in data["peak_flops"].items()}
        data["runtimes"] = {
            k: RuntimePrices.from_dict(v) for k, v in data.get("runtimes", {}).items()
        }
        data["block_rates"] = {k: float(v) for k, v in data.get("block_rates", {}).items()}
        return HardwareSpec(**data)
