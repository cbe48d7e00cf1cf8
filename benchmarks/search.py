"""Search engines on the demo model at 3, 3.5, 4 and 5 stored bits per weight (scales
included): held-out error, full evaluations and wall time of each engine, beside the best
uniform plan that fits the same budget.

Every row is a whole ``autotune()`` run on all-MiniLM-L6-v2 with target ``cpu``: profiling
(read from the sensitivity cache after the first run), the allocator, the engine, the
uniform check, and the held-out measurement. "full evals" counts whole-model evaluations on
the 32-window calibration set (an evaluation on the 4 profiling windows counts 1/8); the
sensitivity table (one layer compressed at a time) is not counted. The error is the
normalised MSE of the sentence embeddings on held-out text, which no engine saw.

Run: ``python benchmarks/search.py`` (about 25 minutes on 2 cores); ``--budgets 4bits
--engines allocator,evolution`` for a part.
"""

from __future__ import annotations

import sys
from pathlib import Path

# this file is named like the package it measures: run as a script, its folder must not
# shadow the installed ``search`` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import time

from autotune import autotune
from autotune.loading import load_model

BUDGETS = ("3bits", "3.5bits", "4bits", "5bits")
ENGINES = ("allocator", "evolution", "tpe", "nsga2")


def run(budget: str, engine: str, max_evals: float, seed: int) -> dict:
    loaded = load_model("demo")
    began = time.perf_counter()
    result = autotune(
        loaded.model,
        budget,
        "cpu",
        tokenizer=loaded.tokenizer,
        search=engine,
        max_evals=max_evals,
        seed=seed,
        progress=False,
    )
    plan = result.plan
    return {
        "budget": budget,
        "engine": engine,
        "chosen": plan.search["chosen"],
        "avg_bits": plan.predicted["avg_bits"],
        "heldout": plan.measured["heldout_error"],
        "calibration": plan.predicted["error"],
        "uniform": plan.measured.get("best_uniform"),
        "full_evals": plan.search["full_evaluations"],
        "seconds": time.perf_counter() - began,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default=",".join(BUDGETS))
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--max-evals", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    header = (
        f"{'budget':<8} {'engine':<10} {'chosen':<22} {'bits':>6} {'held-out':>9} "
        f"{'x uniform':>9} {'calib':>9} {'full evals':>10} {'wall s':>7}"
    )
    print(header, flush=True)
    for budget in args.budgets.split(","):
        uniform_printed = False
        for engine in args.engines.split(","):
            row = run(budget, engine, args.max_evals, args.seed)
            rows.append(row)
            uniform = row["uniform"]
            if uniform and not uniform_printed:
                print(
                    f"{budget:<8} {'uniform':<10} {uniform['option']:<22} "
                    f"{'':>6} {uniform['heldout_error']:>9.4f} {1.0:>9.2f} {'':>9} "
                    f"{'':>10} {'':>7}",
                    flush=True,
                )
                uniform_printed = True
            ratio = row["heldout"] / uniform["heldout_error"] if uniform else float("nan")
            print(
                f"{budget:<8} {engine:<10} {row['chosen'][:22]:<22} {row['avg_bits']:>6.3f} "
                f"{row['heldout']:>9.4f} {ratio:>9.2f} {row['calibration']:>9.4f} "
                f"{row['full_evals']:>10.1f} {row['seconds']:>7.1f}",
                flush=True,
            )
    print(
        "\nheld-out: NMSE of the embeddings on held-out text; x uniform: against the best "
        "uniform plan that fits; full evals: whole-model evaluations on the calibration set "
        "(search and final checks); wall s: the whole tune, sensitivity from the cache."
    )


if __name__ == "__main__":
    main()
