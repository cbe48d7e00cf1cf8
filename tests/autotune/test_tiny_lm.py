"""The bundled trained causal LM ``tiny-lm``: it loads offline, is a small Llama with
grouped-query attention, has learned the text it was trained on, and can be tuned."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers

from autotune.calibration import batch_windows, stdlib_texts, token_windows
from autotune.loading import TINY_LM_DIR, load_model
from autotune.tuner import autotune
from profilers.measure import model_bytes
from profilers.quality import perplexity

MAX_BYTES = 20_000_000
# on the 8 held-out windows of 128 tokens below the shipped model scores about 234 and the
# same architecture untrained about 4,360 (TRAINING.json: 145 on 64 windows of 256 tokens)
MAX_PERPLEXITY = 500.0
SMALL = {"seq_len": 32, "calibration_windows": 8, "sensitivity_windows": 2, "heldout_windows": 4}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: as fast on this model's small matrices, and on a busy machine two
    threads spin-wait on each other (a forward pass measured 40x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder() -> Path:
    return TINY_LM_DIR


@pytest.fixture(scope="module")
def tokenizer(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


@pytest.fixture(scope="module")
def model(folder: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def test_folder_holds_model_tokenizer_and_record(folder: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "TRAINING.json"):
        assert (folder / name).is_file(), name


def test_tokenizer_is_byte_level_bpe_with_specials(tokenizer) -> None:
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
    assert len(tokenizer) == 4096
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert None not in specials and len(specials) == 3
    ids = tokenizer("Return the value, or None if ünknown.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == (
        "Return the value, or None if ünknown."
    )


def test_is_a_llama_causal_lm_with_grouped_query_attention(model) -> None:
    assert isinstance(model, transformers.LlamaForCausalLM)
    config = model.config
    assert config.num_key_value_heads < config.num_attention_heads
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.out_features < attention.q_proj.out_features
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_weights_fit_20_mb(folder: Path) -> None:
    assert (folder / "model.safetensors").stat().st_size <= MAX_BYTES


def test_it_has_learned_held_out_text(model, tokenizer) -> None:
    windows = token_windows(stdlib_texts("heldout"), tokenizer, 128, 8)
    batches = batch_windows(windows, 4, {"input_ids"})
    trained = perplexity(model, batches)
    torch.manual_seed(0)
    untrained = perplexity(transformers.LlamaForCausalLM(model.config).eval(), batches)
    assert trained < MAX_PERPLEXITY < len(tokenizer) / 8
    assert trained < untrained / 8


def test_load_model_resolves_the_name() -> None:
    loaded = load_model("tiny-lm")
    assert isinstance(loaded.model, transformers.LlamaForCausalLM)
    assert not loaded.model.training
    assert loaded.tokenizer is not None and loaded.tokenizer.bos_token == "<s>"
    assert loaded.source == "tiny-lm"
    assert loaded.path == TINY_LM_DIR
    with torch.inference_mode():
        out = loaded.model(**loaded.tokenizer("Return a list of lines.", return_tensors="pt"))
    assert out.logits.shape[-1] == 4096


def test_tune_tiny_lm_exact_bytes_within_budget() -> None:
    original = model_bytes(load_model("tiny-lm").model)
    result = autotune(
        "tiny-lm", "40%", "cpu", search="allocator", sensitivity="local", progress=False, **SMALL
    )
    plan = result.plan
    assert plan.predicted["bytes"] <= 0.4 * original
    assert plan.measured["bytes"] == plan.predicted["bytes"]
    assert model_bytes(result.model) == plan.predicted["bytes"]
    assert result.report.holds() == {"memory": True}
