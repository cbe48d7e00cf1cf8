"""The human report of a plan: predicted beside measured, against the budget."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from autotune.budget import Budget
from autotune.plan import DEFAULT_KEY, Plan
from autotune.reference_file import multiples_of, recorded_multiples
from autotune.report_text import (
    device_kind,
    fmt,
    fmt_bytes,
    in_runtime_line,
    search_line,
    speed_words,
    streamed_line,
    structure_line,
    table_lines,
    uniform_line,
    yes_no,
)
from autotune.repriced import LABEL, RooflineLatency, kernel_notes, profile_roofline, target_spec
from methods.registry import option_from_dict
from profilers.paired_timing import Interval


@dataclass
class Report:
    """Predicted and measured figures of a plan; ``str()`` renders a table.

    A named target's latency is the plan's roofline recomputed, never the figure the plan
    records: ``roofline`` when the caller priced it with the model at hand
    (:func:`autotune.repriced.plan_roofline`), else repriced from the plan's profile."""

    plan: Plan
    roofline: RooflineLatency | None = None
    _priced: RooflineLatency | None = field(default=None, init=False, repr=False)

    @property
    def local(self) -> bool:
        return self.plan.target.get("name") == "local"

    def priced(self) -> RooflineLatency | None:
        """The roofline latency of a named target, recomputed (``None`` for ``local``)."""
        if self.local:
            return None
        if self._priced is None:
            self._priced = self.roofline or profile_roofline(self.plan)
        return self._priced

    def predicted_ms(self, phase: str) -> float | None:
        """Predicted ``latency`` (prefill) or ``decode`` ms: the local tuner's sum of times
        measured per layer, or a named target's recomputed roofline."""
        if self.local:
            return self.plan.predicted.get(f"{phase}_ms")
        priced = self.priced()
        return priced.ms(phase) if priced is not None else None

    def _latency_cell(self, phase: str) -> str:
        if self.local:
            return fmt(self.predicted_ms(phase), " ms") + " [measured here, per layer]"
        return fmt(self.predicted_ms(phase), " ms") + f" [{LABEL}]"

    def measured_on(self) -> dict[str, Any] | None:
        """Where the measured figures were taken: the device, its kind (``cpu`` or ``gpu``),
        whether it is the target (only ``local`` is) and whether it is the same kind of device
        (``None`` when the target names no kind). ``None`` when the plan records no device."""
        device = (self.plan.measured or {}).get("device")
        if not device:
            return None
        kind = device_kind(str(device))
        target_kind = self.plan.target.get("kind")
        same = True if self.local else (None if not target_kind else target_kind == kind)
        return {
            "device": device,
            "kind": kind,
            "is_target": self.local,
            "same_kind_as_target": same,
        }

    def measured_machine(self) -> str | None:
        """``"this cpu"`` or ``"this gpu"`` when the figures were measured on a machine other
        than the target (a named target is priced by its roofline, never timed), else
        ``None``."""
        where = self.measured_on()
        return None if where is None or where["is_target"] else f"this {where['kind']}"

    def _measured_header(self) -> str:
        machine = self.measured_machine()
        return f"measured ({machine})" if machine else "measured"

    def _measured_ms(self, key: str) -> str:
        """A measured latency; tagged with this machine when the target is another kind of
        device (CPU timings beside a GPU's roofline, or the reverse)."""
        cell = fmt((self.plan.measured or {}).get(key), " ms")
        where = self.measured_on()
        if cell == "-" or where is None or where["same_kind_as_target"] is not False:
            return cell
        return f"{cell} [{self.measured_machine()}]"

    @property
    def budget(self) -> Budget:
        return Budget.parse(self.plan.budget)

    def holds(self) -> dict[str, bool]:
        """Each budgeted figure: does the measured (or else predicted) value meet it?"""
        budget = self.budget
        figures = {**self.plan.predicted, **(self.plan.measured or {})}
        out: dict[str, bool] = {}
        limit = budget.memory_limit(self.plan.predicted.get("original_bytes", 0) or 0)
        if limit is not None and figures.get("bytes") is not None:
            overhead = self.plan.predicted.get("memory_overhead_bytes", 0) or 0
            out["memory"] = figures["bytes"] + overhead <= limit
        if budget.avg_bits is not None and figures.get("avg_bits") is not None:
            out["avg_bits"] = figures["avg_bits"] <= budget.avg_bits + 1e-9
        for name in ("latency", "decode"):
            limit = self.latency_budget_ms(name)
            value = self._latency_for_budget(name) if limit is not None else None
            if value is None:
                continue
            out[name] = value <= limit
            multiple = self.measured_multiple(name)
            if multiple is not None:  # the relative term judged on rounds that timed both
                ms_term, ratio = budget.phase_ms(name), budget.phase_ratio(name)
                out[name] = multiple.median <= ratio and (ms_term is None or value <= ms_term)
        return out

    def measured_multiple(self, phase: str) -> Interval | None:
        """On ``local`` with a relative budget: the plan's time as a multiple of the
        original's (or the reference file's, :meth:`yardstick`), the median of the rounds
        that timed both, where it was measured."""
        if not self.local or self.budget.phase_ratio(phase) is None:
            return None
        baseline = (self.plan.measured or {}).get("baseline") or {}
        found = baseline.get(f"{phase}_ratio")
        return Interval.from_dict(found) if isinstance(found, dict) else None

    def latency_budget_ms(self, phase: str = "latency") -> float | None:
        """The budget's limit on ``phase`` in ms; a limit relative to the original is taken
        against the original as the plan's latency is judged: timed beside it on ``local``,
        else its predicted latency."""
        budget = self.budget
        if budget.phase_ratio(phase) is None:
            return budget.phase_ms(phase)
        measured = self.plan.measured or {}
        original = (measured.get("baseline") or {}).get(f"{phase}_p50_ms")
        if not (self.local and f"{phase}_p50_ms" in measured and original is not None):
            original = self.predicted_yardstick_ms(phase)
        if original is None:
            return budget.phase_ms(phase)
        return budget.phase_limit_ms(phase, original)

    def yardstick(self, phase: str) -> tuple[str, float]:
        """What the budget's multiple on ``phase`` is of (``original``, or ``reference``: a
        file, ``--relative-to``) and that one's time as a multiple of the original's."""
        multiple = recorded_multiples(self.plan.search).get(phase)
        return ("original", 1.0) if multiple is None else ("reference", multiple)

    def predicted_yardstick_ms(self, phase: str) -> float | None:
        """The predicted time of what the budget's multiple on ``phase`` is of."""
        original = self.plan.predicted.get(f"original_{phase}_ms")
        return None if original is None else original * self.yardstick(phase)[1]

    def _latency_budget_cell(self, phase: str) -> str:
        """The limit in ms, with the multiple of the original's it stands for."""
        ratio = self.budget.phase_ratio(phase)
        cell = fmt(self.latency_budget_ms(phase), " ms")
        return cell if ratio is None else f"{cell} ({ratio:g}x {self.yardstick(phase)[0]})"

    def _latency_for_budget(self, phase: str = "latency") -> float | None:
        """Measured p50 when the target is this machine, else the target's roofline,
        recomputed."""
        measured = self.plan.measured or {}
        if self.local and f"{phase}_p50_ms" in measured:
            return measured[f"{phase}_p50_ms"]
        return self.predicted_ms(phase)

    def figure_rows(self) -> list[tuple[str, str, str, str, str]]:
        """Header and one row per figure: name, predicted, measured, budget, holds."""
        plan, budget = self.plan, self.budget
        pred, meas = plan.predicted, plan.measured or {}
        shape = pred.get("latency_shape") or [budget.batch_size, budget.seq_len]
        limit = budget.memory_limit(pred.get("original_bytes", 0) or 0)
        holds = self.holds()
        rows = [
            ("figure", "predicted", self._measured_header(), "budget", "holds"),
            (
                "stored bytes",
                fmt_bytes(pred.get("bytes")),
                fmt_bytes(meas.get("bytes")),
                fmt_bytes(limit) if limit is not None else "-",
                yes_no(holds.get("memory")),
            ),
            ("  saved (state_dict)", "-", fmt_bytes(meas.get("state_dict_bytes")), "-", "-"),
            (
                "avg bits per weight",
                fmt(pred.get("avg_bits")),
                fmt(meas.get("avg_bits")),
                fmt(budget.avg_bits),
                yes_no(holds.get("avg_bits")),
            ),
            (
                f"{'prefill' if 'decode_ms' in pred else 'latency'} p50 "
                f"({shape[0]}x{shape[1]} tokens)",
                self._latency_cell("latency"),
                self._measured_ms("latency_p50_ms"),
                self._latency_budget_cell("latency"),
                yes_no(holds.get("latency")),
            ),
            *self._multiple_row("latency"),
            ("  p90", "-", self._measured_ms("latency_p90_ms"), "-", "-"),
            *self._decode_rows(holds.get("decode")),
            (
                "peak memory (traced)",
                fmt_bytes(pred.get("peak_memory_bytes")),
                fmt_bytes(meas.get("peak_memory_bytes")),
                "-",
                "-",
            ),
            (
                f"output error ({pred.get('metric', meas.get('metric', '?'))})",
                fmt(pred.get("error")) + " [calibration]",
                fmt(meas.get("heldout_error")) + " [held-out]",
                "-",
                "-",
            ),
        ]
        breakdown = pred.get("memory_breakdown")
        if breakdown:
            shape = f"{breakdown['batch_size']} x {breakdown['context']} tokens"
            rows[2:2] = [
                (
                    f"  + KV cache ({breakdown['kv_dtype']}, {shape})",
                    fmt_bytes(breakdown["kv_cache"]),
                    "-",
                    "-",
                    "-",
                ),
                ("  + activation peak", fmt_bytes(breakdown["activations"]), "-", "-", "-"),
                (
                    "  = serving memory",
                    fmt_bytes(breakdown["total"]),
                    fmt_bytes(
                        meas["bytes"] + breakdown["kv_cache"] + breakdown["activations"]
                        if meas.get("bytes") is not None
                        else None
                    ),
                    fmt_bytes(limit),
                    yes_no(holds.get("memory")),
                ),
            ]
        if meas.get("perplexity") is not None:
            rows.append(
                (
                    "perplexity (held-out)",
                    "-",
                    f"{fmt(meas['perplexity'])} "
                    f"(uncompressed {fmt(meas.get('baseline_perplexity'))})",
                    "-",
                    "-",
                )
            )
        return rows

    def _decode_rows(self, holds: bool | None) -> list[tuple[str, str, str, str, str]]:
        """Decode latency per token, when the plan predicted or measured it."""
        pred, meas = self.plan.predicted, self.plan.measured or {}
        if self.predicted_ms("decode") is None and meas.get("decode_p50_ms") is None:
            return []
        batch, context = pred.get("decode_shape") or meas.get("decode_shape") or ["?", "?"]
        return [
            (
                f"decode p50 per token ({batch} x {context} context)",
                self._latency_cell("decode"),
                self._measured_ms("decode_p50_ms"),
                self._latency_budget_cell("decode"),
                yes_no(holds),
            ),
            *self._multiple_row("decode"),
            ("  p90", "-", self._measured_ms("decode_p90_ms"), "-", "-"),
        ]

    def _multiple_row(self, phase: str) -> list[tuple[str, str, str, str, str]]:
        """The measured multiple of the original's time and its confidence interval, under
        a relative budget on ``local``."""
        multiple = self.measured_multiple(phase)
        if multiple is None:
            return []
        predicted, original = self.predicted_ms(phase), self.predicted_yardstick_ms(phase)
        return [
            (
                f"  x {self.yardstick(phase)[0]} (same rounds)",
                f"{predicted / original:.3g}x" if predicted and original else "-",
                multiple.describe(),
                f"{self.budget.phase_ratio(phase):g}x",
                "-",
            )
        ]

    def headline(self) -> str:
        model = self.plan.model
        return (
            f"autotune plan for {model.get('source', '?')} ({model.get('class', '?')}, "
            f"{model.get('fingerprint', {}).get('parameters', 0):,} parameters) "
            f"on target {self.plan.target.get('name', '?')}"
        )

    def search_line(self) -> str | None:
        """How the plan was searched for (``None`` when it records no search)."""
        return search_line(self.plan.search)

    def notes(self) -> list[str]:
        """Reference figures: the uncompressed model, the best uniform plan, the device."""
        pred, meas = self.plan.predicted, self.plan.measured or {}
        lines = self.latency_notes()
        baseline = meas.get("baseline") or {}
        if baseline or pred.get("original_bytes"):
            parts = [f"uncompressed model {fmt_bytes(pred.get('original_bytes'))}"]
            if pred.get("original_latency_ms") is not None:
                parts.append(
                    f"predicted latency {pred['original_latency_ms']:.4g} ms (as recorded when "
                    "tuned)"
                )
            file = baseline.get("reference_file")
            timed = []
            machine = self.measured_machine()
            where = f" on {machine}" if machine else ""
            for phase, what in (("latency", "measured p50"), ("decode", "decode p50")):
                key = f"{phase}_p50_ms"
                if baseline.get(key) is not None and meas.get(key):
                    timed.append(
                        f"{what} {baseline[key]:.4g} ms{where} (compressed is "
                        f"{speed_words(baseline[key], meas[key])})"
                    )
            if file is None:
                lines.append("reference: " + "; ".join(parts + timed))
            else:
                lines.append("reference: " + "; ".join(parts))
                if timed:
                    lines.append(
                        f"timed beside reference file {file['file']} ({file['bytes']:,} B): "
                        + "; ".join(timed)
                    )
        uniform = uniform_line(pred, meas)
        if uniform:
            lines.append(uniform)
        in_runtime = meas.get("in_runtime")
        if in_runtime:
            lines.append(in_runtime_line(in_runtime, meas))
        streamed = meas.get("streamed")
        if streamed:
            lines.append(streamed_line(streamed))
        if meas.get("device"):
            runtime = (self.plan.target or {}).get("runtime")
            timed = f"; latency timed in {runtime}" if meas.get("timed_in") and runtime else ""
            lines.append(f"measured on {meas['device']}{timed}")
        return lines

    def latency_notes(self) -> list[str]:
        """How a named target's latency was predicted, and the kernels it lists that
        autotune's modules do not run there (priced as what does run)."""
        priced = self.priced()
        if self.local or not self.plan.target:
            return []
        if priced is None:
            return [
                f"latency on {self.plan.target.get('name')}: not recomputed (the plan has no "
                "layer profile); `autotune validate PLAN MODEL` recomputes it"
            ]
        how = (
            "recomputed from the model"
            if priced.source == "model"
            else "layers repriced from the plan's profile on the target spec it holds, "
            "added to the uncompressed model's roofline latency recorded when tuned"
        )
        return [
            f"latency: {LABEL} on {priced.target}, {how}; not measured on that device",
            *kernel_notes(target_spec(self.plan)),
        ]

    def structure_line(self) -> str | None:
        """What structured pruning removed before the layer options, if any."""
        return structure_line(self.plan.structure)

    def layer_summary(self) -> list[tuple[str, int]]:
        counts = Counter(
            option_from_dict(v).label for k, v in self.plan.layers.items() if k != DEFAULT_KEY
        )
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))

    def __str__(self) -> str:
        budget = self.budget
        lines = [
            self.headline(),
            f"budget {budget.spec}: {budget.describe(multiples_of(self.plan.search))}",
            "",
            "layers:",
        ]
        for label, count in self.layer_summary():
            lines.append(f"  {label:<16} {count:>4} layer{'s' if count != 1 else ''}")
        structure = self.structure_line()
        if structure:
            lines.append(structure)
        searched = self.search_line()
        if searched:
            lines.append(searched)
        lines.append("")
        lines.extend(table_lines(self.figure_rows()))
        notes = self.notes()
        if notes:
            lines.append("")
            lines.extend(notes)
        return "\n".join(lines)

    def layer_table(self) -> str:
        """One line per layer entry of the plan: its option and, if known, its bytes."""
        entries = [(k, option_from_dict(v).label) for k, v in self.plan.layers.items()]
        width = max(len(k) for k, _ in entries)
        lines = ["plan:"] + [f"  {name.ljust(width)}  {label}" for name, label in entries]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "predicted": self.plan.predicted,
            "measured": self.plan.measured,
            "measured_on": self.measured_on(),
            "budget": self.plan.budget,
            "holds": self.holds(),
            "roofline": priced.to_dict() if (priced := self.priced()) is not None else None,
            "layers": dict(self.layer_summary()),
        }
