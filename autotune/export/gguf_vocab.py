"""A Hugging Face tokenizer as a GGUF vocabulary that llama.cpp tokenizes text with.

Each kind of vocabulary is a small class that recognises a fast tokenizer by its
``tokenizer.json`` and writes llama.cpp's keys for it:

* byte-level BPE (GPT-2, Llama 3, Qwen2 style) as llama.cpp's ``gpt2`` model: tokens,
  merges, and the pre-tokenizer that splits words with the same expression (a tokenizer
  that splits otherwise is refused: llama.cpp would tokenize text differently). llama.cpp
  never puts a space before the text, as a tokenizer with ``add_prefix_space`` does: such a
  tokenizer's first word differs unless the prompt starts with a space;
* SentencePiece-style BPE with byte fallback (Llama 2, Mistral, TinyLlama style: spaces as
  ``▁``, unknown characters as ``<0xXX>`` byte tokens) as llama.cpp's ``llama`` model, which
  merges the adjacent pair whose joined token scores highest. A token's score is minus the
  rank of the merge that makes it, so llama.cpp merges in the order the BPE model does.

Without a tokenizer the file says ``none`` (llama.cpp then takes token ids only).
"""

from __future__ import annotations

import json
import re
import tempfile
from abc import ABC, abstractmethod
from typing import Any

from autotune.export.base import ExportError

SPACE = "\u2581"  # SentencePiece's visible space
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Vocabulary(ABC):
    """One kind of tokenizer and how llama.cpp holds it."""

    description: str

    @abstractmethod
    def matches(self, spec: dict[str, Any]) -> bool:
        """Whether the tokenizer described by ``spec`` (its ``tokenizer.json``) is this kind."""

    @abstractmethod
    def write(self, writer: Any, tokenizer: Any, spec: dict[str, Any], vocab_size: int) -> None:
        """Write the vocabulary's keys."""


def _parts(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """A normalizer or pre-tokenizer as its list of steps (a ``Sequence`` unpacked)."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [p for child in node.get(key, []) for p in _parts(child, key)]
    return [node]


def _kinds(tokenizer: Any, vocab_size: int, byte_tokens: bool) -> tuple[list[str], list[Any]]:
    """Every id's token text (``[PADi]`` where the tokenizer has none) and llama.cpp type."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = {str(t) for t in tokenizer.all_special_tokens}
    added = {str(t) for t in tokenizer.get_added_vocab()}
    unknown = getattr(tokenizer, "unk_token", None)
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        if token == unknown:
            types.append(gguf.TokenType.UNKNOWN)
        elif token in special:
            types.append(gguf.TokenType.CONTROL)
        elif token in added:
            types.append(gguf.TokenType.USER_DEFINED)
        elif byte_tokens and BYTE_TOKEN.fullmatch(token):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _special_ids(writer: Any, tokenizer: Any, vocab_size: int, merges: bool) -> None:
    """Begin/end/unknown/padding ids and whether to add them, as gguf reads them from the
    saved tokenizer (and the merges, for BPE models that llama.cpp merges by rank)."""
    import gguf

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        gguf.SpecialVocab(folder, load_merges=merges, n_vocab=vocab_size).add_to_gguf(writer)


# the word-splitting expressions of byte-level BPE tokenizers (their tokenizer.json's
# ``Split`` step before a ``ByteLevel`` one without its own expression) -> the name of
# llama.cpp's pre-tokenizer that splits the same way
SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


class ByteLevelBPE(Vocabulary):
    description = "byte-level BPE splitting words as GPT-2, Llama 3 or Qwen2 do"

    def matches(self, spec: dict[str, Any]) -> bool:
        return spec["model"].get("type") == "BPE" and self._pre(spec) is not None

    @staticmethod
    def _pre(spec: dict[str, Any]) -> str | None:
        """llama.cpp's pre-tokenizer that splits words as ``spec`` does, if it has one."""
        steps = _parts(spec.get("pre_tokenizer"), "pretokenizers")
        kinds = [s.get("type") for s in steps]
        if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
            return "gpt-2"  # ByteLevel's own expression is GPT-2's
        if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
            return SPLITS.get(steps[0].get("pattern", {}).get("Regex", ""))
        return None

    def write(self, writer: Any, tokenizer: Any, spec: dict[str, Any], vocab_size: int) -> None:
        steps = _parts(spec.get("pre_tokenizer"), "pretokenizers")
        prefix = any(s.get("add_prefix_space") for s in steps if s.get("type") == "ByteLevel")
        tokens, types = _kinds(tokenizer, vocab_size, byte_tokens=False)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self._pre(spec))
        writer.add_add_space_prefix(bool(prefix))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        _special_ids(writer, tokenizer, vocab_size, merges=True)


class SentencePieceBPE(Vocabulary):
    description = "SentencePiece-style BPE with byte fallback (Llama 2, Mistral style)"

    def matches(self, spec: dict[str, Any]) -> bool:
        model = spec["model"]
        return (
            model.get("type") == "BPE"
            and bool(model.get("byte_fallback"))
            and self._space_prefix(spec) is not None
        )

    @staticmethod
    def _space_prefix(spec: dict[str, Any]) -> bool | None:
        """Whether a ``▁`` is put before the text; ``None`` where spaces are not ``▁``
        (not SentencePiece-style)."""
        normal = _parts(spec.get("normalizer"), "normalizers")
        replaces = any(
            s.get("type") == "Replace"
            and s.get("pattern", {}).get("String") == " "
            and s.get("content") == SPACE
            for s in normal
        )
        if replaces:
            return any(s.get("type") == "Prepend" and s.get("prepend") == SPACE for s in normal)
        for step in _parts(spec.get("pre_tokenizer"), "pretokenizers"):
            if step.get("type") == "Metaspace" and step.get("replacement") == SPACE:
                if step.get("split", True):
                    return None  # splits words apart first, which llama.cpp's merges do not
                return step.get("prepend_scheme", "always") != "never"
        return None

    def write(self, writer: Any, tokenizer: Any, spec: dict[str, Any], vocab_size: int) -> None:
        import gguf

        tokens, types = _kinds(tokenizer, vocab_size, byte_tokens=True)
        made_by = {}  # token -> rank of the first merge that makes it
        for rank, merge in enumerate(spec["model"].get("merges") or []):
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            made_by.setdefault(left + right, rank)
        scores = [
            -float(made_by[t]) if k == gguf.TokenType.NORMAL and t in made_by else 0.0
            for t, k in zip(tokens, types, strict=True)
        ]
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(bool(self._space_prefix(spec)))
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        _special_ids(writer, tokenizer, vocab_size, merges=False)


VOCABULARIES: tuple[Vocabulary, ...] = (ByteLevelBPE(), SentencePieceBPE())


def write_vocabulary(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """``tokenizer`` as the vocabulary kind it matches, or one line naming those written."""
    if tokenizer is None:
        writer.add_tokenizer_model("none")
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {"model": {}}
    for vocabulary in VOCABULARIES:
        if vocabulary.matches(spec):
            vocabulary.write(writer, tokenizer, spec, vocab_size)
            return
    written = "; ".join(v.description for v in VOCABULARIES)
    found = spec["model"].get("type") or type(tokenizer).__name__
    raise ExportError(
        f"--format gguf writes fast tokenizers of these kinds: {written}; this one is "
        f"{found} without either's pre-tokenizer or byte fallback"
    )
