"""Layer output error of compression methods on the demo model, at equal bytes.

Every linear layer of the demo model is compressed on its own (the rest stays as it is).
Methods that need statistics observe the layer inputs on the calibration windows (through
``profilers.execution.observe.collect_observers``, as ``autotune`` does); the error is
measured on the held-out windows: ``||Y - Y'|| / ||Y||`` of the layer's output, averaged
over layers. Each row compares a candidate with a baseline, mostly of the same bytes (both sizes are
printed), and gives the candidate's error over the baseline's, with the ratio the method
promises where it promises one.

To add a method, append a :class:`Comparison` to ``COMPARISONS``.

Run: ``python benchmarks/methods.py`` (a few minutes on 2 cores); ``--only LABEL,...`` runs
the comparisons that name one of those options.
"""

from __future__ import annotations

import sys
from pathlib import Path

# this file is named like the package it measures: run as a script, its folder must not
# shadow the installed ``methods`` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from autotune.calibration import build_calibration
from autotune.loading import load_model
from methods.base import LayerShape, Option, is_weight_layer
from methods.registry import method_of, option_from_dict
from profilers.execution.observe import Observers, collect_observers
from profilers.proxies import capture_inputs


@dataclass(frozen=True)
class Comparison:
    """A candidate against a baseline, as options in their plan form. ``expect`` is the
    largest error ratio (candidate / baseline) the method promises, if it promises one."""

    name: str
    baseline: dict
    candidate: dict
    expect: float | None = None

    def options(self) -> tuple[Option, Option]:
        return option_from_dict(self.baseline), option_from_dict(self.candidate)


def rtn(bits: int, group: int | None, symmetric: bool = False) -> dict:
    return {"method": "rtn", "bits": bits, "group_size": group, "symmetric": symmetric}


def gptq(bits: int, group: int | None, symmetric: bool = False) -> dict:
    return {**rtn(bits, group, symmetric), "method": "gptq"}


def pruned(method: str, bits: int = 16, pattern: str | None = None) -> dict:
    return {"method": method, "sparsity": 0.5, "pattern": pattern, "bits": bits}


def low_rank(method: str, fraction: float, bits: int = 16) -> dict:
    return {"method": method, "fraction": fraction, "bits": bits}


COMPARISONS: list[Comparison] = [
    # quantisation at equal bytes
    Comparison("int4-g128-sym", rtn(4, 128, True), gptq(4, 128, True), 0.7),
    Comparison("int4-g128-asym", rtn(4, 128), gptq(4, 128), 0.7),
    Comparison("int4-ch-sym", rtn(4, None, True), gptq(4, None, True)),
    Comparison("int3-g64-asym", rtn(3, 64), gptq(3, 64)),
    Comparison("int2-g32-asym", rtn(2, 32), gptq(2, 32)),
    Comparison(
        "4-bit code book", rtn(4, 64, True), {"method": "codebook", "format": "nf", "bits": 4}
    ),
    Comparison(
        "3-bit code book",
        rtn(3, 64, True),
        {"method": "codebook", "format": "lloyd", "bits": 3, "group_size": 64},
    ),
    # the code books against GPTQ, the default search's calibrated method, at equal bytes
    Comparison(
        "4-bit code book",
        gptq(4, 64, True),
        {"method": "codebook", "format": "nf", "bits": 4},
    ),
    Comparison(
        "3-bit code book",
        gptq(3, 64, True),
        {"method": "codebook", "format": "lloyd", "bits": 3, "group_size": 64},
    ),
    # outlier channels kept in float16 (a few more bytes than the baseline)
    Comparison("int3 + 1% fp16", rtn(3, 64), {"method": "outliers", "bits": 3, "group_size": 64}),
    Comparison(
        "gptq3 + 1% fp16",
        gptq(3, 64),
        {"method": "outliers", "bits": 3, "group_size": 64, "base": "gptq"},
    ),
    # pruning at equal bytes
    Comparison("50% fp16", pruned("magnitude"), pruned("wanda")),
    Comparison("50% fp16", pruned("magnitude"), pruned("sparsegpt"), 0.7),
    Comparison("2:4 fp16", pruned("magnitude", pattern="2:4"), pruned("sparsegpt", pattern="2:4")),
    Comparison("50% + int4", pruned("magnitude", 4), pruned("sparsegpt", 4)),
    # low rank at equal bytes
    Comparison("rank 1/2 fp16", low_rank("svd", 0.5), low_rank("whitened_svd", 0.5), 0.7),
    Comparison("rank 1/2 fp16", low_rank("svd", 0.5), low_rank("fisher_svd", 0.5)),
    Comparison("rank 1/4 int8", low_rank("svd", 0.25, 8), low_rank("whitened_svd", 0.25, 8)),
]


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if is_weight_layer(module) and LayerShape.of(module).kind == "linear"
    }


def relative_error(original: nn.Module, compressed: nn.Module, x: torch.Tensor) -> float:
    """``||Y - Y'|| / ||Y||`` of the layer's output on inputs ``x``."""
    with torch.inference_mode():
        y = original(x).double()
        return float((compressed(x).double() - y).norm() / y.norm())


def layer_errors(
    layers: dict[str, nn.Module],
    inputs: dict[str, torch.Tensor],
    convert: Callable[[str, nn.Module], nn.Module],
) -> dict[str, float]:
    """Relative output error of each layer converted by ``convert(name, layer)``."""
    return {
        name: relative_error(module, convert(name, module), inputs[name])
        for name, module in layers.items()
    }


def converter(option: Option, observers: Observers) -> Callable[[str, nn.Module], nn.Module]:
    method = method_of(option)
    return lambda name, module: method.convert(module, option, observers.get((name, option.label)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only",
        help="comma-separated baselines or candidates (option labels, e.g. "
        "gptq4-g64-sym-ao): only the comparisons that name one",
    )
    args = parser.parse_args()
    wanted = set(args.only.split(",")) if args.only else None
    torch.manual_seed(0)
    demo = load_model("demo")
    model = demo.model
    calib = build_calibration(
        model,
        demo.tokenizer,
        None,
        None,
        seq_len=128,
        calibration_windows=32,
        heldout_windows=16,
        sensitivity_windows=4,
    )
    layers = linear_layers(model)
    options = [
        (c, *pair)
        for c in COMPARISONS
        for pair in [c.options()]
        if wanted is None or wanted & {o.label for o in pair}
    ]
    start = time.perf_counter()
    every = {name: [o for _, *pair in options for o in pair] for name in layers}
    observers = collect_observers(model, every, calib.calibration)
    observe_seconds = time.perf_counter() - start
    heldout = capture_inputs(model, list(layers), calib.heldout, max_rows=1 << 62)
    tokens = next(iter(heldout.values())).shape[0]
    print(
        f"demo model: {len(layers)} linear layers; calibration {len(calib.calibration)} "
        f"batches, held-out {tokens} tokens; observers {observe_seconds:.1f}s\n"
    )
    header = (
        f"{'format':<16} {'baseline':<18} {'MB':>6} {'error':>9}  {'candidate':<22} "
        f"{'MB':>6} {'error':>9} {'s':>5}  {'ratio':>5} {'wins':>6} {'expect':>6}"
    )
    print(header)
    print("-" * len(header))
    for comparison, baseline, candidate in options:
        base_mb, cand_mb = (
            sum(method_of(o).cost(LayerShape.of(m), o).bytes for m in layers.values()) / 1e6
            for o in (baseline, candidate)
        )
        base = layer_errors(layers, heldout, converter(baseline, observers))
        tic = time.perf_counter()
        cand = layer_errors(layers, heldout, converter(candidate, observers))
        seconds = time.perf_counter() - tic
        base_mean, cand_mean = statistics.fmean(base.values()), statistics.fmean(cand.values())
        wins = sum(cand[name] < base[name] for name in layers)
        ratio = cand_mean / base_mean
        expect = "" if comparison.expect is None else f"<={comparison.expect:g}"
        if comparison.expect is not None and ratio > comparison.expect:
            expect += " MISS"
        print(
            f"{comparison.name:<16} {baseline.label:<18} {base_mb:>6.2f} {base_mean:>9.5f}  "
            f"{candidate.label:<22} {cand_mb:>6.2f} {cand_mean:>9.5f} {seconds:>5.1f}  "
            f"{ratio:>5.2f} {wins:>3}/{len(layers)} {expect:>6}"
        )
    print(
        "\nerror: mean over layers of ||Y - Y'|| / ||Y|| on held-out windows; "
        "ratio: candidate / baseline; wins: layers where "
        "the candidate's error is lower; s: seconds to convert every layer with the "
        "candidate; expect: the ratio the method promises"
    )


if __name__ == "__main__":
    main()
