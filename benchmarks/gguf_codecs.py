"""llama.cpp's quantizer with a tensor's rows split among threads, and its decoders, against
one call and ``gguf``'s NumPy decoders.

First table: each GGUF type llama.cpp's quantizer encodes (with an importance matrix where
it needs one), on a 1536 x 512 weight (small-lm's feed-forward shape) and a 2048 x 2048
one, timed with one thread and with torch's thread count in alternating rounds (median of
``--rounds``); the bytes are checked equal.

Second table: the same weights decoded to float32 by ``gguf``'s NumPy decoders and by
llama.cpp's ``to_float``, alternating; the floats are checked equal.

Third table: ``autotune(..., runtime="llama.cpp", target="cpu", measure=False)`` on
tiny-lm, no sensitivity cache, as before (the quantizer held to one thread, NumPy decoders)
and as now, alternating (``--tunes`` of each): whole-tune and scoring seconds, and whether
the plans are the same.

Run: ``python benchmarks/gguf_codecs.py`` (about 8 minutes on 2 cores; needs the ``llama``
extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder must not shadow the packages named like its files (methods)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import functools
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from autotune import autotune
from autotune.loading import load_model
from methods import ggml_quantizer
from methods.gguf_types import NUMPY_ENCODERS, allowed_types

SHAPES = ((1536, 512), (2048, 2048))
Weight = tuple[int, int, str, int, np.ndarray, "np.ndarray | None"]


@contextmanager
def as_before(before: bool) -> Iterator[None]:
    """With ``before``: llama.cpp's quantizer held to one thread and its decoders unused
    (``gguf``'s NumPy decoders instead), as before either was added."""
    saved = ggml_quantizer.quantize, ggml_quantizer.dequantize
    if before:
        ggml_quantizer.quantize = functools.partial(saved[0], threads=1)
        ggml_quantizer.dequantize = lambda blocks, ggml_type, cols: None
    try:
        yield
    finally:
        ggml_quantizer.quantize, ggml_quantizer.dequantize = saved


def weights() -> Iterator[Weight]:
    """Each shape and type llama.cpp's quantizer encodes: rows, columns, type name and
    number, the weight and its importance matrix (where the type needs one)."""
    rng = np.random.default_rng(0)
    for rows, cols in SHAPES:
        weight = rng.standard_normal((rows, cols)).astype(np.float32)
        importance = rng.uniform(0.1, 2.0, cols).astype(np.float32)
        for name in sorted(set(allowed_types()) - set(NUMPY_ENCODERS) - {"F16", "BF16", "F32"}):
            kind = GGMLQuantizationType[name].value
            imatrix = importance if ggml_quantizer.requires_imatrix(kind) else None
            yield rows, cols, name, kind, weight, imatrix


def encode_rows(rounds: int) -> None:
    threads = torch.get_num_threads()
    print(f"| type | shape | 1 thread ms | {threads} threads ms | ratio | same bytes |")
    print("|---|---|---:|---:|---:|---|")
    for rows, cols, name, kind, weight, imatrix in weights():
        times: dict[int, list[float]] = {1: [], threads: []}
        outputs = {}
        for _ in range(rounds):
            for count in times:
                began = time.perf_counter()
                outputs[count] = ggml_quantizer.quantize(weight, kind, imatrix, threads=count)
                times[count].append(time.perf_counter() - began)
        one, many = (1e3 * statistics.median(times[c]) for c in (1, threads))
        same = np.array_equal(outputs[1], outputs[threads])
        print(f"| {name} | {rows} x {cols} | {one:.1f} | {many:.1f} | {many / one:.2f} | {same} |")


def decode_rows(rounds: int) -> None:
    print("\n| type | shape | gguf NumPy ms | llama.cpp ms | ratio | same floats |")
    print("|---|---|---:|---:|---:|---|")
    for rows, cols, name, kind, weight, imatrix in weights():
        blocks = ggml_quantizer.quantize(weight, kind, imatrix)
        ggml = GGMLQuantizationType[name]
        times: dict[str, list[float]] = {"numpy": [], "llama.cpp": []}
        theirs = ours = None
        for _ in range(rounds):
            began = time.perf_counter()
            theirs = quants.dequantize(blocks, ggml).astype(np.float32)
            times["numpy"].append(time.perf_counter() - began)
            began = time.perf_counter()
            ours = ggml_quantizer.dequantize(blocks, kind, cols)
            times["llama.cpp"].append(time.perf_counter() - began)
        slow, fast = (1e3 * statistics.median(v) for v in times.values())
        same = ours is not None and np.array_equal(theirs, ours)
        print(
            f"| {name} | {rows} x {cols} | {slow:.1f} | {fast:.2f} | {fast / slow:.3f} | {same} |"
        )


def tune_rows(tunes: int) -> None:
    print("\n| tiny-lm tune | codecs | tune s | scoring s | plan |")
    print("|---|---|---:|---:|---|")
    loaded = load_model("tiny-lm")
    plans = []
    for _ in range(tunes):
        for before in (True, False):
            with as_before(before):
                began = time.perf_counter()
                result = autotune(
                    loaded.model,
                    "4.5bits",
                    "cpu",
                    runtime="llama.cpp",
                    tokenizer=loaded.tokenizer,
                    progress=False,
                    measure=False,
                    cache=False,
                )
                seconds = time.perf_counter() - began
            plans.append(result.plan.layers)
            score = result.plan.search["stage_seconds"]["score"]
            same = "same as the first" if plans[-1] == plans[0] else "differs"
            codecs = (
                "before: 1-thread encoding, NumPy decoding"
                if before
                else f"now: {torch.get_num_threads()}-thread encoding, llama.cpp decoding"
            )
            print(f"| 4.5bits | {codecs} | {seconds:.1f} | {score:.1f} | {same} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tunes", type=int, default=2)
    args = parser.parse_args()
    if not ggml_quantizer.available():
        raise SystemExit(f"needs llama.cpp's quantizer: {ggml_quantizer.INSTALL_HINT}")
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch threads: {torch.get_num_threads()}; CPU: {capability}")
    encode_rows(args.rounds)
    decode_rows(args.rounds)
    tune_rows(args.tunes)


if __name__ == "__main__":
    main()
