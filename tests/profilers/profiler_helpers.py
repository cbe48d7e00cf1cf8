"""Tiny random transformers and token batches shared by the profiler tests."""

from __future__ import annotations

import torch
import transformers

VOCAB = 200
HIDDEN = 32

Batch = dict[str, torch.Tensor]


def tiny_bert_config(**overrides: int) -> transformers.BertConfig:
    fields = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 2 * HIDDEN,
        "max_position_embeddings": 64,
    }
    fields.update(overrides)
    return transformers.BertConfig(**fields)


def make_bert(seed: int = 0) -> transformers.BertModel:
    torch.manual_seed(seed)
    return transformers.BertModel(tiny_bert_config()).eval()


def make_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def make_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    """A causal LM whose blocks hold ``nn.Linear`` layers (GPT-2 uses ``Conv1D``)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * HIDDEN,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def make_batch(batch: int, seq: int, padded: int = 0, seed: int = 0) -> Batch:
    """Random tokens; the first row has its last ``padded`` tokens masked out."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        attention_mask[0, seq - padded :] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}
