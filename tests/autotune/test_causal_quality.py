"""Causal LMs: the plan reports held-out perplexity beside the uncompressed model's."""

from __future__ import annotations

import torch
import transformers

from autotune.tuner import autotune


def test_a_tuned_causal_lm_reports_perplexity() -> None:
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
    model = transformers.LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 128, (4, 32), generator=generator)} for _ in range(4)]
    result = autotune(model, "40%", "cpu", calibration=batches, progress=False, search="allocator")
    measured = result.plan.measured
    assert measured["metric"] == "kl"
    assert measured["perplexity"] > 1 and measured["baseline_perplexity"] > 1
    # compression changes the distribution, hence the perplexity, but not wildly at 40%
    assert measured["perplexity"] != measured["baseline_perplexity"]
    assert abs(measured["perplexity"] / measured["baseline_perplexity"] - 1) < 0.5
    assert "perplexity (held-out)" in str(result.report)
