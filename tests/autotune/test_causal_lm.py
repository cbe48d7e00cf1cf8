"""Causal LMs: perplexity in the measured figures; KV cache and activations in the budget."""

from __future__ import annotations

import pytest
import torch
import transformers

from autotune.budget import Budget
from autotune.errors import AutotuneError, InfeasibleBudgetError
from autotune.tuner import autotune
from profilers.measure import model_bytes
from profilers.memory import kv_cache_bytes
from tests.conftest import make_tiny_bert


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def token_batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 128, (4, 32), generator=generator)} for _ in range(4)]


def test_a_tuned_causal_lm_reports_perplexity() -> None:
    model, batches = tiny_llama(), token_batches()
    result = autotune(model, "40%", "cpu", calibration=batches, progress=False, search="allocator")
    measured = result.plan.measured
    assert measured["metric"] == "kl"
    assert measured["perplexity"] > 1 and measured["baseline_perplexity"] > 1
    # compression changes the distribution, hence the perplexity, but not wildly at 40%
    assert measured["perplexity"] != measured["baseline_perplexity"]
    assert abs(measured["perplexity"] / measured["baseline_perplexity"] - 1) < 0.5
    assert "perplexity (held-out)" in str(result.report)


def test_a_serving_budget_counts_kv_cache_and_activations() -> None:
    model, batches = tiny_llama(), token_batches()
    kv = kv_cache_bytes(model, 2, 64, 2)
    with pytest.raises(InfeasibleBudgetError) as refused:  # a 1-byte budget: learn the overhead
        autotune(model, Budget.parse("1B", batch_size=2, context=64), "cpu", calibration=batches)
    overhead = int(refused.value.smallest["bytes"])
    assert overhead > kv
    limit = overhead + model_bytes(model) // 2
    budget = Budget.parse(f"{limit}B", batch_size=2, context=64, kv_dtype="float16")
    result = autotune(model, budget, "cpu", calibration=batches, progress=False, search="allocator")
    predicted = result.plan.predicted
    breakdown = predicted["memory_breakdown"]
    assert breakdown["kv_cache"] == kv == 2 * 64 * 2 * (32 + 32) * 2  # 2 blocks, 2 kv heads of 16
    assert breakdown["activations"] == overhead - kv
    assert breakdown["total"] == predicted["bytes"] + kv + breakdown["activations"] <= limit
    assert result.plan.measured["bytes"] == predicted["bytes"]
    assert result.report.holds()["memory"]
    text = str(result.report)
    assert "KV cache (float16, 2 x 64 tokens)" in text and "serving memory" in text
    assert result.plan.budget["context"] == 64


def test_a_kv_cache_larger_than_the_budget_is_refused() -> None:
    model, batches = tiny_llama(), token_batches()
    budget = Budget.parse("100KB", batch_size=8, context=4096)
    with pytest.raises(InfeasibleBudgetError, match="KV cache and activation peak alone"):
        autotune(model, budget, "cpu", calibration=batches, progress=False)


def test_a_context_budget_is_refused_for_an_encoder(tokenizer) -> None:
    with pytest.raises(AutotuneError, match="causal language models"):
        autotune(
            make_tiny_bert(),
            Budget.parse("50%", context=128),
            "cpu",
            tokenizer=tokenizer,
            progress=False,
            seq_len=32,
            calibration_windows=4,
            heldout_windows=2,
        )
