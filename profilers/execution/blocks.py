"""Find a model's repeated blocks and replay their cached outputs.

Most transformers are a stack of identical blocks in one ``nn.ModuleList``. When only a layer
of block ``j`` changes, blocks ``0 .. j-1`` compute what they computed before; serving their
cached outputs skips the unchanged prefix of the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The longest ``nn.ModuleList`` of at least two modules of one type, as (name, block)."""
    best: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) == 1 and len(module) > len(best):
            prefix = f"{name}." if name else ""
            best = [(f"{prefix}{i}", child) for i, child in enumerate(module)]
    return best


def block_index(blocks: list[tuple[str, nn.Module]], layer: str, order: list[str]) -> int:
    """How many blocks run before ``layer``: its block's index, 0 for layers before the
    stack, ``len(blocks)`` for layers after it. ``order`` is the model's module order."""
    for i, (name, _) in enumerate(blocks):
        if layer == name or layer.startswith(name + "."):
            return i
    if not blocks:
        return 0
    position = order.index(layer)
    return 0 if position < order.index(blocks[0][0]) else len(blocks)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return (
            type(value)(*(_clone(v) for v in value))
            if hasattr(value, "_fields")
            else tuple(_clone(v) for v in value)
        )
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, dict):
        return type(value)({k: _clone(v) for k, v in value.items()})
    return value


class BlockCache:
    """Outputs of every block for every batch, recorded once from the unchanged model."""

    def __init__(self, blocks: list[tuple[str, nn.Module]]) -> None:
        self.blocks = blocks
        self.outputs: list[list[Any]] = [[] for _ in blocks]
        self.batch = 0

    @contextmanager
    def recording(self) -> Iterator[None]:
        handles = [
            block.register_forward_hook(self._recorder(i))
            for i, (_, block) in enumerate(self.blocks)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _recorder(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.outputs[index].append(_clone(output))

        return hook

    @contextmanager
    def replaying(self, count: int) -> Iterator[None]:
        """Blocks ``0 .. count-1`` return their recorded output for the current batch."""
        patched = [block for _, block in self.blocks[:count]]
        for index, block in enumerate(patched):
            block.forward = self._replayer(index)  # type: ignore[method-assign]
        try:
            yield
        finally:
            for block in patched:
                del block.forward

    def _replayer(self, index: int):
        def forward(*args: Any, **kwargs: Any) -> Any:
            return _clone(self.outputs[index][self.batch])

        return forward
