"""A bundled causal LM in llama.cpp: llama.cpp's own quantisation mixes against autotune's
plans of the same file size, quality and speed measured by llama.cpp itself.

For each mix (``Q8_0``, ``Q6_K``, ``Q5_K_M``, ``Q4_K_M``, ``Q3_K_M``, ``Q2_K`` by default),
``llama_model_quantize`` (the library function behind ``llama-quantize``, with its built-in
per-tensor heuristic and no importance matrix) converts an F32 GGUF of the model (``tiny-lm``,
or ``--model small-lm``, whose rows are all multiples of 256 so that every K-quant applies
to every tensor); where
``scripts/llama-tools`` has built ``llama-quantize``, each mix is also made with an importance
matrix of every linear layer (``+ imatrix`` rows; written by autotune from the calibration
text its tunes use, in llama.cpp's imatrix format). The plain mix's file size is then the
budget of three ``autotune(..., runtime="llama.cpp")`` runs:

* **autotune**: target ``cpu``, every type offered (importance-matrix options included,
  computed from autotune's calibration text), the default decode guard on (a memory budget's
  decode step at most 5% slower than the fastest plan predicted as good as llama.cpp's
  ``--pure`` file of the largest base type that fits; ``autotune.decode_guard``);
* **speed free**: the same with ``decode_slack="off"`` (generation speed left free);
* **plain**: the default with plain types only (no importance matrix: the mixes' own footing);
* **decode-bound**: target ``local`` (every type timed in llama.cpp here) with the mix's
  own decode speed as a second budget: ``decode=1x`` with ``relative_to`` the mix's file
  (``--relative-to``, :mod:`autotune.reference_file`), so that each check of the tune times
  the plan's decode step (one token after 127) beside the mix's file in the same rounds
  (this VM's speed drifts by up to 1.4x within minutes: a bound in milliseconds, or as a
  multiple of the F32 file's measured before the tune, is not what the machine runs later).
  Each such tune's checks are printed below the table.

Every plan is exported to GGUF and all files are run in llama.cpp:

* **KL**: mean next-token KL divergence against the uncompressed model (its torch logits) on
  held-out windows of standard-library docstrings, a split no tune calibrates or selects on
  (**KL in torch**: the same plan in autotune's own modules); **ppl**: perplexity on the
  same windows;
* **tg** / **pp**: generation (one token at a time, 64 tokens after a 16-token prompt) and
  prompt (the first held-out window, 128 tokens, in one batch) speed with 2 threads (tg also
  with 1), timed in rounds that visit every file in turn; the ratio is the file's time over
  the plain mix's, the median over rounds (above 1: slower).

Run: ``python benchmarks/llama_cpp.py`` (about 8-12 minutes on 2 cores for tiny-lm; needs
``pip install 'autotune[llama]'``); ``--mixes Q4_K_M`` for a part, ``--model small-lm`` for
the wider model.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder must not shadow the packages named like its files (methods)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import ctypes
import subprocess
import tempfile
import time

from autotune import autotune
from autotune.calibration import build_heldout
from autotune.errors import AutotuneError
from autotune.export import export_plan, get_exporter
from autotune.export.imatrix import write_imatrix
from autotune.export.llama_cpp import quality_in_llama_cpp, speeds_in_llama_cpp
from autotune.export.llama_tools import find_tool
from autotune.layers import compressible_layers
from autotune.loading import BUNDLED_LMS, load_model
from autotune.plan import Plan
from methods.gguf import GGUFTypes
from profilers.paired_timing import Interval
from profilers.quality import output_error, run_outputs

MIXES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
# the calibration a default tune uses (stdlib docstrings, 32 windows of 128 tokens)
CALIBRATION = {"seq_len": 128, "calibration_windows": 32, "batch_size": 8}


def quantize_mix(source: Path, out: Path, mix: str) -> None:
    """llama.cpp's own mix ``mix`` of the GGUF ``source``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    params.nthread = 2
    if llama_cpp.llama_model_quantize(
        str(source).encode(), str(out).encode(), ctypes.byref(params)
    ):
        raise RuntimeError(f"llama_model_quantize failed for {mix}")


def imatrix_mixes(
    model, tokenizer, source: Path, mixes: list[str], folder: Path
) -> dict[str, Path]:
    """Each mix made by llama.cpp's own ``llama-quantize`` with an importance matrix of every
    linear layer, computed by autotune from the calibration text its tunes use (none where
    ``scripts/llama-tools`` has not built llama-quantize)."""
    tool = find_tool("llama-quantize")
    if tool is None:
        return {}
    linear = [ref.name for ref in compressible_layers(model) if ref.shape.kind == "linear"]
    imatrix = folder / "imatrix.gguf"
    described = Plan(layers={"_default": {"method": "none"}}, calibration=CALIBRATION)
    write_imatrix(model, described, imatrix, tokenizer=tokenizer, layers=linear)
    out = {}
    for mix in mixes:
        path = folder / f"{mix}-imatrix.gguf"
        args = [str(tool), "--imatrix", str(imatrix), str(source), str(path), mix]
        subprocess.run(args, check=True, capture_output=True, timeout=600)
        out[f"{mix} + imatrix"] = path
    return out


def plain_labels(model) -> list[str]:
    """Every type without an importance matrix, for every layer shape of ``model``."""
    method = GGUFTypes()
    return sorted(
        {
            o.label
            for ref in compressible_layers(model)
            for o in method.grid(ref.shape)
            if not o.imatrix
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(BUNDLED_LMS), default="tiny-lm")
    parser.add_argument("--mixes", default=",".join(MIXES))
    parser.add_argument("--windows", type=int, default=32, help="held-out windows of 128 tokens")
    parser.add_argument("--rounds", type=int, default=21, help="timing rounds")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain-types tunes")
    args = parser.parse_args()
    mixes = [m.strip() for m in args.mixes.split(",") if m.strip()]

    loaded = load_model(args.model)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    heldout = build_heldout(model, tokenizer, windows=args.windows, seq_len=128, batch_size=8)
    reference = run_outputs(model, heldout)
    plain = plain_labels(model)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        source = work / "f32.gguf"
        get_exporter("gguf").write(model, None, source, tokenizer)
        paths: dict[str, Path] = {}
        tune_seconds: dict[str, float] = {}
        refused: dict[str, str] = {}
        in_torch: dict[str, float] = {}
        for mix in mixes:
            paths[mix] = work / f"{mix}.gguf"
            quantize_mix(source, paths[mix], mix)
        weighted_mixes = imatrix_mixes(model, tokenizer, source, mixes, work)
        paths.update(weighted_mixes)
        checks: dict[str, list[dict]] = {}
        for mix in mixes:
            size = paths[mix].stat().st_size
            variants = {
                "autotune": (f"{size}B", "cpu", None, "runtime", None),
                "speed free": (f"{size}B", "cpu", None, None, None),
                "plain": (f"{size}B", "cpu", plain, "runtime", None),
                "decode-bound": (f"{size}B,decode=1x", "local", None, "runtime", paths[mix]),
            }
            if args.no_plain:
                del variants["plain"]
            for variant, (budget, target, labels, slack, against) in variants.items():
                start = time.perf_counter()
                try:
                    result = autotune(
                        model,
                        budget,
                        target,
                        runtime="llama.cpp",
                        relative_to=against,
                        tokenizer=tokenizer,
                        option_labels=labels,
                        decode_slack=slack,
                        progress=False,
                        measure=False,
                    )
                except AutotuneError as exc:  # a budget no plan meets, as predicted
                    refused[f"{variant} @ {mix}"] = str(exc).split(": ", 1)[-1]
                    continue
                tune_seconds[f"{variant} @ {mix}"] = time.perf_counter() - start
                if against is not None:
                    checks[mix] = result.plan.search.get("latency_checks", [])
                path = work / f"{variant}-{mix}.gguf"
                export_plan(result.plan, model, "gguf", path, tokenizer=tokenizer)
                paths[f"{variant} @ {mix}"] = path
                error = output_error(result.model, heldout, reference, "kl")
                in_torch[f"{variant} @ {mix}"] = error
        quality = {
            name: quality_in_llama_cpp(path, heldout, reference, "kl")
            for name, path in paths.items()
        }
        prompt = heldout[0]["input_ids"][0].tolist()
        timed = speeds_in_llama_cpp(paths, prompt, generate=64, rounds=args.rounds, threads=2)
        one = speeds_in_llama_cpp(paths, prompt, generate=64, rounds=args.rounds, threads=1)
        for mix in mixes:
            base_kl = quality[mix]["heldout_error"]
            base, base_one = timed[mix], one[mix]
            names = [mix, f"{mix} + imatrix"]
            names += [f"{v} @ {mix}" for v in ("autotune", "speed free", "plain", "decode-bound")]
            for name in names:
                if name not in paths:
                    continue
                speed = timed[name]
                kl = quality[name]["heldout_error"]
                label = name if " @ " not in name else f"{name.split(' @ ')[0]} at {mix}'s size"
                rows.append(
                    (
                        label,
                        paths[name].stat().st_size,
                        kl,
                        kl / base_kl if base_kl else float("nan"),
                        in_torch.get(name),
                        quality[name]["perplexity"],
                        speed.generate_tokens_per_s,
                        base.generate_tokens_per_s / speed.generate_tokens_per_s,
                        base_one.generate_tokens_per_s / one[name].generate_tokens_per_s,
                        base.prompt_tokens_per_s / speed.prompt_tokens_per_s,
                        tune_seconds.get(name),
                    )
                )
    f32_ppl = quality_ppl_reference(heldout, reference)
    print(
        f"{args.model}, {args.windows} held-out windows of 128 tokens; float32 perplexity "
        f"{f32_ppl:.2f}"
    )
    print(
        "| file | bytes | KL | KL vs mix | KL in torch | ppl | tg tok/s | tg time vs mix "
        "| 1 thread | pp128 time vs mix | tune s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, size, kl, ratio, torch_kl, ppl, tps, tg, tg_one, pp, seconds in rows:
        tune = f"{seconds:.0f}" if seconds is not None else "-"
        in_modules = f"{torch_kl:.3e}" if torch_kl is not None else "-"
        print(
            f"| {name} | {size:,} | {kl:.3e} | {ratio:.2f}x | {in_modules} | {ppl:.2f} | "
            f"{tps:.0f} | {tg:.2f}x | {tg_one:.2f}x | {pp:.2f}x | {tune} |"
        )
    print()
    for mix, found in checks.items():
        timed_checks = "; ".join(check_text(c) for c in found) or "none"
        print(f"decode-bound at {mix}'s size, the tune's checks beside {mix}: {timed_checks}")
    for name, why in refused.items():
        print(f"{name}: no plan, {why}")


def check_text(check: dict) -> str:
    """One latency check of a tune: search, the plan's multiple of the reference file's
    decode step with its interval, and the verdict."""
    ratio = Interval.from_dict(check["ratio"]).describe() if check.get("ratio") else "-"
    verdict = "met" if check["met"] else "missed"
    loosened = ", loosened" if check.get("loosened") else ""
    return f"search {check['search']}{loosened}: {ratio}, {verdict}"


def quality_ppl_reference(heldout, reference) -> float:
    from profilers.quality import perplexity

    return perplexity(None, heldout, reference)


if __name__ == "__main__":
    main()
