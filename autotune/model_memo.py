"""Results computed from a model, kept while the model lives and its tensors are unchanged.

A tune measures the original model again at every latency check (its export, in ONNX
Runtime); the result depends only on the model, so it is computed once. The memo is keyed
by the module itself (weakly: it goes with the model) and checked against a fingerprint of
its tensors (each one's storage, shape, dtype and in-place version counter), so a model
edited in place is computed again.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from torch import nn

T = TypeVar("T")


def fingerprint(model: nn.Module) -> tuple[Hashable, ...]:
    """What changes when any parameter or buffer of ``model`` is replaced or edited."""
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    return tuple(
        (name, t.data_ptr(), t._version, tuple(t.shape), str(t.dtype), str(t.device))
        for name, t in tensors
    )


class ModelMemo(Generic[T]):
    """``memo.get(model, compute)``: ``compute(model)``, once per model and state."""

    def __init__(self) -> None:
        self._kept: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, T]] = (
            weakref.WeakKeyDictionary()
        )

    def get(self, model: nn.Module, compute: Callable[[nn.Module], T]) -> T:
        key = fingerprint(model)
        kept = self._kept.get(model)
        if kept is None or kept[0] != key:
            kept = (key, compute(model))
            self._kept[model] = kept
        return kept[1]

    def clear(self) -> None:
        self._kept.clear()
