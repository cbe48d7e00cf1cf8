"""Structured pruning: removing a unit equals zeroing what it contributes, and shapes hold."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

from methods.base import linear_weight
from methods.errors import OptionError
from methods.structured import (
    apply_kept_units,
    find_unit_groups,
    prune_structured,
    remove_units,
    unit_scores,
    units_to_keep,
)


def tiny(family: str) -> nn.Module:
    torch.manual_seed(0)
    common = {"vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 2}
    if family == "bert":
        config = transformers.BertConfig(
            **common, num_attention_heads=4, intermediate_size=48, max_position_embeddings=32
        )
        return transformers.BertModel(config).eval()
    if family == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        config = transformers.LlamaConfig(
            **common,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            max_position_embeddings=32,
        )
        return transformers.LlamaForCausalLM(config).eval()
    if family == "qwen2":
        config = transformers.Qwen2Config(
            **common,
            num_attention_heads=4,
            num_key_value_heads=1,
            intermediate_size=48,
            max_position_embeddings=32,
        )
        return transformers.Qwen2ForCausalLM(config).eval()
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=32
        )
        return transformers.GPT2LMHeadModel(config).eval()
    if family == "opt":
        config = transformers.OPTConfig(
            **common,
            num_attention_heads=4,
            ffn_dim=48,
            max_position_embeddings=32,
            word_embed_proj_dim=32,
        )
        return transformers.OPTForCausalLM(config).eval()
    raise ValueError(family)


FAMILIES = ["bert", "llama", "qwen2", "gpt2", "opt"]
UNITS = {  # per block: FFN neurons, attention units (heads, or key/value groups under GQA)
    "bert": (48, 4),
    "llama": (48, 2),
    "qwen2": (48, 1),
    "gpt2": (48, 4),
    "opt": (48, 4),
}


def batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, 97, (2, 12), generator=generator)} for _ in range(2)]


def output(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        result = model(**batch)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_block_has_its_groups(family: str) -> None:
    groups = find_unit_groups(tiny(family))
    ffn = [g for g in groups if g.kind == "ffn"]
    heads = [g for g in groups if g.kind == "heads"]
    assert len(ffn) == len(heads) == 2
    assert {g.units for g in ffn} == {UNITS[family][0]}
    assert {g.units for g in heads} == {UNITS[family][1]}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["ffn", "heads"])
def test_removing_units_equals_zeroing_their_consumer_columns(family: str, kind: str) -> None:
    """Removed units contribute nothing: the pruned model computes what the full model does
    with those consumer columns set to zero."""
    model = tiny(family)
    group = next(g for g in find_unit_groups(model) if g.kind == kind)
    if group.units == 1:
        pytest.skip("a single unit cannot be removed")
    keep = torch.tensor([u for u in range(group.units) if u % 2 == 0])
    dropped = torch.tensor([u for u in range(group.units) if u % 2 == 1])

    zeroed = copy.deepcopy(model)
    consumer = zeroed.get_submodule(group.consumer)
    with torch.no_grad():
        linear_weight(consumer)[:, group.consumer_columns(dropped)] = 0.0
    before = params(model)
    remove_units(model, group, keep)
    for batch in batches():
        torch.testing.assert_close(output(model, batch), output(zeroed, batch))
    removed = before - params(model)
    rows = sum(seg.rows_per_unit for seg in group.producers) * len(dropped)
    cols = group.cols_per_unit * len(dropped)
    hidden = linear_weight(model.get_submodule(group.consumer)).shape[0]
    producers = {seg.layer for seg in group.producers}
    producer_in = linear_weight(model.get_submodule(next(iter(producers)))).shape[1]
    biases = sum(
        seg.rows_per_unit * len(dropped)
        for seg in group.producers
        if getattr(model.get_submodule(seg.layer), "bias", None) is not None
    )
    assert removed == rows * producer_in + cols * hidden + biases


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_structured_shrinks_and_replays(family: str) -> None:
    model = tiny(family)
    original = copy.deepcopy(model)
    kept = prune_structured(model, {"ffn": 0.25, "heads": 0.5}, batches())
    for consumer, units in kept.items():
        group = next(g for g in find_unit_groups(original) if g.consumer == consumer)
        expected = group.units - round((0.25 if group.kind == "ffn" else 0.5) * group.units)
        assert len(units) == max(1, expected)
    replayed = copy.deepcopy(original)
    apply_kept_units(replayed, kept)
    batch = batches()[0]
    assert torch.equal(output(replayed, batch), output(model, batch))
    assert params(model) < params(original)
    assert torch.isfinite(output(model, batch)).all()


def test_scores_follow_activation_times_weight_norms() -> None:
    model = tiny("bert")
    group = next(g for g in find_unit_groups(model) if g.kind == "ffn")
    consumer = model.get_submodule(group.consumer)
    with torch.no_grad():
        consumer.weight[:, 5] *= 100.0
        consumer.weight[:, 7] = 0.0
    scores = unit_scores(model, [group], batches())[group.consumer]
    assert int(scores.argmax()) == 5 and float(scores[7]) == 0.0
    kept = units_to_keep(scores, 0.5)
    assert 5 in kept.tolist() and 7 not in kept.tolist() and len(kept) == 24


def test_bad_input_is_refused_with_what_is_allowed() -> None:
    model = tiny("bert")
    with pytest.raises(OptionError, match=r"allowed: \[0, 1\)"):
        units_to_keep(torch.ones(4), 1.0)
    with pytest.raises(OptionError, match="allowed: \\['ffn', 'heads'\\]"):
        prune_structured(model, {"experts": 0.5}, batches())
    with pytest.raises(OptionError, match="not the output layer"):
        apply_kept_units(model, {"encoder.layer.0.attention.self.query": [0]})
    group = find_unit_groups(model)[0]
    with pytest.raises(OptionError, match=r"0\.\.47"):
        remove_units(model, group, torch.tensor([0, 48]))
    with pytest.raises(OptionError, match="calibration"):
        unit_scores(model, [group], [])
