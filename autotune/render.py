"""Write a plan's report as HTML and Markdown, with its figures as PNG files.

``write_report(plan, "report.html")`` writes ``report.html``, ``report.md`` and the folder
``report_files/`` of PNGs they both show. The folder is written whole or not at all, then the
two pages, each atomically.
"""

from __future__ import annotations

import html
from pathlib import Path

from autotune.figures import FIGURES, layer_rows
from autotune.io import atomic_directory, write_text_atomic
from autotune.plan import Plan
from autotune.report import Report

CAPTIONS = {
    "allocation": "Option and stored bits per weight of each layer",
    "predicted_measured": "Predicted against measured stored bytes and latency",
    "sensitivity": "Most sensitive layers",
    "candidates": "Candidates checked end to end",
}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.no { color: #b00020; font-weight: bold; } .yes { color: #1b5e20; }
img { max-width: 100%; border: 1px solid #eee; } figure { margin: 1em 0; }
figcaption { font-size: 0.9em; color: #555; }
"""


def _figures(plan: Plan, folder: Path) -> list[str]:
    written = []
    for name, make in FIGURES.items():
        figure = make(plan)
        if figure is not None:
            figure.savefig(folder / f"{name}.png", dpi=100)
            written.append(name)
    return written


def _layer_table(plan: Plan) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for row in layer_rows(plan):
        rows.append(
            (
                row.name,
                row.label,
                "-" if row.bits is None else f"{row.bits:.3g}",
                "-" if row.bytes is None else f"{row.bytes:,}",
                "-" if row.error is None else f"{row.error:.3g}",
            )
        )
    return rows


def render_html(plan: Plan, files: str, figures: list[str]) -> str:
    report = Report(plan)
    esc = html.escape
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(report.headline())}</title><style>{STYLE}</style></head><body>",
        f"<h1>{esc(report.headline())}</h1>",
        f"<p>Budget <b>{esc(report.budget.spec)}</b>: {esc(report.budget.describe())}.</p>",
    ]
    if report.search_line():
        out.append(f"<p>{esc(report.search_line())}</p>")
    header, *rows = report.figure_rows()
    out.append("<h2>Predicted and measured</h2><table><tr>")
    out.extend(f"<th>{esc(h)}</th>" for h in header)
    out.append("</tr>")
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            css = {"NO": "no", "yes": "yes"}.get(cell, "num" if 0 < i < 4 else "")
            cells.append(f'<td class="{css}">{esc(cell)}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    out.extend(f"<p>{esc(note)}</p>" for note in report.notes())
    for name in figures:
        out.append(
            f'<figure><img src="{esc(files)}/{name}.png" alt="{esc(CAPTIONS[name])}">'
            f"<figcaption>{esc(CAPTIONS[name])}</figcaption></figure>"
        )
    layers = _layer_table(plan)
    if layers:
        out.append("<h2>Layers</h2><table><tr><th>layer</th><th>option</th>")
        out.append("<th>bits per weight</th><th>bytes</th><th>error alone</th></tr>")
        for name, label, bits, size, error in layers:
            out.append(
                f"<tr><td>{esc(name)}</td><td>{esc(label)}</td><td class='num'>{bits}</td>"
                f"<td class='num'>{size}</td><td class='num'>{error}</td></tr>"
            )
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def render_markdown(plan: Plan, files: str, figures: list[str]) -> str:
    report = Report(plan)
    out = [
        f"# {report.headline()}",
        "",
        f"Budget **{report.budget.spec}**: {report.budget.describe()}.",
    ]
    if report.search_line():
        out += ["", report.search_line()]
    header, *rows = report.figure_rows()
    out += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell.strip() for cell in row) + " |" for row in rows]
    notes = report.notes()
    if notes:
        out += ["", *notes]
    for name in figures:
        out += ["", f"![{CAPTIONS[name]}]({files}/{name}.png)"]
    layers = _layer_table(plan)
    if layers:
        out += [
            "",
            "| layer | option | bits per weight | bytes | error alone |",
            "|---|---|---|---|---|",
        ]
        out += [f"| {' | '.join(row)} |" for row in layers]
    return "\n".join(out) + "\n"


def write_report(plan: Plan, output: str | Path) -> list[Path]:
    """Write ``<stem>.html``, ``<stem>.md`` and ``<stem>_files/*.png``; returns the paths."""
    target = Path(output)
    stem = target.with_suffix("") if target.suffix in (".html", ".md") else target
    folder = stem.parent / f"{stem.name}_files"
    with atomic_directory(folder) as staging:
        figures = _figures(plan, staging)
    page = stem.parent / f"{stem.name}.html"
    notes = stem.parent / f"{stem.name}.md"
    write_text_atomic(page, render_html(plan, folder.name, figures))
    write_text_atomic(notes, render_markdown(plan, folder.name, figures))
    return [page, notes, *(folder / f"{name}.png" for name in figures)]
