"""Speed of the compressed demo model against float32 on this CPU, at batch 1.

Tunes all-MiniLM-L6-v2 twice: for 15 MB alone (what ``scripts/demo`` runs) and for 15 MB plus
a latency limit of 90% of the float32 model's measured latency at 16 tokens (target
``local``: latencies measured inside the model). Then times every variant interleaved, one
call each per round, at 16 and at 128 tokens, and prints stored bytes, held-out error and the
latency ratio to float32 (higher is faster). Reference formats, uniform over the layers, are
timed beside them. Run: ``python benchmarks/demo_speed.py`` (about five minutes).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch

from autotune import Plan, apply_plan, autotune
from autotune.calibration import build_calibration
from autotune.loading import load_model
from profilers.measure import measure_latencies, model_bytes
from profilers.quality import output_error, run_outputs

LINEARS = r"re:.*(query|key|value|dense)"


def uniform(model, tokenizer, option: dict, embeddings: dict | None = None):
    layers = {LINEARS: option}
    if embeddings is not None:
        layers["re:embeddings\\..*_embeddings"] = embeddings
    return apply_plan(model, Plan(schema_version=1, layers=layers), tokenizer=tokenizer)


def timed(models: dict, inputs: dict, rounds: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median p50 (ms) and median ratio to float32 over ``repeats`` interleaved runs."""
    p50: dict[str, list[float]] = {name: [] for name in models}
    ratio: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        stats = measure_latencies(models, inputs, rounds=rounds)
        for name, s in stats.items():
            p50[name].append(s.p50_ms)
            ratio[name].append(stats["float32"].p50_ms / s.p50_ms)
    return {n: (statistics.median(p50[n]), statistics.median(ratio[n])) for n in models}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    loaded = load_model("demo")
    model, tokenizer = loaded.model, loaded.tokenizer
    calib = build_calibration(model, tokenizer)
    short = calib.latency_inputs(1, 16)
    fp32_16 = statistics.median(
        measure_latencies({"m": model}, short, rounds=args.rounds)["m"].p50_ms for _ in range(3)
    )
    limit = round(0.9 * fp32_16, 3)
    print(
        f"float32 at 1x16 tokens: {fp32_16:.3f} ms; latency limit for the second plan: {limit} ms"
    )

    memory_only = autotune(model, "15MB", "cpu", tokenizer=tokenizer, progress=False)
    print(f"plan A (15MB, target cpu): {memory_only.plan.search['seconds']:.0f} s to tune")
    try:
        with_latency = autotune(
            model,
            f"15MB,{limit}ms",
            "local",
            tokenizer=tokenizer,
            latency_seq_len=16,
            progress=False,
        )
        print(
            f"plan B (15MB,{limit}ms at 1x16, target local): "
            f"{with_latency.plan.search['seconds']:.0f} s to tune"
        )
    except Exception as exc:  # an infeasible limit is a result too
        print(f"plan B: {exc}")
        with_latency = None

    int8 = {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True}
    models = {
        "float32": model,
        "bfloat16 (cast)": copy.deepcopy(model).to(torch.bfloat16),
        "uniform int8 weight-only": uniform(model, tokenizer, int8, int8),
        "uniform int4-g32 weight-only": uniform(
            model,
            tokenizer,
            {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False},
            {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False},
        ),
        "uniform w8a8 linears, fp32 embeddings": uniform(
            model, tokenizer, {"method": "w8a8", "alpha": 0.6}
        ),
        "plan A: 15MB": memory_only.model,
    }
    if with_latency is not None:
        models[f"plan B: 15MB,{limit}ms@16"] = with_latency.model

    reference = run_outputs(model, calib.heldout)
    errors = {name: output_error(m, calib.heldout, reference, "nmse") for name, m in models.items()}

    at16 = timed(models, short, args.rounds, args.repeats)
    at128 = timed(models, calib.latency_inputs(1, 128), max(args.rounds // 3, 10), args.repeats)
    header = (
        f"{'model':<40} {'stored MB':>9} {'held-out nmse':>13} "
        f"{'ms @16':>8} {'x fp32':>7} {'ms @128':>8} {'x fp32':>7}"
    )
    print()
    print(header)
    print("-" * len(header))
    for name, m in models.items():
        fast, slow = at16[name], at128[name]
        print(
            f"{name:<40} {model_bytes(m) / 1e6:>9.2f} {errors[name]:>13.4f} "
            f"{fast[0]:>8.2f} {fast[1]:>7.2f} {slow[0]:>8.2f} {slow[1]:>7.2f}"
        )
    print()
    print(
        f"machine: {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; "
        "x fp32 > 1 is faster; differences under ~3% are within this machine's noise"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
