"""How each model family becomes a llama.cpp architecture in a GGUF file: the checks that a
config is one llama.cpp computes, the hyperparameter keys, and any reordering of rows. A
family is a small class registered under the ``model_type`` values it writes."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from autotune.export.base import ExportError


class Family(ABC):
    """How one model family becomes a llama.cpp architecture: its name, the checks that its
    config is one llama.cpp computes, its hyperparameter keys and any reordering of rows."""

    arch: str

    @abstractmethod
    def check(self, config: Any) -> None:
        """Raise :class:`ExportError` with one line where llama.cpp would compute another
        function than the model's."""

    @abstractmethod
    def hyperparameters(self, writer: Any, config: Any) -> None:
        """Write the architecture's hyperparameter keys."""

    def arrange(self, name: str, array: np.ndarray, config: Any) -> np.ndarray:
        """``array`` (rows = output features) as llama.cpp expects tensor ``name``."""
        return array


@dataclass(frozen=True)
class LlamaFamily(Family):
    """Llama-style decoders: RMS norms, rotary embeddings, gated MLPs, grouped key/values."""

    arch: str
    permute_qk: bool  # llama.cpp's Llama rotary layout pairs rows differently from HF's

    def check(self, config: Any) -> None:
        rope = _rope(config)
        if rope.get("rope_type", "default") != "default":
            raise ExportError(
                f"--format gguf writes default rotary embeddings; this model's rope_type is "
                f"{rope.get('rope_type')!r}"
            )

    def hyperparameters(self, writer: Any, config: Any) -> None:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(_kv_heads(config))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_rope_freq_base(float(_rope(config).get("rope_theta", 10000.0)))
        writer.add_rope_dimension_count(head_dim)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)

    def arrange(self, name: str, array: np.ndarray, config: Any) -> np.ndarray:
        if self.permute_qk and (".attn_q." in name or ".attn_k." in name):
            heads = config.num_attention_heads if ".attn_q." in name else _kv_heads(config)
            return _permute_rows(array, heads)
        return array


TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # what ggml_gelu computes


@dataclass(frozen=True)
class GPT2Family(Family):
    """GPT-2: learned positions, layer norms with biases, one fused query/key/value layer,
    a tanh-approximated GELU MLP; ``Conv1D`` weights are written as rows of outputs."""

    arch: str = "gpt2"

    def check(self, config: Any) -> None:
        activation = getattr(config, "activation_function", "gelu_new")
        if activation not in TANH_GELUS:
            raise ExportError(
                f"--format gguf writes GPT-2 models with a tanh GELU ({', '.join(TANH_GELUS)}), "
                f"as llama.cpp computes it; this model's activation_function is {activation!r}"
            )
        if getattr(config, "scale_attn_by_inverse_layer_idx", False) or not getattr(
            config, "scale_attn_weights", True
        ):
            raise ExportError(
                "--format gguf writes GPT-2 attention scaled by 1/sqrt(head size) only, as "
                "llama.cpp computes it; this model's config scales it otherwise"
            )

    def hyperparameters(self, writer: Any, config: Any) -> None:
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(float(config.layer_norm_epsilon))


FAMILIES: dict[str, Family] = {
    "llama": LlamaFamily("llama", True),
    "mistral": LlamaFamily("llama", True),
    "qwen2": LlamaFamily("qwen2", False),
    "qwen3": LlamaFamily("qwen3", False),  # per-head query and key norms, by gguf's name map
    "gpt2": GPT2Family(),
}


def family_of(model: nn.Module) -> Family:
    """The family of ``model``'s config, or one line naming those written."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        raise ExportError(
            f"--format gguf writes {', '.join(sorted(FAMILIES))} models for llama.cpp; this "
            f"model is {kind or type(model).__name__!r}"
        )
    family = FAMILIES[kind]
    family.check(config)
    return family


@functools.cache
def is_position_table(layer: str) -> bool:
    """Whether ``layer`` is a learned position embedding, by gguf's map of model names."""
    import gguf

    arch = gguf_arch(GPT2Family())  # an architecture whose map holds position embeddings
    found = gguf.get_tensor_name_map(arch, 1).get_type_and_name(
        f"{layer}.weight", try_suffixes=(".weight",)
    )
    return found is not None and found[0] == gguf.MODEL_TENSOR.POS_EMBD


def _rope(config: Any) -> dict[str, Any]:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(rope, dict):
        return rope
    return {"rope_theta": getattr(config, "rope_theta", 10000.0)}


def _permute_rows(array: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half rows to llama.cpp's interleaved pairs, per head."""
    rows = array.shape[0]
    return (
        array.reshape(heads, 2, rows // heads // 2, *array.shape[1:])
        .swapaxes(1, 2)
        .reshape(array.shape)
    )


def _kv_heads(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def gguf_arch(family: Family) -> Any:
    """gguf's ``MODEL_ARCH`` of ``family``."""
    import gguf

    return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == family.arch)
