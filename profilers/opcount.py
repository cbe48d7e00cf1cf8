"""Count what a model computes outside its compressible layers in one forward pass."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from profilers.roofline import RestOfModel

_QUERIES = {
    torch.ops.aten.is_contiguous.default,
    torch.ops.aten.is_contiguous.memory_format,
    torch.ops.aten.size.default,
    torch.ops.aten.sym_size.default,
    torch.ops.aten.stride.default,
    torch.ops.aten.sym_stride.default,
    torch.ops.aten.storage_offset.default,
    torch.ops.aten.sym_storage_offset.default,
    torch.ops.aten.numel.default,
    torch.ops.aten.sym_numel.default,
    torch.ops.aten.dim.default,
    torch.ops.prim.layout.default,
}


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.flops = 0.0
        self.bytes = 0.0
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _QUERIES:
            return NotImplemented
        if not self.paused and func._overloadpacket not in flop_registry:
            # composite ops (linear, matmul, attention) are counted through their parts
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        if self.paused:
            return out
        self.ops += 1
        packet = func._overloadpacket
        if packet in flop_registry:
            # an op whose flop formula does not take these arguments counts no FLOPs
            with contextlib.suppress(Exception):
                self.flops += float(flop_registry[packet](*args, **kwargs, out_val=out))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.bytes += tensor.numel() * tensor.element_size()
        return out


def rest_of_model(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    layers: Iterable[nn.Module],
    run: Callable[..., Any] | None = None,
) -> RestOfModel:
    """FLOPs, op count and activation bytes of one forward pass, the layers excluded.
    ``run(**inputs)`` makes the pass (default: ``model`` itself)."""
    counter = _Counter()

    def pause(module, args):
        counter.paused += 1

    def resume(module, args, output):
        counter.paused -= 1

    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(pause))
        handles.append(layer.register_forward_hook(resume))
    try:
        with torch.inference_mode(), counter:
            (run or model)(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return RestOfModel(
        flops=counter.flops,
        ops=counter.ops,
        activation_bytes=2 * counter.bytes,
        dtype=str(dtype).removeprefix("torch."),
    )
