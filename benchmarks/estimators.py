"""Sensitivity estimators side by side: how many (layer, option) pairs each measures end to
end, how long scoring takes, and the held-out error of the plan the allocator builds on the
scores.

For each model (the demo and tiny-lm) and budget, one ``autotune()`` run per estimator on
target ``cpu`` with ``search="allocator"`` (so the plan follows the scores alone, with the
selection split's final check against uniform plans as in every tune) and no sensitivity
cache. ``hybrid`` gives every option its Fisher estimate and measures end to end only the
options on each layer's front of bytes against estimate. The held-out split is the stdlib
held-out text, which no run chooses anything on. Rows run one after another on an idle
machine; read the seconds as ratios to end-to-end in the same run.

Run: ``python benchmarks/estimators.py`` (about 8 minutes on 2 cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder must not shadow the packages named like its files (methods)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import time

from autotune import autotune
from autotune.loading import load_model

ESTIMATORS = ("end-to-end", "hybrid", "fisher")
BUDGETS = {"demo": ["15MB", "3.5bits"], "tiny-lm": ["4.25bits", "3.5bits"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,tiny-lm")
    args = parser.parse_args()
    started = time.perf_counter()
    print(
        "| model | budget | estimator | pairs | end-to-end pairs | scoring s | x end-to-end "
        "| held-out error | stored bytes |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        loaded = load_model(name)
        for budget in BUDGETS[name]:
            base = None
            for estimator in ESTIMATORS:
                result = autotune(
                    loaded.model,
                    budget,
                    "cpu",
                    tokenizer=loaded.tokenizer,
                    sensitivity=estimator,
                    search="allocator",
                    cache=False,
                    progress=False,
                )
                table, plan = result.sensitivity, result.plan
                pairs = sum(len(e) for e in table.errors.values())
                measured = table.scored_by.get(
                    "end-to-end", pairs if estimator == ESTIMATORS[0] else 0
                )
                base = base or table.seconds
                print(
                    f"| {name} | {budget} | {estimator} | {pairs} | {measured} | "
                    f"{table.seconds:.1f} | {table.seconds / base:.2f} | "
                    f"{plan.measured['heldout_error']:.4g} | {plan.measured['bytes']:,} |",
                    flush=True,
                )
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
