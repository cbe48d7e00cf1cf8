"""GPTQ's column sweep on the CPU: numpy for narrow stacks against torch, on the demo's shapes.

``methods.gptq_solver`` sweeps stacks of up to ``NUMPY_ROWS`` rows in numpy (one thread, about
a microsecond per call) and wider ones in torch. This times both paths on the layer shapes of
all-MiniLM-L6-v2 (384 x 384 attention, 1536 x 384 and 384 x 1536 feed-forward) with random
weights and a Hessian from random inputs of uneven scale, for 1 to 8 options stacked (static
groups, activation order), interleaved round by round, and checks that both give the same
codes. Printed: the median milliseconds per sweep of each path and their ratio. A second
table times the inverse Hessian's upper factor (:func:`methods.gptq_solver.inverse_hessian_factor`,
one Cholesky factorisation of the reversed matrix and one triangular inverse) against
inverting the matrix and factoring the inverse again, as GPTQ's reference does, in float32 at
each width, interleaved, and gives the largest difference between the two factors.

Run: ``python benchmarks/gptq_sweep.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder must not shadow the packages named like its files (methods)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import statistics
import time

import torch

from methods import gptq_solver
from methods.gptq import GPTQOption

SHAPES = ((384, 384), (1536, 384), (384, 1536))
OPTIONS = [
    GPTQOption(bits, group, symmetric)
    for bits in (2, 3, 4, 8)
    for group in (32, 64, 128)
    for symmetric in (False, True)
]


def layer(rows: int, cols: int, seed: int = 0) -> gptq_solver.Factored:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(512, cols, generator=generator) * torch.rand(cols, generator=generator) * 3
    weight = torch.randn(rows, cols, generator=generator) * 0.05
    return gptq_solver.factor(weight, 2 * x.t() @ x / 512, 0.01, True, "bench")


def timed(factored: gptq_solver.Factored, stack: list[GPTQOption], numpy_rows: int):
    saved = gptq_solver.NUMPY_ROWS
    gptq_solver.NUMPY_ROWS = numpy_rows
    try:
        began = time.perf_counter()
        result = gptq_solver.sweep_static(factored, stack)
        return time.perf_counter() - began, result
    finally:
        gptq_solver.NUMPY_ROWS = saved


def refactored_inverse(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper factor of ``(H + d I)^-1`` by inverting and factoring again."""
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype)
    lower = torch.linalg.cholesky(hessian + damp * float(hessian.diagonal().mean()) * eye)
    return torch.linalg.cholesky(torch.cholesky_solve(eye, lower), upper=True)


def time_factors(rounds: int) -> None:
    print()
    print("| columns | one pass ms | invert and refactor ms | one pass / refactor | max diff |")
    print("|---:|---:|---:|---:|---:|")
    for cols in sorted({c for _, c in SHAPES}):
        generator = torch.Generator().manual_seed(cols)
        x = torch.randn(2048, cols, generator=generator) * torch.rand(cols, generator=generator)
        hessian = 2 * x.t() @ x / 2048
        seconds: dict[str, list[float]] = {"one pass": [], "refactor": []}
        for _ in range(rounds):
            began = time.perf_counter()
            one_pass = gptq_solver.inverse_hessian_factor(hessian, 0.01, "bench")
            seconds["one pass"].append(time.perf_counter() - began)
            began = time.perf_counter()
            refactored = refactored_inverse(hessian, 0.01)
            seconds["refactor"].append(time.perf_counter() - began)
        ms = {k: 1e3 * statistics.median(v) for k, v in seconds.items()}
        diff = float((one_pass - refactored).abs().max() / refactored.abs().max())
        print(
            f"| {cols} | {ms['one pass']:.1f} | {ms['refactor']:.1f} | "
            f"{ms['one pass'] / ms['refactor']:.2f} | {diff:.1e} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print("| layer | options stacked | rows swept | path | torch ms | numpy ms | numpy / torch |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for rows, cols in SHAPES:
        factored = layer(rows, cols)
        for count in (1, 2, 4, 8):
            if rows * count > gptq_solver.STACK_ROWS:
                continue
            stack = OPTIONS[:count]
            seconds: dict[str, list[float]] = {"torch": [], "numpy": []}
            for _ in range(args.rounds):
                in_torch, by_torch = timed(factored, stack, 0)
                in_numpy, by_numpy = timed(factored, stack, 1 << 30)
                seconds["torch"].append(in_torch)
                seconds["numpy"].append(in_numpy)
                pairs = zip(by_torch, by_numpy, strict=True)
                if any(not torch.equal(a.codes, b.codes) for a, b in pairs):
                    raise SystemExit(f"{rows} x {cols}, {count} options: the paths' codes differ")
            torch_ms = 1e3 * statistics.median(seconds["torch"])
            numpy_ms = 1e3 * statistics.median(seconds["numpy"])
            path = "numpy" if rows * count <= gptq_solver.NUMPY_ROWS else "torch"
            print(
                f"| {rows} x {cols} | {count} | {rows * count} | {path} | {torch_ms:.0f} | "
                f"{numpy_ms:.0f} | {numpy_ms / torch_ms:.2f} |",
                flush=True,
            )
    time_factors(args.rounds)


if __name__ == "__main__":
    main()
