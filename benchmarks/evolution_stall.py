"""The evolutionary search with and without its stall rule, on the demo model.

Each row is a whole ``autotune()`` run (target ``cpu``, ``search="evolution"``, the default
evaluation ceiling) at one bits-per-weight budget: with the stall rule (stop once the
parent's error on the selection split fell by less than 0.5% over the last generations) over
4, 3 (the default) and 2 generations by default; ``--rules 8,4,off`` compares others, ``off``
leaving only the ceiling to stop it.
Printed: why the search stopped, its generations and full evaluations, the plan the selection
split kept (the engine's, the allocator's or a uniform one), the held-out error (normalised
MSE of the sentence embeddings on held-out windows, which nothing chooses on) and the wall
seconds of the whole tune. The sensitivity table is built by a first, untimed run and read
from the cache by every timed one.

Run: ``python benchmarks/evolution_stall.py`` (about 10 minutes on 2 cores);
``--budgets 3.5bits`` or ``--rules 4,2`` for a part.
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
from search.evolution import Stall

BUDGETS = ("3bits", "3.5bits", "4bits", "15MB")


RULES = ("4", "3", "2")


def rule(patience: str) -> tuple[str, Stall | None]:
    """The stall rule named by a number of generations, or none for ``off``."""
    if patience == "off":
        return "off", None
    return f"on ({patience} generations)", Stall(generations=int(patience))


def tune(budget: str, stall: Stall | None) -> dict:
    loaded = load_model("demo")
    saved = dict(engines.EVOLUTION)
    engines.EVOLUTION["stall"] = stall
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
        "chosen": search.get("chosen", "-"),
        "error": result.plan.measured["heldout_error"],
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default=",".join(BUDGETS))
    parser.add_argument(
        "--rules",
        default=",".join(RULES),
        help="stall rules to compare: generations without a 0.5%% gain, or off",
    )
    args = parser.parse_args()
    budgets = args.budgets.split(",")
    tune(budgets[0], Stall())  # builds the sensitivity cache, untimed
    print(
        "| budget | stall rule | stopped by | generations | full evals | kept | held-out NMSE | s |"
    )
    print("|---|---|---|---:|---:|---|---:|---:|")
    for budget in budgets:
        for patience in args.rules.split(","):
            name, stall = rule(patience)
            row = tune(budget, stall)
            cells = [
                budget,
                name,
                str(row["stopped"]),
                str(row["generations"]),
                f"{row['evaluations']:.1f}",
                str(row["chosen"]),
                f"{row['error']:.4f}",
                f"{row['seconds']:.0f}",
            ]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
