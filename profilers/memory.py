"""Peak memory of inference: activations traced op by op, dequantisation scratch, and the
process's measured peak.

A plan's peak memory at inference is predicted as stored weight bytes
(:func:`profilers.measure.model_bytes`) + the most bytes of op outputs one forward pass holds
at once (:func:`activation_peak`) + the dequantisation scratch buffers
(:func:`scratch_bytes`). :func:`measure_peak` measures the real figure to compare with.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from methods import workspace
from profilers.execution.adapters import adapter_for


@dataclass(frozen=True)
class ActivationPeak:
    """Bytes of op outputs during one forward pass.

    ``peak_bytes``: the most bytes live at once; ``allocated_bytes``: the bytes of every
    storage an op created (views not counted again); ``ops``: ops run (a composite op as
    its parts); ``retained_bytes``: storages created in the pass that the model keeps
    afterwards (dequantisation scratch, weights converted on first use), left out of the
    other two.
    """

    peak_bytes: int
    allocated_bytes: int
    ops: int
    retained_bytes: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class MeasuredPeak:
    """Measured rise of memory over ``baseline_bytes`` while a call ran, and how it was
    measured (``"rss-sampling"`` or ``"cuda-allocator"``)."""

    peak_increase_bytes: int
    baseline_bytes: int
    method: str

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)


@dataclass(frozen=True)
class PeakPrediction:
    """Predicted peak memory of inference and its parts, in bytes."""

    weights: int
    activations: int
    scratch: int
    total: int

    @classmethod
    def of(cls, weights: int, activation: int | ActivationPeak, scratch: int) -> PeakPrediction:
        activations = _activation_bytes(activation)
        return cls(weights, activations, scratch, predict_peak(weights, activations, scratch))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _activation_bytes(activation: int | ActivationPeak) -> int:
    return activation.peak_bytes if isinstance(activation, ActivationPeak) else int(activation)


def predict_peak(weights_bytes: int, activation: int | ActivationPeak, scratch: int) -> int:
    """Peak bytes at inference: stored weights + activation peak + scratch buffers."""
    return int(weights_bytes) + _activation_bytes(activation) + int(scratch)


def _storage(tensor: torch.Tensor) -> tuple[int, int] | None:
    """``(data_ptr, nbytes)`` of the tensor's storage, or ``None`` if it has no real one."""
    if tensor.device.type == "meta" or tensor.layout != torch.strided:
        return None
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    nbytes = storage.nbytes()
    return (storage.data_ptr(), nbytes) if nbytes else None


def _tensors(tree: Any) -> Iterable[torch.Tensor]:
    return (leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor))


def scratch_in_use() -> list[torch.Tensor]:
    """The dequantisation scratch buffers this thread holds now."""
    buffers = getattr(workspace._LOCAL, "buffers", None) or {}
    return list(buffers.values())


class _LiveBytes(TorchDispatchMode):
    """Records, in order, the creation and release of every storage that ops allocate.

    A storage is counted when an op returns a tensor on memory that none of the op's tensor
    arguments uses and that is not tracked yet; views and in-place results of tracked
    storages add a reference; views of memory from before the pass (parameters, buffers,
    inputs) are ignored. A storage is released when the last tensor using it is freed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # data_ptr -> [serial, tensors using it]
        self.sizes: list[int] = []  # nbytes by serial
        self.events: list[tuple[int, int]] = []  # (serial, +nbytes or -nbytes)
        self.excluded: set[int] = set()
        self.finalizers: list[weakref.finalize] = []
        self.ops = 0

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        self.exclude(scratch_in_use())
        # a composite op runs as its parts: see their temporaries too
        with self:
            decomposed = func.decompose(*args, **kwargs)
        if decomposed is not NotImplemented:
            return decomposed
        out = func(*args, **kwargs)
        self.ops += 1
        used = {key[0] for t in _tensors((args, kwargs)) if (key := _storage(t)) is not None}
        for tensor in _tensors(out):
            self._track(tensor, used)
        return out

    def _track(self, tensor: torch.Tensor, used: set[int]) -> None:
        key = _storage(tensor)
        if key is None:
            return
        ptr, nbytes = key
        entry = self.live.get(ptr)
        if entry is None:
            if ptr in used:
                return  # memory from before the pass, or an op writing into it
            entry = [len(self.sizes), 0]
            self.sizes.append(nbytes)
            self.events.append((entry[0], nbytes))
            self.live[ptr] = entry
        entry[1] += 1
        self.finalizers.append(weakref.finalize(tensor, self._release, ptr))

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[ptr]
            self.events.append((entry[0], -self.sizes[entry[0]]))

    def exclude(self, tensors: Iterable[torch.Tensor]) -> None:
        """Leave out the tracked storages these tensors use (memory the model keeps)."""
        for tensor in tensors:
            key = _storage(tensor)
            entry = self.live.get(key[0]) if key is not None else None
            if entry is not None:
                self.excluded.add(entry[0])

    def detach(self) -> None:
        for finalizer in self.finalizers:
            finalizer.detach()
        self.finalizers.clear()

    def result(self) -> ActivationPeak:
        live = peak = allocated = 0
        for serial, delta in self.events:
            if serial in self.excluded:
                continue
            live += delta
            if delta > 0:
                allocated += delta
                peak = max(peak, live)
        retained = sum(self.sizes[serial] for serial in self.excluded)
        return ActivationPeak(peak, allocated, self.ops, retained)


def _model_state(model: nn.Module) -> Iterable[torch.Tensor]:
    """Tensors the model holds: parameters, buffers and plain tensor attributes."""
    yield from model.parameters()
    yield from model.buffers()
    for module in model.modules():
        yield from (v for v in vars(module).values() if isinstance(v, torch.Tensor))


def activation_peak(
    model: nn.Module, inputs: dict[str, Any], run: Callable[..., Any] | None = None
) -> ActivationPeak:
    """Most bytes of op outputs live at once during one ``model(**inputs)`` under
    ``torch.inference_mode``.

    Counts the storages ops return, each once however many views use it, from the op that
    creates it until its last tensor is freed (the model's output stays live to the end).
    Parameters, buffers, inputs and what the model keeps after the pass (dequantisation
    scratch: see :func:`scratch_bytes`; weights repacked on first use) are not counted.
    Memory a kernel uses internally without returning it is not seen. A model's first call
    can hold more than later ones (e.g. weights converted to a kernel layout on first use).
    ``run(**inputs)`` makes the pass instead of the model (a model streamed from disk).
    """
    tracker = _LiveBytes()
    try:
        with torch.inference_mode(), tracker:
            out = (run or model)(**inputs)
        tracker.exclude(scratch_in_use())
        tracker.exclude(_model_state(model))
    finally:
        tracker.detach()
    del out
    return tracker.result()


def scratch_bytes(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the largest dequantisation scratch a forward pass can allocate.

    Each thread keeps one buffer per slot, grown to the largest layer's need; modules say
    what they need through ``scratch_needs(dtype)`` (the float weight, unpacked codes...).
    Layers that a call runs on an int8 / int4 kernel use none, so this is an upper bound.
    0 if the model has no such layers.
    """
    largest: dict[str, int] = {}
    for module in model.modules():
        needs = getattr(module, "scratch_needs", None)
        if callable(needs):
            for slot, nbytes in needs(dtype).items():
                largest[slot] = max(largest.get(slot, 0), int(nbytes))
    return sum(largest.values())


def return_free_memory() -> None:
    """Ask glibc to give freed heap memory back to the system (a no-op elsewhere), so that
    what ``fn`` allocates shows as a rise instead of reusing memory freed before."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure_peak(
    fn: Callable[[], Any], interval_s: float = 0.0005, *, cuda: bool = False
) -> MeasuredPeak:
    """Rise of memory over its level just before while ``fn()`` runs.

    With ``cuda=True`` and a GPU: the CUDA caching allocator's peak of allocated bytes.
    Otherwise the process's resident set size, sampled every ``interval_s`` by a background
    thread: a peak shorter than the interval can be missed, and the figure includes what
    the allocators keep (memory freed earlier and still held by malloc is reused without a
    rise, so a repeated call can show less than it allocates), and other threads' memory.
    """
    if cuda and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        increase = torch.cuda.max_memory_allocated() - baseline
        return MeasuredPeak(max(0, increase), baseline, "cuda-allocator")
    process = psutil.Process()
    gc.collect()
    return_free_memory()
    baseline = process.memory_info().rss
    samples = [baseline]
    done = threading.Event()

    def sample() -> None:
        while True:
            samples.append(process.memory_info().rss)
            if done.wait(interval_s):
                return

    thread = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    thread.start()
    try:
        fn()
        samples.append(process.memory_info().rss)
    finally:
        done.set()
        thread.join()
    return MeasuredPeak(max(0, max(samples) - baseline), baseline, "rss-sampling")


def kv_cache_bytes(model: nn.Module, batch: int, context: int, bytes_per_element: int) -> int:
    """Bytes of the key/value cache of ``batch`` sequences of ``context`` tokens, from the
    model's cache geometry (:meth:`profilers.execution.adapters.ModelAdapter.kv_geometry`:
    the key and value widths of every layer that holds a cache, after structured pruning;
    sliding-window layers hold at most their window). Raises
    :class:`profilers.kv_geometry.KVGeometryError` for a model whose geometry is not
    recognised."""
    return adapter_for(model).kv_geometry(model).bytes(batch, context, bytes_per_element)
