"""Does activation-aware scaling (AWQ-style) pay beside GPTQ at equal storage?

For every linear layer of the demo, at three formats, the layer's own output error
``|X (W' - W)^T|^2 / |X W^T|^2`` of three ways to fill the same codes and scales:

* RTN: round to nearest;
* AWQ-style scale search: input columns multiplied by ``s = mean|x|^a`` (normalised), rounded
  to nearest, divided back; ``a`` searched on a grid of 21 values in [0, 1] for the least
  error on the calibration inputs. (Storing ``s`` costs 2 bytes per input column more, which
  this comparison gives it for free.)
* GPTQ: the project's ``gptq`` method with the Hessian of the calibration inputs.

``X`` for the reported error is the layer's inputs on the selection split, which neither the
scale search nor GPTQ saw. Prints, per format, the median ratio to RTN and the layers where
each is the better of the two calibrated ways.

Run: ``python benchmarks/activation_scaling.py`` (about 1.5 minutes on 2 cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder must not shadow the packages named like its files (methods)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import statistics
import time

import torch
from torch import nn

from autotune.calibration import build_calibration
from autotune.layers import compressible_layers
from autotune.loading import load_model
from methods.gptq import GPTQOption
from methods.registry import method_of
from methods.rtn import QuantOption
from profilers.execution.observe import collect_observers
from profilers.proxies import capture_inputs, effective_weight

FORMATS = [(4, 128, False), (3, 64, False), (3, 128, True)]
ALPHAS = [i / 20 for i in range(21)]
ROWS = 4096


def output_error(weight: torch.Tensor, reference: torch.Tensor, inputs: torch.Tensor) -> float:
    difference = inputs @ (weight - reference).T
    return float(difference.pow(2).sum() / (inputs @ reference.T).pow(2).sum())


def rounded(weight: torch.Tensor, option: QuantOption) -> torch.Tensor:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight
    return effective_weight(method_of(option).convert(layer, option))


def scale_searched(weight: torch.Tensor, option: QuantOption, inputs: torch.Tensor) -> torch.Tensor:
    """The rounded weight with the activation-aware column scale that fits ``inputs`` best."""
    magnitude = inputs.abs().mean(0).clamp_min(1e-8)
    best, best_error = rounded(weight, option), None
    for alpha in ALPHAS:
        scale = magnitude.pow(alpha)
        scale = scale / (scale.max() * scale.min()).sqrt()
        candidate = rounded(weight * scale, option) / scale
        error = output_error(candidate, weight, inputs)
        if best_error is None or error < best_error:
            best, best_error = candidate, error
    return best


def main() -> None:
    started = time.perf_counter()
    torch.manual_seed(0)
    loaded = load_model("demo")
    model = loaded.model.eval()
    calib = build_calibration(model, loaded.tokenizer)
    layers = [r.name for r in compressible_layers(model) if r.shape.kind == "linear"]
    fitted_on = capture_inputs(model, layers, calib.calibration, ROWS)
    judged_on = capture_inputs(model, layers, calib.selection, ROWS)
    gptq = {name: [GPTQOption(*f) for f in FORMATS] for name in layers}
    observers = collect_observers(model, gptq, calib.calibration)
    print(
        "| format | layers | AWQ-style / RTN (median) | GPTQ / RTN (median) "
        "| AWQ-style better | GPTQ better |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for bits, group, symmetric in FORMATS:
        option, calibrated = QuantOption(bits, group, symmetric), GPTQOption(bits, group, symmetric)
        scaled, solved, scaled_wins = [], [], 0
        for name in layers:
            module = model.get_submodule(name)
            weight = module.weight.detach().float()
            judge = judged_on[name].float()
            rtn = output_error(rounded(weight, option), weight, judge)
            awq = output_error(
                scale_searched(weight, option, fitted_on[name].float()), weight, judge
            )
            converted = method_of(calibrated).convert(
                module, calibrated, observers[(name, calibrated.label)]
            )
            gptq_error = output_error(effective_weight(converted), weight, judge)
            scaled.append(awq / rtn)
            solved.append(gptq_error / rtn)
            scaled_wins += awq < gptq_error
        print(
            f"| {option.label} | {len(layers)} | {statistics.median(scaled):.3f} | "
            f"{statistics.median(solved):.3f} | {scaled_wins} | {len(layers) - scaled_wins} |",
            flush=True,
        )
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
