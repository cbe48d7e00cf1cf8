"""Safetensors headers checked before any tensor is read: one error line naming the file."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from autotune.errors import ModelLoadError
from autotune.safetensors_check import (
    check_folder,
    check_header,
    check_safetensors,
    safetensors_files,
)


def _write(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", size) + raw + data)
    return path


def _refused(path: Path, fragment: str) -> None:
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        check_safetensors(path)
    assert time.perf_counter() - started < 1.0
    message = str(info.value)
    assert str(path) in message and fragment in message, message
    assert "\n" not in message


def test_a_real_file_passes_with_its_tensors(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    tensors = {"a": torch.zeros(3, 4), "b": torch.ones(5, dtype=torch.int8), "e": torch.zeros(0)}
    safetensors.torch.save_file(tensors, str(file), metadata={"format": "pt"})
    found = check_safetensors(file)
    assert set(found) == {"a", "b", "e"}
    assert found["a"].dtype == "F32" and found["a"].shape == (3, 4)
    assert found["a"].end - found["a"].begin == 48


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("header", "data", "fragment"),
    [
        (b"\xff\xfe garbage", b"", "not UTF-8 text"),
        (b"{garbage", b"", "not valid JSON"),
        (b"[1, 2, 3]", b"", "its header is a list, not an object"),
        (b"[" * 100_000, b"", "more than 64 deep"),
        ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "tensor 'w' has no data_offsets"),
        ({"w": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "has no dtype"),
        ({"w": [1, 2]}, b"", "entry 'w' is a list, not an object"),
        ({"w": F32_2 | {"dtype": "F128"}}, b"\0" * 8, "dtype 'F128'; allowed: BOOL"),
        ({"w": F32_2 | {"shape": [-2]}}, b"\0" * 8, "shape [-2]"),
        ({"w": F32_2 | {"shape": [True, 2]}}, b"\0" * 8, "non-negative integers"),
        ({"w": F32_2 | {"shape": "2"}}, b"\0" * 8, "shape '2'"),
        ({"w": F32_2 | {"data_offsets": [8, 0]}}, b"\0" * 8, "data_offsets [8, 0]"),
        ({"w": F32_2 | {"data_offsets": [0, 16]}}, b"\0" * 8, "<= 8 (the bytes after"),
        ({"w": F32_2 | {"data_offsets": [0]}}, b"\0" * 8, "data_offsets [0]"),
        ({"w": F32_2 | {"data_offsets": [0.0, 8]}}, b"\0" * 8, "data_offsets [0.0, 8]"),
        ({"w": F32_2 | {"shape": [3]}}, b"\0" * 8, "takes more than the file holds"),
        ({"w": F32_2 | {"shape": [1]}}, b"\0" * 8, "spans 8 bytes, but a F32 tensor"),
        ({"w": F32_2 | {"shape": [10**20, 10**20]}}, b"\0" * 8, "more than the file holds"),
        (
            {"a": F32_2, "b": F32_2 | {"data_offsets": [4, 12]}},
            b"\0" * 12,
            "tensors 'a' and 'b' overlap",
        ),
        ({"__metadata__": {"format": 1}}, b"", "__metadata__ must map names to strings"),
        ({"__metadata__": [1]}, b"", "__metadata__ must map names to strings"),
    ],
)
def test_bad_headers_are_refused(
    tmp_path: Path, header: object, data: bytes, fragment: str
) -> None:
    _refused(_write(tmp_path / "model.safetensors", header, data), fragment)


def test_a_header_length_of_2_to_the_40_is_refused_before_reading(tmp_path: Path) -> None:
    file = _write(tmp_path / "model.safetensors", b"{}", length=2**40)
    _refused(file, "header length 1,099,511,627,776 exceeds the 2 bytes after it")


def test_a_header_longer_than_the_file_is_refused(tmp_path: Path) -> None:
    _refused(_write(tmp_path / "m.safetensors", b"{}", length=3), "exceeds the 2 bytes")


def test_a_file_shorter_than_the_length_field_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "m.safetensors"
    file.write_bytes(b"\x01\x02")
    _refused(file, "shorter than the 8-byte header length")


def test_sub_byte_and_empty_tensors() -> None:
    header = {
        "f4": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]},
        "e": {"dtype": "F32", "shape": [0, 5], "data_offsets": [2, 2]},
    }
    assert set(check_header(header, 2, "x")) == {"f4", "e"}
    with pytest.raises(ModelLoadError, match="F4 tensor of shape"):
        check_header({"f4": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, 2, "x")


def _index(folder: Path, weight_map: object) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_folder_files_come_from_the_index_and_are_checked(tmp_path: Path) -> None:
    safetensors.torch.save_file({"a": torch.zeros(2)}, str(tmp_path / "one.safetensors"))
    _write(tmp_path / "two.safetensors", [1])
    _index(tmp_path, {"a": "one.safetensors"})
    assert check_folder(tmp_path) == [tmp_path / "one.safetensors"]
    _index(tmp_path, {"a": "one.safetensors", "b": "two.safetensors"})
    with pytest.raises(ModelLoadError, match=r"two\.safetensors is not a valid safetensors"):
        check_folder(tmp_path)


@pytest.mark.parametrize(
    ("weight_map", "fragment"),
    [
        ({"a": "../outside.safetensors"}, "allowed: .safetensors files in its folder"),
        ({"a": "/etc/passwd"}, "allowed: .safetensors files in its folder"),
        ({"a": "weights.bin"}, "allowed: .safetensors files in its folder"),
        ({"a": "absent.safetensors"}, "lists absent.safetensors, which is not in"),
        ({"a": 3}, "no weight_map"),
        ([1], "no weight_map"),
    ],
)
def test_bad_indexes_are_refused(tmp_path: Path, weight_map: object, fragment: str) -> None:
    _index(tmp_path, weight_map)
    with pytest.raises(ModelLoadError, match="index") as info:
        safetensors_files(tmp_path)
    assert fragment in str(info.value)


def test_a_deeply_nested_index_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text("[" * 100_000)
    with pytest.raises(ModelLoadError, match="more than 64 deep"):
        safetensors_files(tmp_path)


def test_a_folder_without_safetensors_has_none(tmp_path: Path) -> None:
    assert check_folder(tmp_path) == []
