"""Reusable scratch buffers for dequantising a layer's weight on the fly.

Allocating a fresh multi-megabyte tensor on every call costs page faults that can exceed the
matmul itself on a CPU; one buffer per thread, grown to the largest layer, avoids that. The
buffer is transient memory (like activations), not stored weight bytes.
"""

from __future__ import annotations

import threading

import torch

_LOCAL = threading.local()


def scratch(slot: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D tensor of ``numel`` elements that stays valid until the next call for ``slot``."""
    buffers: dict = getattr(_LOCAL, "buffers", None) or {}
    _LOCAL.buffers = buffers
    key = (slot, dtype, device)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        # a normal tensor (not an inference tensor), so it may be written in and out of
        # torch.inference_mode
        with torch.inference_mode(False):
            buffer = torch.empty(numel, dtype=dtype, device=device)
        buffers[key] = buffer
    return buffer[:numel]


def release() -> None:
    """Free this thread's scratch buffers."""
    _LOCAL.buffers = {}


def held_bytes() -> int:
    """Bytes of this thread's scratch buffers."""
    buffers: dict = getattr(_LOCAL, "buffers", None) or {}
    return sum(b.numel() * b.element_size() for b in buffers.values())
