"""The default tune with and without the calibration-vs-selection agreement check, on
held-out text, with the default calibration text and with a small one.

Before any layer is scored, each calibrated method (GPTQ) is probed on every layer: its
option with the fewest bytes is converted, and its output error over its uncalibrated
stand-in's is compared on the calibration inputs and on the selection split's
(:mod:`autotune.agreement`). Where the probe is no better on the selection split, the
method's options leave the layer; elsewhere its errors are scaled by how far calibration
overstated its gain. Variants, each a full default tune of a fresh copy of the model:

* **agreement**: the default tune;
* **no agreement**: the same tune with the check switched off (the executor reports no
  agreement, so nothing is left out or scaled): calibrated errors are taken as measured on
  the text they were fitted to;
* **rtn only**: ``methods=["rtn"]``, no calibrated method at all.

Calibration: ``default`` is the tune's default (standard-library docstrings, 32 windows of
128 tokens, 8 selection windows); ``small`` is the first ``--small-sentences`` sentences of
those docstrings (short texts, a few windows in all). Held-out: the paragraphs of the Debian
licence texts (``/usr/share/common-licenses``), which no variant calibrates or selects on;
the error is measured here on ``--heldout-windows`` windows against the float model, as in
``benchmarks/peers.py`` (``1 - cosine`` of mean-pooled embeddings for the demo, KL per token
for tiny-lm). Beside it, in the tune's own metric (normalised MSE of the demo's hidden states,
KL for tiny-lm), the chosen plan's error on the calibration windows (what the tune predicts)
and on the held-out windows (as the tune measures it): the gap between the two is what
fitting the calibration text left unearned. ``left out`` and ``scaled`` count the layers
where the check left GPTQ out or scaled its errors (with the median factor).

Run: ``python benchmarks/calibration_agreement.py`` (both models, both calibrations, about
15 minutes on 2 cores); ``--models tiny-lm --calibrations small`` for a part.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder must not shadow the packages named like its files (methods)
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import argparse
import contextlib
import copy
import importlib.util
import itertools
import re
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from autotune import autotune
from autotune.agreement import Agreement
from autotune.calibration import stdlib_texts
from autotune.executors.memory import InMemory
from autotune.loading import load_model

_spec = importlib.util.spec_from_file_location("peers", HERE / "peers.py")
assert _spec is not None and _spec.loader is not None
peers = sys.modules["peers"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peers)

BUDGETS = {"demo": "3.5bits", "tiny-lm": "3.5bits"}
VARIANTS = ("agreement", "no agreement", "rtn only")


@dataclass
class Row:
    model: str
    calibration: str
    variant: str
    predicted: float
    measured: float
    heldout: float
    left_out: int
    scaled: int
    median_factor: float
    chosen: str
    seconds: float


def small_texts(count: int) -> list[str]:
    """The first ``count`` sentences of the standard library's calibration docstrings."""
    sentences: Iterator[str] = (
        sentence.strip()
        for text in stdlib_texts("calibration")
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
        if len(sentence.split()) >= 4
    )
    return list(itertools.islice(sentences, count))


@contextlib.contextmanager
def agreement_off() -> Iterator[None]:
    """The in-memory executor reports no agreement while the block runs."""
    original = InMemory.agreement
    InMemory.agreement = lambda self, layers, options, observers, selection: []  # type: ignore[method-assign]
    try:
        yield
    finally:
        InMemory.agreement = original  # type: ignore[method-assign]


def tune(
    model_name: str,
    calibration: str,
    variant: str,
    float_model: Any,
    tokenizer: Any,
    data: Any,
    texts: list[str] | None,
) -> Row:
    settings: dict[str, Any] = {"methods": ["rtn"]} if variant == "rtn only" else {}
    if texts is not None:
        settings["calibration"] = texts
    off = agreement_off() if variant == "no agreement" else contextlib.nullcontext()
    started = time.perf_counter()
    with off, peers.quiet(), tempfile.TemporaryDirectory() as cache:
        result = autotune(
            copy.deepcopy(float_model),
            BUDGETS[model_name],
            "cpu",
            tokenizer=tokenizer,
            heldout=data.heldout_texts,
            heldout_windows=data.heldout_windows,
            progress=False,
            cache=cache,
            inplace=True,
            **settings,
        )
    seconds = time.perf_counter() - started
    search = result.plan.search
    judged = search.get("calibration_agreement", [])
    factors = [
        Agreement(
            a["layer"], a["method"], a["probe"], a["stand_in"],
            a["calibration_ratio"], a["selection_ratio"],
        ).optimism
        for a in judged
        if a["kept"]
    ]  # fmt: skip
    return Row(
        model=model_name,
        calibration=calibration,
        variant=variant,
        predicted=float(result.plan.predicted.get("error", float("nan"))),
        measured=float(result.plan.measured.get("heldout_error", float("nan"))),
        heldout=peers.heldout_error(result.model, data),
        left_out=sum(not a["kept"] for a in judged),
        scaled=sum(f > 1.0 for f in factors),
        median_factor=statistics.median(factors) if factors else 1.0,
        chosen=str(search.get("chosen", "")),
        seconds=seconds,
    )


def print_table(rows: list[Row]) -> None:
    print(
        "| model, budget | calibration | variant | tune's metric: calibration | held-out | "
        "held-out error | x agreement | GPTQ left out / scaled (median x) | chosen | s |"
    )
    print("|---|---|---|---:|---:|---:|---:|---|---|---:|")
    for row in rows:
        base = next(
            r.heldout
            for r in rows
            if (r.model, r.calibration, r.variant) == (row.model, row.calibration, "agreement")
        )
        print(
            f"| {row.model} {BUDGETS[row.model]} | {row.calibration} | {row.variant} | "
            f"{row.predicted:.4g} | {row.measured:.4g} | {row.heldout:.4g} | "
            f"{row.heldout / base:.2f}x | "
            f"{row.left_out} / {row.scaled} ({row.median_factor:.2f}x) | {row.chosen} | "
            f"{row.seconds:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="demo,tiny-lm")
    parser.add_argument("--calibrations", default="default,small")
    parser.add_argument("--small-sentences", type=int, default=32)
    parser.add_argument("--heldout-windows", type=int, default=16)
    args = parser.parse_args()
    rows = []
    for model_name in args.models.split(","):
        loaded = load_model(model_name)
        texts_args = argparse.Namespace(
            calibration_texts=64, calibration_windows=4, heldout_windows=args.heldout_windows
        )
        data = peers.prepare(loaded.model, loaded.tokenizer, texts_args)
        for calibration in args.calibrations.split(","):
            texts = small_texts(args.small_sentences) if calibration == "small" else None
            for variant in VARIANTS:
                row = tune(
                    model_name, calibration, variant, loaded.model, loaded.tokenizer, data, texts
                )
                print(f"{model_name} {calibration} {variant}: {row}", file=sys.stderr)
                rows.append(row)
    print_table(rows)


if __name__ == "__main__":
    main()
