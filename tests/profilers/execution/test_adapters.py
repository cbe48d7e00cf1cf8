"""Model adapters: every registered adapter answers for the families it recognises, and a
family the default does not read is one registered adapter away."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from autotune.estimators import get_estimator
from methods.base import LayerShape
from methods.registry import get_method
from profilers.execution.adapters import ADAPTERS, ModelAdapter, TransformerStack, adapter_for
from profilers.execution.checkpoint import CheckpointError
from profilers.execution.resident import ResidentModel

VOCAB = 128


def family(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB)
        return transformers.GPT2LMHeadModel(config).eval()
    if kind == "bert":
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64,
        )  # fmt: skip
        return transformers.BertModel(config).eval()
    if kind == "opt":
        config = transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            ffn_dim=64, word_embed_proj_dim=32,
        )  # fmt: skip
        return transformers.OPTForCausalLM(config).eval()
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("adapter", list(ADAPTERS.values()), ids=list(ADAPTERS))
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "opt"])
def test_every_adapter_reads_the_families_it_recognises(adapter: ModelAdapter, kind: str) -> None:
    model = family(kind)
    if not adapter.matches(model):
        pytest.skip(f"{adapter.name} does not recognise {kind}")
    blocks = adapter.blocks(model)
    assert len(blocks) == 2 and all(model.get_submodule(n) is b for n, b in blocks)
    groups = adapter.unit_groups(model)
    assert {g.kind for g in groups} == {"ffn", "heads"}
    assert all(model.get_submodule(g.consumer) is not None for g in groups)
    if kind == "bert":
        with pytest.raises(ValueError, match="not a decoder-only causal language model"):
            adapter.kv_geometry(model)
        return
    geometry = adapter.kv_geometry(model)
    assert len(geometry.layers) == 2
    tokens = torch.randint(0, VOCAB, (1, 6))
    step = adapter.decode_inputs(model, tokens)
    assert step["input_ids"].shape == (1, 1)
    if kind == "llama":
        assert adapter.tied_pairs(model) == {"lm_head": "model.embed_tokens"}
        assert adapter.max_context(model) is None  # rotary: no table to run out of


class Tower(nn.Module):
    """Blocks in an ``nn.Sequential``, which the default adapter does not read as a stack."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.stack = nn.Sequential(*(nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(3)))
        self.head = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stack(self.embed(x)))


class TowerAdapter(ModelAdapter):
    name = "test-tower"
    description = "a Tower's blocks are its stack's children"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, Tower)

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"stack.{i}", block) for i, block in enumerate(model.stack)]


def test_a_registered_adapter_is_asked_first_and_every_caller_uses_it(monkeypatch) -> None:
    model = Tower().eval()
    assert isinstance(adapter_for(model), TransformerStack)
    with pytest.raises(CheckpointError, match="Tower has no stack of blocks"):
        ResidentModel(model)
    monkeypatch.setitem(ADAPTERS, TowerAdapter.name, TowerAdapter())
    assert isinstance(adapter_for(model), TowerAdapter)
    assert isinstance(adapter_for(family("llama")), TransformerStack)
    grid = get_method("rtn").grid(LayerShape.of(model.head))
    option = next(o for o in grid if o.label == "int8-ch-sym")
    layers = ["embed", "stack.0.0", "stack.1.0", "stack.2.0", "head"]
    batches = [{"x": torch.randn(2, 16)} for _ in range(2)]
    table = get_estimator("block-output").table(
        model, {name: [option] for name in layers}, batches, observers={}
    )
    assert set(table.errors) == set(layers)
    assert all(table.errors[name][option.label] > 0 for name in layers)
