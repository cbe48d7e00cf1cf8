"""The tokenizer in a GGUF file: llama.cpp tokenizes held-out text into the ids the Hugging
Face tokenizer gives, for byte-level BPE and for SentencePiece-style BPE with byte fallback
(normalizer and Metaspace forms); other tokenizers are refused in one line."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from autotune.calibration import stdlib_texts
from autotune.export import ExportError, export_plan
from autotune.plan import Plan
from methods import ggml_quantizer
from tests.autotune.export.test_gguf import make_model

FLOAT = Plan(layers={"_default": {"method": "none"}})
SPACE = "\u2581"
# text with runs of spaces, newlines, tabs, digits, accents and symbols the trained
# vocabularies lack (those fall back to bytes)
ODD = ["  two  spaces\tand a tab\n\nnew lines", "caf\u00e9 na\u00efve \u2713 \u03bb 12345", "x"]


def sentencepiece_tokenizer(style: str):
    """A SentencePiece-style BPE tokenizer (1,024 tokens: ``<unk>``, ``<s>``, ``</s>``, 256
    byte tokens, merges) trained on the calibration docstrings, in Llama 2's form (spaces
    replaced by a normalizer) or the newer Metaspace form."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=specials, limit_alphabet=120, show_progress=False
    )
    backend.train_from_iterator(itertools.islice(stdlib_texts("calibration"), 1500), trainer)
    if style == "normalizer":  # Llama 2's tokenizer.json
        backend.pre_tokenizer = None
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return transformers.LlamaTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
    )


def byte_level_tokenizer(split: str):
    """A byte-level BPE tokenizer (1,024 tokens) that splits words with the expression of
    Llama 3's or Qwen2's tokenizer.json, trained on the calibration docstrings."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from autotune.export.gguf_vocab import SPLITS

    pattern = next(p for p, name in SPLITS.items() if name == split)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(itertools.islice(stdlib_texts("calibration"), 1500), trainer)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>"
    )


def tokenizer_of(kind: str, bpe_tokenizer):
    if kind == "tiny-lm":
        return bpe_tokenizer
    if kind in ("llama-bpe", "qwen2"):
        return byte_level_tokenizer(kind)
    return sentencepiece_tokenizer(kind)


def llama_cpp_ids(path: Path, texts: list[str]) -> list[list[int]]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(t.encode(), add_bos=True, special=False) for t in texts]
    finally:
        llm.close()


def heldout() -> list[str]:
    return list(itertools.islice(stdlib_texts("heldout"), 300)) + ODD


@pytest.mark.skipif(not ggml_quantizer.available(), reason="llama.cpp is not installed")
@pytest.mark.parametrize("kind", ["tiny-lm", "llama-bpe", "qwen2", "normalizer", "metaspace"])
def test_llama_cpp_tokenizes_as_the_tokenizer_does(kind: str, bpe_tokenizer, tmp_path) -> None:
    tokenizer = tokenizer_of(kind, bpe_tokenizer)
    model = make_model(vocab_size=len(tokenizer))
    export_plan(FLOAT, model, "gguf", tmp_path / "m.gguf", tokenizer=tokenizer)
    texts = heldout()
    if kind == "metaspace":  # Metaspace puts no space before a text that starts with one,
        texts = [t for t in texts if not t.startswith(" ")]  # SentencePiece and llama.cpp do
    ours = [tokenizer(t)["input_ids"] for t in texts]
    # llama.cpp's byte-level BPE never puts a space before the text, as tiny-lm's tokenizer
    # does (add_prefix_space, where the text does not start with one): it is given that space
    given = [" " + t if kind == "tiny-lm" and not t.startswith(" ") else t for t in texts]
    theirs = llama_cpp_ids(tmp_path / "m.gguf", given)
    differ = [t for t, a, b in zip(texts, ours, theirs, strict=True) if a != b]
    assert not differ, f"{len(differ)} of {len(texts)} texts differ, e.g. {differ[0]!r}"
    if kind in ("normalizer", "metaspace"):  # the fallback to byte tokens is exercised
        assert "<0xE2>" in {t for ids in ours for t in tokenizer.convert_ids_to_tokens(ids)}


def test_a_tokenizer_of_another_kind_is_refused(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="writes fast tokenizers of these kinds: byte-level"):
        export_plan(FLOAT, make_model(), "gguf", tmp_path / "m.gguf", tokenizer=tokenizer)
    assert list(tmp_path.iterdir()) == []
