"""``autotune profile``: the two tables a search works from, written for people and tools.

For every compressible layer and every option: the exact stored bytes, the latency on the
target for prefill (batch x sequence tokens) and decode (one token per sequence), and the
sensitivity (the output error with only that layer compressed, or a cheap proxy of it).
Optionally the target's roofline is fitted to latencies measured here: its own figures in
autotune's modules, or (``--runtime llama.cpp``) its figures for llama.cpp, in llama.cpp.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from autotune.calibration import build_calibration
from autotune.costs import build_costs, default_methods, drop_undercalibrated, layer_options
from autotune.errors import AutotuneError
from autotune.estimators import get_estimator
from autotune.fingerprint import fingerprint
from autotune.io import write_text_atomic
from autotune.layers import compressible_layers
from autotune.runtimes import get_runtime
from methods.keep import KeepOption
from methods.registry import method_of
from methods.tied import untie_output_embeddings
from profilers.cache import SensitivityCache, batches_digest, cache_folder, table_key
from profilers.execution.adapters import adapter_for
from profilers.execution.decode import DecodeError
from profilers.execution.observe import collect_observers
from profilers.hardware import HardwareSpec
from profilers.quality import is_causal_lm
from profilers.sensitivity import SensitivityTable


@dataclass
class Profile:
    model: dict[str, Any]
    target: dict[str, Any]
    calibration: dict[str, Any]
    sensitivity: dict[str, Any]
    shape: dict[str, int]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    fixed: dict[str, float] = field(default_factory=dict)
    fitted_target: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per (layer, option), as in the CSV."""
        out = []
        for name, layer in self.layers.items():
            for label, entry in layer["options"].items():
                out.append({"layer": name, "kind": layer["kind"], "option": label, **entry})
        return out

    def to_csv(self) -> str:
        rows = self.rows()
        buffer = io.StringIO()
        columns = [
            "layer",
            "kind",
            "option",
            "bytes",
            "bits_per_weight",
            "prefill_ms",
            "decode_ms",
            "error",
        ]
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def summary(self, top: int = 5) -> str:
        """The most and least sensitive layers, and the range of each option's costs."""
        metric = self.sensitivity["metric"]
        reference = _reference_label(self)
        ranked = sorted(
            (
                (layer["options"][reference]["error"], name)
                for name, layer in self.layers.items()
                if layer["options"].get(reference, {}).get("error") is not None
            ),
            reverse=True,
        )
        lines = [
            f"profile of {self.model['class']} on {self.target['name']}: {len(self.layers)} "
            f"layers, sensitivity {self.sensitivity['kind']} ({metric}) in "
            f"{self.sensitivity['seconds']:.1f} s, {self.sensitivity['evaluations']} evaluations",
            f"latency at {self.shape['batch_size']}x{self.shape['seq_len']} tokens (prefill) "
            f"and {self.shape['batch_size']} token(s) (decode)",
            "",
            f"most sensitive layers (error with only that layer at {reference}):",
        ]
        lines += [f"  {error:.3g}  {name}" for error, name in ranked[:top]]
        lines += ["", "least sensitive layers:"]
        lines += [f"  {error:.3g}  {name}" for error, name in ranked[::-1][:top]]
        lines += ["", "cost range per option over layers:"]
        lines.append(
            f"  {'option':<16} {'bits/weight':>15} {'prefill ms (sum)':>17} {'decode ms (sum)':>16}"
        )
        by_label: dict[str, list[dict[str, Any]]] = {}
        for layer in self.layers.values():
            for label, entry in layer["options"].items():
                by_label.setdefault(label, []).append(entry)
        for label, entries in sorted(by_label.items()):
            bits = [e["bits_per_weight"] for e in entries]
            prefill = sum(e["prefill_ms"] or 0.0 for e in entries)
            decode = sum(e["decode_ms"] or 0.0 for e in entries)
            span = f"{min(bits):>7.3g}-{max(bits):<7.3g}"
            lines.append(f"  {label:<16} {span} {prefill:>17.4g} {decode:>16.4g}")
        if self.fitted_target:
            fit = self.fitted_target
            used = self.target.get("runtime", "torch")
            runtime = "" if used == "torch" else f" (its figures for {used})"
            lines += [
                "",
                f"roofline of {self.target['name']}{runtime} fitted to latencies measured here: "
                f"median "
                f"error {100 * fit['before']['median_abs_rel_error']:.0f}% -> "
                f"{100 * fit['after']['median_abs_rel_error']:.0f}%, Spearman "
                f"{fit['before']['spearman']:.2f} -> {fit['after']['spearman']:.2f}",
            ]
        return "\n".join(lines)


def _reference_label(profile: Profile) -> str:
    """The option most layers have that is neither keep nor 8-bit: a fair yardstick."""
    counts: dict[str, int] = {}
    for layer in profile.layers.values():
        for label in layer["options"]:
            counts[label] = counts.get(label, 0) + 1
    preferred = ["int4-g32-asym", "int4-g64-asym", "int4-ch-asym"]
    for label in preferred:
        if counts.get(label, 0) == len(profile.layers):
            return label
    return max(counts, key=lambda label: (counts[label], label != "keep"))


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def sensitivity_table(
    model: nn.Module,
    options: dict,
    batches: list,
    kind: str,
    observers: dict,
    cache: SensitivityCache | None,
    progress: bool = False,
) -> SensitivityTable:
    estimator = get_estimator(kind)
    total = sum(len(o) for o in options.values()) if estimator.steps_per_option else 0
    with tqdm(
        total=total, desc="sensitivity", disable=None if progress else True, leave=False
    ) as bar:
        return estimator.table(
            model, options, batches, observers=observers, cache=cache, progress=bar.update
        )


def profile_model(
    model: nn.Module,
    spec: HardwareSpec,
    *,
    tokenizer: Any = None,
    calibration: Any = None,
    methods: tuple[str, ...] | None = None,
    batch_size: int = 1,
    seq_len: int = 128,
    sensitivity: str = "end-to-end",
    cache: bool | str | Path = True,
    fit: bool = False,
    progress: bool = False,
    runtime: str = "torch",
) -> Profile:
    """Sensitivity and cost of every (layer, option) of ``model`` on ``spec``, as ``runtime``
    runs it (its options, its prices)."""
    estimator = get_estimator(sensitivity)
    chosen = get_runtime(runtime).for_target(spec)
    chosen.check_target(spec, spec.name)
    chosen.check_model(model)
    if fit and runtime != "torch":
        _check_runtime_fit(chosen, spec)
    device, spec = spec, chosen.spec_for(spec)
    if methods is None:
        methods = chosen.methods(spec) or default_methods(spec)
    model.eval()
    if adapter_for(model).tied_pairs(
        model
    ):  # a tied table is one layer: untie a copy, never the caller's model
        model = copy.deepcopy(model)
        untie_output_embeddings(model)
    layers = compressible_layers(model)
    options = chosen.restrict(layers, layer_options(layers, methods))
    calib = build_calibration(model, tokenizer, calibration)
    observers = collect_observers(model, options, calib.calibration)
    drop_undercalibrated(layers, options, observers)
    prefill = calib.latency_inputs(batch_size, seq_len)
    decode = _decode_step(model, prefill)
    prefill_costs = build_costs(model, layers, options, spec, prefill, observers=observers)
    decode_costs = build_costs(model, layers, options, spec, decode, observers=observers)
    table_cache = None
    if cache and estimator.cacheable:
        folder = cache_folder(cache)
        digest = batches_digest(calib.sensitivity)
        key = table_key(fingerprint(model), digest, estimator.cache_name or sensitivity)
        table_cache = SensitivityCache(folder, key)
    start = time.perf_counter()
    table = sensitivity_table(
        model, options, calib.sensitivity, sensitivity, observers, table_cache
    )
    seconds = time.perf_counter() - start
    profile = Profile(
        model={"class": type(model).__name__, "fingerprint": fingerprint(model)},
        target={k: v for k, v in spec.to_dict().items() if k != "probed"},
        calibration=calib.description,
        sensitivity={
            "kind": sensitivity,
            "metric": table.metric,
            "evaluations": table.evaluations,
            "seconds": round(seconds, 3),
            "cached": table_cache.hits if table_cache else 0,
        },
        shape={"batch_size": batch_size, "seq_len": seq_len},
        fixed={
            "bytes": prefill_costs.fixed_bytes,
            "prefill_ms": round(1e3 * prefill_costs.fixed_seconds, 6),
            "decode_ms": round(1e3 * decode_costs.fixed_seconds, 6),
        },
    )
    for ref in layers:
        entries = {}
        for index, option in enumerate(options[ref.name]):
            cost = method_of(option).cost(ref.shape, option)
            entries[option.label] = {
                "bytes": cost.bytes,
                "bits_per_weight": round(8 * cost.weight_bytes / ref.shape.numel, 4),
                "prefill_ms": _finite(1e3 * prefill_costs.seconds[ref.name][index]),
                "decode_ms": _finite(1e3 * decode_costs.seconds[ref.name][index]),
                "error": _finite(table.errors.get(ref.name, {}).get(option.label)),
            }
        profile.layers[ref.name] = {
            "kind": ref.shape.kind,
            "shape": [ref.shape.rows, ref.shape.cols],
            "options": entries,
        }
    if fit and runtime == "torch":
        profile.fitted_target = _fit(model, device, options, calib, observers, batch_size, seq_len)
    elif fit:
        profile.fitted_target = _fit_runtime(chosen, model, device, prefill, decode, tokenizer)
    return profile


def _decode_step(model: nn.Module, prefill: dict[str, Any]) -> dict[str, Any]:
    """A decode step after the prefill's tokens for a causal LM (a frozen KV cache of that
    context), else one token per sequence."""
    if is_causal_lm(model):
        with contextlib.suppress(DecodeError):
            return adapter_for(model).decode_inputs(model, prefill["input_ids"])
    return {k: v[:, :1].contiguous() for k, v in prefill.items()}


def _fit(model, spec, options, calib, observers, batch_size, seq_len) -> dict[str, Any]:
    from profilers.roofline_fit import fit_target, observe

    every = {r.name: [KeepOption()] for r in compressible_layers(model, min_numel=0)}
    every.update(options)
    shapes = [calib.latency_inputs(batch_size, seq_len), calib.latency_inputs(batch_size, 16)]
    observations = observe(model, every, shapes, observers=observers)
    result = fit_target(
        spec,
        observations,
        name=f"{spec.name}-fitted",
        source=f"on {type(model).__name__} at {batch_size}x{seq_len} and {batch_size}x16 tokens",
    )
    return _fitted_entry(result)


def _check_runtime_fit(runtime: Any, spec: HardwareSpec) -> None:
    """Refuse, before any work, a fit of figures ``runtime`` does not have or a target whose
    figures are not fitted (``local``)."""
    if not runtime.fits_prices:
        raise AutotuneError(
            f"--fit-target with --runtime {runtime.name}: its plans are priced with the "
            "device's own figures; fit those with --runtime torch (llama.cpp has figures "
            "of its own)"
        )
    if spec.name == "local":
        raise AutotuneError(
            "--fit-target fits a named target's figures (e.g. --target cpu); 'local' is "
            "timed on this machine already"
        )


def _fit_runtime(runtime, model, device, prefill, decode, tokenizer) -> dict[str, Any]:
    """The named target ``device`` with figures of ``runtime``'s own, fitted to the model
    timed in it (a prompt of the profile's shape and, for a causal LM, one decode step
    after it)."""
    shapes = {"prompt": prefill}
    if is_causal_lm(model):
        shapes["decode"] = decode
    return _fitted_entry(runtime.fit_prices(model, device, shapes, tokenizer))


def _fitted_entry(result: Any) -> dict[str, Any]:
    """A fit as the profile records it: the target entry and its accuracy before and after."""
    # a target file describes a device; what runs on it is a tune's choice (--runtime)
    entry = {k: v for k, v in result.spec.to_dict().items() if k not in ("probed", "runtime")}
    return {"entry": entry, "before": result.before, "after": result.after}


def write_profile(
    profile: Profile, output: str | Path, csv_path: str | Path | None = None
) -> list[Path]:
    """Write the profile JSON (and CSV) atomically; returns the paths written."""
    written = [Path(output)]
    write_text_atomic(output, profile.to_json())
    csv_target = Path(csv_path) if csv_path else Path(output).with_suffix(".csv")
    write_text_atomic(csv_target, profile.to_csv())
    written.append(csv_target)
    return written


def fitted_target_file(profile: Profile) -> str:
    """A target file (``--target-file``) holding the fitted entry."""
    if not profile.fitted_target:
        raise ValueError("this profile has no fitted target")
    return (
        json.dumps({"schema_version": 1, "targets": [profile.fitted_target["entry"]]}, indent=2)
        + "\n"
    )
