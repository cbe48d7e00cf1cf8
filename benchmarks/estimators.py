"""Sensitivity estimators side by side: how many (layer, option) pairs each measures end to
end, how long scoring takes, and the held-out error of the plan the allocator builds on the
scores; then how scoring time grows with the options offered per layer.

First table: for each model (the demo and tiny-lm) and budget, one ``autotune()`` run per
estimator on target ``cpu`` with the default methods, ``search="allocator"`` (so the plan
follows the scores alone, with the selection split's final check as in every tune) and no
sensitivity cache. ``refined`` (the default in memory) measures end to end the options the
allocator's plan depends on (by default the options it chooses, round after round);
``refined, wide reach`` also each chosen option's front neighbours and the options an estimate
0.8x lower would put on the front, for up to eight rounds (the default before); ``hybrid``
the options on each layer's front of bytes against estimate; ``fisher`` none. The held-out
split is the stdlib held-out text, which no run chooses anything on.

Second table: the demo at 15 MB scored by ``end-to-end`` and ``refined`` with a growing share
of the default option labels (every k-th label of the sorted list, ``keep`` always offered),
to show how scoring time grows with the options per layer.

Rows run one after another on an idle machine; read the seconds as ratios within a table.

Run: ``python benchmarks/estimators.py`` (about 20 minutes on 2 cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder must not shadow the packages named like its files (methods)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import contextlib
import time
from collections.abc import Iterator

from autotune import autotune
from autotune.estimators import get_estimator
from autotune.loading import load_model
from autotune.refinement import Reach

WIDE = "refined, wide reach"
ESTIMATORS = ("end-to-end", "refined", WIDE, "hybrid", "fisher")
WIDE_REACH = Reach(steps=1, band=0.8, rounds=8)
BUDGETS = {"demo": ["15MB", "3.5bits"], "tiny-lm": ["4.25bits", "3.5bits"]}


SCALING_SHARES = (4, 3, 2, 1)  # every k-th option label
SCALING_ESTIMATORS = ("end-to-end", "refined")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,tiny-lm")
    parser.add_argument("--tables", default="estimators,scaling")
    args = parser.parse_args()
    started = time.perf_counter()
    tables = args.tables.split(",")
    if "estimators" in tables:
        estimators(args.models.split(","))
    if "scaling" in tables:
        scaling()
    print(f"\n{time.perf_counter() - started:.0f} s")


def _tune(loaded, budget: str, **settings):
    return autotune(
        loaded.model,
        budget,
        "cpu",
        tokenizer=loaded.tokenizer,
        search="allocator",
        cache=False,
        progress=False,
        **settings,
    )


@contextlib.contextmanager
def reach_of(estimator: str) -> Iterator[str]:
    """The registered estimator's name for a row, with the wide reach set for its run."""
    if estimator != WIDE:
        yield estimator
        return
    refined = get_estimator("refined")
    before = refined.reach
    refined.reach = WIDE_REACH
    try:
        yield "refined"
    finally:
        refined.reach = before


def estimators(models: list[str]) -> None:
    print(
        "| model | budget | estimator | pairs | end-to-end pairs | scoring s | x end-to-end "
        "| held-out error | stored bytes |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name in models:
        loaded = load_model(name)
        for budget in BUDGETS[name]:
            base = None
            for estimator in ESTIMATORS:
                with reach_of(estimator) as registered:
                    result = _tune(loaded, budget, sensitivity=registered)
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


def scaling() -> None:
    """Scoring time against the options offered per layer, on the demo at 15 MB."""
    from autotune.costs import default_methods, layer_options
    from autotune.executors import get_executor
    from autotune.layers import compressible_layers
    from autotune.targets import get_target

    loaded = load_model("demo")
    executor = get_executor("in-memory")
    methods = default_methods(get_target("cpu"), executor.default_calibrated_methods)
    offered = layer_options(compressible_layers(loaded.model), methods)
    labels = sorted({o.label for opts in offered.values() for o in opts} - {"keep"})
    print(
        "\n| options per layer (most) | estimator | pairs | end-to-end pairs | scoring s "
        "| time per pair | x fewest options | held-out error |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    base: dict[str, float] = {}
    for share in SCALING_SHARES:
        chosen = ["keep", *labels[::share]]
        for estimator in SCALING_ESTIMATORS:
            result = _tune(loaded, "15MB", sensitivity=estimator, option_labels=chosen)
            table = result.sensitivity
            pairs = sum(len(e) for e in table.errors.values())
            most = max(len(e) for e in table.errors.values())
            measured = table.scored_by.get("end-to-end", pairs)
            base.setdefault(estimator, table.seconds)
            print(
                f"| {most} | {estimator} | {pairs} | {measured} | {table.seconds:.1f} | "
                f"{1e3 * table.seconds / pairs:.1f} ms | {table.seconds / base[estimator]:.2f} | "
                f"{result.plan.measured['heldout_error']:.4g} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
