"""The evolutionary search with and without its stall rule, on the demo model.

Each row is a whole ``autotune()`` run (target ``cpu``, ``search="evolution"``, the default
evaluation ceiling) at one bits-per-weight budget: with the default rule (stop once the best
error fell by less than 0.5% over 8 generations) and with the rule off, so that only the
ceiling stops it. Printed: why the search stopped, its generations and full evaluations, the
held-out error (normalised MSE of the sentence embeddings on held-out windows, which the
search never saw) and the wall seconds of the whole tune. The sensitivity table is built by a
first, untimed run and read from the cache by every timed one.

Run: ``python benchmarks/evolution_stall.py`` (about 10 minutes on 2 cores);
``--budgets 3.5bits`` for a part.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder must not shadow the packages named like its files (search)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import time

from autotune import autotune, engines
from autotune.loading import load_model

BUDGETS = ("3bits", "3.5bits", "4bits")


def tune(budget: str, stall: bool) -> dict:
    loaded = load_model("demo")
    saved = dict(engines.EVOLUTION)
    if not stall:
        engines.EVOLUTION["stall"] = None
    try:
        began = time.perf_counter()
        result = autotune(
            loaded.model,
            budget,
            "cpu",
            tokenizer=loaded.tokenizer,
            search="evolution",
            progress=False,
        )
        seconds = time.perf_counter() - began
    finally:
        engines.EVOLUTION.clear()
        engines.EVOLUTION.update(saved)
    search = result.plan.search or {}
    run = search.get("engine_run") or search
    return {
        "stopped": run.get("stopped", "-"),
        "generations": run.get("iterations", "-"),
        "evaluations": run.get("full_evaluations", float("nan")),
        "error": result.plan.measured["heldout_error"],
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default=",".join(BUDGETS))
    args = parser.parse_args()
    budgets = args.budgets.split(",")
    tune(budgets[0], stall=True)  # builds the sensitivity cache, untimed
    print("| budget | stall rule | stopped by | generations | full evals | held-out NMSE | s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for budget in budgets:
        for stall in (True, False):
            row = tune(budget, stall)
            cells = [
                budget,
                "on" if stall else "off",
                str(row["stopped"]),
                str(row["generations"]),
                f"{row['evaluations']:.1f}",
                f"{row['error']:.4f}",
                f"{row['seconds']:.0f}",
            ]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
