"""One decode step against a frozen KV cache: same logits as the full pass, same every call."""

from __future__ import annotations

import pytest
import torch
import transformers

from profilers.execution.decode import DecodeError, cache_argument, decode_inputs, max_context
from profilers.opcount import rest_of_model


def llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=48,
    )
    return transformers.LlamaForCausalLM(config).eval()


def gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=48)
    return transformers.GPT2LMHeadModel(config).eval()


def opt() -> transformers.OPTForCausalLM:
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=4, vocab_size=96,
        max_position_embeddings=48, word_embed_proj_dim=32,
    )  # fmt: skip
    return transformers.OPTForCausalLM(config).eval()


def qwen2() -> transformers.Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(config).eval()


def mistral() -> transformers.MistralForCausalLM:
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
        sliding_window=8,
    )  # fmt: skip
    return transformers.MistralForCausalLM(config).eval()


@pytest.mark.parametrize("build", [llama, gpt2, opt, qwen2, mistral])
def test_a_decode_step_scores_the_next_token_as_the_full_pass_does(build) -> None:
    model = build()
    tokens = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    inputs = decode_inputs(model, tokens)
    assert inputs["input_ids"].shape == (2, 1)
    with torch.inference_mode():
        full = model(input_ids=tokens).logits[:, -1]
        steps = [model(**inputs).logits[:, -1] for _ in range(3)]
    torch.testing.assert_close(steps[0], full, rtol=1e-4, atol=1e-5)
    # the cache is frozen: every call sees the same 19 tokens of context
    assert all(torch.equal(step, steps[0]) for step in steps[1:])
    assert inputs[cache_argument(model)].get_seq_length() == 19


def test_a_decode_step_reads_the_cache_it_is_given() -> None:
    """Tracing a step counts the cached keys and values: a longer context moves more bytes."""
    model = llama()
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    short = decode_inputs(model, torch.randint(0, 96, (1, 8)))
    long = decode_inputs(model, torch.randint(0, 96, (1, 40)))
    assert (
        rest_of_model(model, long, layers).activation_bytes
        > rest_of_model(model, short, layers).activation_bytes
    )


def test_contexts_the_model_cannot_hold_are_refused() -> None:
    model = gpt2()
    assert max_context(model) == 48
    assert max_context(llama()) is None  # rotary positions: no table to run out of
    with pytest.raises(DecodeError, match="exceeds the model's 48 positions"):
        decode_inputs(model, torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(DecodeError, match="at least 2 tokens"):
        decode_inputs(model, torch.zeros(1, 1, dtype=torch.long))


def test_an_encoder_cannot_be_decoded() -> None:
    config = transformers.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=48,
    )  # fmt: skip
    with pytest.raises(DecodeError, match="cannot be decoded"):
        decode_inputs(transformers.BertModel(config).eval(), torch.zeros(1, 8, dtype=torch.long))
