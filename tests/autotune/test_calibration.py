from __future__ import annotations

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
    held = set(_take(stdlib_texts("heldout"), 200))
    assert calib and held
    assert not calib & held
    assert _take(stdlib_texts("calibration"), 50) == _take(stdlib_texts("calibration"), 50)
    assert all("test" not in p.parts for p in stdlib_files())


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
    held_rows = {tuple(r.tolist()) for b in calib.heldout for r in b["input_ids"]}
    calib_rows = {tuple(r.tolist()) for b in calib.calibration for r in b["input_ids"]}
    assert not held_rows & calib_rows
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
    file = tmp_path / "corpus.txt"
    file.write_text("\n\n".join(texts))
    from_file = build_calibration(model, tokenizer, file, seq_len=32, calibration_windows=4)
    assert from_file.description["source"] == str(file)
    assert build_heldout(model, tokenizer, file, seq_len=32, windows=2)


def test_user_batches_are_used_as_given() -> None:
    import torch

    batches = [{"input_ids": torch.randint(0, 100, (2, 8))} for _ in range(4)]
    calib = build_calibration(make_tiny_bert(), None, batches)
    assert len(calib.calibration) + len(calib.heldout) == 4


@pytest.mark.parametrize(
    ("calibration", "fragment"),
    [
        ("/nonexistent/corpus.txt", "does not exist"),
        ([1, 2, 3], "list of strings"),
        (["too short"], "not enough calibration text"),
    ],
)
def test_unusable_calibration(tokenizer, calibration, fragment: str) -> None:
    with pytest.raises(CalibrationError, match=fragment):
        build_calibration(make_tiny_bert(), tokenizer, calibration, seq_len=64)


def test_no_tokenizer_needs_batches() -> None:
    with pytest.raises(CalibrationError, match="no tokenizer"):
        build_calibration(make_tiny_bert(), None)
