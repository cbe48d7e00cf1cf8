"""How often the chosen plan beats the best uniform plan on held-out data.

A tune picks its plan with two splits: the calibration data picks the search's front runner
and the selection split judges it against every uniform plan that fits the budget. Neither
split is the held-out data, so the held-out comparison below can come out either way: it
is the evidence that the choice generalises, not a restatement of it.

For each model (the demo and tiny-lm), budget and seed, one ``autotune()`` run on target
``cpu`` (the default search) gets its own calibration texts: standard-library docstrings of
the calibration and selection files, shuffled by the seed (the tune deals every fourth one
to its selection split). The held-out texts are the held-out files' docstrings, the same for
every run, and no run chooses anything on them. Each row prints the chosen plan and the best
uniform plan (the uniform plan that fits with the least selection error), both stored sizes,
and both held-out errors (1 - cosine for the demo's embeddings, KL of the next-token
distributions for tiny-lm); the ratio is chosen / uniform, below 1 when the chosen plan wins.

Run: ``python benchmarks/guarantee.py`` (about 15 minutes on 2 cores); ``--models tiny-lm
--seeds 0`` for a part.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder must not shadow the packages named like its files (methods)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import itertools
import random
import statistics
import time
from dataclasses import dataclass

from autotune import autotune
from autotune.calibration import stdlib_texts
from autotune.loading import load_model

BUDGETS = {"demo": ["3.25bits", "4.25bits", "5bits"], "tiny-lm": ["3.25bits", "4.25bits"]}
TEXTS = 1200  # docstrings each run draws its calibration and selection texts from


@dataclass
class Row:
    model: str
    budget: str
    seed: int
    chosen: str
    chosen_bytes: int
    uniform: str
    uniform_bytes: int
    chosen_error: float
    uniform_error: float
    seconds: float

    @property
    def ratio(self) -> float:
        return self.chosen_error / self.uniform_error if self.uniform_error else float("nan")


def calibration_texts(seed: int) -> list[str]:
    pool = list(itertools.islice(stdlib_texts("calibration"), TEXTS))
    pool += list(itertools.islice(stdlib_texts("selection"), TEXTS // 2))
    random.Random(seed).shuffle(pool)
    return pool


def run(model_name: str, budget: str, seed: int, heldout: list[str], search: str) -> Row:
    loaded = load_model(model_name)
    started = time.perf_counter()
    result = autotune(
        loaded.model,
        budget,
        "cpu",
        tokenizer=loaded.tokenizer,
        calibration=calibration_texts(seed),
        heldout=heldout,
        seed=seed,
        search=search,
        progress=False,
        cache=False,
        inplace=True,
    )
    plan = result.plan
    uniform = plan.measured.get("best_uniform") or {}
    return Row(
        model=model_name,
        budget=budget,
        seed=seed,
        chosen=plan.search["chosen"],
        chosen_bytes=plan.measured["bytes"],
        uniform=uniform.get("option", "none fits"),
        uniform_bytes=uniform.get("bytes", 0),
        chosen_error=plan.measured["heldout_error"],
        uniform_error=uniform.get("heldout_error", float("nan")),
        seconds=time.perf_counter() - started,
    )


def print_rows(rows: list[Row]) -> None:
    print(
        "| model | budget | seed | chosen | bytes | best uniform (selection) | bytes "
        "| held-out error, chosen | held-out error, uniform | ratio | tune s |"
    )
    print("|---|---|---|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.model} | {r.budget} | {r.seed} | {r.chosen} | {r.chosen_bytes:,} "
            f"| {r.uniform} | {r.uniform_bytes:,} | {r.chosen_error:.4g} "
            f"| {r.uniform_error:.4g} | {r.ratio:.3f} | {r.seconds:.0f} |",
            flush=True,
        )


def print_summary(rows: list[Row]) -> None:
    print("\n| model | runs | chosen beats best uniform on held-out | median ratio | worst ratio |")
    print("|---|---:|---:|---:|---:|")
    for model in dict.fromkeys(r.model for r in rows):
        ratios = [r.ratio for r in rows if r.model == model and r.uniform_bytes]
        if not ratios:
            continue
        wins = sum(x < 1 for x in ratios)
        print(
            f"| {model} | {len(ratios)} | {wins}/{len(ratios)} | "
            f"{statistics.median(ratios):.3f} | {max(ratios):.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--search", default="auto", help="search engine (default: auto)")
    args = parser.parse_args()
    heldout = list(stdlib_texts("heldout"))
    rows = []
    for model in args.models:
        for budget in BUDGETS[model]:
            for seed in args.seeds:
                rows.append(run(model, budget, seed, heldout, args.search))
                print(
                    f"{model} {budget} seed {seed}: ratio {rows[-1].ratio:.3f}",
                    file=sys.stderr,
                    flush=True,
                )
    print_rows(rows)
    print_summary(rows)


if __name__ == "__main__":
    main()
