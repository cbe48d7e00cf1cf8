"""Which layers of a model can be compressed."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from methods.base import LayerShape

MIN_NUMEL = 4096


@dataclass(frozen=True)
class LayerRef:
    name: str
    shape: LayerShape


def compressible_layers(
    model: nn.Module, *, include_embeddings: bool = True, min_numel: int = MIN_NUMEL
) -> list[LayerRef]:
    """``nn.Linear`` and ``nn.Embedding`` layers in module order, found by type.

    Layers smaller than ``min_numel`` weights are left alone (their bytes are negligible and
    each one would cost a profiling pass). A weight shared by several layers is listed once.
    """
    found: list[LayerRef] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and not include_embeddings:
            continue
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        if not module.weight.is_floating_point() or module.weight.numel() < min_numel:
            continue
        key = module.weight.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        found.append(LayerRef(name, LayerShape.of(module)))
    return found


def weight_numel(model: nn.Module) -> int:
    """Weights of every linear and embedding layer (the denominator of average bits)."""
    total = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            key = module.weight.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += module.weight.numel()
    return total
