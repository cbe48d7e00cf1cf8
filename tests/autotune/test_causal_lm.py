"""Causal LMs: perplexity in the measured figures; KV cache and activations in the budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from autotune.budget import Budget
from autotune.errors import AutotuneError, InfeasibleBudgetError
from autotune.tuner import autotune
from autotune.validate import validate_plan
from profilers.measure import model_bytes
from profilers.memory import kv_cache_bytes
from search import ChoiceTable, allocate
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


def test_a_decode_budget_bounds_the_predicted_time_per_token() -> None:
    model, batches = tiny_llama(), token_batches()
    shape = {"latency_seq_len": 32, "calibration": batches, "progress": False}
    free = autotune(model, "60%", "cpu", search="allocator", **shape)
    predicted = free.plan.predicted
    assert predicted["decode_shape"] == [1, 32]
    assert free.plan.measured["decode_p50_ms"] > 0
    assert free.plan.measured["baseline"]["decode_p50_ms"] > 0
    with pytest.raises(InfeasibleBudgetError, match=r"decode latency is .* per token") as refused:
        autotune(model, "60%,decode=1us", "cpu", **shape)
    assert 1e3 * refused.value.smallest["decode_seconds"] < predicted["decode_ms"]
    # the fastest plan within the memory budget, found by the allocator with time as the score
    costs = free.costs
    names = [ref.name for ref in costs.layers]
    table = ChoiceTable(
        variables=names,
        choices=[[o.label for o in costs.options[n]] for n in names],
        scores=[np.asarray(costs.decode_seconds[n]) for n in names],
        costs={"bytes": [np.asarray(costs.bytes[n], dtype=float) for n in names]},
        fixed={"bytes": float(costs.fixed_bytes)},
    )
    quickest = allocate(table, {"bytes": int(0.6 * costs.original_bytes)})
    fastest = 1e3 * (costs.fixed_decode_seconds + quickest.score)
    assert fastest < predicted["decode_ms"]
    limit = (fastest + predicted["decode_ms"]) / 2
    bounded = autotune(model, f"60%,decode={limit}ms", "cpu", search="allocator", **shape)
    assert bounded.plan.predicted["decode_ms"] <= limit < predicted["decode_ms"]
    assert bounded.report.holds() == {"memory": True, "decode": True}
    assert "decode p50 per token (1 x 32 context)" in str(bounded.report)
    assert Budget.parse(bounded.plan.budget["spec"]).decode_ms == pytest.approx(limit, rel=1e-12)
    checked = validate_plan(bounded.plan, model, heldout=batches[-1:], calibration=batches)
    decode = next(c for c in checked.checks if c.name == "decode p50")
    assert decode.holds and "predicted" in decode.measured
    assert checked.ok and checked.measured["decode"]["p50_ms"] > 0


def test_a_decode_budget_is_refused_for_an_encoder(tokenizer) -> None:
    with pytest.raises(AutotuneError, match="decode latency budget is for causal language models"):
        autotune(make_tiny_bert(), "50%,decode=5ms", "cpu", tokenizer=tokenizer, progress=False)
