"""KV-cache geometry: the bytes :func:`kv_cache_bytes` predicts equal the bytes of the cache a
tiny random model of each family really allocates (float32 caches, 4 bytes an element).

What is compared: the key and value tensors of the cache ``model.generate`` returns (a
``DynamicCache``) after ``PROMPT`` prompt and ``NEW`` generated tokens, which holds
``PROMPT + NEW - 1`` tokens per full-attention layer (the last token is never fed back). A
sliding-window layer of transformers' ``DynamicCache`` keeps ``window - 1`` tokens between
steps and attends over ``window`` during one (the kept ones and the new token), while a
``StaticCache`` allocates ``min(context, window)``: the figure counts ``min(context, window)``,
so for sliding layers it is checked against a ``StaticCache`` filled by a forward pass, and the
``DynamicCache`` is checked to hold one token less per sliding layer.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from methods.errors import OptionError
from methods.structured import prune_structured
from profilers.kv_geometry import KVGeometry, KVGeometryError, LayerKV, kv_geometry
from profilers.memory import kv_cache_bytes

BATCH, PROMPT, NEW = 2, 7, 4
CONTEXT = PROMPT + NEW - 1  # tokens the cache holds after generate
WINDOW = 4  # sliding window of the sliding-window families: smaller than the context
IDS = {"vocab_size": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
COMMON = {**IDS, "hidden_size": 32, "num_hidden_layers": 2}
GQA = {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48}


def _gemma4() -> transformers.PreTrainedConfig:
    """Gemma-4 text: full-attention layers with wider heads and keys reused as values;
    the last two layers read the caches of the first two."""
    return transformers.Gemma4TextConfig(
        **{**COMMON, "num_hidden_layers": 4},
        **GQA,
        head_dim=8,
        global_head_dim=16,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"] * 2,
        num_kv_shared_layers=2,
        vocab_size_per_layer_input=64,
        hidden_size_per_layer_input=8,
    )


def _gemma3n() -> transformers.PreTrainedConfig:
    return transformers.Gemma3nTextConfig(
        **{**COMMON, "num_hidden_layers": 4},
        **GQA,
        head_dim=8,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"] * 2,
        num_kv_shared_layers=2,
        vocab_size_per_layer_input=64,
        hidden_size_per_layer_input=8,
        laurel_rank=4,
        altup_num_inputs=2,
        activation_sparsity_pattern=[0.0] * 4,
    )


CONFIGS: dict[str, Callable[[], transformers.PreTrainedConfig]] = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, **GQA),
    "mistral": lambda: transformers.MistralConfig(**COMMON, **GQA, sliding_window=WINDOW),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, **GQA),
    "qwen2-sliding": lambda: transformers.Qwen2Config(
        **COMMON, **GQA, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
    ),
    "gemma": lambda: transformers.GemmaConfig(**COMMON, **GQA, head_dim=8),
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, **GQA, head_dim=8, sliding_window=WINDOW),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **COMMON,
        **GQA,
        head_dim=8,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "gemma3n": _gemma3n,
    "gemma4": _gemma4,
    "gpt2": lambda: transformers.GPT2Config(**IDS, n_embd=32, n_layer=2, n_head=4),
    "opt": lambda: transformers.OPTConfig(
        **COMMON, num_attention_heads=4, ffn_dim=48, word_embed_proj_dim=32
    ),
    "gpt-neox": lambda: transformers.GPTNeoXConfig(
        **COMMON, num_attention_heads=4, intermediate_size=48
    ),
    "phi3": lambda: transformers.Phi3Config(**COMMON, **GQA),
    "falcon": lambda: transformers.FalconConfig(**COMMON, num_attention_heads=4, multi_query=False),
    "falcon-multi-query": lambda: transformers.FalconConfig(
        **COMMON, num_attention_heads=4, multi_query=True
    ),
    "falcon-new-architecture": lambda: transformers.FalconConfig(
        **COMMON, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True
    ),
}
# (layers holding a cache, key/value heads, head width, sliding layers) of each family
EXPECTED = {
    "llama": (2, 2, 8, 0),
    "mistral": (2, 2, 8, 2),
    "qwen2": (2, 2, 8, 0),
    "qwen2-sliding": (2, 2, 8, 1),
    "gemma": (2, 2, 8, 0),
    "gemma2": (2, 2, 8, 1),
    "gemma3": (2, 2, 8, 1),
    "gemma3n": (2, 2, 8, 1),
    "gemma4": (2, None, None, 1),  # per layer: see test_gemma4_layers_differ
    "gpt2": (2, 4, 8, 0),
    "opt": (2, 4, 8, 0),
    "gpt-neox": (2, 4, 8, 0),
    "phi3": (2, 2, 8, 0),
    "falcon": (2, 4, 8, 0),
    "falcon-multi-query": (2, 1, 8, 0),
    "falcon-new-architecture": (2, 2, 8, 0),
}


def build(family: str) -> nn.Module:
    try:
        config = CONFIGS[family]()
    except AttributeError:  # a family this transformers does not have
        pytest.skip(f"{family} is not in transformers {transformers.__version__}")
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def prompt() -> torch.Tensor:
    return torch.randint(3, 64, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))


def returned_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def cache_tensors(cache: Any) -> list[torch.Tensor]:
    """Key and value tensors a transformers cache holds (layers that hold none skipped)."""
    if hasattr(cache, "layers"):
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    else:  # legacy tuples of (key, value) per layer
        pairs = [(layer[0], layer[1]) for layer in cache]
    return [t for pair in pairs for t in pair if isinstance(t, torch.Tensor) and t.numel()]


def allocated(cache: Any) -> int:
    return sum(t.numel() * t.element_size() for t in cache_tensors(cache))


def generated_cache(model: nn.Module) -> Any:
    with torch.no_grad():
        out = model.generate(
            prompt(),
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            use_cache=True,
            return_dict_in_generate=True,
        )
    assert out.sequences.shape == (BATCH, PROMPT + NEW)
    cache = returned_cache(out)
    assert all(t.dtype == torch.float32 for t in cache_tensors(cache))
    return cache


def between_steps(geometry: KVGeometry) -> int:
    """Bytes a ``DynamicCache`` holds between steps: ``window - 1`` tokens per sliding layer."""
    return (
        BATCH
        * 4
        * sum(
            layer.width * (CONTEXT if layer.window is None else min(CONTEXT, layer.window - 1))
            for layer in geometry.layers
        )
    )


@pytest.mark.parametrize("family", list(CONFIGS))
def test_kv_cache_bytes_equal_what_generate_allocates(family: str) -> None:
    model = build(family)
    geometry = kv_geometry(model)
    layers, heads, head_dim, sliding = EXPECTED[family]
    assert len(geometry.layers) == layers
    assert sum(layer.window is not None for layer in geometry.layers) == sliding
    if heads is not None:
        assert {(layer.kv_heads, layer.key_dim, layer.value_dim) for layer in geometry.layers} == {
            (heads, head_dim, head_dim)
        }
    predicted = kv_cache_bytes(model, BATCH, CONTEXT, 4)
    assert predicted == geometry.bytes(BATCH, CONTEXT, 4) > 0
    real = allocated(generated_cache(model))
    if sliding == 0:
        assert predicted == real
    else:  # the DynamicCache keeps window - 1 tokens of each sliding layer between steps
        assert (
            real
            == between_steps(geometry)
            == predicted
            - BATCH * 4 * sum(layer.width for layer in geometry.layers if layer.window is not None)
        )


@pytest.mark.parametrize(
    "family", ["mistral", "qwen2-sliding", "gemma2", "gemma3", "gemma4", "llama", "gpt2"]
)
def test_kv_cache_bytes_equal_a_static_cache_of_the_context(family: str) -> None:
    """A ``StaticCache`` of ``CONTEXT`` tokens: full layers hold the context, sliding layers
    ``min(context, window)`` tokens, as the figure counts."""
    model = build(family)
    cache = transformers.StaticCache(config=model.config, max_cache_len=CONTEXT)
    ids = torch.randint(3, 64, (BATCH, CONTEXT), generator=torch.Generator().manual_seed(2))
    # transformers 5 names the argument ``cache``, 4.x ``past_key_values``
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        model(ids, use_cache=True, **{name: cache})
    assert allocated(cache) == kv_cache_bytes(model, BATCH, CONTEXT, 4)


def test_a_sliding_window_caps_the_tokens_held() -> None:
    geometry = kv_geometry(build("mistral"))
    assert [layer.window for layer in geometry.layers] == [WINDOW, WINDOW]
    per_token = BATCH * 2 * 2 * (8 + 8) * 4  # 2 layers, 2 heads of 8 keys and 8 values
    assert geometry.bytes(BATCH, 3, 4) == 3 * per_token
    assert geometry.bytes(BATCH, 1000, 4) == WINDOW * per_token
    qwen = kv_geometry(build("qwen2-sliding"))  # layers from max_window_layers on slide
    assert [layer.window for layer in qwen.layers] == [None, WINDOW]


def test_gemma4_layers_differ() -> None:
    """Full-attention layers: 1 head of 16, keys reused as values (both cached); the last two
    layers reuse the first two's caches and hold none."""
    geometry = kv_geometry(build("gemma4"))
    assert geometry.layers == (
        LayerKV(0, 2, 8, 8, window=WINDOW),
        LayerKV(1, 1, 16, 16, window=None),
    )
    assert geometry.shared == (2, 3)


def batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(3, 64, (2, 12), generator=generator)} for _ in range(2)]


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_pruned_heads_shrink_the_cache(family: str) -> None:
    """Structured pruning removes half the key/value heads: the figure follows the module
    widths, and matches the pruned model's real cache."""
    model = build(family)
    before = kv_cache_bytes(model, BATCH, CONTEXT, 4)
    prune_structured(model, {"heads": 0.5}, batches())
    after = kv_cache_bytes(model, BATCH, CONTEXT, 4)
    assert after == before // 2
    assert after == allocated(generated_cache(model))


def test_a_model_without_a_known_geometry_is_refused_in_one_line() -> None:
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=48,
        )
    )
    with pytest.raises(KVGeometryError, match="BertModel: it is not a decoder-only causal") as e:
        kv_cache_bytes(bert, 1, 16, 2)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, OptionError)
    with pytest.raises(KVGeometryError, match="of Linear: it has no transformers config"):
        kv_cache_bytes(nn.Linear(4, 4), 1, 16, 2)

    class TinyForCausalLM(nn.Module):  # a causal LM by name whose config says nothing
        config = transformers.PreTrainedConfig()

    with pytest.raises(KVGeometryError, match="of TinyForCausalLM: its config has no layer"):
        kv_geometry(TinyForCausalLM())


def test_an_unknown_attention_type_is_refused() -> None:
    model = build("llama")
    model.config.layer_types = ["full_attention", "some_new_attention"]
    with pytest.raises(KVGeometryError, match="layer 1 has attention type 'some_new_attention'"):
        kv_geometry(model)
