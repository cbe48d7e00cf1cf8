"""Figures of a plan (matplotlib, object-oriented API: no global pyplot state).

Each function takes a :class:`Plan` and returns a ``Figure``, or ``None`` when the plan holds
nothing to draw (a hand-written plan has no profile, a plan without a search no candidates).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from autotune.budget import Budget
from autotune.plan import DEFAULT_KEY, PATTERN_PREFIX, Plan
from autotune.report import Report
from methods.registry import option_from_dict

BLOCK_NAME = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<suffix>.+)$")
METHOD_COLOURS = {"none": "#7f7f7f", "rtn": "#1f77b4", "w8a8": "#d62728", "fp8": "#9467bd"}


@dataclass(frozen=True)
class LayerRow:
    name: str
    label: str
    method: str
    bits: float | None
    error: float | None
    bytes: int | None


def layer_rows(plan: Plan) -> list[LayerRow]:
    """One row per named layer: from the profile when the plan has one, else from its entries
    (patterns and ``_default`` cannot be drawn without the model)."""
    profile = (plan.profile or {}).get("layers", {})
    rows = []
    for key, value in plan.layers.items():
        if key == DEFAULT_KEY or key.startswith(PATTERN_PREFIX):
            continue
        option = option_from_dict(value)
        info = profile.get(key, {})
        bits = info.get("bits_per_weight")
        if bits is None:
            bits = getattr(option, "bits", None)
            bits = 8.0 if bits is None and option.method in ("w8a8", "fp8") else bits
        rows.append(
            LayerRow(key, option.label, option.method, bits, info.get("error"), info.get("bytes"))
        )
    return rows


def short_label(label: str) -> str:
    """``int4-g32-asym`` -> ``4 g32 a``; ``w8a8-sq0.6`` -> ``w8a8 .6``; ``w8a8-a8-tensor-sq0.6``
    -> ``w8a8 a8 t .6``; ``keep`` -> ``fp``."""
    if label == "keep":
        return "fp"
    match = re.fullmatch(r"int(\d+)-(ch|g\d+)-(sym|asym)", label)
    if match:
        return f"{match.group(1)} {match.group(2)} {match.group(3)[0]}"
    match = re.fullmatch(r"w8a8(-a\d+)?(-tensor)?(?:-sq([\d.]+))?", label)
    if match:
        activations, per_tensor, alpha = match.groups()
        parts = ["w8a8", activations and activations[1:], per_tensor and "t"]
        parts.append(alpha and alpha.removeprefix("0"))
        return " ".join(part for part in parts if part)
    return label


def _grid(
    rows: list[LayerRow],
) -> tuple[list[int], list[str], dict[tuple[int, str], LayerRow], list[LayerRow]]:
    """Split layers into a block x role grid (names like ``encoder.layer.3.attention.key``)
    and the rest."""
    matches = [(row, BLOCK_NAME.match(row.name)) for row in rows]
    prefixes = [m.group("prefix") for _, m in matches if m]
    if not prefixes:
        return [], [], {}, rows
    prefix = max(set(prefixes), key=prefixes.count)
    cells: dict[tuple[int, str], LayerRow] = {}
    roles: list[str] = []
    others = []
    for row, match in matches:
        if match and match.group("prefix") == prefix:
            role = match.group("suffix")
            if role not in roles:
                roles.append(role)
            cells[(int(match.group("index")), role)] = row
        else:
            others.append(row)
    blocks = sorted({index for index, _ in cells})
    return blocks, roles, cells, others


def allocation_figure(plan: Plan) -> Figure | None:
    """Stored bits per weight of every layer: a block x role heat map plus the other layers."""
    rows = layer_rows(plan)
    if not rows:
        return None
    blocks, roles, cells, others = _grid(rows)
    bits = [r.bits for r in rows if r.bits is not None]
    low, high = (min(bits), max(bits)) if bits else (0.0, 32.0)
    figure = Figure(figsize=(11, 1.2 + 0.45 * max(len(blocks), 1) + 0.3 * len(others)))
    grid = figure.add_gridspec(2, 1, height_ratios=[max(len(blocks), 1), max(len(others), 1) * 0.7])
    colormap = "viridis"
    if blocks:
        ax = figure.add_subplot(grid[0])
        matrix = np.full((len(blocks), len(roles)), np.nan)
        for (index, role), row in cells.items():
            if row.bits is not None:
                matrix[blocks.index(index), roles.index(role)] = row.bits
        image = ax.imshow(matrix, aspect="auto", cmap=colormap, vmin=low, vmax=high)
        for (index, role), row in cells.items():
            value = matrix[blocks.index(index), roles.index(role)]
            dark = not math.isnan(value) and value < low + 0.6 * (high - low)
            ax.text(
                roles.index(role),
                blocks.index(index),
                short_label(row.label),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if dark else "black",
            )
        ax.set_xticks(range(len(roles)), [r.replace(".", "\n") for r in roles], fontsize=8)
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=8)
        ax.set_ylabel("block")
        ax.set_title("Stored bits per weight (scales included) and option of each layer")
        figure.colorbar(image, ax=ax, label="bits per weight", fraction=0.03)
    if others:
        ax = figure.add_subplot(grid[1])
        names = [r.name for r in others]
        values = [r.bits or 0.0 for r in others]
        colours = [METHOD_COLOURS.get(r.method, "#2ca02c") for r in others]
        ax.barh(range(len(others)), values, color=colours)
        for i, row in enumerate(others):
            ax.text(values[i], i, f" {row.label}", va="center", fontsize=8)
        ax.set_yticks(range(len(others)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("bits per weight")
        ax.set_xlim(0, max([*values, high]) * 1.3)
        if not blocks:
            ax.set_title("Stored bits per weight and option of each layer")
    figure.tight_layout()
    return figure


def sensitivity_figure(plan: Plan, top: int = 12) -> Figure | None:
    """The layers whose chosen option costs the most output error, with each layer's range."""
    profile = (plan.profile or {}).get("layers", {})
    rows = [(name, info) for name, info in profile.items() if info.get("error") is not None]
    if not rows:
        return None
    rows.sort(key=lambda item: item[1]["error"], reverse=True)
    rows = rows[:top]
    figure = Figure(figsize=(11, 1.0 + 0.38 * len(rows)))
    ax = figure.add_subplot()
    chosen = [max(info["error"], 1e-12) for _, info in rows]
    worst = [
        max([v for v in info.get("errors", {}).values() if v is not None] or [info["error"]])
        for _, info in rows
    ]
    y = np.arange(len(rows))
    ax.barh(y, worst, color="#dddddd", label="worst option profiled")
    ax.barh(y, chosen, color="#1f77b4", label="chosen option")
    label_of = {k: option_from_dict(v).label for k, v in plan.layers.items() if k in profile}
    for i, (name, _) in enumerate(rows):
        ax.text(chosen[i], i, f" {label_of.get(name, '?')}", va="center", fontsize=8)
    ax.set_yticks(y, [name for name, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    metric = (plan.profile or {}).get("metric", "error")
    ax.set_xlabel(f"output {metric} with only this layer compressed")
    ax.set_title(f"Most sensitive layers (top {len(rows)} by the error of their chosen option)")
    ax.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def _bar_panel(ax: Any, items: list[tuple[str, float | None]], unit: str, title: str) -> None:
    present = [(label, value) for label, value in items if value is not None]
    colours = ["#1f77b4", "#ff7f0e", "#d62728", "#7f7f7f", "#2ca02c"]
    ax.bar(range(len(present)), [v for _, v in present], color=colours[: len(present)])
    for i, (_, value) in enumerate(present):
        ax.text(i, value, f"{value:.4g}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(present)), [label for label, _ in present], fontsize=8)
    ax.set_ylabel(unit)
    ax.set_title(title)


def predicted_measured_figure(plan: Plan) -> Figure | None:
    """Stored bytes and latency: predicted, measured, budget and the uncompressed model."""
    predicted, measured = plan.predicted or {}, plan.measured or {}
    if not predicted and not measured:
        return None
    budget = Budget.parse(plan.budget) if plan.budget else None
    original = predicted.get("original_bytes")
    limit = budget.memory_limit(original or 0) if budget else None

    def mb(value: float | None) -> float | None:
        return None if value is None else value / 1e6

    figure = Figure(figsize=(11, 3.6))
    left, right = figure.subplots(1, 2)
    _bar_panel(
        left,
        [
            ("predicted", mb(predicted.get("bytes"))),
            ("measured", mb(measured.get("bytes"))),
            ("budget", mb(limit)),
            ("uncompressed", mb(original)),
        ],
        "MB",
        "Stored bytes",
    )
    _latency_panel(right, plan, budget)
    figure.tight_layout()
    return figure


def _latency_panel(ax: Any, plan: Plan, budget: Budget | None) -> None:
    """Predicted, measured, uncompressed and budget latency; measured bars name this machine
    when the target is another (a named target's prediction is its roofline)."""
    predicted, measured = plan.predicted or {}, plan.measured or {}
    shape = predicted.get("latency_shape") or measured.get("latency_shape") or ["?", "?"]
    baseline = measured.get("baseline") or {}
    report = Report(plan)
    machine = report.measured_machine()
    here = f"\n({machine})" if machine else ""
    target = plan.target.get("name", "?")
    _bar_panel(
        ax,
        [
            (
                "predicted" if report.local else "predicted (roofline)",
                report.predicted_ms("latency"),
            ),
            (f"measured p50{here}", measured.get("latency_p50_ms")),
            (f"measured p90{here}", measured.get("latency_p90_ms")),
            (f"uncompressed p50{here}", baseline.get("latency_p50_ms")),
            ("budget", report.latency_budget_ms("latency") if budget else None),
        ],
        "ms",
        f"Latency at {shape[0]} x {shape[1]} tokens on {target}"
        + (f"\n(measured on {machine})" if machine else ""),
    )


def candidates_figure(plan: Plan) -> Figure | None:
    """Stored bytes against error of every candidate checked end to end, and the Pareto front
    when the search recorded one."""
    candidates = [c for c in (plan.search or {}).get("candidates", []) if c.get("bytes")]
    front = (plan.search or {}).get("pareto", [])
    if not candidates and not front:
        return None
    figure = Figure(figsize=(11, 4))
    ax = figure.add_subplot()
    labels: list[Any] = []
    for candidate in candidates:
        error = candidate.get("screening_error")  # every candidate has one: comparable
        if error is None:
            continue
        chosen = candidate["name"] == plan.search.get("chosen")
        uniform = candidate["name"].startswith("uniform")
        ax.scatter(
            candidate["bytes"] / 1e6,
            error,
            marker="*" if chosen else ("o" if uniform else "s"),
            s=180 if chosen else 40,
            color="#d62728" if chosen else ("#7f7f7f" if uniform else "#1f77b4"),
            zorder=4 if chosen else 3,
        )
        labels.insert(  # the chosen plan's label is placed first, beside its star
            0 if chosen else len(labels),
            ax.annotate(
                candidate["name"].removeprefix("uniform "),
                (candidate["bytes"] / 1e6, error),
                fontsize=7,
                xytext=(4, 2),
                textcoords="offset points",
            ),
        )
    if front:
        points = sorted((p["bytes"] / 1e6, p["error"]) for p in front if "bytes" in p)
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            "-",
            color="#2ca02c",
            marker=".",
            label="Pareto front of the search (error on the calibration set)",
        )
        ax.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("stored MB")
    ax.set_ylabel("output error (candidates: on the profiling batches)")
    ax.set_title("Candidates checked end to end (star: chosen; circles: uniform plans)")
    figure.tight_layout()
    separate_labels(figure, labels)
    return figure


def separate_labels(figure: Figure, labels: list[Any], gap_points: float = 1.0) -> None:
    """Place annotations so that none overlaps one placed before it (candidates of equal or
    near-equal size and error would otherwise print their names over each other): a label
    past the axes' right edge moves to the left of its point, then one that collides moves
    whole lines down (or, below the axes, up) until it is free."""
    renderer = _renderer(figure)
    placed: list[Any] = []
    for label in labels:
        frame = label.axes.get_window_extent(renderer)
        _keep_left_of(label, frame.x1, renderer)
        placed.append(_free_line(label, placed, frame, renderer, gap_points))


def _renderer(figure: Figure) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = figure.canvas if hasattr(figure.canvas, "get_renderer") else FigureCanvasAgg(figure)
    return canvas.get_renderer()


def _keep_left_of(label: Any, right: float, renderer: Any) -> None:
    """Mirror a label to the left of its point when it runs past ``right`` (pixels)."""
    if label.get_window_extent(renderer).x1 > right:
        x, y = label.xyann
        label.xyann = (-abs(x), y)
        label.set_horizontalalignment("right")


def _line_steps(count: int) -> list[int]:
    """``0, -1, -2, ..., 1, 2, ...``: down first, so that a stack of labels reads in order,
    and enough lines that ``count`` boxes cannot block them all (a box of one line's height
    overlaps at most two)."""
    return [-k for k in range(count + 2)] + list(range(1, count + 2))


def _free_line(label: Any, placed: list[Any], frame: Any, renderer: Any, gap: float) -> Any:
    """Move ``label`` to the first line offset where it overlaps none of ``placed``, inside
    ``frame`` if any such line is; returns its box there."""
    x, y = label.xyann
    step = label.get_window_extent(renderer).height * 72.0 / label.figure.dpi + gap
    outside = None
    for k in _line_steps(len(placed)):
        label.xyann = (x, y + k * step)
        box = label.get_window_extent(renderer)
        if any(box.overlaps(other) for other in placed):
            continue
        if frame.y0 <= box.y0 and box.y1 <= frame.y1:
            return box
        outside = k if outside is None else outside
    label.xyann = (x, y + (outside or 0) * step)
    return label.get_window_extent(renderer)


FIGURES = {
    "allocation": allocation_figure,
    "predicted_measured": predicted_measured_figure,
    "sensitivity": sensitivity_figure,
    "candidates": candidates_figure,
}
