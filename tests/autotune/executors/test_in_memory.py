"""The in-memory executor: the user's model untouched, the compressed model written when
asked, with the plan and its measured figures beside it."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from autotune.plan import Plan
from autotune.saved import load_compressed
from autotune.tuner import autotune
from profilers.measure import model_bytes

VOCAB = 256


def test_save_to_writes_the_compressed_model_and_its_measured_plan(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=generator)}] * 3
    result = autotune(
        model,
        "40%",
        "cpu",
        calibration=batches,
        heldout=batches[:1],
        option_labels=["int8-ch-sym", "int4-g32-asym"],
        search="allocator",
        save_to=tmp_path / "out",
        progress=False,
        cache=False,
    )
    assert result.saved == tmp_path / "out"
    written = load_compressed(result.saved)
    assert model_bytes(written) == result.plan.measured["bytes"] == result.plan.predicted["bytes"]
    with torch.inference_mode():
        assert torch.equal(written(**batches[0]).logits, result.model(**batches[0]).logits)
    saved_plan = Plan.load(result.saved / "plan.json")
    assert saved_plan.measured == result.plan.measured  # re-saved once measured
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
