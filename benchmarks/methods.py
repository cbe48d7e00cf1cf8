"""Layer output error of compression methods on the demo model, at equal bytes.

Every linear layer of the demo model is compressed on its own (the rest stays as it is).
Methods that need statistics observe the layer inputs on the calibration windows (through
``profilers.observe.collect_observers``, as ``autotune`` does); the error is measured on the
held-out windows: ``||Y - Y'||^2 / ||Y||^2`` of the layer's output, averaged over layers.
Each row compares a candidate with a baseline of the same stored format (the bytes column
holds for both); the last column is the candidate's error over the baseline's.

To add a method, append a :class:`Comparison` to ``COMPARISONS``.

Run: ``python benchmarks/methods.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

# this file is named like the package it measures: run as a script, its folder must not
# shadow the installed ``methods`` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from autotune.calibration import build_calibration
from autotune.loading import load_model
from methods import GPTQOption, QuantOption
from methods.base import LayerShape, Option, is_weight_layer
from methods.registry import method_of
from profilers.observe import Observers, collect_observers
from profilers.proxies import capture_inputs

MakeOption = Callable[[], Option]


@dataclass(frozen=True)
class Comparison:
    """A candidate against a baseline that stores the same bytes."""

    name: str
    baseline: MakeOption
    candidate: MakeOption


COMPARISONS: list[Comparison] = [
    Comparison(
        "int4-g128-sym", lambda: QuantOption(4, 128, True), lambda: GPTQOption(4, 128, True)
    ),
    Comparison(
        "int4-g128-asym", lambda: QuantOption(4, 128, False), lambda: GPTQOption(4, 128, False)
    ),
    Comparison(
        "int4-ch-sym", lambda: QuantOption(4, None, True), lambda: GPTQOption(4, None, True)
    ),
    Comparison(
        "int3-g64-asym", lambda: QuantOption(3, 64, False), lambda: GPTQOption(3, 64, False)
    ),
    Comparison(
        "int2-g32-asym", lambda: QuantOption(2, 32, False), lambda: GPTQOption(2, 32, False)
    ),
]


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if is_weight_layer(module) and LayerShape.of(module).kind == "linear"
    }


def relative_error(original: nn.Module, compressed: nn.Module, x: torch.Tensor) -> float:
    """``||Y - Y'||^2 / ||Y||^2`` of the layer's output on inputs ``x``."""
    with torch.inference_mode():
        y = original(x).double()
        return float((compressed(x).double() - y).pow(2).sum() / y.pow(2).sum())


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
    options = [(c, c.baseline(), c.candidate()) for c in COMPARISONS]
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
        f"{'format':<15} {'MB':>6} {'bits/w':>6}  {'baseline':<20} {'error':>9}  "
        f"{'candidate':<22} {'error':>9} {'s':>5}  {'ratio':>5} {'wins':>6}"
    )
    print(header)
    print("-" * len(header))
    numel = sum(LayerShape.of(m).numel for m in layers.values())
    for comparison, baseline, candidate in options:
        nbytes = sum(
            method_of(baseline).cost(LayerShape.of(m), baseline).bytes for m in layers.values()
        )
        assert nbytes == sum(
            method_of(candidate).cost(LayerShape.of(m), candidate).bytes for m in layers.values()
        )
        weight_bytes = sum(
            method_of(baseline).cost(LayerShape.of(m), baseline).weight_bytes
            for m in layers.values()
        )
        base = layer_errors(layers, heldout, converter(baseline, observers))
        tic = time.perf_counter()
        cand = layer_errors(layers, heldout, converter(candidate, observers))
        seconds = time.perf_counter() - tic
        base_mean, cand_mean = statistics.fmean(base.values()), statistics.fmean(cand.values())
        wins = sum(cand[name] < base[name] for name in layers)
        print(
            f"{comparison.name:<15} {nbytes / 1e6:>6.2f} {8 * weight_bytes / numel:>6.2f}  "
            f"{baseline.label:<20} {base_mean:>9.5f}  {candidate.label:<22} {cand_mean:>9.5f} "
            f"{seconds:>5.1f}  {cand_mean / base_mean:>5.2f} {wins:>3}/{len(layers)}"
        )
    print(
        "\nerror: mean over layers of ||Y - Y'||^2 / ||Y||^2 on held-out windows; ratio: "
        "candidate / baseline; wins: layers where the candidate's error is lower; s: seconds "
        "to convert every layer with the candidate"
    )


if __name__ == "__main__":
    main()
