"""The embedded causal LM (tiny-lm) at 3 and 4 stored bits per weight: perplexity and KL of
uniform RTN, uniform GPTQ and the searched plan; the serving memory breakdown; prefill and
decode latency predicted against measured on this machine.

For each budget (average stored bits per weight of the linear and embedding layers, scales
and offsets included), one ``autotune()`` run with target ``local`` (latency tables measured
inside the model on this machine) searches RTN and GPTQ options per layer (evolution from
the allocator's plan, then the uniform check). Beside it:

* **uniform RTN**: every layer at the same RTN option, the option with the least calibration
  KL among those that fit the budget;
* **uniform GPTQ**: the linear layers at the same GPTQ option and the embedding (which GPTQ
  cannot take) at the RTN option of the same format, chosen the same way.

Perplexity and KL (of the next-token distributions, against the uncompressed model) are on
the held-out docstrings, which no step saw. "predicted" latency is the sum of the per-layer
times measured inside the model plus the rest of the model; "measured" is the whole model,
timed interleaved with the float32 model. The memory breakdown is the serving budget of one
sequence of 256 tokens with a float16 KV cache.

Run: ``python benchmarks/llm.py`` (about 15 minutes on 2 cores); ``--bits 4 --max-evals 20``
for a part.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder must not shadow the packages named like its files (methods)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import copy
import time

import torch
import transformers

from autotune import autotune
from autotune.apply import compress
from autotune.budget import Budget
from autotune.calibration import build_calibration
from autotune.layers import weight_numel
from autotune.loading import load_model
from autotune.measured_figures import measure_model
from methods.keep import KeepOption
from profilers.execution.decode import decode_inputs
from profilers.measure import model_bytes
from profilers.quality import output_error, perplexity, run_outputs

CONTEXT = 256


def uniform_options(model, costs, label_of) -> dict:
    """The same option for every layer: ``label_of(layer kind)`` names it."""
    chosen = {}
    for ref in costs.layers:
        label = label_of(ref.shape.kind)
        chosen[ref.name] = next(o for o in costs.options[ref.name] if o.label == label)
    return chosen


def predicted_ms(costs, options) -> tuple[float, float]:
    totals = costs.totals({n: costs.options[n].index(o) for n, o in options.items()})
    return totals["latency_ms"], totals["decode_ms"]


def best_uniform(model, calib, costs, bits, gptq: bool):
    """The uniform plan of least calibration KL within ``bits`` (RTN, or GPTQ on linears)."""
    total = weight_numel(model)
    reference = run_outputs(model, calib.calibration)
    best = None
    rtn_labels = sorted(
        {o.label for opts in costs.options.values() for o in opts if o.method == "rtn"}
    )
    for label in rtn_labels:
        if gptq:
            gptq_label = "gptq" + label.removeprefix("int") + "-ao"
            if not any(o.label == gptq_label for opts in costs.options.values() for o in opts):
                continue

            def label_of(kind, label=label, gptq_label=gptq_label):
                return gptq_label if kind == "linear" else label
        else:

            def label_of(kind, label=label):
                return label

        options = uniform_options(model, costs, label_of)
        bits_used = sum(costs.weight_bits[n][costs.options[n].index(o)] for n, o in options.items())
        if (bits_used + costs.fixed_weight_bits) / total > bits + 1e-9:
            continue
        compressed = compress(copy.deepcopy(model), options, calibration=calib.calibration)
        error = output_error(compressed, calib.calibration, reference, "kl")
        if best is None or error < best[0]:
            best = (error, label_of("linear"), options, compressed)
    return best


def row(name, model, compressed, calib, reference, latency, decode, predicted) -> dict:
    measured = measure_model(
        compressed,
        total_weights=weight_numel(model),
        latency_inputs=latency,
        decode_inputs=decode,
        baseline=model,
    )
    return {
        "plan": name,
        "bits": measured.avg_bits,
        "mb": model_bytes(compressed) / 1e6,
        "ppl": perplexity(compressed, calib.heldout),
        "kl": output_error(compressed, calib.heldout, reference, "kl"),
        "prefill": (predicted[0], measured.latency.p50_ms),
        "decode": (predicted[1], measured.decode.p50_ms),
        "speedup": (
            measured.baseline_latency.p50_ms / measured.latency.p50_ms,
            measured.baseline_decode.p50_ms / measured.decode.p50_ms,
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default="3,4", help="comma-separated budgets in bits")
    parser.add_argument("--max-evals", type=float, default=60, help="evolution's evaluations")
    parser.add_argument("--seq-len", type=int, default=128, help="prefill tokens")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    loaded = load_model("tiny-lm")
    model, tokenizer = loaded.model, loaded.tokenizer
    calib = build_calibration(model, tokenizer, None, seq_len=args.seq_len)
    reference = run_outputs(model, calib.heldout)
    latency = calib.latency_inputs(1, args.seq_len)
    decode = decode_inputs(model, calib.latency_inputs(1, CONTEXT)["input_ids"])
    rows, breakdowns = [], {}
    for bits in (float(b) for b in args.bits.split(",")):
        began = time.perf_counter()
        budget = Budget.parse(f"{bits:g}bits", seq_len=args.seq_len, context=CONTEXT)
        result = autotune(
            model,
            budget,
            "local",
            tokenizer=tokenizer,
            methods=("rtn", "gptq"),
            max_evals=args.max_evals,
            progress=False,
        )
        costs = result.costs
        print(
            f"{bits:g} bits: tuned in {time.perf_counter() - began:.0f} s, chose "
            f"{result.plan.search['chosen']}",
            flush=True,
        )
        if not rows:
            keep = {r.name: KeepOption() for r in costs.layers}
            rows.append(
                row(
                    "float32",
                    model,
                    model,
                    calib,
                    reference,
                    latency,
                    decode,
                    predicted_ms(costs, keep),
                )
            )
        searched_options = {
            name: next(o for o in costs.options[name] if o.to_dict() == entry)
            for name, entry in result.plan.layers.items()
            if name in costs.options
        }
        for gptq, name in ((False, "uniform RTN"), (True, "uniform GPTQ")):
            best = best_uniform(model, calib, costs, bits, gptq)
            if best is None:
                print(f"{bits:g} bits: no {name} plan fits")
                continue
            _, label, options, compressed = best
            rows.append(
                row(
                    f"{bits:g} bits {name} ({label})",
                    model,
                    compressed,
                    calib,
                    reference,
                    latency,
                    decode,
                    predicted_ms(costs, options),
                )
            )
        rows.append(
            row(
                f"{bits:g} bits searched",
                model,
                result.model,
                calib,
                reference,
                latency,
                decode,
                predicted_ms(costs, searched_options),
            )
        )
        breakdowns[f"{bits:g} bits searched"] = result.plan.predicted["memory_breakdown"]

    header = (
        f"{'plan':<40} {'bits':>5} {'MB':>6} {'ppl':>7} {'KL':>8} "
        f"{'prefill ms pred/meas':>21} {'decode ms pred/meas':>20} {'x fp32 pre/dec':>15}"
    )
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['plan']:<40} {r['bits']:>5.2f} {r['mb']:>6.2f} {r['ppl']:>7.1f} "
            f"{r['kl']:>8.4f} {r['prefill'][0]:>10.2f} /{r['prefill'][1]:>8.2f} "
            f"{r['decode'][0]:>9.2f} /{r['decode'][1]:>8.2f} "
            f"{r['speedup'][0]:>7.2f} /{r['speedup'][1]:>5.2f}"
        )
    print()
    print(f"serving memory at batch 1 x {CONTEXT} tokens (float16 KV cache), predicted:")
    print(f"{'plan':<24} {'weights':>10} {'KV cache':>10} {'activations':>12} {'total':>10}")
    for name, b in breakdowns.items():
        print(
            f"{name:<24} {b['weights']:>10,} {b['kv_cache']:>10,} {b['activations']:>12,} "
            f"{b['total']:>10,}"
        )
    print()
    print(
        f"prefill 1x{args.seq_len} tokens, decode 1 token after {CONTEXT - 1}; "
        f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
