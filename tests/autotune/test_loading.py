"""Local model folders: safetensors only, their headers and config checked before loading."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from autotune.errors import ModelLoadError
from autotune.loading import load_model, load_skeleton


@pytest.fixture
def no_torch_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any call of torch.load fails the test: no pickle may be opened."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load was called on a pickle")

    monkeypatch.setattr(torch, "load", refuse)


def _folder(tmp_path: Path, source: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(source / "config.json", folder / "config.json")
    return folder


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_a_folder_with_only_pickle_weights_is_refused(
    tmp_path: Path, tiny_bert_dir: Path, no_torch_load: None, name: str
) -> None:
    folder = _folder(tmp_path, tiny_bert_dir)
    torch.save({"w": torch.zeros(2)}, folder / name)
    for load in (load_model, load_skeleton):
        with pytest.raises(ModelLoadError) as info:
            load(folder)
        message = str(info.value)
        assert f"{folder} has only pickle weights ({name})" in message
        assert "safe_serialization=True" in message and "\n" not in message


def test_a_folder_without_weights_is_refused(tmp_path: Path, tiny_bert_dir: Path) -> None:
    folder = _folder(tmp_path, tiny_bert_dir)
    with pytest.raises(ModelLoadError, match=r"holds no model\.safetensors"):
        load_model(folder)


def test_safetensors_beside_a_pickle_are_loaded_and_the_pickle_is_not(
    tmp_path: Path, tiny_bert_dir: Path, no_torch_load: None
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, folder)
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    assert load_model(folder).model is not None


@pytest.mark.parametrize(
    ("header", "length", "fragment"),
    [
        (b"garbage", None, "is not valid JSON"),
        (b"[1]", None, "its header is a list"),
        (json.dumps({"w": {"dtype": "F32", "shape": [1]}}).encode(), None, "no data_offsets"),
        (b"{}", 2**40, "header length 1,099,511,627,776"),
    ],
)
def test_a_bad_safetensors_header_is_named_before_loading(
    tmp_path: Path, tiny_bert_dir: Path, header: bytes, length: int | None, fragment: str
) -> None:
    folder = _folder(tmp_path, tiny_bert_dir)
    size = len(header) if length is None else length
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", size) + header)
    for load in (load_model, load_skeleton):
        with pytest.raises(ModelLoadError) as info:
            load(folder)
        assert str(folder / "model.safetensors") in str(info.value)
        assert fragment in str(info.value)


def test_a_deeply_nested_config_is_one_error(tmp_path: Path, tiny_bert_dir: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, folder)
    (folder / "config.json").write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    with pytest.raises(ModelLoadError, match=r"config\.json nests arrays and objects"):
        load_model(folder)


def test_a_folder_without_tokenizer_files_gives_no_tokenizer_and_a_clear_refusal(
    tmp_path,
) -> None:
    import transformers

    from autotune.calibration import build_calibration
    from autotune.errors import AutotuneError

    config = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=1000, n_positions=64
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.tokenizer is None
    with pytest.raises(AutotuneError, match="no tokenizer was found beside the model"):
        build_calibration(loaded.model, loaded.tokenizer)
