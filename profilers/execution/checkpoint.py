"""A model folder's safetensors tensors, read one at a time, and models built without memory.

:class:`Checkpoint` indexes the tensors of ``model.safetensors`` or of the shards an index
lists, from their headers only (checked against the file's size before they are read), and
reads one tensor's bytes at a time: no file is mapped whole. :func:`parameters_on_meta`
builds a model with every parameter on the ``meta`` device, so that a model larger than
memory can be built and then filled a block at a time (:mod:`profilers.execution.streaming`).
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

MAX_HEADER_BYTES = 100_000_000  # as the safetensors format itself allows


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match the model."""


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the offset where its data starts."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > min(MAX_HEADER_BYTES, size - 8):  # checked before reading it
                raise CheckpointError(
                    f"the safetensors header of {path} claims {length:,} bytes; the file has "
                    f"{max(size - 8, 0):,} after its length field"
                )
            header = json.loads(handle.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"cannot read the safetensors header of {path}: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"the safetensors header of {path} is not a JSON object")
    return header, 8 + length


def _entry(path: Path, name: str, info: Any, start: int) -> _Entry:
    """One header entry, or a :class:`CheckpointError` naming what is wrong with it."""
    try:
        dtype = _DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        first, last = (int(v) for v in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"{path}: tensor {name!r} needs a known dtype, a shape and two data_offsets"
        ) from None
    if min(shape, default=0) < 0 or not 0 <= first <= last:
        raise CheckpointError(f"{path}: tensor {name!r} has a negative shape or offsets")
    return _Entry(path, dtype, shape, start + first, last - first)


class Checkpoint:
    """The tensors of a model folder's safetensors files: ``model.safetensors``, or shards
    listed by ``model.safetensors.index.json``. Tensors are read one at a time."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"cannot read {index}: {exc}") from None
            files = sorted({self.folder / name for name in weight_map.values()})
        elif (self.folder / WEIGHTS).is_file():
            files = [self.folder / WEIGHTS]
        else:
            raise CheckpointError(
                f"{self.folder} holds no {WEIGHTS} or {INDEX}: streaming reads safetensors "
                "only (pickled .bin checkpoints are never loaded)"
            )
        self.entries: dict[str, _Entry] = {}
        for path in files:
            header, start = read_header(path)
            for name, info in header.items():
                if name != "__metadata__":
                    self.entries[name] = _entry(path, name, info, start)

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor in the checkpoint."""
        return sum(entry.nbytes for entry in self.entries.values())

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read from disk into memory of its own."""
        entry = self.entries[name]
        data = torch.empty(entry.nbytes, dtype=torch.uint8)
        with open(entry.path, "rb") as handle:
            handle.seek(entry.offset)
            if handle.readinto(memoryview(data.numpy())) != entry.nbytes:
                raise CheckpointError(f"{entry.path} is truncated: cannot read {name!r}")
        return data.view(entry.dtype).reshape(entry.shape)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside put every parameter on the ``meta`` device as it is registered
    (no memory, no initialisation cost); buffers are computed as usual, so non-persistent
    ones (rotary frequencies, position ids) hold their real values."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]
