"""Out-of-sample accuracy of a fitted roofline: fit on one model, predict the others.

The ``cpu`` target is fitted on the demo encoder on this machine, as ``autotune profile demo
--target cpu --fit-target FILE`` does (every (layer, option) and the rest of the model timed
inside the demo at 1x128 and 1x16 tokens). Then the whole-model latency of several plans is
predicted and measured on four models: the demo itself (in sample), the bundled ``tiny-lm``,
and a Llama and a GPT-2 built from configs with random weights (out of sample). Plans per
model: uniform ones, mixed ones drawn at random per layer with a fixed seed, and the
allocator's plan (bytes <= 40% of the original, scored by a data-free bits proxy). Causal
LMs are measured for prefill and for one decode step against a KV cache.

All plans of a (model, phase) are timed interleaved, one call of each per round with the
order reversed every other round, so load swings on the machine hit every plan alike. The
table gives measured ms, the built-in ``cpu`` roofline and the fitted one, each with its
ratio to the measurement, and then the median absolute error per (model, phase).

Run: ``python benchmarks/latency_transfer.py`` (under a minute on 2 idle cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder would shadow the installed ``methods`` and ``profilers``
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import copy
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn

from autotune.apply import compress
from autotune.calibration import build_calibration
from autotune.costs import CostModel, build_costs, default_methods, layer_options
from autotune.layers import compressible_layers
from autotune.loading import load_model
from autotune.targets import get_target
from methods import KeepOption
from methods.base import Option
from methods.tied import untie_output_embeddings
from profilers.execution.decode import decode_inputs
from profilers.execution.observe import collect_observers
from profilers.hardware import HardwareSpec
from profilers.measure import measure_latencies
from profilers.roofline_fit import fit_target, observe
from search import ChoiceTable, allocate

UNIFORM = ("keep", "int8-ch-sym", "int4-g32-asym", "int4-g128-sym", "w8a8-sq0.6")
RANDOM_PLANS = 2
ALLOCATOR_SHARE = 0.4
SEQ_LEN = 128
DECODE_CONTEXT = 128
FIT_ROUNDS = 5  # timed calls per (layer, option) when fitting (the CLI's fit takes 7)


@dataclass
class Subject:
    """A model to predict, with calibration batches and whether it decodes."""

    name: str
    model: nn.Module
    batches: list[dict[str, torch.Tensor]]
    causal: bool
    fitted_here: bool = False


def random_batches(vocab: int, count: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        {"input_ids": torch.randint(0, vocab, (2, SEQ_LEN), generator=generator)}
        for _ in range(count)
    ]


def llama() -> Subject:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=8000,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    return Subject("llama-4x384", model, random_batches(8000), causal=True)


def gpt2() -> Subject:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=8000,
        n_embd=512,
        n_layer=4,
        n_head=8,
        n_positions=512,
        bos_token_id=1,
        eos_token_id=1,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    return Subject("gpt2-4x512", model, random_batches(8000), causal=True)


def bundled(name: str, causal: bool, fitted_here: bool = False) -> Subject:
    loaded = load_model(name)
    calib = build_calibration(loaded.model, loaded.tokenizer, seq_len=SEQ_LEN)
    return Subject(name, loaded.model.eval(), calib.calibration, causal, fitted_here)


def fit_on(subject: Subject, spec: HardwareSpec) -> HardwareSpec:
    """``spec`` fitted to times measured inside ``subject`` (as ``--fit-target`` does)."""
    model = subject.model
    layers = compressible_layers(model)
    options = layer_options(layers, default_methods(spec))
    every: dict[str, list[Option]] = {
        r.name: [KeepOption()] for r in compressible_layers(model, min_numel=0)
    }
    every.update(options)
    ids = subject.batches[0]["input_ids"][:1]
    shapes = [{"input_ids": ids[:, :SEQ_LEN]}, {"input_ids": ids[:, :16]}]
    observers = collect_observers(model, options, subject.batches)
    observations = observe(model, every, shapes, observers=observers, rounds=FIT_ROUNDS)
    fit = fit_target(spec, observations, name=f"{spec.name}-fitted", source=f"on {subject.name}")
    print(
        f"{spec.name} fitted on {subject.name}: per-layer median error "
        f"{100 * fit.before['median_abs_rel_error']:.0f}% -> "
        f"{100 * fit.after['median_abs_rel_error']:.0f}% ({len(observations)} observations)",
        flush=True,
    )
    return fit.spec


def plans(options: dict[str, list[Option]], costs: CostModel, seed: int) -> dict[str, dict]:
    """Uniform plans (a layer without the option keeps its weight), random mixes, and the
    allocator's plan under a bytes limit with a data-free score (error ~ 4^-bits)."""
    out: dict[str, dict[str, Option]] = {}
    for label in UNIFORM:
        out[f"uniform {label}"] = {
            name: next((o for o in opts if o.label == label), KeepOption())
            for name, opts in options.items()
        }
    rng = random.Random(seed)
    for index in range(RANDOM_PLANS):
        out[f"random mix {index + 1}"] = {name: rng.choice(opts) for name, opts in options.items()}
    names = list(options)
    bits = {n: np.asarray(costs.weight_bits[n], dtype=float) for n in names}
    numel = {n: costs.weight_bits[n][options[n].index(KeepOption())] / 32 for n in names}
    table = ChoiceTable(
        variables=names,
        choices=[[o.label for o in options[n]] for n in names],
        scores=[numel[n] * 4.0 ** -(bits[n] / numel[n]) for n in names],
        costs={"bytes": [np.asarray(costs.bytes[n], dtype=float) for n in names]},
        fixed={"bytes": float(costs.fixed_bytes)},
    )
    chosen = allocate(table, {"bytes": ALLOCATOR_SHARE * costs.original_bytes})
    out[f"allocator <= {ALLOCATOR_SHARE:.0%} bytes"] = {
        n: options[n][i] for n, i in zip(names, chosen.assignment, strict=True)
    }
    return out


def phases(subject: Subject, model: nn.Module) -> dict[str, dict[str, Any]]:
    ids = subject.batches[0]["input_ids"][:1]
    out: dict[str, dict[str, Any]] = {"prefill 1x128": {"input_ids": ids[:, :SEQ_LEN]}}
    if subject.causal:
        out[f"decode @{DECODE_CONTEXT}"] = decode_inputs(model, ids[:, :DECODE_CONTEXT])
    return out


def evaluate(
    subject: Subject, specs: dict[str, HardwareSpec], rounds: int, seed: int
) -> list[dict[str, Any]]:
    model = copy.deepcopy(subject.model)
    untie_output_embeddings(model)  # as the tuner does: a tied table is one layer
    layers = compressible_layers(model)
    options = layer_options(layers, default_methods(specs["cpu"]))
    observers = collect_observers(model, options, subject.batches)
    rows = []
    steps = phases(subject, model)
    first = next(iter(steps.values()))
    candidates = plans(options, build_costs(model, layers, options, specs["cpu"], first), seed)
    compressed = {}
    for label, chosen in candidates.items():
        variant = copy.deepcopy(model)
        compress(variant, chosen, observers=observers)
        compressed[label] = variant
    for phase, inputs in steps.items():
        costs = {name: build_costs(model, layers, options, s, inputs) for name, s in specs.items()}
        measured = measure_latencies(compressed, inputs, rounds=rounds, warmup=3)
        for label, chosen in candidates.items():
            choice = {n: options[n].index(o) for n, o in chosen.items()}
            row = {
                "fitted on": "demo",
                "model": subject.name + (" (in sample)" if subject.fitted_here else ""),
                "phase": phase,
                "plan": label,
                "measured": measured[label].p50_ms,
            }
            for name, cost in costs.items():
                row[name] = cost.totals(choice)["latency_ms"]
            rows.append(row)
    return rows


def _cell(predicted: float, measured: float) -> str:
    ratio = predicted / measured
    return f" {predicted:>8.2f}ms x{ratio:>5.2f} {100 * (ratio - 1):>+4.0f}%"


def print_table(rows: list[dict[str, Any]], predictors: list[str]) -> None:
    header = f"{'fitted on':<9} {'model':<17} {'phase':<14} {'plan':<23} {'measured':>9}" + "".join(
        f" {name:>22}" for name in predictors
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = "".join(_cell(r[n], r["measured"]) for n in predictors)
        print(
            f"{r['fitted on']:<9} {r['model']:<17} {r['phase']:<14} {r['plan']:<23} "
            f"{r['measured']:>7.2f}ms{cells}"
        )
    print()
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["phase"]), []).append(r)
    for (model, phase), subset in groups.items():
        parts = []
        for name in predictors:
            errors = [abs(r[name] / r["measured"] - 1) for r in subset]
            parts.append(f"{name} {100 * statistics.median(errors):.0f}%")
        print(f"median |error| {model:<17} {phase:<14} " + ", ".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed calls of each plan")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random mixed plans")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    demo = bundled("demo", causal=False, fitted_here=True)
    builtin = get_target("cpu")
    specs = {"cpu": builtin, "cpu fitted on demo": fit_on(demo, builtin)}
    rows = []
    for subject in (demo, bundled("tiny-lm", causal=True), llama(), gpt2()):
        rows += evaluate(subject, specs, args.rounds, args.seed)
        print(f"measured {subject.name} ({time.perf_counter() - started:.0f} s)", flush=True)
    print()
    print_table(rows, list(specs))
    print(f"\ndone in {time.perf_counter() - started:.0f} s on {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
