"""llama.cpp's own quantizer and decoders, called in the ``libggml-base`` that
``llama-cpp-python`` ships.

``ggml_quantize_chunk`` is the function ``llama-quantize`` runs on every tensor, so codes made
here are the codes llama.cpp would write, bit for bit, with or without an importance matrix.
Only K- and i-quants need it (``gguf`` encodes the 32-wide legacy types in NumPy); without
``llama-cpp-python`` those types are refused in one line that says how to install it. Its
``to_float`` decoders give the floats of ``gguf``'s NumPy decoders, bit for bit and several
times faster; autotune's GGUF layers decode with them where they are present.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import itertools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from methods.errors import OptionError

INSTALL_HINT = "pip install 'autotune[llama]' (llama-cpp-python, which builds llama.cpp)"
# weights per thread below which a tensor is quantised in one call (a thread costs more)
MIN_CHUNK = 1 << 16


@functools.cache
def _library() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    found = sorted(lib_dir.glob("libggml-base.*"))
    if not found:
        return None
    lib = ctypes.CDLL(str(found[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


class _TypeTraits(ctypes.Structure):
    """``struct ggml_type_traits`` (ggml.h)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_ToFloat = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@functools.cache
def _decoder(ggml_type: int) -> Any:
    """llama.cpp's ``to_float`` of ``ggml_type``, or ``None`` where it has none."""
    traits = _lib("decoding").ggml_get_type_traits(ggml_type).contents
    return _ToFloat(traits.to_float) if traits.to_float else None


def dequantize(blocks: np.ndarray, ggml_type: int, cols: int) -> np.ndarray | None:
    """``[rows, cols]`` float32 from rows of ``ggml_type`` bytes (``[rows, row_size]``),
    decoded by llama.cpp's own ``to_float`` (the same floats as ``gguf``'s NumPy decoders,
    which a test checks, several times faster); ``None`` where llama.cpp has no decoder."""
    decoder = _decoder(ggml_type) if available() else None
    if decoder is None:
        return None
    src = np.ascontiguousarray(blocks, dtype=np.uint8)
    out = np.empty((src.shape[0], cols), dtype=np.float32)
    decoder(src.ctypes.data, out.ctypes.data, out.size)
    return out


def available() -> bool:
    """Whether llama.cpp's quantizer can be called here."""
    return _library() is not None


def _lib(what: str) -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise OptionError(f"{what} needs llama.cpp's quantizer: {INSTALL_HINT}")
    return lib


def row_size(ggml_type: int, cols: int) -> int:
    """llama.cpp's bytes for one row of ``cols`` weights of ``ggml_type``."""
    return int(_lib("ggml_row_size").ggml_row_size(ggml_type, cols))


def requires_imatrix(ggml_type: int) -> bool:
    return bool(_lib("an importance check").ggml_quantize_requires_imatrix(ggml_type))


def quantize(
    weight: np.ndarray,
    ggml_type: int,
    imatrix: np.ndarray | None = None,
    what: str = "quantize",
    threads: int | None = None,
) -> np.ndarray:
    """Rows of ``weight`` (``[rows, cols]`` float32) as llama.cpp stores them in
    ``ggml_type``: ``[rows, row_size]`` bytes. ``imatrix`` (``[cols]``) weighs each column's
    error as ``llama-quantize --imatrix`` does. Rows are split among ``threads`` (torch's
    thread count by default) as ``llama-quantize`` splits them: the same bytes either way."""
    lib = _lib(what)
    src = np.ascontiguousarray(weight, dtype=np.float32)
    rows, cols = src.shape
    row_bytes = int(lib.ggml_row_size(ggml_type, cols))
    out = np.zeros((rows, row_bytes), dtype=np.uint8)
    importance = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    if importance is not None and importance.shape != (cols,):
        raise ValueError(f"an importance matrix has one value per column ({cols})")
    weights = None if importance is None else importance.ctypes.data

    def chunk(first: int, count: int) -> int:
        # ``start`` counts elements; llama.cpp writes the rows from ``first`` on
        return int(
            lib.ggml_quantize_chunk(
                ggml_type, src.ctypes.data, out.ctypes.data, first * cols, count, cols, weights
            )
        )

    workers = min(threads or torch.get_num_threads(), max(1, rows * cols // MIN_CHUNK))
    bounds = np.linspace(0, rows, workers + 1).astype(int)
    spans = [(a, b - a) for a, b in itertools.pairwise(bounds) if b > a]
    if len(spans) == 1:
        written = chunk(*spans[0])
    else:  # rows are quantised independently; ctypes releases the GIL in the call
        with ThreadPoolExecutor(len(spans)) as pool:
            written = sum(pool.map(lambda span: chunk(*span), spans))
    if written != out.nbytes:
        raise RuntimeError(f"llama.cpp wrote {written} bytes, expected {out.nbytes}")
    return out
