"""Inputs of one decode step of a causal LM: new tokens against a KV cache of fixed length.

A decode step runs ``batch`` new tokens (one per sequence) through the model while attention
reads the keys and values of the ``context - 1`` tokens before them. To time and trace such a
step many times over, the cache is *frozen*: it hands attention its stored keys and values with
the new ones appended, as a growing cache does, but stores nothing, so every call sees the
same context.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn


class DecodeError(ValueError):
    """The model cannot be run one token at a time with a KV cache."""


def _stored(cache: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values a transformers cache holds for layer ``index``."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[index].keys, layers[index].values
    return cache.key_cache[index], cache.value_cache[index]


def freeze(cache: Any) -> Any:
    """Make ``cache`` return its stored keys and values plus the new ones without keeping
    the new ones (in place; returns ``cache``)."""

    def update(
        key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = _stored(cache, layer_idx)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    cache.update = update
    return cache


def max_context(model: nn.Module) -> int | None:
    """The most tokens the model's position embeddings hold, if its config says; ``None``
    for rotary positions, which have no table to run out of."""
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) is not None for name in ("rope_parameters", "rope_theta")):
        return None
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def decode_inputs(model: nn.Module, tokens: torch.Tensor) -> dict[str, Any]:
    """Inputs of one decode step: the last column of ``tokens`` (``batch x context``) as new
    tokens, against a frozen cache filled by running ``model`` on the columns before it."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise DecodeError(f"decode needs a context of at least 2 tokens, got {tuple(tokens.shape)}")
    limit = max_context(model)
    if limit is not None and tokens.shape[1] > limit:
        raise DecodeError(
            f"a context of {tokens.shape[1]} tokens exceeds the model's {limit} positions"
        )
    with torch.inference_mode():
        out = model(input_ids=tokens[:, :-1], use_cache=True)
    name = cache_argument(model)
    cache = getattr(out, name, None)
    if cache is None or not hasattr(cache, "update"):
        raise DecodeError(f"{type(model).__name__} returns no KV cache: it cannot be decoded")
    return {"input_ids": tokens[:, -1:].contiguous(), name: freeze(cache)}


def cache_argument(model: nn.Module) -> str:
    """What the model calls its KV cache argument (and output): ``cache`` in recent
    transformers, ``past_key_values`` before."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
