from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from autotune.apply import apply_plan
from autotune.errors import ModelLoadError
from autotune.io import atomic_directory
from autotune.plan import Plan
from autotune.saved import load_compressed, save_compressed
from profilers.measure import state_dict_bytes
from tests.conftest import make_tiny_bert

PLAN = Plan(
    layers={
        "_default": {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False},
        "pooler.dense": {"method": "rtn", "bits": 8, "group_size": None, "symmetric": False},
    }
)


def _tensor_bytes(path: Path) -> int:
    raw = path.read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_size])
    return len(raw) - 8 - header_size, header


def test_round_trip_is_bit_identical(tmp_path: Path, tokenizer) -> None:
    compressed = apply_plan(make_tiny_bert(), PLAN)
    ids = torch.randint(1000, 2000, (2, 9))
    with torch.inference_mode():
        compressed(input_ids=ids[:1, :4])  # switch int4 layers to the kernel layout first
        expected = compressed(input_ids=ids).last_hidden_state
    out = save_compressed(compressed, PLAN, tmp_path / "saved", tokenizer)
    assert {"model.safetensors", "plan.json", "config.json"} <= {p.name for p in out.iterdir()}
    reloaded = load_compressed(out)
    with torch.inference_mode():
        got = reloaded(input_ids=ids).last_hidden_state
    assert torch.equal(expected, got)


def test_file_holds_exactly_the_state_bytes(tmp_path: Path) -> None:
    compressed = apply_plan(make_tiny_bert(), PLAN)
    out = save_compressed(compressed, PLAN, tmp_path / "saved")
    data_bytes, header = _tensor_bytes(out / "model.safetensors")
    assert data_bytes == state_dict_bytes(compressed)
    assert header["__metadata__"]["producer"] == "autotune"


def test_missing_pieces_are_named(tmp_path: Path) -> None:
    compressed = apply_plan(make_tiny_bert(), PLAN)
    out = save_compressed(compressed, PLAN, tmp_path / "saved")
    (out / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"lacks model\.safetensors"):
        load_compressed(out)


def test_a_failed_save_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (b"[1, 2]", "its header is a list"),
        (json.dumps({"w": {"dtype": "F32", "shape": [1]}}).encode(), "no data_offsets"),
        (b"\xff{}", "not UTF-8 text"),
    ],
)
def test_a_corrupt_saved_file_is_named_before_anything_is_read(
    tmp_path: Path, header: bytes, fragment: str
) -> None:
    out = save_compressed(apply_plan(make_tiny_bert(), PLAN), PLAN, tmp_path / "saved")
    weights = out / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ModelLoadError) as info:
        load_compressed(out)
    assert str(weights) in str(info.value) and fragment in str(info.value)


def test_a_saved_folder_with_a_huge_header_length_is_refused(tmp_path: Path) -> None:
    out = save_compressed(apply_plan(make_tiny_bert(), PLAN), PLAN, tmp_path / "saved")
    (out / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ModelLoadError, match="header length 1,099,511,627,776"):
        load_compressed(out)
