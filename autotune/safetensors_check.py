"""Checking safetensors files before any library reads them.

A safetensors file is an 8-byte little-endian header length, a JSON header, and the tensors'
bytes. :func:`check_safetensors` reads the length and the header alone and refuses a file
whose header is too long for the file, not JSON, or does not describe tensors that fit the
data section: each entry (except ``__metadata__``, a map of strings) has a known ``dtype``,
a ``shape`` of non-negative integers and ``data_offsets`` ``[begin, end]`` in order, within
the data, not overlapping another tensor's, spanning exactly ``dtype`` size x elements.
Nothing is allocated for a tensor before its file passes. Errors are one-line
:class:`ModelLoadError` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.errors import ModelLoadError
from autotune.json_input import parse_json, read_json

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 10**6
MAX_DIMS = 64
METADATA = "__metadata__"
# bits per element of every dtype the safetensors format names
DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are in its file (offsets from the start of the data)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_bytes(shape: list[int], bits: int, data_bytes: int) -> int | None:
    """Bytes of a tensor of ``shape``, or ``None`` when they exceed ``data_bytes`` (or are
    not whole bytes)."""
    numel = 1
    for dim in shape:
        numel *= dim
        if numel * bits > 8 * data_bytes:
            return None
    return None if (numel * bits) % 8 else numel * bits // 8


def _entry(name: str, info: Any, data_bytes: int, fault: Any) -> TensorInfo:
    """One header entry checked against a data section of ``data_bytes`` bytes."""
    if not isinstance(info, dict):
        raise fault(f"entry {name!r} is a {type(info).__name__}, not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise fault(f"tensor {name!r} has no {missing[0]}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise fault(f"tensor {name!r} has dtype {dtype!r}; allowed: {', '.join(DTYPE_BITS)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(_is_int(d) and d >= 0 for d in shape)
    ):
        raise fault(
            f"tensor {name!r} has shape {shape!r}; allowed: a list of at most {MAX_DIMS} "
            "non-negative integers"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_bytes
    ):
        raise fault(
            f"tensor {name!r} has data_offsets {offsets!r}; allowed: [begin, end] with "
            f"0 <= begin <= end <= {data_bytes:,} (the bytes after the header)"
        )
    size = _tensor_bytes(shape, DTYPE_BITS[dtype], data_bytes)
    if size != offsets[1] - offsets[0]:
        raise fault(
            f"tensor {name!r} spans {offsets[1] - offsets[0]:,} bytes, but a {dtype} tensor "
            f"of shape {shape} takes {'more than the file holds' if size is None else size}"
        )
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def _check_overlaps(tensors: dict[str, TensorInfo], fault: Any) -> None:
    previous: tuple[str, TensorInfo] | None = None
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if previous is not None and info.begin < previous[1].end and info.begin < info.end:
            raise fault(f"tensors {previous[0]!r} and {name!r} overlap in the data section")
        if info.begin < info.end:
            previous = (name, info)


def check_header(header: Any, data_bytes: int, origin: str) -> dict[str, TensorInfo]:
    """The tensors a parsed header describes, checked against ``data_bytes`` of data."""

    def fault(text: str) -> ModelLoadError:
        return ModelLoadError(f"{origin} is not a valid safetensors file: {text}")

    if not isinstance(header, dict):
        raise fault(f"its header is a {type(header).__name__}, not an object")
    metadata = header.get(METADATA, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fault(f"{METADATA} must map names to strings")
    tensors = {
        name: _entry(name, info, data_bytes, fault)
        for name, info in header.items()
        if name != METADATA
    }
    _check_overlaps(tensors, fault)
    return tensors


def check_safetensors(path: str | Path) -> dict[str, TensorInfo]:
    """The tensors of the safetensors file at ``path``, read from its header alone, or a
    :class:`ModelLoadError` naming the file and what is wrong with it."""
    file = Path(path)
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelLoadError(
                    f"{file} is not a valid safetensors file: it is {size} bytes long, "
                    "shorter than the 8-byte header length"
                )
            length = int.from_bytes(prefix, "little")
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise ModelLoadError(
                    f"{file} is not a valid safetensors file: its header length {length:,} "
                    f"exceeds the {max(size - 8, 0):,} bytes after it or the limit of "
                    f"{MAX_HEADER_BYTES:,}"
                )
            raw = handle.read(length)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {file}: {exc.strerror or exc}") from None
    header = parse_json(
        raw, f"the safetensors header of {file}", ModelLoadError, max_bytes=MAX_HEADER_BYTES
    )
    return check_header(header, size - 8 - length, str(file))


def _shard_names(index: Path) -> list[str]:
    data = read_json(index, ModelLoadError, what="safetensors index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelLoadError(f"{index} has no weight_map of tensor names to file names")
    names = sorted(set(weight_map.values()))
    for name in names:
        part = Path(name)
        if part.is_absolute() or ".." in part.parts or not name.endswith(".safetensors"):
            raise ModelLoadError(
                f"{index} names the file {name!r}; allowed: .safetensors files in its folder"
            )
    return names


def safetensors_files(folder: str | Path) -> list[Path]:
    """The safetensors files a model folder's weights are in: the shards its index lists,
    else ``model.safetensors``, else none."""
    root = Path(folder)
    if (root / INDEX).is_file():
        files = [root / name for name in _shard_names(root / INDEX)]
        absent = [f for f in files if not f.is_file()]
        if absent:
            raise ModelLoadError(f"{root / INDEX} lists {absent[0].name}, which is not in {root}")
        return files
    return [root / WEIGHTS] if (root / WEIGHTS).is_file() else []


def check_folder(folder: str | Path) -> list[Path]:
    """Check every safetensors file of a model folder (see :func:`safetensors_files`) and
    return them."""
    files = safetensors_files(folder)
    for file in files:
        check_safetensors(file)
    return files
