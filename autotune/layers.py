"""Which layers of a model can be compressed."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from methods.base import LayerShape, is_weight_layer, storage_key

MIN_NUMEL = 4096


@dataclass(frozen=True)
class LayerRef:
    name: str
    shape: LayerShape


def compressible_layers(
    model: nn.Module, *, include_embeddings: bool = True, min_numel: int = MIN_NUMEL
) -> list[LayerRef]:
    """Linear (``nn.Linear``, GPT-2 ``Conv1D``) and embedding layers in module order, found by
    type.

    Layers smaller than ``min_numel`` weights are left alone (their bytes are negligible and
    each one would cost a profiling pass). Layers whose weight is shared with another layer
    are left alone too: compressing one side would keep the float copy alive for the other.
    Tied input and output embeddings are one layer once the output side is a
    :class:`methods.tied.TiedHead` (see :func:`methods.tied.untie_output_embeddings`).
    """
    users: dict[int, int] = {}
    for module in model.modules():
        if is_weight_layer(module):
            key = storage_key(module.weight)
            users[key] = users.get(key, 0) + 1
    found: list[LayerRef] = []
    for name, module in model.named_modules():
        if not is_weight_layer(module):
            continue
        if isinstance(module, nn.Embedding) and not include_embeddings:
            continue
        weight = module.weight
        if not weight.is_floating_point() or weight.numel() < min_numel:
            continue
        if users[storage_key(weight)] > 1:
            continue
        found.append(LayerRef(name, LayerShape.of(module)))
    return found


def weight_numel(model: nn.Module) -> int:
    """Weights of every linear and embedding layer (the denominator of average bits)."""
    total = 0
    seen: set[int] = set()
    for module in model.modules():
        if is_weight_layer(module):
            key = storage_key(module.weight)
            if key not in seen:
                seen.add(key)
                total += module.weight.numel()
    return total
