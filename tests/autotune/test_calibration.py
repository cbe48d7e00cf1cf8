from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from autotune.calibration import (
    build_calibration,
    build_heldout,
    special_tokens,
    stdlib_files,
    stdlib_texts,
    token_windows,
)
from autotune.errors import CalibrationError
from tests.conftest import make_tiny_bert


def test_stdlib_splits_are_disjoint_and_deterministic() -> None:
    calib = set(_take(stdlib_texts("calibration"), 200))
    select = set(_take(stdlib_texts("selection"), 200))
    held = set(_take(stdlib_texts("heldout"), 200))
    assert calib and select and held
    assert not calib & held and not calib & select and not select & held
    with pytest.raises(ValueError, match="allowed: calibration, selection, heldout"):
        next(stdlib_texts("test"))
    assert _first_texts_in_a_fresh_process("1") == _first_texts_in_a_fresh_process("2")
    assert all("test" not in p.parts for p in stdlib_files())


def _first_texts_in_a_fresh_process(hash_seed: str) -> str:
    """The first calibration texts as another process (with its own string hashing) sees
    them: the splits must not depend on set or dict order."""
    script = (
        "from autotune.calibration import stdlib_texts\n"
        "from itertools import islice\n"
        "print(repr([t[:40] for t in islice(stdlib_texts('calibration'), 50)]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    return done.stdout


def _take(iterator, n: int) -> list[str]:
    return [text for _, text in zip(range(n), iterator, strict=False)]


def test_windows_have_exact_length_and_special_tokens(tokenizer) -> None:
    prefix, suffix = special_tokens(tokenizer)
    assert prefix == [tokenizer.cls_token_id] and suffix == [tokenizer.sep_token_id]
    windows = token_windows(stdlib_texts("calibration"), tokenizer, 32, 5)
    assert len(windows) == 5
    assert all(len(w) == 32 and w[0] == prefix[0] and w[-1] == suffix[0] for w in windows)


def test_default_calibration_set(tokenizer) -> None:
    model = make_tiny_bert()
    calib = build_calibration(
        model, tokenizer, seq_len=64, calibration_windows=10, heldout_windows=4, batch_size=4
    )
    assert sum(b["input_ids"].shape[0] for b in calib.calibration) == 10
    assert sum(b["input_ids"].shape[0] for b in calib.heldout) == 4
    assert calib.sensitivity[0]["input_ids"].shape == (4, 64)
    assert set(calib.calibration[0]) == {"input_ids", "attention_mask", "token_type_ids"}
    rows = {
        split: {tuple(r.tolist()) for b in getattr(calib, split) for r in b["input_ids"]}
        for split in ("calibration", "selection", "heldout")
    }
    assert len(rows["selection"]) == 8  # the default selection windows
    assert not rows["heldout"] & rows["calibration"]
    assert not rows["selection"] & (rows["calibration"] | rows["heldout"])
    assert calib.description["selection_windows"] == 8
    assert calib.description["source"] == "python-stdlib-docstrings"
    latency = calib.latency_inputs(2, 16)
    assert latency["input_ids"].shape == (2, 16)


def test_sequence_length_is_capped_by_the_model(tokenizer) -> None:
    model = make_tiny_bert()  # 128 positions
    calib = build_calibration(
        model, tokenizer, seq_len=4096, calibration_windows=2, heldout_windows=2
    )
    assert calib.calibration[0]["input_ids"].shape[1] == 128


def test_user_texts_and_files(tokenizer, tmp_path: Path) -> None:
    texts = [f"paragraph {i} " + "lorem ipsum dolor sit amet " * 20 for i in range(12)]
    model = make_tiny_bert()
    calib = build_calibration(
        model, tokenizer, texts, seq_len=32, calibration_windows=4, heldout_windows=2
    )
    assert calib.description["source"] == "user texts"
    # each split holds windows of its own texts only: paragraph numbers tell them apart
    numbers = {
        split: {
            int(tokenizer.decode(row[1:4]).split()[1])
            for b in getattr(calib, split)
            for row in b["input_ids"].tolist()
            if tokenizer.decode(row[1:3]).startswith("paragraph")
        }
        for split in ("calibration", "selection", "heldout")
    }
    assert numbers["calibration"] <= {0, 2, 4, 6, 8, 10}
    assert numbers["selection"] and numbers["selection"] <= {1, 5, 9}
    assert numbers["heldout"] and numbers["heldout"] <= {3, 7, 11}
    file = tmp_path / "corpus.txt"
    file.write_text("\n\n".join(texts))
    from_file = build_calibration(model, tokenizer, file, seq_len=32, calibration_windows=4)
    assert from_file.description["source"] == str(file)
    assert build_heldout(model, tokenizer, file, seq_len=32, windows=2)


def test_user_batches_are_used_as_given() -> None:
    import torch

    batches = [{"input_ids": torch.randint(0, 100, (2, 8))} for _ in range(4)]
    calib = build_calibration(make_tiny_bert(), None, batches)
    assert [calib.calibration, calib.selection, calib.heldout] == [
        batches[:2],
        batches[2:3],
        batches[3:],
    ]
    with pytest.raises(CalibrationError, match="need at least 3"):
        build_calibration(make_tiny_bert(), None, batches[:2])
    given = build_calibration(make_tiny_bert(), None, batches[:2], heldout=batches[2:])
    assert (given.calibration, given.selection, given.heldout) == (
        batches[:1],
        batches[1:2],
        batches[2:],
    )


@pytest.mark.parametrize(("count", "heldout", "needed"), [(3, None, 4), (1, ["held out"], 2)])
def test_too_few_texts_for_disjoint_splits_are_refused(
    tokenizer, count: int, heldout, needed: int
) -> None:
    texts = ["lorem ipsum dolor sit amet " * 40] * count
    with pytest.raises(CalibrationError, match=f"{count} calibration text.*at least {needed}"):
        build_calibration(make_tiny_bert(), tokenizer, texts, heldout=heldout, seq_len=32)


@pytest.mark.parametrize(
    ("calibration", "fragment"),
    [
        ("/nonexistent/corpus.txt", "does not exist"),
        ([1, 2, 3], "list of strings"),
        (["too short"] * 4, "not enough text .* calibration and selection and heldout"),
    ],
)
def test_unusable_calibration(tokenizer, calibration, fragment: str) -> None:
    with pytest.raises(CalibrationError, match=fragment):
        build_calibration(make_tiny_bert(), tokenizer, calibration, seq_len=64)


def test_no_tokenizer_needs_batches() -> None:
    with pytest.raises(CalibrationError, match="no tokenizer"):
        build_calibration(make_tiny_bert(), None)


def test_a_model_without_segment_embeddings_gets_no_token_type_ids(tokenizer) -> None:
    """GPT-2's forward takes ``token_type_ids`` but looks them up in its token table: batches
    carry none, so the model computes on them what it computes in use."""
    import torch
    import transformers

    config = transformers.GPT2Config(
        vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=64
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    calib = build_calibration(model, tokenizer, seq_len=16, calibration_windows=2)
    batch = calib.calibration[0]
    assert set(batch) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"]).logits
        assert torch.equal(model(**batch).logits, plain)
