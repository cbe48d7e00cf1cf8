"""Re-check a plan against a model: does the budget still hold, is quality within tolerance?

Used by ``autotune validate`` in CI: the plan is re-applied to the model (or a saved
compressed model is measured) and every budgeted figure is compared with what is measured
now, and the held-out error with the one the plan recorded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autotune.apply import apply_plan
from autotune.budget import Budget
from autotune.calibration import STDLIB_SOURCE, CalibrationSet, build_heldout
from autotune.errors import CalibrationError, PlanError
from autotune.layers import weight_numel
from autotune.loading import load_model
from autotune.measured_figures import Measured, device_description, measure_model
from autotune.plan import Plan
from autotune.reference_file import multiples_of, recorded_multiples
from autotune.repriced import LABEL, RooflineLatency, plan_roofline, profile_roofline
from autotune.validate_gguf import is_gguf, validate_gguf
from methods.keep import KeepOption
from profilers.execution.adapters import adapter_for
from profilers.measure import LatencyStats
from profilers.paired_timing import paired
from profilers.quality import run_outputs

BYTES_TOLERANCE = 0.005


@dataclass
class Check:
    name: str
    expected: str
    measured: str
    holds: bool
    note: str = ""


@dataclass
class ValidationResult:
    checks: list[Check]
    measured: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.holds for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.holds]

    def __str__(self) -> str:
        lines = []
        for check in self.checks:
            status = "ok  " if check.holds else "FAIL"
            note = f" ({check.note})" if check.note else ""
            lines.append(
                f"{status} {check.name}: measured {check.measured}, expected {check.expected}{note}"
            )
        verdict = (
            "plan holds" if self.ok else f"plan broken: {len(self.failures())} check(s) failed"
        )
        lines.append(verdict)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checks": [asdict(c) for c in self.checks],
            "measured": self.measured,
        }


def heldout_batches(plan: Plan, model: nn.Module, tokenizer: Any, heldout: Any) -> list[dict]:
    description = plan.calibration or {}
    if heldout is None and description.get("source") not in (None, STDLIB_SOURCE):
        raise CalibrationError(
            f"the plan was tuned on {description.get('source')!r}: pass the held-out data "
            "it was validated on (--heldout)"
        )
    return build_heldout(
        model,
        tokenizer,
        heldout,
        seq_len=int(description.get("seq_len", 128)),
        windows=int(description.get("heldout_windows", 16)),
        batch_size=int(description.get("batch_size", 8)),
    )


def validate_plan(
    plan: Plan | str | Path,
    model: nn.Module | str | Path,
    *,
    tokenizer: Any = None,
    heldout: Any = None,
    tolerance: float = 0.10,
    measure_latency: bool = True,
    strict: bool = True,
    trust_remote_code: bool = False,
    compressed: nn.Module | str | Path | None = None,
    calibration: Any = None,
    relative_to: str | Path | None = None,
) -> ValidationResult:
    """Apply ``plan`` to ``model`` and check budget, predicted bytes and quality.

    ``calibration`` is what a plan with calibrated methods (GPTQ) was tuned on, where that
    was not a text file or the default text the plan names (input batches, as ``autotune``
    takes them); :func:`~autotune.apply.apply_plan` refuses such a plan without it.

    ``relative_to`` is the reference file a plan's budget multiples are of, where it was tuned
    with one (:mod:`autotune.reference_file`): the plan is timed beside it in its runtime, and
    a plan tuned against another file is refused.

    ``compressed`` (a folder written by ``autotune apply``, or a module) is checked instead of
    a fresh application of the plan; the folder's plan must be the same plan. A GGUF file is
    read and run in llama.cpp (:mod:`autotune.validate_gguf`).

    Quality holds when the held-out error is at most ``(1 + tolerance)`` times the error the
    plan recorded. Latency is measured against the budget when the plan's target is this
    machine (``local``); for a named target the plan's roofline latency is recomputed from its
    layers on the target spec it holds (:mod:`autotune.repriced`), never read back.
    """
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    if isinstance(model, (str, Path)):
        loaded = load_model(model, trust_remote_code=trust_remote_code)
        model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
    plan.check_model(model, strict=strict)
    budget = Budget.parse(plan.budget) if plan.budget else None
    recorded = plan.measured or {}
    predicted = plan.predicted or {}
    needs_error = "heldout_error" in recorded
    batches = heldout_batches(plan, model, tokenizer, heldout) if needs_error else None
    reference = run_outputs(model, batches) if batches else None
    if isinstance(compressed, (str, Path)) and is_gguf(compressed):
        return validate_gguf(
            plan,
            model,
            compressed,
            batches=batches,
            reference=reference,
            tolerance=tolerance,
            strict=strict,
            measure_latency=measure_latency,
            relative_to=relative_to,
        )
    if compressed is None:
        compressed = apply_plan(
            model, plan, calibration=calibration, tokenizer=tokenizer, strict=strict
        )
    elif isinstance(compressed, (str, Path)):
        compressed = _load_saved(compressed, plan, trust_remote_code)
    latency_inputs = decode = decode_tokens = None
    timed = budget is not None and (budget.bounds_latency or budget.bounds_decode)
    if timed:
        assert budget is not None
        tiles = CalibrationSet(batches, batches, batches) if batches else None
        latency_inputs = _latency_tiles(tiles, budget.batch_size, budget.seq_len)
        if budget.bounds_decode:
            decode_tokens = _latency_tiles(tiles, budget.batch_size, budget.decode_context)[
                "input_ids"
            ]
    roofline = original_roofline = None
    relative = budget is not None and (
        budget.latency_ratio is not None or budget.decode_ratio is not None
    )
    # multiples of the original that are not of a reference file (timed beside it instead)
    of_file = recorded_multiples(plan.search)
    of_original = budget is not None and any(
        budget.phase_ratio(phase) is not None and phase not in of_file
        for phase in ("latency", "decode")
    )
    if timed and plan.target.get("name") != "local":
        assert latency_inputs is not None
        roofline = plan_roofline(plan, model, latency_inputs, decode_tokens)
        if relative:  # the original on the same roofline, recomputed too
            kept = dataclasses.replace(plan, layers={"_default": KeepOption().to_dict()})
            original_roofline = plan_roofline(kept, model, latency_inputs, decode_tokens)
    if not (measure_latency and batches):
        latency_inputs = None  # roofline only: nothing is timed here
    elif decode_tokens is not None:
        decode = adapter_for(model).decode_inputs(model, decode_tokens)
    metric = recorded.get("metric", predicted.get("metric", "nmse"))
    local = plan.target.get("name") == "local"
    beside = of_original and local
    limits = None  # a named target's latency is judged on its roofline, not timed here
    if budget is not None and local:
        limits = {phase: budget.timing_limit(phase, beside) for phase in ("latency", "decode")}
    now = measure_model(
        compressed,
        total_weights=weight_numel(model),
        latency_inputs=latency_inputs,
        decode_inputs=decode,
        heldout=(batches, reference) if batches else None,
        metric=metric,
        baseline=model if beside else None,
        limits=limits,
    )
    if latency_inputs is not None and local and budget is not None:
        now = _beside_reference(plan, compressed, relative_to, latency_inputs, decode, budget, now)
    originals: dict[str, float] = {}
    if original_roofline is not None:
        originals = {
            phase: ms
            for phase in ("latency", "decode")
            if (ms := original_roofline.ms(phase)) is not None
        }
    else:  # local: the original timed beside the compressed model, where it was
        beside = (("latency", now.baseline_latency), ("decode", now.baseline_decode))
        originals = {phase: stats.p50_ms for phase, stats in beside if stats is not None}
    exported = _export_bytes(plan, compressed, tokenizer)
    if exported is not None:  # the plan's runtime counts the bytes of its export
        now = dataclasses.replace(now, bytes=exported["bytes"])
    checks = plan_checks(plan, now, tolerance, roofline, originals)
    checks += _runtime_checks(plan, model, strict)
    measured = now.__dict__.copy()
    if exported is not None:
        measured.update(exported, bytes_counted_in=plan.target.get("runtime"))
    measured["latency"] = now.latency.to_dict() if now.latency else None
    measured["decode"] = now.decode.to_dict() if now.decode else None
    measured["device"] = device_description()
    if roofline is not None:
        measured["roofline"] = roofline.to_dict()
    return ValidationResult(checks, measured)


def plan_checks(
    plan: Plan,
    now: Measured,
    tolerance: float,
    roofline: RooflineLatency | None = None,
    originals: dict[str, float] | None = None,
) -> list[Check]:
    """The plan's budget, predicted bytes and recorded held-out error against ``now``; a
    named target's latency against ``roofline`` (recomputed with the model, see
    :mod:`autotune.repriced`), else against the plan's layers repriced from its profile. A
    latency budget relative to the original is taken against ``originals`` (phase -> the
    original's ms, recomputed as the plan's are)."""
    originals = dict(originals or {})
    budget = Budget.parse(plan.budget) if plan.budget else None
    if roofline is None and plan.target.get("name") not in (None, "local"):
        roofline = profile_roofline(plan)
    if roofline is not None and roofline.source == "plan":
        # layers repriced onto the original's latency recorded at tuning time (no model here)
        for phase in ("latency", "decode"):
            recorded_ms = (plan.predicted or {}).get(f"original_{phase}_ms")
            if phase not in originals and recorded_ms is not None:
                originals[phase] = recorded_ms
    recorded = plan.measured or {}
    predicted = plan.predicted or {}
    metric = recorded.get("metric", predicted.get("metric", "nmse"))
    checks: list[Check] = []
    original = predicted.get("original_bytes") or 0
    if budget is not None:
        limit = budget.memory_limit(original)
        if limit is not None:
            overhead = predicted.get("memory_overhead_bytes", 0) or 0
            served = f" + {overhead:,} bytes of KV cache and activations" if overhead else ""
            checks.append(
                Check(
                    "memory",
                    f"<= {limit:,} bytes (budget {budget.spec})",
                    f"{now.bytes:,} bytes{served}",
                    now.bytes + overhead <= limit,
                )
            )
        if budget.avg_bits is not None:
            checks.append(
                Check(
                    "average bits",
                    f"<= {budget.avg_bits:g}",
                    f"{now.avg_bits:.4f}",
                    now.avg_bits <= budget.avg_bits + 1e-9,
                )
            )
        timed = (
            ("latency", now.latency, now.baseline_latency),
            ("decode", now.decode, now.baseline_decode),
        )
        for phase, stats, beside in timed:
            check = _budgeted_latency(plan, budget, phase, stats, roofline, originals, beside)
            if check is not None:
                checks.append(check)
    if predicted.get("bytes"):
        expected = int(predicted["bytes"])
        off = abs(now.bytes - expected) / expected
        checks.append(
            Check(
                "predicted bytes",
                f"{expected:,} bytes +/- {100 * BYTES_TOLERANCE:g}%",
                f"{now.bytes:,} bytes ({100 * off:.3f}% off)",
                off <= BYTES_TOLERANCE,
            )
        )
    if "heldout_error" in recorded and now.heldout_error is not None:
        limit_error = recorded["heldout_error"] * (1 + tolerance) + 1e-12
        checks.append(
            Check(
                f"held-out error ({metric})",
                f"<= {limit_error:.6g} (recorded {recorded['heldout_error']:.6g} "
                f"+{100 * tolerance:g}%)",
                f"{now.heldout_error:.6g}",
                now.heldout_error <= limit_error,
            )
        )
    return checks


def _beside_reference(
    plan: Plan,
    compressed: nn.Module,
    given: str | Path | None,
    latency_inputs: dict[str, torch.Tensor],
    decode: dict[str, Any] | None,
    budget: Budget,
    now: Measured,
) -> Measured:
    """``now`` with each phase whose budget multiple is of a reference file timed again in
    the plan's runtime beside that file (``given``; refused if it is missing or another
    file), where the plan was tuned against one."""
    from autotune.latency_models import measuring_model
    from autotune.reference_file import given_reference
    from profilers.hardware import HardwareSpec

    recorded = (plan.search or {}).get("relative_to")
    file = given_reference(recorded, given)
    if file is None:
        return now
    timer = measuring_model(HardwareSpec.from_dict(plan.target))
    if not timer.runs_here() or not timer.measures:
        raise PlanError(
            f"the plan is timed beside reference file {file.path.name!r} in "
            f"{plan.target.get('runtime')}, which is not installed here"
        )
    inputs = {"latency": latency_inputs, "decode": decode}
    fields = {"latency": ("latency", "baseline_latency"), "decode": ("decode", "baseline_decode")}
    changed: dict[str, Any] = {}
    for phase in recorded_multiples(plan.search):
        if inputs.get(phase) is None:
            continue
        found = timer.measure(
            compressed, plan, file.path, inputs[phase], budget.timing_limit(phase, True)
        )
        if found is not None:
            model_field, beside_field = fields[phase]
            changed[model_field], changed[beside_field] = found["model"], found["baseline"]
    return dataclasses.replace(now, **changed)


def _runtime_checks(plan: Plan, model: nn.Module, strict: bool) -> list[Check]:
    """Where the plan's runtime loads layers as one fused matrix (vLLM), that each such
    group has one option, recomputed from the plan's layers."""
    from autotune.export.base import shaped_layer_options
    from autotune.runtimes import get_runtime

    runtime = get_runtime(plan.target.get("runtime") or "torch")
    if not runtime.fused:
        return []
    options = {ref.name: o for ref, o in shaped_layer_options(plan, model, strict).items()}
    why = runtime.tie_refusal(options)
    groups = len(runtime.tied_layers(list(options)))
    found = why or f"{groups} fused groups, each whole"
    return [Check(f"fused layers ({runtime.name})", "one option per fused matrix", found, not why)]


def _export_bytes(plan: Plan, compressed: nn.Module, tokenizer: Any) -> dict[str, int] | None:
    """The bytes of the export of ``compressed``, recomputed, where the plan's runtime counts
    a budget in its export (``--runtime onnxruntime``)."""
    from autotune.runtimes import get_runtime

    runtime = get_runtime(plan.target.get("runtime") or "torch")
    return runtime.stored_bytes(compressed, plan, tokenizer=tokenizer)


def _load_saved(folder: str | Path, plan: Plan, trust_remote_code: bool) -> nn.Module:
    from autotune.saved import PLAN, load_compressed

    saved = Plan.load(Path(folder) / PLAN) if (Path(folder) / PLAN).is_file() else None
    if saved is not None and (saved.layers != plan.layers or saved.model != plan.model):
        raise PlanError(f"the saved model in {str(folder)!r} was made from another plan")
    return load_compressed(folder, trust_remote_code=trust_remote_code)


def _latency_tiles(
    tiles: CalibrationSet | None, batch_size: int, seq_len: int
) -> dict[str, torch.Tensor]:
    """Inputs of ``batch_size x seq_len`` tokens: tiled from held-out data when there is
    some, else token id 1 throughout (the roofline reads shapes, not values)."""
    if tiles is not None:
        return tiles.latency_inputs(batch_size, seq_len)
    ids = torch.ones(batch_size, seq_len, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _budgeted_latency(
    plan: Plan,
    budget: Budget,
    phase: str,
    now: LatencyStats | None,
    roofline: RooflineLatency | None,
    originals: dict[str, float],
    beside: LatencyStats | None = None,
) -> Check | None:
    """The check of one phase's latency term (``None`` without one); a relative term needs
    the original's latency, recomputed, and on ``local`` is judged on the rounds that timed
    the original ``beside`` the plan."""
    ratio, absolute = budget.phase_ratio(phase), budget.phase_ms(phase)
    if ratio is None:
        return None if absolute is None else _latency_check(plan, phase, absolute, now, roofline)
    multiple = None
    if now is not None and beside is not None and plan.target.get("name") == "local":
        multiple = paired(now.samples_ms, beside.samples_ms)
    if multiple is not None:
        assert now is not None and beside is not None
        within = absolute is None or now.p50_ms <= absolute
        term = "" if absolute is None else f" and <= {absolute:g} ms"
        return Check(
            f"{phase} p50",
            f"<= {ratio:g}x {multiples_of(plan.search, phase)} (timed in the same rounds){term}",
            f"{multiple.describe()}: {now.p50_ms:.4g} ms against {beside.p50_ms:.4g} ms",
            multiple.median <= ratio and within,
        )
    original = originals.get(phase)
    if original is None:
        return Check(
            f"{phase} p50",
            f"<= {ratio:g}x the original's",
            "the original's latency was not computed",
            False,
            note="time the model (a relative budget compares it with the original)",
        )
    limit = budget.phase_limit_ms(phase, original)
    assert limit is not None
    check = _latency_check(plan, phase, limit, now, roofline)
    what = "timed beside it" if plan.target.get("name") == "local" else "recomputed alike"
    return dataclasses.replace(
        check, expected=f"{check.expected} ({ratio:g}x the original's {original:.4g} ms, {what})"
    )


def _latency_check(
    plan: Plan,
    phase: str,
    limit: float,
    now: LatencyStats | None,
    roofline: RooflineLatency | None,
) -> Check:
    """``phase`` (``latency`` or ``decode``) p50 against ``limit`` ms: measured on this
    machine for the ``local`` target, else the plan's roofline on its target, recomputed
    from its layers (``roofline``), never the figure the plan records."""
    name = f"{phase} p50"
    if plan.target.get("name") == "local":
        if now is None:
            return Check(
                name,
                f"<= {limit:g} ms",
                "not measured",
                False,
                note="the local target's budget holds only as measured: time the model",
            )
        return Check(
            name, f"<= {limit:g} ms", f"{now.p50_ms:.4g} ms on this machine", now.p50_ms <= limit
        )
    predicted = roofline.ms(phase) if roofline is not None else None
    if predicted is None:
        return Check(name, f"<= {limit:g} ms", f"unknown ({LABEL} not computed)", False)
    notes = [f"{roofline.describe()}: not a measurement on this machine", *roofline.notes]
    return Check(
        name,
        f"<= {limit:g} ms",
        f"{predicted:.4g} ms {LABEL}",
        predicted <= limit,
        note="; ".join(notes),
    )
