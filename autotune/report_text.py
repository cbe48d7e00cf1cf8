"""Text of the plan report: table cells and the sentences built from recorded figures.

This module holds the pure text work behind :class:`autotune.report.Report`: formatting a
cell (bytes, numbers, yes/no), laying rows out as aligned columns, saying a speed ratio in
words, and writing the one-line summaries of what a plan records (its search, its structured
pruning, the best uniform plan, the figures measured in a runtime, a block-by-block run).
Each function reads plain dicts and returns text; none knows the plan or the budget.
"""

from __future__ import annotations

from typing import Any


def fmt_bytes(n: float | None) -> str:
    """``"1,234 B (0.001 MB)"``, or ``"-"`` for ``None``."""
    return "-" if n is None else f"{int(n):,} B ({n / 1e6:.3f} MB)"


def fmt(value: Any, unit: str = "", digits: int = 4) -> str:
    """A value with its unit (floats to ``digits`` significant digits), or ``"-"``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}{unit}"
    return f"{value}{unit}"


def yes_no(holds: bool | None) -> str:
    """``"yes"``, ``"NO"`` or ``"-"`` (not judged)."""
    return "-" if holds is None else ("yes" if holds else "NO")


def table_lines(rows: list[tuple[str, ...]]) -> list[str]:
    """The rows as left-aligned columns two spaces apart, trailing spaces dropped."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


def speed_words(baseline_ms: float, compressed_ms: float) -> str:
    """``"1.37x slower"``, ``"1.40x faster"`` or ``"as fast"``: the ratio is always the slower
    time over the faster one."""
    if compressed_ms <= 0 or baseline_ms <= 0:
        return "not comparable"
    ratio = max(baseline_ms, compressed_ms) / min(baseline_ms, compressed_ms)
    if round(ratio, 2) == 1.0:
        return "as fast"
    return f"{ratio:.2f}x {'faster' if baseline_ms > compressed_ms else 'slower'}"


def device_kind(device: str) -> str:
    """``gpu`` for a device recorded as ``cuda: ...``, else ``cpu``."""
    return "gpu" if device.startswith("cuda") else "cpu"


def search_line(search: dict[str, Any]) -> str | None:
    """How the plan was searched for: the algorithm, its effort and what it chose."""
    if not search:
        return None
    line = (
        f"search: {search.get('algorithm', '?')}, chose '{search.get('chosen', '?')}'; "
        f"{search.get('sensitivity_evaluations', 0):,} layer evaluations, "
        f"{float(search.get('full_evaluations', 0)):.1f} whole-model evaluations "
        "(in calibration sets), "
        f"{search.get('seconds', 0):.1f} s"
    )
    run = search.get("engine_run")
    if run:
        line += (
            f"; {search.get('engine')}: calibration error {run['allocator_error']:.4g} "
            f"for the allocator's plan, {run['best_error']:.4g} for the best found "
            f"({run['full_evaluations']:.1f} evaluations, stopped by {run['stopped']})"
        )
    for check in search.get("latency_checks") or []:
        line += (
            f"; {check['budget']} check of search {check.get('search', 1)}'s plan"
            + (" (under a loosened limit)" if check.get("loosened") else "")
            + ": "
            f"{check['measured_ms']:.4g} ms measured{_multiple(check)}, "
            f"{check['predicted_ms']:.4g} ms predicted, "
            f"budget {check['budget_ms']:.4g} ms ({'met' if check['met'] else 'missed'})"
        )
    guard = search.get("decode_guard")
    if guard:
        line += (
            f"; decode step searched within {guard['limit_ms']:.4g} ms, "
            f"{100 * guard['slack']:g}% over the fastest plan predicted as good as "
            f"{guard['reference']} ({guard['fastest_as_good_ms']:.4g} ms)"
        )
    selection = search.get("selection") or {}
    chosen, front = selection.get("chosen"), selection.get("front_runner")
    if chosen and front and chosen != front:
        line += (
            f"; on the selection split ({selection.get('windows', '?')} windows) "
            f"'{chosen}' beat the calibration front runner '{front}' and was kept"
        )
    return line


def _multiple(check: dict[str, Any]) -> str:
    """`` (0.71x the original's in 23 rounds)`` (or the reference file's) for a check that
    timed both in turn."""
    ratio = check.get("ratio")
    if not ratio:
        return ""
    beside = "reference file" if "reference_ms" in check else "original"
    return f" ({ratio['p50']:.3g}x the {beside}'s in {ratio['rounds']} rounds)"


def structure_line(structure: dict[str, Any]) -> str | None:
    """What structured pruning removed before the layer options, if any."""
    if not structure.get("kept"):
        return None
    parts = [
        f"{100 * f:g}% of {'FFN neurons' if kind == 'ffn' else 'attention heads'}"
        for kind, f in (structure.get("fractions") or {}).items()
        if f
    ]
    removed = structure.get("removed_parameters")
    tail = f" ({removed:,} parameters)" if isinstance(removed, int) else ""
    return "structure: removed " + " and ".join(parts) + tail


def uniform_line(predicted: dict[str, Any], measured: dict[str, Any]) -> str | None:
    """The best uniform plan that fits, beside this plan's held-out error and bytes."""
    uniform = measured.get("best_uniform") or {}
    if not uniform:
        return None
    ratio = (
        measured["heldout_error"] / uniform["heldout_error"]
        if uniform.get("heldout_error")
        else float("nan")
    )
    plan_bytes = predicted.get("bytes")
    sizes = (
        f"{uniform['bytes']:,} B against this plan's {plan_bytes:,} B"
        if plan_bytes is not None
        else f"{uniform['bytes']:,} B"
    )
    return (
        f"best uniform plan that fits on the selection split ({uniform['option']}): "
        f"held-out error {uniform['heldout_error']:.4g}, {sizes}; this plan's "
        f"held-out error is {ratio:.2f}x that"
    )


def in_runtime_line(figures: dict[str, Any], measured: dict[str, Any]) -> str:
    """The export's quality as its runtime computes it, beside autotune's modules'."""
    if "skipped" in figures:
        return f"not measured in {figures['runtime']}: {figures['skipped']}"
    ours = measured.get("heldout_error")
    beside = f" (autotune's modules: {ours:.4g})" if ours is not None else ""
    text = (
        f"measured in {figures['runtime']} on its export: held-out error "
        f"{figures['heldout_error']:.4g}{beside}"
    )
    if figures.get("perplexity") is not None:
        text += f", perplexity {figures['perplexity']:.4g}"
    for kind, label in (("prompt", "pp"), ("generate", "tg")):
        speed = figures.get(f"{kind}_tokens_per_s")
        if speed is not None:
            text += f"; {label} {speed:,.0f} tokens/s"
            base = figures.get(f"baseline_{kind}_tokens_per_s")
            if base:
                text += f" ({speed / base:.2f}x float32's {base:,.0f})"
    return text


def streamed_line(streamed: dict[str, Any]) -> str:
    """How a plan worked block by block read its weights, and its peak resident memory."""
    return (
        f"worked block by block: {streamed['blocks']} blocks read one at a time from "
        f"{fmt_bytes(streamed['checkpoint_bytes'])} of weights; peak resident memory "
        f"of the process {fmt_bytes(streamed['peak_rss_bytes'])}"
    )
