"""How often a latency check's verdict on a relative budget (``0.7x`` the original) is right,
with a fixed number of rounds judged on p50 over p50 (before) against rounds that go on
until the verdict is settled, judged on the median of per-round multiples (now:
:mod:`profilers.paired_timing`).

Three pairs, each a compressed model and its original, timed as a tune's latency check
times them on ``local``:

* ``torch``: the demo in autotune's modules, W8A8 per tensor against float32, batch 1 x 16;
* ``onnxruntime``: the same plan's ONNX export against the float model's, 1 x 16, sessions
  visited in turn and settled at each visit;
* ``llama.cpp``: tiny-lm as Q4_0 against its F32 GGUF, one decode step after 127 tokens.

Each pair is timed ``--repeats`` times, each time for the most rounds a check may take (the
runtime's usual rounds times :data:`~profilers.paired_timing.ROUNDS_TO_SETTLE`), in one
process. The consensus multiple is the median of every per-round multiple of every repeat.
Each repeat is then judged as a check would have judged it, replaying its rounds in order
(a check that stops at round ``t`` sees exactly the first ``t``): before, the p50 of the
usual rounds over the original's p50 against the limit; now, the median per-round multiple
once the limit lies outside its 95% interval (or at the last round). Limits are set around
the consensus of the other repeats (never the judged repeat's own rounds; the limit column
shows the factor at the consensus of all); a verdict is right when it agrees with that
consensus's. No data set is involved: timings only.

Run: ``python benchmarks/latency_checks.py`` (about 3 minutes on 2 cores). Never beside
another heavy job: it times.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder must not shadow the packages named like its files (methods)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch

from autotune.apply import apply_plan
from autotune.export.gguf import GGUFExporter
from autotune.export.llama_latency import FILE_ROUNDS, measure_files
from autotune.export.onnx import OnnxExporter
from autotune.export.ort_sessions import (
    SETTLE,
    model_source,
    open_session,
    run_rounds,
    session_options,
)
from autotune.latency_models import ORT_ROUNDS, float_onnx_export
from autotune.loading import load_model
from autotune.plan import Plan
from profilers.execution.decode import decode_inputs
from profilers.measure import ROUNDS, LatencyStats, measure_latencies
from profilers.paired_timing import ROUNDS_TO_SETTLE, Limit, ratio_interval
from profilers.probe import machine_facts

LIMITS = (0.85, 0.9, 0.95, 1.05, 1.1, 1.15)  # times the consensus multiple
W8A8 = {
    "method": "w8a8",
    "alpha": 0,
    "activation_bits": 8,
    "weight_scales": "tensor",
    "pair_safe": True,
}

INT8_ROWS = {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True}
PLAN = Plan(layers={"_default": W8A8, r"re:embeddings\..*": INT8_ROWS})


def seconds(found: dict[str, LatencyStats]) -> tuple[list[float], list[float]]:
    """The model's and the baseline's timings in seconds, one per round."""
    return [t / 1e3 for t in found["model"].samples_ms], [
        t / 1e3 for t in found["baseline"].samples_ms
    ]


@dataclass
class Pair:
    """One compressed model and its original, and how a check times them: ``usual`` rounds,
    and ``rounds`` of (model, original) seconds from one call of ``time``."""

    name: str
    shape: str
    usual: int
    time: Callable[[int], tuple[list[float], list[float]]]


def torch_pair() -> Pair:
    model = load_model("demo").model
    compressed = apply_plan(model, PLAN)
    ids = torch.randint(1000, 2000, (1, 16))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def time(rounds: int) -> tuple[list[float], list[float]]:
        found = measure_latencies(
            {"model": compressed, "baseline": model}, inputs, rounds=rounds, max_seconds=1e9
        )
        return seconds(found)

    return Pair("torch (autotune's modules)", "demo W8A8 vs float32, 1 x 16", ROUNDS, time)


def ort_pair(folder: Path) -> Pair:
    model = load_model("demo").model
    compressed = apply_plan(model, PLAN)
    graphs = [OnnxExporter().build(compressed, PLAN)[0], float_onnx_export(model)]
    sessions = [open_session(model_source(g, folder), session_options()) for g in graphs]
    ids = torch.randint(1000, 2000, (1, 16))
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
    }

    def time(rounds: int) -> tuple[list[float], list[float]]:
        walls = run_rounds(sessions, inputs, rounds, SETTLE)
        return walls[0], walls[1]

    return Pair("onnxruntime", "demo W8A8 vs float32, 1 x 16", ORT_ROUNDS, time)


def llama_pair(folder: Path) -> Pair:
    loaded = load_model("tiny-lm")
    model, tokenizer = loaded.model, loaded.tokenizer
    plan = Plan(layers={"_default": {"method": "gguf", "type": "Q4_0", "imatrix": False}})
    compressed = apply_plan(model, plan)
    paths = {"model": folder / "q4_0.gguf", "baseline": folder / "f32.gguf"}
    GGUFExporter().write(compressed, plan, paths["model"], tokenizer)
    GGUFExporter().write(model, None, paths["baseline"], tokenizer)
    decode = decode_inputs(model, torch.randint(3, 200, (1, 128)))

    def time(rounds: int) -> tuple[list[float], list[float]]:
        found = measure_files(paths, decode, rounds)
        return seconds(found)

    return Pair("llama.cpp", "tiny-lm Q4_0 vs F32, decode after 127", FILE_ROUNDS, time)


@dataclass
class Verdicts:
    right_before: int = 0
    right_now: int = 0
    rounds_now: int = 0


def judged_now(model: list[float], base: list[float], limit: float) -> tuple[bool, int]:
    """A check's verdict on ``limit`` timing until settled, and the rounds it took."""
    settles = Limit(ratio=limit)
    for done in range(1, len(model) + 1):
        if settles.settled(model[:done], base[:done]):
            break
    return ratio_interval(model[:done], base[:done]).median <= limit, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--only", choices=["torch", "onnxruntime", "llama.cpp"], default=None)
    args = parser.parse_args()
    facts = machine_facts()
    print(f"machine: {facts['cpu']}, {facts['torch_threads']} threads ({facts['isa']})")
    with tempfile.TemporaryDirectory(prefix="latency-checks-") as tmp:
        makers = {
            "torch": torch_pair,
            "onnxruntime": lambda: ort_pair(Path(tmp)),
            "llama.cpp": lambda: llama_pair(Path(tmp)),
        }
        pairs = [make() for name, make in makers.items() if args.only in (None, name)]
        runs = {
            p.name: [p.time(p.usual * ROUNDS_TO_SETTLE) for _ in range(args.repeats)] for p in pairs
        }
    spread_rows, verdict_rows = [], []
    for pair in pairs:
        timed = runs[pair.name]
        every = [m / b for model, base in timed for m, b in zip(model, base, strict=True)]
        consensus = statistics.median(every)
        before = [
            statistics.median(model[: pair.usual]) / statistics.median(base[: pair.usual])
            for model, base in timed
        ]
        usual = [ratio_interval(m[: pair.usual], b[: pair.usual]).median for m, b in timed]
        longest = [ratio_interval(m, b).median for m, b in timed]
        spread_rows.append(
            f"| {pair.name} | {pair.shape} | {consensus:.3f} | "
            + " | ".join(f"{min(v):.3f}-{max(v):.3f}" for v in (before, usual, longest))
            + f" | {pair.usual} / {pair.usual * ROUNDS_TO_SETTLE} |"
        )
        # each repeat is judged against the other repeats' consensus, never its own rounds
        others = [
            statistics.median(
                m / b
                for k, (model, base) in enumerate(timed)
                if k != j
                for m, b in zip(model, base, strict=True)
            )
            for j in range(len(timed))
        ]
        for factor in LIMITS:
            truth = factor >= 1.0  # the limit is above the consensus: met
            found = Verdicts()
            for (model, base), multiple, other in zip(timed, before, others, strict=True):
                limit = other * factor
                found.right_before += (multiple <= limit) == truth
                verdict, rounds = judged_now(model, base, limit)
                found.right_now += verdict == truth
                found.rounds_now += rounds
            verdict_rows.append(
                f"| {pair.name} | {factor:.2f}x ({consensus * factor:.3f}) | "
                f"{'met' if truth else 'missed'} | "
                f"{found.right_before}/{len(timed)} | {found.right_now}/{len(timed)} | "
                f"{pair.usual} | {found.rounds_now / len(timed):.1f} |"
            )
    print(
        f"\nThe measured multiple over {args.repeats} repeats (min-max): p50 over p50 of the "
        "usual rounds (before), median per-round multiple of the usual rounds and of all "
        "rounds\n"
    )
    print(
        "| runtime | pair | consensus multiple | p50 / p50, usual rounds | per-round median, "
        "usual rounds | per-round median, all rounds | rounds usual / all |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(spread_rows))
    print(
        f"\nRight verdicts out of {args.repeats} at limits around the consensus (before: "
        "fixed rounds, p50 over p50; now: until settled, per-round median)\n"
    )
    print(
        "| runtime | limit (x consensus) | consensus verdict | right before | right now | "
        "rounds before | rounds now (mean) |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    print("\n".join(verdict_rows))


if __name__ == "__main__":
    main()
