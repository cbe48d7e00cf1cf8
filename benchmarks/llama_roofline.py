"""llama.cpp's own speed per GGML type against the ``cpu`` target's prices for llama.cpp.

For each model, every compressible layer is given one type at a time: one GGUF file per
type (and the all-F32 file), written by autotune and timed in llama.cpp on this machine, every
file in turn each round, at two shapes: a prompt of 1 x 128 tokens and one decode step after
127 tokens. The same uniform plans are priced on the ``cpu`` target's roofline two ways:

* **llama.cpp figures**: the target's ``runtimes["llama.cpp"]`` figures (fitted by
  ``autotune profile MODEL --runtime llama.cpp --target cpu --fit-target FILE`` to llama.cpp's
  timings of one model's uniform files; its source names which), as tunes price them;
* **device figures**: the target's own figures, fitted to autotune's torch modules (how such
  plans were priced before llama.cpp had figures of its own).

Timings here are taken afresh, so even on the model the figures were fitted to they are
checked against other runs than the fit's; the other models were not fitted to at all. The
absolute seconds decide whether a latency budget is met; a plan's choice between types
depends on their relative cost, shown over F16's (below 1: faster than F16). Models: tiny-lm
(256 wide: only the 32-wide block types fit every layer), small-lm, and a Llama built from a
config with rows that are multiples of 256 (8 blocks x 512, MLP 1536, random weights: speed
does not depend on them), so K-quants apply.

A second table times one file per block type a plan can take (its linear layers in that type,
its embeddings in Q4_0; the i-quants too) in a decode step and compares each type's time over
Q4_0's file with the ``cpu`` figures' prediction, with their block rates and without them
(every type priced by its bytes on one kernel efficiency).

Run: ``python benchmarks/llama_roofline.py`` (a few minutes on 2 cores; needs
``pip install 'autotune[llama]'``).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder must not shadow the packages named like its files (methods)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import dataclasses
import math
import statistics
from typing import Any

import torch
import transformers
from torch import nn

from autotune.export.llama_cpp import available
from autotune.export.llama_fit import FLOAT, REFERENCE, llama_observations, rated_type
from autotune.loading import load_model
from autotune.runtimes import get_runtime
from autotune.targets import get_target
from profilers.execution.adapters import adapter_for

RUNTIME = "llama.cpp"


def config_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, 128), generator=torch.Generator().manual_seed(1))
    return {
        "prompt 1x128": {"input_ids": ids},
        "decode after 127": adapter_for(model).decode_inputs(model, ids),
    }


def rows(
    model_name: str,
    model: nn.Module,
    summary: list[list[str]],
    rated: list[list[str]],
    rated_summary: list[list[str]],
) -> list[list[str]]:
    device = get_target("cpu")
    ways = {
        "llama.cpp figures": get_runtime(RUNTIME).spec_for(device),
        "device figures": dataclasses.replace(device, runtimes={}).for_runtime(RUNTIME),
    }
    found = []
    observations = llama_observations(model, shapes(model), rated=True)
    per_type = [o for o in observations if rated_type(o) is not None]
    _rated_rows(model_name, per_type, ways, rated, rated_summary)
    observations = [o for o in observations if rated_type(o) is None]
    for shape in shapes(model):
        timed = {
            o.label.rsplit(" ", 1)[1]: o for o in observations if f" {shape} " in f"{o.label} "
        }
        measured = {t: o.seconds for t, o in timed.items()}
        priced = {w: {t: o.price(spec) for t, o in timed.items()} for w, spec in ways.items()}
        for t in timed:
            row = [model_name, shape, t, f"{1e3 * measured[t]:.2f}"]
            row += [f"{1e3 * priced[w][t]:.2f} ({priced[w][t] / measured[t]:.2f})" for w in ways]
            row.append("-" if t in (FLOAT, "F16") else f"{measured[t] / measured['F16']:.2f}")
            for w in ways:
                if t in (FLOAT, "F16"):
                    row.append("-")
                    continue
                relative = priced[w][t] / priced[w]["F16"]
                row.append(f"{relative:.2f} ({relative / (measured[t] / measured['F16']):.2f})")
            found.append(row)
        for w in ways:
            absolute = [abs(math.log(priced[w][t] / measured[t])) for t in timed]
            relative = [
                abs(math.log(priced[w][t] / priced[w]["F16"] * measured["F16"] / measured[t]))
                for t in timed
                if t not in (FLOAT, "F16")
            ]
            summary.append(
                [
                    model_name,
                    shape,
                    w,
                    f"{math.exp(statistics.median(absolute)):.2f}x",
                    f"{math.exp(max(absolute)):.2f}x",
                    f"{math.exp(statistics.median(relative)):.2f}x",
                ]
            )
    return found


def _rated_rows(
    model_name: str,
    observations: list,
    ways: dict,
    rated: list[list[str]],
    rated_summary: list[list[str]],
) -> None:
    """Each block type's decode step over Q4_0's, measured and priced with and without the
    block rates: a row per type in ``rated``, per way of pricing in ``rated_summary``."""
    figures = ways["llama.cpp figures"]
    priced_ways = {
        "with block rates": figures,
        "without": dataclasses.replace(figures, block_rates={}),
    }
    decode = {rated_type(o): o for o in observations if " decode " in o.label}
    if REFERENCE not in decode:
        return
    anchor = decode[REFERENCE]
    errors: dict[str, list[float]] = {w: [] for w in priced_ways}
    for kind, observation in sorted(decode.items()):
        measured = observation.seconds / anchor.seconds
        row = [model_name, kind, f"{1e3 * observation.seconds:.3f}", f"{measured:.2f}"]
        for way, spec in priced_ways.items():
            predicted = observation.price(spec) / anchor.price(spec)
            row.append(f"{predicted:.2f} ({predicted / measured:.2f})")
            errors[way].append(abs(math.log(predicted / measured)))
        rated.append(row)
    for way, values in errors.items():
        rated_summary.append(
            [
                model_name,
                way,
                f"{math.exp(statistics.median(values)):.2f}x",
                f"{math.exp(max(values)):.2f}x",
            ]
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny-lm,small-lm,llama-8x512")
    args = parser.parse_args()
    if not available():
        sys.exit("llama.cpp is not installed: pip install 'autotune[llama]'")
    device = get_target("cpu")
    figures = device.runtimes.get(RUNTIME)
    fitted = figures.sources.get("op_overhead_s") if figures else "none"
    print(f"cpu target's llama.cpp figures: {fitted}")
    table: list[list[str]] = []
    summary: list[list[str]] = []
    rated: list[list[str]] = []  # per model and block type, in a decode step
    rated_summary: list[list[str]] = []
    for name in args.models.split(","):
        model = config_llama() if name == "llama-8x512" else load_model(name).model
        table += rows(name, model, summary, rated, rated_summary)
    print()
    print(
        "| model | shape | type | measured ms | llama.cpp figures ms (x measured) | device "
        "figures ms (x measured) | measured / F16 | llama.cpp figures / F16 (x measured) | "
        "device figures / F16 (x measured) |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    print()
    print(
        "| model | shape | figures | median error of ms (factor) | largest | median error of "
        "the time over F16's |"
    )
    print("|---|---|---|---:|---:|---:|")
    for row in summary:
        print("| " + " | ".join(row) + " |")
    print()
    print(
        f"| model | type | decode ms | measured / {REFERENCE} | priced / {REFERENCE} with block "
        "rates (x measured) | without (x measured) |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for row in rated:
        print("| " + " | ".join(row) + " |")
    print()
    print(f"| model | prices | median error of the time over {REFERENCE}'s (factor) | largest |")
    print("|---|---|---:|---:|")
    for row in rated_summary:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
