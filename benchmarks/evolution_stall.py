"""The evolutionary search with and without its stall rules, on the bundled models.

Each row is a whole ``autotune()`` run (target ``cpu``, ``search="evolution"``, the default
evaluation ceiling) at one budget, with a stall rule spelled ``N`` (stop once the parent's
error on the selection split fell by less than 0.5% over the last N generations), ``N+K``
(that, or no lower error at all over the last K generations) or
``off`` (only the ceiling stops it); the default is ``1``. By default ``3+1`` (the rule
before) and ``1`` are compared on the demo and tiny-lm; ``--rules 8,4,off`` compares others.
Printed: why the search stopped, its generations and full evaluations, the plan the selection
split kept (the engine's, the allocator's or a uniform one), the held-out error (normalised
MSE of the demo's sentence embeddings, KL of tiny-lm's next-token distributions, on held-out
windows, which nothing chooses on) and the wall seconds of the whole tune. The sensitivity
table of each model is built by a first, untimed run and read from the cache by every timed
one (a budget's first timed tune also measures the end-to-end pairs its refinement adds).

Run: ``python benchmarks/evolution_stall.py`` (about 10 minutes on 2 cores);
``--models demo --budgets 3.5bits`` or ``--rules 4,2`` for a part.
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

BUDGETS = ("3bits", "3.5bits", "4bits", "5bits")


MODELS = ("demo", "tiny-lm")
RULES = ("3+1", "1")


def rule(spelled: str) -> tuple[str, Stall | None]:
    """The stall rule spelled ``N``, ``N+K`` or ``off`` (see the module docstring)."""
    if spelled == "off":
        return "off", None
    generations, _, idle = spelled.partition("+")
    plural = "" if generations == "1" else "s"
    if not idle:
        return f"on ({generations} generation{plural})", Stall(int(generations), idle=None)
    name = f"on ({generations} generation{plural}, or {idle} without a gain)"
    return name, Stall(int(generations), idle=int(idle))


def tune(model: str, budget: str, stall: Stall | None) -> dict:
    loaded = load_model(model)
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
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--budgets", default=",".join(BUDGETS))
    parser.add_argument(
        "--rules",
        default=",".join(RULES),
        help="stall rules to compare: N, N+K or off (see the module docstring)",
    )
    args = parser.parse_args()
    budgets = args.budgets.split(",")
    print(
        "| model | budget | stall rule | stopped by | generations | full evals | kept "
        "| held-out error | s |"
    )
    print("|---|---|---|---|---:|---:|---|---:|---:|")
    for model in args.models.split(","):
        tune(model, budgets[0], Stall())  # builds the sensitivity cache, untimed
        for budget in budgets:
            for spelled in args.rules.split(","):
                name, stall = rule(spelled)
                row = tune(model, budget, stall)
                cells = [
                    model,
                    budget,
                    name,
                    str(row["stopped"]),
                    str(row["generations"]),
                    f"{row['evaluations']:.1f}",
                    str(row["chosen"]),
                    f"{row['error']:.4g}",
                    f"{row['seconds']:.0f}",
                ]
                print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
