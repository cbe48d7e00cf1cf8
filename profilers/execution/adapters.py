"""Model adapters: what autotune knows of a model family's layout, in one place per family.

An adapter answers, for the models it recognises by their module structure: the stack of
blocks (streaming, prefix replay, block-output sensitivity), the KV-cache geometry (serving
memory), the prunable units (FFN neurons, attention heads), the layers that share an
embedding's weight, the longest context, and the inputs of one decode step. Every caller
asks :func:`adapter_for`, so a family this registry does not know is one subclass and one
:func:`register_adapter` call away. Adapters registered later are asked first; the last
resort is :class:`TransformerStack`, which reads the layout from the modules themselves
(Llama, Mistral, Qwen2, GPT-2, OPT, BERT, ...). What an adapter cannot find it refuses with
one line (:class:`~profilers.kv_geometry.KVGeometryError`, ``OptionError`` for units),
never treating an unknown layout as empty.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from methods.structured import UNIT_KINDS, UnitGroup, UnitKind, find_unit_groups
from methods.tied import tied_pairs
from profilers.execution.blocks import find_blocks
from profilers.execution.decode import decode_inputs, max_context
from profilers.kv_geometry import KVGeometry, kv_geometry


class ModelAdapter(ABC):
    """The layout of one family of models; the defaults read it from the modules."""

    name: ClassVar[str]
    description: ClassVar[str]

    @abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter knows ``model``'s layout."""

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The stack of blocks a forward pass runs in order, as (name, block); empty for a
        model without one."""
        return find_blocks(model)

    def kv_geometry(self, model: nn.Module) -> KVGeometry:
        """Which layers hold a KV cache and how wide (causal LMs)."""
        return kv_geometry(model)

    def unit_groups(
        self, model: nn.Module, kinds: Iterable[UnitKind] = UNIT_KINDS
    ) -> list[UnitGroup]:
        """The FFN and attention groups structured pruning can shrink."""
        return find_unit_groups(model, kinds)

    def tied_pairs(self, model: nn.Module) -> dict[str, str]:
        """``{layer: embedding}`` of the layers that read an embedding's weight."""
        return tied_pairs(model)

    def max_context(self, model: nn.Module) -> int | None:
        """The most positions the model holds (``None``: no table to run out of)."""
        return max_context(model)

    def decode_inputs(self, model: nn.Module, tokens: torch.Tensor) -> dict[str, Any]:
        """Inputs of one decode step after ``tokens`` (batch x context) but the last."""
        return decode_inputs(model, tokens)


class TransformerStack(ModelAdapter):
    """Any model read from its modules: the longest list of same-type blocks, attention
    widths from its projections and config, FFN and head groups from recognised projection
    names, tied weights by shared storage."""

    name = "transformer-stack"
    description = "layout read from the modules (Llama, Mistral, Qwen2, GPT-2, OPT, BERT...)"

    def matches(self, model: nn.Module) -> bool:
        return True


ADAPTERS: dict[str, ModelAdapter] = {}


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    ADAPTERS[adapter.name] = adapter
    return adapter


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``: the last registered one that recognises it."""
    for adapter in reversed(list(ADAPTERS.values())):
        if adapter.matches(model):
            return adapter
    raise ValueError(f"no model adapter recognises {type(model).__name__}")


register_adapter(TransformerStack())
