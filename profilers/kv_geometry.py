"""KV-cache geometry of a transformers causal LM: which layers hold a cache, and how wide.

Read from the decoder's config (layer count, layer types, sliding windows, layers that reuse
another layer's cache) and from its attention modules (key/value widths, so heads removed by
structured pruning are seen). Separate key/value projections (``k_proj``/``v_proj``) give
the widths directly; fused projections (``c_attn``, ``query_key_value``, ``qkv_proj``...)
give them as the fused width less the query width the output projection reads. A layer whose
attention module is not recognised falls back to the config's head counts.

The bytes follow what transformers (5.x) allocates while serving: a full-attention layer holds
every token of the context; a sliding-window (or chunked) layer holds ``min(context, window)``
tokens, which is what ``StaticCache`` allocates and what a ``DynamicCache`` step attends over
(it keeps ``window - 1`` tokens between steps; transformers 4.x's ``DynamicCache`` kept all of
them); a layer that reuses another layer's cache holds none; layers without attention (linear
attention, Mamba, MLP-only) hold no per-token cache (their fixed-size state is not counted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from methods.errors import OptionError
from profilers.quality import is_causal_lm

# layer type -> config field of its window (None: the layer holds the whole context)
_CACHED_TYPES: dict[str, str | None] = {
    "full_attention": None,
    "hybrid": None,
    "sliding_attention": "sliding_window",
    "hybrid_sliding": "sliding_window",
    "chunked_attention": "attention_chunk_size",
}
_UNCACHED_TYPES = frozenset({"linear_attention", "conv", "mamba", "moe", "mlp", "dummy"})
# fused query/key/value projection -> the output projection, which reads the query width
_FUSED = (
    ("c_attn", "c_proj"),  # GPT-2
    ("query_key_value", "dense"),  # GPT-NeoX, Falcon, Bloom
    ("qkv_proj", "o_proj"),  # Phi-3
    ("Wqkv", "out_proj"),  # MPT
)


class KVGeometryError(OptionError):
    """A model whose KV-cache geometry cannot be found (not a causal LM, or a config or
    attention layout that is not recognised)."""


@dataclass(frozen=True)
class LayerKV:
    """The cache of decoder layer ``index``: ``kv_heads`` heads of ``key_dim`` key and
    ``value_dim`` value elements per token, over the last ``window`` tokens (None: all)."""

    index: int
    kv_heads: int
    key_dim: int
    value_dim: int
    window: int | None = None

    def tokens(self, context: int) -> int:
        """Tokens this layer holds for a context of ``context`` tokens."""
        return context if self.window is None else min(context, self.window)

    @property
    def width(self) -> int:
        """Key and value elements per token."""
        return self.kv_heads * (self.key_dim + self.value_dim)


@dataclass(frozen=True)
class KVGeometry:
    """The layers that hold a KV cache, and ``shared``: layers that read another's cache."""

    model: str
    layers: tuple[LayerKV, ...]
    shared: tuple[int, ...] = ()

    def bytes(self, batch: int, context: int, bytes_per_element: int) -> int:
        """Bytes of the cache of ``batch`` sequences of ``context`` tokens."""
        per_sequence = sum(layer.tokens(context) * layer.width for layer in self.layers)
        return batch * per_sequence * bytes_per_element


def _dims(module: nn.Module | None) -> tuple[int, int] | None:
    """``(out, in)`` features of a linear-like layer (``Conv1D`` and compressed layers too)."""
    if module is None:
        return None
    out = getattr(module, "out_features", getattr(module, "nf", None))
    inp = getattr(module, "in_features", getattr(module, "nx", None))
    return (out, inp) if isinstance(out, int) and isinstance(inp, int) else None


def _int(obj: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _split(key_width: int, value_width: int, head_dim: int) -> tuple[int, int, int] | None:
    """``(kv_heads, key_dim, value_dim)`` of key/value widths with heads of ``head_dim``."""
    heads = key_width // head_dim
    if heads == 0 or key_width % head_dim or value_width % heads:
        return None
    return heads, head_dim, value_width // heads


def _module_kv(attention: nn.Module, head_dim: int | None) -> tuple[int, int, int] | None:
    """``(kv_heads, key_dim, value_dim)`` from an attention module's projection widths."""
    head_dim = _int(attention, "head_dim", "head_size", "attention_head_size") or head_dim
    if head_dim is None:
        return None
    key = _dims(getattr(attention, "k_proj", None))
    if key is not None:
        if not hasattr(attention, "v_proj"):
            return None
        value = _dims(attention.v_proj)  # None: values computed by the key projection
        return _split(key[0], value[0] if value is not None else key[0], head_dim)
    for fused_name, out_name in _FUSED:
        fused = _dims(getattr(attention, fused_name, None))
        out = _dims(getattr(attention, out_name, None))
        if fused is not None and out is not None:
            kv_width = fused[0] - out[1]  # the fused width less the query heads' width
            if kv_width <= 0 or kv_width % 2:
                return None
            return _split(kv_width // 2, kv_width // 2, head_dim)
    return None


def _head_dim(config: Any) -> int | None:
    heads, hidden = _int(config, "num_attention_heads"), _int(config, "hidden_size")
    return _int(config, "head_dim") or (hidden // heads if hidden and heads else None)


def _config_kv(config: Any) -> tuple[int, int, int] | None:
    """``(kv_heads, key_dim, value_dim)`` from a (per-layer) config's head counts."""
    heads = _int(config, "num_attention_heads")
    if getattr(config, "new_decoder_architecture", False):
        kv_heads = _int(config, "num_kv_heads")
    elif getattr(config, "multi_query", False):
        kv_heads = 1
    else:
        kv_heads = _int(config, "num_key_value_heads", "num_kv_heads") or heads
    key_dim = _int(config, "qk_head_dim") or _head_dim(config)
    if kv_heads is None or key_dim is None:
        return None
    return kv_heads, key_dim, _int(config, "v_head_dim") or key_dim


def _decoder(model: nn.Module) -> nn.Module:
    get_decoder = getattr(model, "get_decoder", None)
    try:
        decoder = get_decoder() if callable(get_decoder) else None
    except (AttributeError, NotImplementedError, TypeError):
        decoder = None
    return decoder if isinstance(decoder, nn.Module) else model


def _attention_by_layer(model: nn.Module, n_layers: int) -> dict[int, nn.Module]:
    """The decoder's attention modules by the cache layer they write (their ``layer_idx``;
    in module order when they carry none)."""
    candidates = [
        module
        for module in _decoder(model).modules()
        if any(hasattr(module, name) for name in ("k_proj", *(f for f, _ in _FUSED)))
    ]
    by_index: dict[int, nn.Module] = {}
    for module in candidates:
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int) and 0 <= index < n_layers:
            by_index.setdefault(index, module)
    if not by_index and len(candidates) == n_layers:
        by_index = dict(enumerate(candidates))
    return by_index


def _layer_configs(config: Any, n_layers: int) -> Sequence[Any]:
    try:
        per_layer = list(config.per_layer_config)  # heterogeneous configs (transformers 5)
    except (AttributeError, TypeError):
        per_layer = []
    return per_layer if len(per_layer) == n_layers else [config] * n_layers


def _layer_types(config: Any, layer_configs: Sequence[Any]) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types is not None:
        return list(types)
    if getattr(config, "use_sliding_window", None) is not None:  # Qwen2 before layer_types
        first = _int(config, "max_window_layers") or 0
        sliding = bool(config.use_sliding_window) and _int(config, "sliding_window") is not None
        return [
            "sliding_attention" if sliding and i >= first else "full_attention"
            for i in range(len(layer_configs))
        ]
    return [
        "sliding_attention"
        if _int(c, "sliding_window")
        else "chunked_attention"
        if _int(c, "attention_chunk_size")
        else "full_attention"
        for c in layer_configs
    ]


def _reused(config: Any, n_layers: int) -> set[int]:
    """Layers that read another layer's cache instead of holding their own."""
    try:
        modes = getattr(config, "kv_sharing_modes", None)
    except ValueError:
        modes = None
    if modes is not None:
        return {i for i, mode in enumerate(modes) if mode == "reuse"}
    shared = _int(config, "num_kv_shared_layers") or 0
    return set(range(n_layers - shared, n_layers))


def kv_geometry(model: nn.Module) -> KVGeometry:
    """The KV-cache geometry of a transformers causal LM; :class:`KVGeometryError` if the
    model is not one or its layout is not recognised."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "get_text_config", None)):
        raise KVGeometryError(
            f"cannot size the KV cache of {name}: it has no transformers config to read it from"
        )
    if not is_causal_lm(model) or getattr(config, "is_encoder_decoder", False):
        raise KVGeometryError(
            f"cannot size the KV cache of {name}: it is not a decoder-only causal language model"
        )
    text = config.get_text_config(decoder=True)
    n_layers = _int(text, "num_hidden_layers")
    if n_layers is None:
        raise KVGeometryError(f"cannot size the KV cache of {name}: its config has no layer count")
    layer_configs = _layer_configs(text, n_layers)
    types = _layer_types(text, layer_configs)
    if len(types) != n_layers:
        raise KVGeometryError(
            f"cannot size the KV cache of {name}: its config lists {len(types)} layer types "
            f"for {n_layers} layers"
        )
    reused = _reused(text, n_layers)
    attention = _attention_by_layer(model, n_layers)
    layers: list[LayerKV] = []
    for index, (kind, layer_config) in enumerate(zip(types, layer_configs, strict=True)):
        if kind in _UNCACHED_TYPES or index in reused:
            continue
        if kind not in _CACHED_TYPES:
            raise KVGeometryError(
                f"cannot size the KV cache of {name}: layer {index} has attention type "
                f"{kind!r}; known: {sorted(_CACHED_TYPES)}"
            )
        module = attention.get(index)
        kv = _module_kv(module, _head_dim(layer_config)) if module is not None else None
        kv = kv or _config_kv(layer_config)
        if kv is None:
            raise KVGeometryError(
                f"cannot size the KV cache of {name}: layer {index} has no recognised attention "
                "module (k_proj/v_proj or a fused qkv projection) and its config no head counts"
            )
        window_field = _CACHED_TYPES[kind]
        window = _int(layer_config, window_field) if window_field else None
        if window_field and window is None:
            raise KVGeometryError(
                f"cannot size the KV cache of {name}: layer {index} is {kind!r} but its config "
                f"has no {window_field}"
            )
        layers.append(LayerKV(index, *kv, window=window))
    return KVGeometry(name, tuple(layers), tuple(sorted(reused)))
