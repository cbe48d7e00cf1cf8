"""How well the profilers predict what is measured: bytes, latency, and sensitivity.

For nine plans on each of two models (the demo encoder, and a Llama-style decoder of 8 blocks
built from a transformers config with random weights), this prints predicted against
measured stored bytes, and measured latency on this machine against three predictions:
``local`` (per-layer times measured inside the model), the built-in ``cpu`` roofline, and
the ``cpu`` roofline fitted to this machine on the demo model (``autotune profile
--fit-target``; applied unchanged to the decoder). Latencies of all plans of a model are
timed interleaved. Then the Spearman rank correlation and median absolute relative error of
each predictor, and how well the cheap sensitivity proxies rank (layer, option) pairs
against the end-to-end table on the demo.

Run: ``python benchmarks/profilers.py`` (about six minutes on 2 cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

# this file is named like the package it measures: run as a script, its folder must not
# shadow the installed ``profilers`` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import random
import statistics
import time
from copy import deepcopy

import numpy as np
import torch
import transformers
from scipy.stats import spearmanr

from autotune.apply import compress
from autotune.calibration import build_calibration
from autotune.costs import build_costs, layer_options
from autotune.layers import compressible_layers
from autotune.loading import load_model
from autotune.targets import get_target
from methods import KeepOption
from profilers.execution.observe import collect_observers
from profilers.measure import measure_latencies, model_bytes
from profilers.proxies import fisher_table, local_error_table, spearman
from profilers.roofline_fit import fit_target, observe
from profilers.sensitivity import measure_sensitivity

UNIFORM = ["keep", "int8-ch-sym", "int4-g32-asym", "int4-g128-sym", "int3-g64-asym", "w8a8-sq0.6"]
RANDOM_PLANS = 3


def decoder() -> tuple[torch.nn.Module, list[dict]]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=8000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [
        {"input_ids": torch.randint(0, 8000, (4, 128), generator=generator)} for _ in range(4)
    ]
    return model, batches


def plans(options: dict[str, list]) -> dict[str, dict]:
    """Uniform plans (layers without the option stay as they are) and random mixed ones."""
    out = {}
    for label in UNIFORM:
        out[f"uniform {label}"] = {
            name: next((o for o in opts if o.label == label), KeepOption())
            for name, opts in options.items()
        }
    rng = random.Random(0)
    for index in range(RANDOM_PLANS):
        out[f"random mix {index + 1}"] = {name: rng.choice(opts) for name, opts in options.items()}
    return out


def evaluate(name: str, model, calib_batches, inputs_by_shape, fitted, tokenizer_calib=None):
    layers = compressible_layers(model)
    options = layer_options(layers, ("rtn", "w8a8"))
    observers = collect_observers(model, options, calib_batches)
    candidates = plans(options)
    compressed = {}
    for label, chosen in candidates.items():
        copy = deepcopy(model)
        compress(copy, chosen, observers=observers)
        compressed[label] = copy
    rows = []
    for shape_name, inputs in inputs_by_shape.items():
        costs = {
            spec_name: build_costs(model, layers, options, spec, inputs, observers=observers)
            for spec_name, spec in (
                ("local", get_target("local")),
                ("cpu", get_target("cpu")),
                ("cpu fitted", fitted),
            )
        }
        measured = {}
        for _ in range(3):
            stats = measure_latencies(compressed, inputs, rounds=15, warmup=3)
            for label, s in stats.items():
                measured.setdefault(label, []).append(s.p50_ms)
        for label, chosen in candidates.items():
            choice = {n: options[n].index(o) for n, o in chosen.items()}
            row = {
                "model": name,
                "shape": shape_name,
                "plan": label,
                "bytes_predicted": costs["local"].totals(choice)["bytes"],
                "bytes_measured": model_bytes(compressed[label]),
                "measured_ms": statistics.median(measured[label]),
            }
            for spec_name, cost in costs.items():
                row[spec_name] = cost.totals(choice)["latency_ms"]
            rows.append(row)
    return rows


def summary(rows: list[dict], predictor: str) -> tuple[float, float]:
    measured = np.array([r["measured_ms"] for r in rows])
    predicted = np.array([r[predictor] for r in rows])
    rho = float(spearmanr(predicted, measured).statistic)
    error = float(np.median(np.abs(predicted - measured) / measured))
    return rho, error


def main() -> int:
    started = time.perf_counter()
    demo = load_model("demo")
    calib = build_calibration(demo.model, demo.tokenizer)
    demo_inputs = {"1x128": calib.latency_inputs(1, 128), "1x16": calib.latency_inputs(1, 16)}

    # fit the cpu roofline on the demo (every weight layer listed: see profilers.roofline_fit)
    layers = compressible_layers(demo.model)
    options = layer_options(layers, ("rtn", "w8a8"))
    every = {r.name: [KeepOption()] for r in compressible_layers(demo.model, min_numel=0)}
    every.update(options)
    observations = observe(
        demo.model,
        every,
        list(demo_inputs.values()),
        observers=collect_observers(demo.model, options, calib.calibration),
    )
    fit = fit_target(get_target("cpu"), observations, name="cpu-fitted", source="on the demo")
    print(
        f"cpu roofline fitted on the demo: per-layer median error "
        f"{100 * fit.before['median_abs_rel_error']:.0f}% -> "
        f"{100 * fit.after['median_abs_rel_error']:.0f}%"
    )

    rows = evaluate("demo", demo.model, calib.calibration, demo_inputs, fit.spec)
    model, batches = decoder()
    decoder_inputs = {
        "1x128": {"input_ids": batches[0]["input_ids"][:1]},
        "1x16": {"input_ids": batches[0]["input_ids"][:1, :16]},
    }
    rows += evaluate("llama-8x512", model, batches, decoder_inputs, fit.spec)

    header = (
        f"{'model':<12} {'shape':<6} {'plan':<22} {'bytes err':>9} {'measured':>9} "
        f"{'local':>14} {'cpu':>14} {'cpu fitted':>14}"
    )
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        bytes_error = abs(r["bytes_predicted"] - r["bytes_measured"]) / r["bytes_measured"]

        def cell(key: str, r: dict = r) -> str:
            return f"{r[key]:>7.2f} ({100 * (r[key] / r['measured_ms'] - 1):+4.0f}%)"

        print(
            f"{r['model']:<12} {r['shape']:<6} {r['plan']:<22} {100 * bytes_error:>8.3f}% "
            f"{r['measured_ms']:>7.2f}ms {cell('local')} {cell('cpu')} {cell('cpu fitted')}"
        )
    print()
    worst_bytes = max(
        abs(r["bytes_predicted"] - r["bytes_measured"]) / r["bytes_measured"] for r in rows
    )
    print(f"bytes: worst relative error {100 * worst_bytes:.4f}% over {len(rows)} (plan, shape)")
    for model_name in ("demo", "llama-8x512"):
        subset = [r for r in rows if r["model"] == model_name]
        for predictor in ("local", "cpu", "cpu fitted"):
            rho, error = summary(subset, predictor)
            print(
                f"latency {model_name:<12} {predictor:<11} Spearman {rho:.3f}, "
                f"median |error| {100 * error:.1f}%"
            )

    # sensitivity proxies against end-to-end, on the demo
    rtn = layer_options(layers, ("rtn",))
    start = time.perf_counter()
    end_to_end = measure_sensitivity(demo.model, rtn, calib.sensitivity)
    seconds = {"end-to-end": time.perf_counter() - start}
    start = time.perf_counter()
    fisher = fisher_table(demo.model, rtn, calib.sensitivity)
    seconds["fisher"] = time.perf_counter() - start
    start = time.perf_counter()
    local = local_error_table(demo.model, rtn, calib.sensitivity)
    seconds["local"] = time.perf_counter() - start
    print()
    print(f"sensitivity on the demo ({sum(len(v) for v in rtn.values())} layer x option pairs):")
    print(f"  end-to-end  {seconds['end-to-end']:.1f} s")
    for label, table in (("fisher", fisher), ("local", local)):
        rho = spearman(table, end_to_end)
        print(f"  {label:<11} {seconds[label]:.1f} s, Spearman vs end-to-end {rho:.3f}")
    print(f"\ndone in {time.perf_counter() - started:.0f} s on {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
