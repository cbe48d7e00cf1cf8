"""Converted modules kept by (layer, option label) up to a byte cap, so that a later step
reuses a conversion (a GPTQ sweep, a code-book fit) instead of running it again."""

from __future__ import annotations

import psutil
from torch import nn

from profilers.measure import model_bytes, state_dict_bytes


def default_cap(model: nn.Module) -> int:
    """Up to 12x the model, within a third of the memory available now."""
    return int(min(12 * model_bytes(model), psutil.virtual_memory().available / 3))


class ConvertedModules:
    """Converted modules by (layer, option label); a module that would pass the cap is not
    kept (nor is an option that leaves the layer as it is)."""

    def __init__(self, cap_bytes: int) -> None:
        self.cap = cap_bytes
        self.used = 0
        self.store: dict[tuple[str, str], nn.Module] = {}

    def get(self, layer: str, label: str) -> nn.Module | None:
        return self.store.get((layer, label))

    def put(self, layer: str, label: str, module: nn.Module, original: nn.Module) -> None:
        key = (layer, label)
        if module is original or key in self.store:
            return
        size = state_dict_bytes(module)
        if self.used + size <= self.cap:
            self.store[key] = module
            self.used += size

    def retain(self, keys: set[tuple[str, str]]) -> None:
        """Drop every module but those of ``keys``."""
        for key in [k for k in self.store if k not in keys]:
            self.used -= state_dict_bytes(self.store.pop(key))

    def clear(self) -> None:
        self.store.clear()
        self.used = 0
