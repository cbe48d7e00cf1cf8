"""How tuning time grows with depth: profiling and search on Llama-style decoders of 4 to 32
blocks, in memory and block by block, extrapolated to 80 blocks.

Each model is built from a config (hidden 256, FFN 704, grouped-query attention 4/2 heads,
vocabulary 2048; random weights, which cost the same to run as trained ones) and saved as
safetensors. For each depth:

* **profile (in memory)**: the end-to-end sensitivity table, one (layer, option) at a time,
  with the blocks before the layer replaying their recorded outputs, so a layer of block j
  runs the blocks after j only: the cost grows with the square of the depth;
* **profile (streamed)**: the block-output table of a block-by-block tune (each block loaded
  once, every option of its layers run on that block alone): it grows with the depth;
* **allocator**: the multiple-choice knapsack solved by HiGHS;
* **evaluation**: one whole-model evaluation of a plan on the calibration windows (what an
  engine such as evolution pays per candidate), in memory;
* **streamed tune**: a whole block-by-block tune (profile, candidate checks, writing and
  reading back the compressed model).

Times are fitted as ``a * blocks ** b`` (least squares on logs) and extrapolated to 80
blocks, the depth of a 70B-class model; per-layer work scales with width, which is kept
fixed here. The options are int8-ch-sym, int4-g64-asym and int4-g32-asym (plus keep).

Run: ``python benchmarks/scale.py`` (about a minute on 2 cores); ``--blocks 4,8`` for a part.

``--large`` instead tunes a real-size model block by block: a Llama of 1.1 billion
parameters (22 blocks, hidden 2048, FFN 5632, 32 query / 4 key-value heads, vocabulary
32000: TinyLlama's geometry) built from its config with random weights, saved as float32
safetensors with tiny-lm's tokenizer beside it (in a child process, so that building it
does not count), then ``autotune tune DIR --budget 4bits --target a100 --low-memory`` in a
fresh process with the default settings (calibration on the standard library's docstrings,
every option of the target's default methods). It prints the time of each stage of the
tune and the tune process's peak resident memory (about 40 minutes on 2 cores, 9 GB of
disk).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder must not shadow the packages named like its files (methods)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import subprocess
import tempfile
import time

import numpy as np
import torch
import transformers

from autotune.allocation import choice_table, limits_for
from autotune.budget import Budget
from autotune.candidates import ModuleCache, evaluate
from autotune.costs import build_costs, layer_options
from autotune.layers import compressible_layers
from autotune.streamed import open_streamed, tune_streamed
from autotune.targets import get_target
from profilers.execution.stages import profile as streamed_profile
from profilers.quality import run_outputs
from profilers.sensitivity import measure_sensitivity
from search import allocate

LABELS = ("int8-ch-sym", "int4-g64-asym", "int4-g32-asym")
VOCAB = 2048
TARGET_DEPTH = 80


def build(blocks: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=blocks,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


def batches(count: int, tokens: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        {"input_ids": torch.randint(3, VOCAB, (2, tokens), generator=generator)}
        for _ in range(count)
    ]


def seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(blocks: int, folder: Path, tokens: int) -> dict[str, float]:
    model = build(blocks)
    model.save_pretrained(folder, max_shard_size="20MB")
    profiling, calibration = batches(1, tokens), batches(4, tokens)
    layers = compressible_layers(model)
    options = layer_options(layers, ["rtn"], LABELS)
    row: dict[str, float] = {"layers": len(layers), "options": sum(map(len, options.values()))}

    row["profile"], table = seconds(lambda: measure_sensitivity(model, options, profiling))
    streamed, _ = open_streamed(folder)
    row["profile_streamed"], _ = seconds(
        lambda: streamed_profile(streamed, layer_options(layers, ["rtn"], LABELS), profiling)
    )

    spec = get_target("cpu")
    inputs = {"input_ids": profiling[0]["input_ids"][:1]}
    costs = build_costs(model, layers, options, spec, inputs)
    scores = {
        n: [table.errors[n].get(o.label, np.inf) for o in opts] for n, opts in options.items()
    }
    choices = choice_table(costs, scores)
    limits = limits_for(Budget.parse("35%"), costs)
    row["allocator"], allocation = seconds(lambda: allocate(choices, limits))

    picked = zip(choices.variables, allocation.assignment, strict=True)
    plan = {name: costs.options[name][index] for name, index in picked}
    reference = run_outputs(model, calibration)
    cache = ModuleCache(model, cap_bytes=4 * 10**9)
    evaluate(model, plan, calibration, reference, "kl", cache)  # converts the plan's modules
    row["evaluation"], _ = seconds(
        lambda: evaluate(model, plan, calibration, reference, "kl", cache)
    )

    row["streamed_tune"], _ = seconds(
        lambda: tune_streamed(
            folder,
            "35%",
            "cpu",
            save_to=folder.parent / f"out-{blocks}",
            calibration=calibration,
            heldout=batches(2, tokens),
            seq_len=tokens,
            latency_seq_len=tokens,
            option_labels=LABELS,
            progress=False,
        )
    )
    return row


def fit(depths: list[int], values: list[float]) -> tuple[float, float]:
    """``(a, b)`` of ``value = a * depth ** b``, by least squares on logs."""
    slope, intercept = np.polyfit(np.log(depths), np.log(values), 1)
    return float(np.exp(intercept)), float(slope)


LARGE = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


def write_large(folder: Path) -> None:
    """The 1.1B model, random weights, saved as safetensors with a tokenizer beside it."""
    from autotune.loading import load_model

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LARGE)).eval()
    model.save_pretrained(folder, max_shard_size="1GB")
    load_model("tiny-lm").tokenizer.save_pretrained(folder)


def tune_large(scratch: Path) -> int:
    """Write the 1.1B model in one child process, tune it block by block in another, and
    print the tune's stages and peak resident memory."""
    folder, out, plan_path = scratch / "llama-1.1b", scratch / "out", scratch / "plan.json"
    started = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--write-large", str(folder)], check=True)
    print(f"wrote the 1.1B model in {time.perf_counter() - started:.0f} s")
    command = [
        sys.executable, "-m", "autotune.cli", "tune", str(folder), "--budget", "4bits",
        "--target", "a100", "--low-memory", "--save-model", str(out), "-o", str(plan_path),
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    if done.returncode not in (0, 1):  # 1: a measured figure missed its prediction
        print(f"the tune failed with exit code {done.returncode}")
        return 1
    plan = json.loads(plan_path.read_text())
    stages, measured = plan["search"]["stage_seconds"], plan["measured"]
    print(f"\n{'stage':<12}{'seconds':>10}{'share':>8}")
    print("-" * 30)
    for stage, took in stages.items():
        print(f"{stage:<12}{took:>10.1f}{took / wall:>8.1%}")
    print(f"{'process':<12}{wall:>10.1f}{1:>8.0%}   (loading Python and the tune's own steps)")
    streamed = measured["streamed"]
    print(
        f"\nparameters {streamed['checkpoint_bytes'] // 4:,} (float32); safetensors "
        f"{streamed['checkpoint_bytes']:,} B; written {measured['bytes']:,} B "
        f"({measured['avg_bits']:.3f} bits per weight; predicted {plan['predicted']['bytes']:,} "
        f"B); held-out {measured['metric']} {measured['heldout_error']:.4g}"
    )
    print(
        f"peak resident memory of the tune process: {streamed['peak_rss_bytes'] / 2**30:.2f} "
        f"GiB; {streamed['blocks']} blocks; engine {plan['search']['engine']}, sensitivity "
        f"{plan['search']['sensitivity']}, chose {plan['search']['chosen']}; "
        f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", default="4,8,16,32", help="comma-separated depths")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per window")
    parser.add_argument("--large", action="store_true", help="tune the 1.1B model instead")
    parser.add_argument("--write-large", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_large:
        write_large(args.write_large)
        return 0
    if args.large:
        with tempfile.TemporaryDirectory(dir=Path.home()) as scratch:
            return tune_large(Path(scratch))
    depths = [int(b) for b in args.blocks.split(",")]
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for depth in depths:
            rows[depth] = measure(depth, Path(scratch) / f"model-{depth}", args.tokens)
            print(f"{depth} blocks: " + ", ".join(f"{k} {v:.3g}" for k, v in rows[depth].items()))
    stages = {
        "profile": "profile, in memory (s)",
        "profile_streamed": "profile, streamed (s)",
        "allocator": "allocator (s)",
        "evaluation": "one evaluation (s)",
        "streamed_tune": "whole streamed tune (s)",
    }
    header = f"{'':<26}" + "".join(f"{d:>9}" for d in depths) + f"{'fit':>16}{TARGET_DEPTH:>10}"
    print()
    print(header)
    print("-" * len(header))
    print(f"{'layers':<26}" + "".join(f"{rows[d]['layers']:>9.0f}" for d in depths))
    for key, label in stages.items():
        values = [rows[d][key] for d in depths]
        a, b = fit(depths, values) if len(depths) > 1 else (values[0], 1.0)
        cells = "".join(f"{v:>9.3g}" for v in values)
        print(f"{label:<26}{cells}{f'~ blocks^{b:.2f}':>16}{a * TARGET_DEPTH**b:>10.3g}")
    print()
    print(
        f"{args.tokens} tokens x 2 sequences per window; {len(LABELS)} options + keep per layer; "
        f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
