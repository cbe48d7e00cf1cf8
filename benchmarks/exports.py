"""ONNX exports of the demo model: autotune's plans against ONNX Runtime's own quantisers.

The demo model (all-MiniLM-L6-v2 as a transformers ``BertModel``) in ONNX Runtime on the CPU:

* ``ort float32``: the plain ``torch.onnx.export`` (dynamo exporter, its graph optimiser on);
* ``ort quantize_dynamic``: ONNX Runtime's ``quantize_dynamic`` of that file (its defaults:
  int8 weights per tensor, int8 activations per call; embeddings and the pooler too), and the
  same with ``per_channel=True``;
* ``ort 4-bit bN``: ONNX Runtime's ``MatMulNBitsQuantizer`` (4 bits, symmetric, blocks of
  32 or 128; MatMul weights only, so embeddings and the pooler's Gemm stay float);
* ``autotune ...``: ``autotune.export`` to ONNX of a uniform RTN int4 g32 symmetric plan
  (linear layers, embeddings float: the same coverage as ORT 4-bit), a uniform int8
  per-channel plan (every layer, as quantize_dynamic), uniform W8A8 plans with 8-bit dynamic
  activations (``DynamicQuantizeLinear``, which ONNX Runtime fuses with the int8 matmul as it
  does quantize_dynamic's) and int8 embeddings, weight scales per tensor and per channel,
  with full-range codes and pair-safe ones (exact on CPUs without VNNI, whose int8 kernels
  saturate 16-bit pair sums; the first line printed says which this CPU is), and
  plans tuned by ``autotune()`` for ``runtime="onnxruntime"`` on the ``cpu`` target at the
  tensor bytes of ORT's 4-bit block-32 file, of ORT's int8 file and at 15 MB, and two tuned on
  ``local`` (every option timed inside ONNX Runtime sessions) for the int8 file's tensor bytes
  and quantize_dynamic's speed: a latency budget of ``1x`` quantize_dynamic's file
  (``relative_to``, :mod:`autotune.reference_file`: each check times the plan's export beside
  that file at 1 x 16 tokens in the same rounds), and of ``1.1x`` it (about the time of 8-bit
  activations with weight scales per channel); the int4 and
  int8 weight-only plans also with
  ``accuracy_level=4`` (ONNX Runtime quantises MatMulNBits' activations to int8 per block:
  faster, no longer autotune's numerics);
* ``torch float32``: the float model in torch, for scale.

A second table times the variants near quantize_dynamic's size (autotune's pair-safe W8A8
plans and the plans tuned at its tensor bytes) in pairs against each of quantize_dynamic's
exports: the median of the per-round multiples with its 95% interval.

A third table is the compressed-tensors export of the bundled causal LM (``tiny-lm``): a
uniform int4 g128 and int8 per-channel plan (symmetric: what vLLM's Marlin kernels run), FP8
per channel weight-only and with FP8 inputs, and plans tuned with ``runtime="vllm"`` at 8 MB
for the ``a100`` target and for ``h100`` (whose FP8 tensor cores take FP8 inputs), the last
also at 0.63x the float model's predicted time for prompts of 16 x 2048 tokens. Each
folder is loaded by plain transformers in a process that never imports autotune; the table
gives the plan's predicted bytes beside the folder's ``model.safetensors`` bytes, the
held-out KL of the loaded model's next-token distribution against the float model, and the
largest logit difference between the loaded model and autotune's own compressed model.

Both exporters' per-node debug metadata is dropped. ``tensor bytes`` are the file's
initializers, what a ``--runtime onnxruntime`` budget counts; the rest of a file is its graph
(and, in autotune's, the plan).
Errors are measured on the held-out windows (the stdlib held-out split; nothing here is
chosen on them) against the float model: 1 - cosine of the mean-pooled embeddings (averaged
over windows) and the relative MSE of ``last_hidden_state``; ``torch 1-cos`` is autotune's own
compressed model on the same windows. Latency is the median of ``session.run`` at batch 1 x
16 and 1 x 128 tokens, every variant timed in turn, round after round, in one process.

Run: ``python benchmarks/exports.py`` (``--part onnx``: 5-8 minutes on 2 cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder must not shadow the packages named like its files (methods)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import contextlib
import functools
import io
import json
import logging
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import quantize_dynamic
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
from safetensors.torch import load_file, save_file
from torch import nn

from autotune import autotune
from autotune.apply import apply_plan
from autotune.calibration import build_heldout
from autotune.errors import InfeasibleBudgetError
from autotune.export import export_plan
from autotune.export.onnx import OnnxExporter, tensor_bytes
from autotune.export.ort_sessions import SETTLE, run_rounds
from autotune.loading import load_model
from autotune.plan import Plan
from autotune.runtimes import get_runtime
from profilers.measure import model_bytes
from profilers.paired_timing import ratio_interval
from profilers.probe import int8_pairs_saturate

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = ("last_hidden_state", "pooler_output")
SHAPES = (16, 128)
# the latency-bound plans' budgets: these multiples of quantize_dynamic's file's 1 x 16 time
# (1: at least its speed; 1.1: about the time of 8-bit activations with weight scales per
# channel, 1.02-1.08x quantize_dynamic's in pairs on the demo)
LATENCY_FACTORS = (1.0, 1.1)
PAIRED_ROUNDS = 40  # rounds of each pair timed against quantize_dynamic
T = TypeVar("T")


def rtn(bits: int, group: int | None, symmetric: bool) -> dict:
    return {"method": "rtn", "bits": bits, "group_size": group, "symmetric": symmetric}


INT4_PLAN = Plan(layers={"_default": rtn(4, 32, True), r"re:embeddings\..*": {"method": "none"}})
INT8_PLAN = Plan(layers={"_default": rtn(8, None, True)})


def w8a8_plan(weight_scales: str, pair_safe: bool = False) -> Plan:
    """Every linear layer W8A8 with 8-bit activations (unsmoothed), int8 embeddings."""
    w8a8 = {
        "method": "w8a8",
        "alpha": 0,
        "activation_bits": 8,
        "weight_scales": weight_scales,
        "pair_safe": pair_safe,
    }
    return Plan(layers={"_default": w8a8, r"re:embeddings\..*": rtn(8, None, True)})


@dataclass
class Variant:
    name: str
    path: Path | None = None
    model: nn.Module | None = None
    torch_error: float | None = None
    session: ort.InferenceSession | None = None
    error: tuple[float, float] = (float("nan"), float("nan"))
    times: dict[int, list[float]] = field(default_factory=lambda: {s: [] for s in SHAPES})

    @property
    def bytes(self) -> int | None:
        return self.path.stat().st_size if self.path else None

    @functools.cached_property
    def tensor_bytes(self) -> int | None:
        return tensor_bytes(onnx.load(str(self.path))) if self.path else None

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        if self.session is not None:
            return self.session.run([OUTPUTS[0]], feed)[0]
        assert self.model is not None
        with torch.inference_mode():
            tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
            return self.model(**tensors).last_hidden_state.numpy()


def quiet(call: Callable[[], T]) -> T:
    """Run ``call`` without the exporters' progress prints and warnings."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return call()


def export_float(model: nn.Module, path: Path) -> Path:
    ids = torch.arange(1, 17).reshape(2, 8)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    example["token_type_ids"] = torch.zeros_like(ids)
    program = quiet(
        lambda: torch.onnx.export(
            model,
            (),
            kwargs=example,
            dynamo=True,
            opset_version=21,
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_shapes={k: {0: "batch", 1: "sequence"} for k in INPUTS},
        )
    )
    proto = program.model_proto
    for node in proto.graph.node:
        del node.metadata_props[:]
    onnx.save_model(proto, str(path))
    return path


def ort_4bit(source: Path, path: Path, block: int) -> Path:
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(source)), bits=4, block_size=block, is_symmetric=True
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(path))
    return path


def export(plan: Plan, compressed: nn.Module, path: Path, accuracy_level: int) -> None:
    """autotune's ONNX export of an applied plan (``export_plan`` applies it itself; this
    reuses the compressed model, and sets the exporter's accuracy level)."""
    OnnxExporter(accuracy_level).write(compressed, plan, path)


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[..., None].astype(np.float64)
    return (hidden * weights).sum(axis=1) / weights.sum(axis=1)


def errors(outputs: list[np.ndarray], reference: list[np.ndarray], masks: list) -> tuple:
    """(mean 1 - cosine of mean-pooled embeddings, relative MSE of last_hidden_state)."""
    distances, num, den = [], 0.0, 0.0
    for out, ref, mask in zip(outputs, reference, masks, strict=True):
        a, b = pooled(out, mask), pooled(ref, mask)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        distances.extend((1 - cos).tolist())
        keep = mask.astype(bool)
        num += float(((out - ref)[keep] ** 2).sum())
        den += float((ref[keep] ** 2).sum())
    return float(np.mean(distances)), num / den


def torch_error(model: nn.Module, feeds: list[dict], reference: list, masks: list) -> float:
    variant = Variant("torch", model=model)
    return errors([variant.run(f) for f in feeds], reference, masks)[0]


def timing_feeds(feed: dict[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    """Batch 1 x 16 and 1 x 128 tokens cut from a held-out window."""
    return {s: {k: np.ascontiguousarray(v[:1, :s]) for k, v in feed.items()} for s in SHAPES}


def timing_inputs(feed: dict[str, np.ndarray], tokens: int) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v[:1, :tokens])) for k, v in feed.items()}


def time_round_robin(variants: list[Variant], feeds: dict, rounds: int) -> None:
    for variant in variants:
        for feed in feeds.values():
            for _ in range(3):
                variant.run(feed)
    for _ in range(rounds):
        for size, feed in feeds.items():
            for variant in variants:
                start = time.perf_counter()
                variant.run(feed)
                variant.times[size].append(time.perf_counter() - start)


def print_table(variants: list[Variant], tuned: dict[str, Plan], model: nn.Module) -> None:
    base = {s: statistics.median(variants[0].times[s]) for s in SHAPES}
    print(
        "\n| variant | file bytes | tensor bytes | held-out 1-cos | held-out rel. MSE "
        "| torch 1-cos | 1x16 p50 ms | vs ort fp32 | 1x128 p50 ms | vs ort fp32 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        cells = [f"{v.bytes:,}" if v.bytes else "-"]
        cells.append(f"{v.tensor_bytes:,}" if v.tensor_bytes else "-")
        cells += [f"{v.error[0]:.2e}", f"{v.error[1]:.2e}"]
        cells.append(f"{v.torch_error:.2e}" if v.torch_error is not None else "-")
        for s in SHAPES:
            median = statistics.median(v.times[s])
            cells += [f"{1000 * median:.2f}", f"{median / base[s]:.2f}"]
        print(f"| {v.name} | " + " | ".join(cells) + " |")
    for name, plan in tuned.items():
        labels = [o.label for o in plan.layer_options(model).values()]
        counts = {label: labels.count(label) for label in sorted(set(labels))}
        predicted, measured = plan.predicted or {}, plan.measured or {}
        figures = f"predicted {predicted.get('bytes'):,} tensor bytes"
        if measured.get("timed_in") == "onnxruntime-timed":
            baseline = measured.get("baseline", {})
            beside = (baseline.get("reference_file") or {}).get("file", "the float model")
            figures += (
                f", {predicted['latency_ms']:.2f} ms in ONNX Runtime (measured "
                f"{measured.get('latency_p50_ms', float('nan')):.2f} ms beside {beside}'s "
                f"{baseline.get('latency_p50_ms', float('nan')):.2f}"
                + (
                    f", {baseline['latency_ratio']['p50']:.3f}x it in the median round"
                    if "latency_ratio" in baseline
                    else ""
                )
                + ")"
            )
        print(f"\n{name}: {counts} ({figures})")
        for check in plan.search.get("latency_checks", []):
            print(
                f"  latency check of '{check['plan']}': predicted {check['predicted_ms']:.2f} ms "
                f"(planned under {check['planned_ms']:.2f}), measured {check['measured_ms']:.2f} "
                f"ms against {check['budget_ms']:.2f} ms"
                + (
                    f" ({check['original_ms']:.2f} ms the float model beside it)"
                    if "original_ms" in check
                    else ""
                )
                + (
                    f" ({check['reference_ms']:.2f} ms the reference file beside it)"
                    if "reference_ms" in check
                    else ""
                )
                + (
                    f", {check['ratio']['p50']:.3f}x it in the median of {check['ratio']['rounds']}"
                    f" rounds (95% CI {check['ratio']['low']:.3f}-{check['ratio']['high']:.3f})"
                    if "ratio" in check
                    else ""
                )
                + f": {'met' if check['met'] else 'missed'}"
            )


CT_PLANS = {
    "int4 g128 sym": Plan(
        layers={"_default": rtn(4, 128, True), "model.embed_tokens": {"method": "none"}}
    ),
    "int8 per-channel sym": Plan(
        layers={"_default": rtn(8, None, True), "model.embed_tokens": {"method": "none"}}
    ),
    "fp8 per-channel": Plan(
        layers={
            "_default": {"method": "fp8", "activations": False},
            "model.embed_tokens": {"method": "none"},
        }
    ),
    "fp8 per-channel, fp8 inputs": Plan(
        layers={
            "_default": {"method": "fp8", "activations": True},
            "model.embed_tokens": {"method": "none"},
        }
    ),
}
# plans tuned for vLLM: row, target, budget and settings (a latency budget for prompts of
# 16 x 2048 tokens, where H100's FP8 tensor cores pay)
PROMPTS = {"batch_size": 16, "latency_seq_len": 2048}
VLLM_TUNES = (
    ("tuned for vllm @ 8 MB", "a100", "8MB", {}),
    ("tuned for vllm on h100 @ 8 MB", "h100", "8MB", {}),
    ("tuned for vllm on h100 @ 8 MB, 0.63x at 16 x 2048", "h100", "8MB,0.63x", PROMPTS),
)

# run by a fresh interpreter: plain transformers loads every folder; autotune is never imported
LOAD_FOLDERS = """
import json, sys
import torch, transformers
from safetensors.torch import load_file, save_file

for folder in json.loads(sys.argv[1]):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    batches = load_file(folder + "-inputs.safetensors")
    with torch.no_grad():
        logits = {k: model(input_ids=v).logits.contiguous() for k, v in batches.items()}
    save_file(logits, folder + "-logits.safetensors")
assert "autotune" not in sys.modules
"""


def kl(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean KL divergence of the next-token distributions, reference first."""
    ref = torch.log_softmax(reference.double(), -1)
    out = torch.log_softmax(logits.double(), -1)
    return float((ref.exp() * (ref - out)).sum(-1).mean())


def compressed_tensors_table(windows: int) -> None:
    loaded = load_model("tiny-lm")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    batches = build_heldout(model, tokenizer, windows=windows, seq_len=128, batch_size=8)
    inputs = {f"b{i}": b["input_ids"].contiguous() for i, b in enumerate(batches)}
    with torch.inference_mode():
        reference = {k: model(input_ids=v).logits for k, v in inputs.items()}
    tunes = {
        name: autotune(
            model,
            budget,
            target,
            runtime="vllm",
            tokenizer=tokenizer,
            progress=False,
            measure=False,
            **settings,
        )
        for name, target, budget, settings in VLLM_TUNES
    }
    plans = {**CT_PLANS, **{name: result.plan for name, result in tunes.items()}}
    tuned_models = {name: result.model for name, result in tunes.items()}
    with tempfile.TemporaryDirectory() as folder:
        tmp, folders = Path(folder), {}
        for index, (name, plan) in enumerate(plans.items()):
            out = tmp / f"ct-{index}"
            export_plan(plan, model, "compressed-tensors", out, tokenizer=tokenizer)
            save_file(inputs, f"{out}-inputs.safetensors")
            folders[name] = out
        run = subprocess.run(
            [sys.executable, "-c", LOAD_FOLDERS, json.dumps([str(f) for f in folders.values()])],
            capture_output=True,
            text=True,
            cwd=tmp,
        )
        if run.returncode != 0:
            raise SystemExit(run.stderr[-3000:])
        print(
            "\n| tiny-lm, compressed-tensors | plan bytes | model.safetensors bytes | file / "
            "plan | held-out KL, transformers | held-out KL, autotune | max abs logit diff |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, plan in plans.items():
            out = folders[name]
            compressed = tuned_models.get(name) or apply_plan(model, plan)
            with torch.inference_mode():
                ours = {k: compressed(input_ids=v).logits for k, v in inputs.items()}
            theirs = load_file(f"{out}-logits.safetensors")
            predicted = plan.predicted.get("bytes") or model_bytes(compressed)
            file_bytes = (out / "model.safetensors").stat().st_size
            diff = max(float((theirs[k] - ours[k]).abs().max()) for k in inputs)
            cells = [
                f"{predicted:,}",
                f"{file_bytes:,}",
                f"{file_bytes / predicted:.4f}",
                f"{statistics.fmean(kl(theirs[k], reference[k]) for k in inputs):.4g}",
                f"{statistics.fmean(kl(ours[k], reference[k]) for k in inputs):.4g}",
                f"{diff:.2e}",
            ]
            print(f"| {name} | " + " | ".join(cells) + " |")
    vllm = get_runtime("vllm")
    for name, result in tunes.items():
        options = {ref.name: o for ref, o in result.plan.layer_options(model).items()}
        labels = [o.label for o in options.values()]
        counts = {label: labels.count(label) for label in sorted(set(labels))}
        print(f"\n{name}: {counts}")
        for group in vllm.tied_layers(list(options)):
            print(f"  fused {', '.join(group)}: {options[group[0]].label}")
        print(f"  split groups: {vllm.tie_refusal(options) or 'none'}")
        kernels = [m["kernel"] for m in result.plan.export["matrices"].values()]
        print(f"  kernels: { {k: kernels.count(k) for k in sorted(set(kernels))} }")
        predicted = result.plan.predicted
        if "latency_ms" in predicted:
            print(
                f"  predicted latency {predicted['latency_ms']:.3f} ms against the float "
                f"model's {predicted['original_latency_ms']:.3f} ms at "
                f"{' x '.join(map(str, predicted['latency_shape']))} tokens "
                f"({predicted['latency_ms'] / predicted['original_latency_ms']:.3f}x)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="timed calls per variant and shape")
    parser.add_argument("--windows", type=int, default=16, help="held-out windows of 128 tokens")
    parser.add_argument(
        "--part", choices=("all", "onnx", "compressed-tensors"), default="all", help="which table"
    )
    args = parser.parse_args()
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)
    saturate = int8_pairs_saturate()
    print(
        f"CPU: {torch.backends.cpu.get_cpu_capability()}, int8 pair sums "
        f"{'saturate (no VNNI)' if saturate else 'exact'}"
    )
    started = time.perf_counter()
    torch.manual_seed(0)
    if args.part != "compressed-tensors":
        onnx_table(args)
    if args.part != "onnx":
        compressed_tensors_table(args.windows)
    print(f"\n{time.perf_counter() - started:.0f} s, {torch.get_num_threads()} torch threads")


def onnx_table(args: argparse.Namespace) -> None:
    loaded = load_model("demo")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    batches = build_heldout(model, tokenizer, windows=args.windows, seq_len=128, batch_size=8)
    feeds = [{k: b[k].numpy() for k in INPUTS} for b in batches]
    masks = [f["attention_mask"] for f in feeds]
    reference = [Variant("ref", model=model).run(f) for f in feeds]

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        float_path = export_float(model, tmp / "float.onnx")
        variants = [Variant("ort float32", float_path)]
        quiet(lambda: quantize_dynamic(float_path, tmp / "int8.onnx"))
        variants.append(Variant("ort quantize_dynamic int8", tmp / "int8.onnx"))
        for block in (32, 128):
            path = quiet(lambda b=block: ort_4bit(float_path, tmp / f"int4-b{b}.onnx", b))
            variants.append(Variant(f"ort 4-bit b{block}", path))
        quiet(lambda: quantize_dynamic(float_path, tmp / "int8-pc.onnx", per_channel=True))
        variants.append(Variant("ort quantize_dynamic int8 per-channel", tmp / "int8-pc.onnx"))
        int4_bytes, int8_bytes = variants[2].tensor_bytes, variants[1].tensor_bytes
        assert int4_bytes is not None and int8_bytes is not None

        def tune(budget: str, **kwargs) -> tuple[Plan, nn.Module] | None:
            try:
                result = tune_once(budget, **kwargs)
            except InfeasibleBudgetError as exc:
                print(f"not tuned: {exc}")
                return None
            return result.plan, result.model

        def tune_once(budget: str, **kwargs):
            return quiet(
                lambda: autotune(
                    model,
                    budget,
                    runtime="onnxruntime",
                    tokenizer=tokenizer,
                    search="allocator",
                    progress=False,
                    **kwargs,
                )
            )

        plans = {
            "autotune int4 g32 sym": (INT4_PLAN, None),
            "autotune int8 per-channel": (INT8_PLAN, None),
            "autotune w8a8 a8 per-tensor": (w8a8_plan("tensor"), None),
            "autotune w8a8 a8 per-channel": (w8a8_plan("channel"), None),
            "autotune w8a8 a8 pair-safe per-tensor": (w8a8_plan("tensor", True), None),
            "autotune w8a8 a8 pair-safe per-channel": (w8a8_plan("channel", True), None),
            f"autotune tuned @ {int4_bytes / 1e6:.1f} MB": tune(
                f"{int4_bytes}B", target="cpu", measure=False
            ),
            f"autotune tuned @ {int8_bytes / 1e6:.1f} MB": tune(
                f"{int8_bytes}B", target="cpu", measure=False
            ),
            "autotune tuned @ 15 MB": tune("15MB", target="cpu", measure=False),
        }
        for factor in LATENCY_FACTORS:
            name = (
                f"autotune tuned @ {int8_bytes / 1e6:.1f} MB, {factor:g}x quantize_dynamic's "
                "time (its file beside each check, ORT-timed)"
            )
            plans[name] = tune(
                f"{int8_bytes}B,{factor:g}x",
                target="local",
                latency_seq_len=16,
                relative_to=variants[1].path,
            )
        plans = {name: entry for name, entry in plans.items() if entry is not None}
        tuned = {name: plan for name, (plan, _) in list(plans.items())[6:]}
        for index, (name, (plan, compressed)) in enumerate(plans.items()):
            compressed = compressed or apply_plan(model, plan)
            error = torch_error(compressed, feeds, reference, masks)
            for level in (0, 4) if index < 2 else (0,):  # MatMulNBits' accuracy levels
                path = tmp / f"autotune-{index}-{level}.onnx"
                quiet(lambda p=plan, c=compressed, o=path, a=level: export(p, c, o, a))
                label = name if level == 0 else f"{name}, accuracy_level 4"
                variants.append(Variant(label, path, torch_error=error))
        options = ort.SessionOptions()
        # idle ORT threads must not spin: the variants are timed interleaved with torch's
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for variant in variants:
            variant.session = ort.InferenceSession(
                str(variant.path), options, providers=["CPUExecutionProvider"]
            )
            variant.error = errors([variant.run(f) for f in feeds], reference, masks)
        variants.append(Variant("torch float32", model=model))
        variants[-1].error = (0.0, 0.0)
        time_round_robin(variants, timing_feeds(feeds[0]), args.rounds)
        print_table(variants, tuned, model)
        near = ("autotune w8a8 a8 pair-safe", f"autotune tuned @ {int8_bytes / 1e6:.1f} MB")
        paired_table([v for v in variants if v.name.startswith(near)], variants, feeds[0])


def paired_table(
    chosen: list[Variant], variants: list[Variant], feed: dict[str, np.ndarray]
) -> None:
    """``chosen`` (the variants near quantize_dynamic's size), each timed in pairs against
    both of its exports (the two sessions visited in turn, ``PAIRED_ROUNDS`` rounds): the
    median of the per-round multiples with its 95% interval, below 1 faster."""
    by_name = {v.name: v for v in variants}
    baselines = ["ort quantize_dynamic int8", "ort quantize_dynamic int8 per-channel"]
    print(
        "\n| variant, timed in pairs | "
        + " | ".join(f"{s} tokens vs {b.removeprefix('ort ')}" for s in SHAPES for b in baselines)
        + " |"
    )
    print("|---|" + "---:|" * (len(SHAPES) * len(baselines)))
    for variant in chosen:
        cells = []
        for size in SHAPES:
            inputs = timing_inputs(feed, size)
            for name in baselines:
                sessions = [variant.session, by_name[name].session]
                walls = run_rounds(sessions, inputs, PAIRED_ROUNDS, SETTLE)
                cells.append(ratio_interval(walls[0], walls[1]).describe())
        print(f"| {variant.name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
