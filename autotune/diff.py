"""Compare two plans: which layers changed option, and how the figures moved."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autotune.plan import Plan
from methods.registry import option_from_dict

FIGURES = (
    ("predicted", "bytes", "stored bytes"),
    ("predicted", "avg_bits", "avg bits per weight"),
    ("predicted", "latency_ms", "predicted latency (ms)"),
    ("predicted", "error", "calibration error"),
    ("measured", "bytes", "measured bytes"),
    ("measured", "latency_p50_ms", "measured latency p50 (ms)"),
    ("measured", "heldout_error", "held-out error"),
)


@dataclass
class PlanDiff:
    changed: list[tuple[str, str, str]] = field(default_factory=list)  # layer, before, after
    added: list[tuple[str, str]] = field(default_factory=list)
    removed: list[tuple[str, str]] = field(default_factory=list)
    figures: list[tuple[str, Any, Any]] = field(default_factory=list)  # name, before, after
    budget: tuple[str, str] | None = None
    same_model: bool = True

    @property
    def identical(self) -> bool:
        return not (self.changed or self.added or self.removed or self.budget)

    def __str__(self) -> str:
        lines = []
        if not self.same_model:
            lines.append("note: the plans were made for different models (fingerprints differ)")
        if self.budget:
            lines.append(f"budget: {self.budget[0]} -> {self.budget[1]}")
        if self.identical:
            lines.append("same layer options")
        width = max([len(n) for n, *_ in self.changed + self.added + self.removed] or [0])
        for name, before, after in self.changed:
            lines.append(f"~ {name.ljust(width)}  {before} -> {after}")
        for name, label in self.added:
            lines.append(f"+ {name.ljust(width)}  {label}")
        for name, label in self.removed:
            lines.append(f"- {name.ljust(width)}  {label}")
        if self.figures:
            lines.append("")
            for name, before, after in self.figures:
                lines.append(f"{name}: {_fmt(before)} -> {_fmt(after)}{_change(before, after)}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "identical": self.identical,
            "same_model": self.same_model,
            "budget": self.budget,
            "changed": [{"layer": n, "before": b, "after": a} for n, b, a in self.changed],
            "added": [{"layer": n, "option": o} for n, o in self.added],
            "removed": [{"layer": n, "option": o} for n, o in self.removed],
            "figures": [{"figure": n, "before": b, "after": a} for n, b, a in self.figures],
        }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _change(before: Any, after: Any) -> str:
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)) or not before:
        return ""
    return f" ({100 * (after - before) / abs(before):+.1f}%)"


def diff_plans(a: Plan, b: Plan) -> PlanDiff:
    """Layer entries compared as written (patterns and ``_default`` included)."""
    labels_a = {k: option_from_dict(v).label for k, v in a.layers.items()}
    labels_b = {k: option_from_dict(v).label for k, v in b.layers.items()}
    result = PlanDiff()
    for name, label in labels_a.items():
        if name not in labels_b:
            result.removed.append((name, label))
        elif labels_b[name] != label:
            result.changed.append((name, label, labels_b[name]))
    result.added = [(n, label) for n, label in labels_b.items() if n not in labels_a]
    spec_a, spec_b = a.budget.get("spec"), b.budget.get("spec")
    if spec_a != spec_b:
        result.budget = (str(spec_a), str(spec_b))
    for section, key, name in FIGURES:
        before = (getattr(a, section) or {}).get(key)
        after = (getattr(b, section) or {}).get(key)
        if before is not None or after is not None:
            result.figures.append((name, before, after))
    fp_a, fp_b = a.model.get("fingerprint"), b.model.get("fingerprint")
    result.same_model = not (fp_a and fp_b and fp_a.get("weights") != fp_b.get("weights"))
    return result
