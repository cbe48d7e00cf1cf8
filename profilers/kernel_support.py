"""Which low-bit kernels this project's modules really run, on which kind of device.

A hardware spec lists the kernels a device *has* (``kernels`` in a target entry); the
roofline prices a kernel only where autotune's own modules call it. Each kernel is registered
with the predicate its module consults before calling it (:mod:`methods.kernels` for the
weight-only kernels, :mod:`methods.smoothquant` for W8A8), asked about a device of the kind
(``cpu`` -> ``torch.device("cpu")``, ``gpu`` -> ``torch.device("cuda")``). A kernel its
modules do not run there is priced as the path they take instead, ``dequantize``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from methods import kernels, smoothquant

DEVICE_KINDS = {"cpu": "cpu", "gpu": "cuda"}  # a spec's kind -> the torch device type
# ways to compute that are not kernels but may carry a fitted efficiency of their own
PATH_ENTRIES = ("dequantize", "lookup")


@dataclass(frozen=True)
class KernelSupport:
    """A kernel name (a key of a spec's ``kernels``) and whether the module that would call
    it does so on a given device: ``runs_on(device)``."""

    name: str
    runs_on: Callable[[torch.device], bool]


KERNELS: dict[str, KernelSupport] = {}


def register_kernel(support: KernelSupport) -> KernelSupport:
    KERNELS[support.name] = support
    return support


def allowed_kernel_entries() -> tuple[str, ...]:
    """Every name a target's ``kernels`` table may hold: registered kernels, the kernels of
    the runtimes plans are exported to, and paths."""
    kernels = {name for runtime in runtimes() for name in known_kernels(runtime)}
    return tuple(sorted({*kernels, *PATH_ENTRIES}))


def device_for(kind: str) -> torch.device:
    if kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device kind {kind!r}; allowed: {', '.join(DEVICE_KINDS)}")
    return torch.device(DEVICE_KINDS[kind])


# The runtime a plan is tuned for (``--runtime``): ``torch`` is autotune's own modules, whose
# kernels are probed above; the others run the exported model with kernels of their own,
# listed here per kind of device (vLLM's Marlin weight-only kernels on GPUs, integer and FP8,
# and its FP8 W8A8 matmul with dynamic per-token activations; ONNX Runtime's
# MatMulNBits and its fused dynamic int8 matmul, DynamicQuantizeMatMul, on CPUs). Options those
# kernels cannot take are kept out of such plans by :mod:`autotune.runtimes`.
OWN_RUNTIME = "torch"
# FP8 kernels a runtime may have: weight-only, and with FP8 inputs
FP8_KERNELS = ("fp8_weight_only", "fp8_dynamic")
RUNTIME_KERNELS: dict[str, dict[str, frozenset[str]]] = {
    "vllm": {"gpu": frozenset({"int4_weight_only", "int8_weight_only", *FP8_KERNELS})},
    "onnxruntime": {"cpu": frozenset({"int4_weight_only", "int8_dynamic"})},
    # llama.cpp multiplies every quantised GGML type in its blocks, on CPUs and GPUs alike
    # (activations quantised to 8 bits for integer dot products): ``gguf_block``
    "llama.cpp": {"cpu": frozenset({"gguf_block"}), "gpu": frozenset({"gguf_block"})},
}


# Operators one call of a runtime's kernel launches, where the roofline's default (several
# for autotune's own modules: reshapes and casts around the kernel) does not hold: vLLM runs
# a Marlin matmul as one kernel, and its FP8 W8A8 matmul after one that quantises the inputs.
RUNTIME_KERNEL_OPS: dict[str, dict[str, int]] = {
    "vllm": {
        "int4_weight_only": 1,
        "int8_weight_only": 1,
        "fp8_weight_only": 1,
        "fp8_dynamic": 2,
    },
}
# Kernels a runtime calls at every token count, whatever token limit a target gives the
# kernel (the limits in targets.json are where autotune's modules switch to dequantising):
# vLLM multiplies a quantised layer with its kernel for prompts and decoding alike.
EVERY_TOKEN_COUNT: dict[str, frozenset[str]] = {"vllm": RUNTIME_KERNELS["vllm"]["gpu"]}


def runtimes() -> tuple[str, ...]:
    return (OWN_RUNTIME, *RUNTIME_KERNELS)


def runs_kernel(name: str, kind: str, runtime: str = OWN_RUNTIME) -> bool:
    """Whether kernel ``name`` runs on a device of ``kind`` in ``runtime``: for autotune's
    own modules (``torch``) as their checks say, else as the runtime's table lists."""
    device = device_for(kind)
    if runtime == OWN_RUNTIME:
        support = KERNELS.get(name)
        return support is not None and support.runs_on(device)
    if runtime not in RUNTIME_KERNELS:
        raise ValueError(f"unknown runtime {runtime!r}; allowed: {', '.join(runtimes())}")
    return name in RUNTIME_KERNELS[runtime].get(kind, frozenset())


def known_kernels(runtime: str = OWN_RUNTIME) -> frozenset[str]:
    """The kernels ``runtime`` has on some kind of device (autotune's modules: the registered
    ones)."""
    if runtime == OWN_RUNTIME:
        return frozenset(KERNELS)
    if runtime not in RUNTIME_KERNELS:
        raise ValueError(f"unknown runtime {runtime!r}; allowed: {', '.join(runtimes())}")
    return frozenset(name for names in RUNTIME_KERNELS[runtime].values() for name in names)


def unrun_kernels(listed: Iterable[str], kind: str, runtime: str = OWN_RUNTIME) -> list[str]:
    """The kernels among ``listed`` (a spec's ``kernels`` names) that ``runtime`` has but does
    not run on a device of ``kind``, in order (another runtime's kernels are not its
    concern)."""
    known = known_kernels(runtime)
    return [k for k in listed if k in known and not runs_kernel(k, kind, runtime)]


# a call the kernels are meant for: one token, a 256 x 256 weight in groups of 128
_ROWS, _COLS, _GROUP = 256, 256, 128


@contextlib.contextmanager
def _kernels_enabled() -> Iterator[None]:
    """The process's kernel policy switched fully on: a switch of this process (tests, the
    ``AUTOTUNE_KERNELS`` variable) must not change how a named target is priced."""
    saved = dataclasses.replace(kernels.POLICY)
    kernels.set_kernel_policy(enabled=True, int8_max_tokens=1, int4_max_tokens=1)
    try:
        yield
    finally:
        kernels.set_kernel_policy(
            enabled=saved.enabled,
            int8_max_tokens=saved.int8_max_tokens,
            int4_max_tokens=saved.int4_max_tokens,
        )


def _int8_weight_only(device: torch.device) -> bool:
    with _kernels_enabled():
        return kernels.int8_kernel_usable(device, 1, _COLS)


def _int4_weight_only(device: torch.device) -> bool:
    with _kernels_enabled():
        return kernels.int4_kernel_usable(device, 1, _ROWS, _COLS, _GROUP)


def _int8_dynamic(device: torch.device) -> bool:
    # W8A8Linear asks this of its (float32) input; only its device and dtype are read
    probe = SimpleNamespace(device=device, dtype=torch.float32)
    return smoothquant._fbgemm_ready(probe)  # type: ignore[arg-type]


register_kernel(KernelSupport("int8_weight_only", _int8_weight_only))
register_kernel(KernelSupport("int4_weight_only", _int4_weight_only))
register_kernel(KernelSupport("int8_dynamic", _int8_dynamic))
