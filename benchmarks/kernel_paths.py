"""Latency of each compressed layer's compute path against float32 and bfloat16 layers.

For three layer shapes (the demo model's FFN, a 4096 x 4096 projection and a 4096 -> 11008
LLM FFN) and 1 or 16 tokens, every format is timed on the same Gaussian layer: dense float32
and bfloat16 ``nn.Linear``, and the modules the methods convert to (RTN int8 and int4 run
torch's CPU weight-only kernels for a few tokens; the others rebuild their float weight on
each call). Calls are interleaved round by round so the machine's drift hits every format
alike; the paths that rebuild a float weight (tens of milliseconds on large layers) are timed
in a second pass, with float32 and bfloat16 again, so they do not evict the fast paths'
weights from the caches between calls. The table gives the median time per call and the
speed ratio to float32 (above 1 is faster) and to bfloat16 of the same pass.

Run: ``python benchmarks/kernel_paths.py`` (about two minutes on 2 cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/methods.py would shadow the installed ``methods`` package: drop this folder
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from methods import kernels
from methods.base import LayerShape
from methods.errors import OptionError
from methods.registry import method_of, option_from_dict

SHAPES = {"384->1536": (384, 1536), "4096->4096": (4096, 4096), "4096->11008": (4096, 11008)}
TOKENS = (1, 16)
# method options in their plan form; those whose method is not registered are skipped
FORMATS: dict[str, dict] = {
    "int8 (kernel)": {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True},
    "int4-g128 (kernel)": {"method": "rtn", "bits": 4, "group_size": 128, "symmetric": False},
    "int3-g64": {"method": "rtn", "bits": 3, "group_size": 64, "symmetric": False},
    "nf4-g64": {"method": "codebook", "format": "nf", "bits": 4, "group_size": 64},
    "2:4 fp16": {"method": "magnitude", "pattern": "2:4", "bits": 16},
    "50% + int4": {"method": "magnitude", "sparsity": 0.5, "bits": 4},
    "svd r25% fp16": {"method": "svd", "fraction": 0.25, "bits": 16},
}


Paths = dict[str, Callable[[torch.Tensor], torch.Tensor]]


def layer_formats(cols: int, rows: int) -> tuple[Paths, Paths]:
    """The float layers and every registered format converted from the same weights: the
    paths that run a kernel or dense matmuls, and those that rebuild the float weight."""
    torch.manual_seed(0)
    dense = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        dense.weight.normal_(0.0, 0.02)
    bf16 = nn.Linear(cols, rows, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        bf16.weight.copy_(dense.weight)
    floats: Paths = {"float32": dense, "bfloat16": lambda x, _m=bf16: _m(x.to(torch.bfloat16))}
    fast, rebuilt = dict(floats), dict(floats)
    shape = LayerShape.of(dense)
    for name, data in FORMATS.items():
        try:
            option = option_from_dict(data)
        except OptionError:
            continue  # not registered in this build
        method = method_of(option)
        try:
            method.check(shape, option, name)
        except OptionError:
            continue
        paths = rebuilt if method.runtime_format(shape, option) == "dequantize" else fast
        paths[name] = method.convert(dense, option)
    return fast, rebuilt


def time_paths(
    paths: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, rounds: int
) -> dict[str, float]:
    """Median seconds per call of each path, timed in interleaved rounds."""
    samples: dict[str, list[float]] = {name: [] for name in paths}
    with torch.inference_mode():
        for fn in paths.values():  # warm up (the int4 layout switch happens here)
            fn(x)
            fn(x)
        for _ in range(rounds):
            for name, fn in paths.items():
                tic = time.perf_counter()
                fn(x)
                samples[name].append(time.perf_counter() - tic)
    return {name: statistics.median(times) for name, times in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    kernels.set_kernel_policy(enabled=True, int8_max_tokens=16, int4_max_tokens=16)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; kernels for <= 16 tokens")
    header = f"{'shape':<12} {'tokens':>6}  {'path':<20} {'ms':>8} {'vs fp32':>8} {'vs bf16':>8}"
    print(header)
    print("-" * len(header))
    for shape_name, (cols, rows) in SHAPES.items():
        passes = layer_formats(cols, rows)
        for tokens in TOKENS:
            x = torch.randn(tokens, cols)
            for number, paths in enumerate(passes):
                large = cols * rows >= 1 << 24
                rounds = max(5, args.rounds // 3) if number and large else args.rounds
                seconds = time_paths(paths, x, rounds)
                for name, s in seconds.items():
                    if number and name in ("float32", "bfloat16"):
                        continue  # printed with the first pass; ratios use this pass's
                    print(
                        f"{shape_name:<12} {tokens:>6}  {name:<20} {1e3 * s:>8.3f} "
                        f"{seconds['float32'] / s:>8.2f} {seconds['bfloat16'] / s:>8.2f}"
                    )
        print()
    print("ratios: time of float32 (or bfloat16) / time of the path; above 1 is faster")


if __name__ == "__main__":
    main()
