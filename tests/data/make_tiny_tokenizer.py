"""Build ``tests/data/tiny_tokenizer.json``: a small BERT-style WordPiece tokenizer for the
test models built from configs, so that no test needs the demo package for a tokenizer.

Trained offline with the ``tokenizers`` library on the calibration split of the standard
library's docstrings (as the demo would calibrate), lower-cased, with BERT's special tokens
and its ``[CLS] text [SEP]`` template. The trainer's merges may differ from run to run, so
the file is shipped rather than built by the tests.

Usage: ``.venv/bin/python tests/data/make_tiny_tokenizer.py``.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import WordPieceTrainer

from autotune.calibration import stdlib_texts

OUT = Path(__file__).resolve().parent / "tiny_tokenizer.json"
VOCAB = 3072
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0 to 4


def build() -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = WordPieceTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, min_frequency=2)
    tokenizer.train_from_iterator(sorted(stdlib_texts("calibration")), trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return tokenizer


if __name__ == "__main__":
    build().save(str(OUT), pretty=False)
    print(f"{OUT}: {OUT.stat().st_size} bytes")
