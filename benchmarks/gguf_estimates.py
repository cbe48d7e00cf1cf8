"""Fisher estimates of llama.cpp's tensor types with and without their activation rounding.

llama.cpp rounds every activation row to the weight type's vec_dot type (8-bit blocks, or
float16) before multiplying, so a type's error is its weight error plus that rounding's. The
Fisher estimate that ranks (layer, type) pairs before end-to-end scoring adds the rounding's
error (:mod:`profilers.input_rounding`); this compares it with the weight-only estimate.

First table: on the bundled tiny-lm and small-lm, every plain GGUF type each linear layer of
the blocks can take, scored end to end (the KL of next-token distributions on the
calibration's sensitivity windows, with the layer in autotune's GGUF module, activation
rounding included) and by both estimates; per type, the median ratio of estimate to
end-to-end error over the layers (1 is exact), and over all pairs the Spearman rank
correlation with the end-to-end errors.

Second table: ``autotune(..., runtime="llama.cpp", target="cpu", measure=False)`` at two
budgets per model, with each estimate (the other switched off by patching
``Method.input_rounding``), no sensitivity cache: the pairs measured end to end, the
scoring and whole-tune seconds, the stored bytes and the held-out KL of the plan in
autotune's modules (the held-out split, which no tune chooses on; measured here after the
tune). Rows run one after another; read seconds as ratios within a model and budget.

Run: ``python benchmarks/gguf_estimates.py`` (about 10 minutes on 2 cores; needs the
``llama`` extra for the i-quants and K-quants' exact encoders).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder must not shadow the packages named like its files (methods)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

from autotune import autotune
from autotune.calibration import build_calibration
from autotune.loading import load_model
from methods.base import LayerShape
from methods.gguf import GGUFOption, GGUFTypes
from methods.registry import get_method
from profilers.proxies import fisher_table, spearman
from profilers.quality import output_error, run_outputs
from profilers.sensitivity import measure_sensitivity

BUDGETS = {"tiny-lm": ("8.5bits", "4.5bits"), "small-lm": ("8.5bits", "4.5bits")}


@contextmanager
def weight_only_estimates():
    """Fisher estimates without the activation rounding (as before it was added)."""
    saved = GGUFTypes.input_rounding
    GGUFTypes.input_rounding = lambda self, option: None
    try:
        yield
    finally:
        GGUFTypes.input_rounding = saved


def block_options(model: torch.nn.Module) -> dict[str, list[GGUFOption]]:
    """Every plain GGUF type each linear layer inside the blocks can take."""
    method = get_method("gguf")
    return {
        name: [o for o in method.grid(LayerShape.of(module)) if not o.imatrix]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"
    }


def estimate_table(name: str) -> None:
    loaded = load_model(name)
    model = loaded.model
    batches = build_calibration(model, loaded.tokenizer).sensitivity
    options = block_options(model)
    measured = measure_sensitivity(model, options, batches)
    with_rounding = fisher_table(model, options, batches)
    with weight_only_estimates():
        weight_only = fisher_table(model, options, batches)
    types = sorted({o.type for opts in options.values() for o in opts})
    for kind in types:
        ratios = {"with": [], "without": []}
        for layer, opts in options.items():
            label = GGUFOption(kind).label
            truth = measured.errors[layer].get(label)
            if label not in {o.label for o in opts} or not truth:
                continue
            ratios["with"].append(with_rounding.errors[layer][label] / truth)
            ratios["without"].append(weight_only.errors[layer][label] / truth)
        if ratios["with"]:
            print(
                f"| {name} | {kind} | {len(ratios['with'])} | "
                f"{statistics.median(ratios['with']):.2f} | "
                f"{statistics.median(ratios['without']):.2f} |",
                flush=True,
            )
    print(
        f"| {name} | all (Spearman) | {sum(len(e) for e in measured.errors.values())} | "
        f"{spearman(with_rounding, measured):.3f} | {spearman(weight_only, measured):.3f} |",
        flush=True,
    )


def tune_row(name: str, budget: str, estimate: str) -> None:
    loaded = load_model(name)
    began = time.perf_counter()
    result = autotune(
        loaded.model,
        budget,
        "cpu",
        runtime="llama.cpp",
        tokenizer=loaded.tokenizer,
        progress=False,
        measure=False,
        cache=False,
    )
    seconds = time.perf_counter() - began
    search = result.plan.search
    heldout = build_calibration(loaded.model, loaded.tokenizer).heldout
    reference = run_outputs(loaded.model, heldout)
    error = output_error(result.model, heldout, reference, "kl")
    print(
        f"| {name} | {budget} | {estimate} | {search['sensitivity_scored_by']['end-to-end']} | "
        f"{search['stage_seconds']['score']:.1f} | {seconds:.1f} | "
        f"{result.plan.predicted['bytes']:,} | {error:.4g} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(BUDGETS))
    parser.add_argument("--tables", default="estimates,tunes")
    args = parser.parse_args()
    models, tables = args.models.split(","), args.tables.split(",")
    if "estimates" in tables:
        print("| model | type | layers | estimate / end-to-end, with rounding | without |")
        print("|---|---|---:|---:|---:|")
        for name in models:
            estimate_table(name)
        print()
    if "tunes" in tables:
        print(
            "| model | budget | estimate | pairs end to end | scoring s | tune s | bytes | "
            "held-out KL |"
        )
        print("|---|---|---|---:|---:|---:|---:|---:|")
        for name in models:
            for budget in BUDGETS[name]:
                tune_row(name, budget, "with rounding")
                with weight_only_estimates():
                    tune_row(name, budget, "weight only")


if __name__ == "__main__":
    main()
