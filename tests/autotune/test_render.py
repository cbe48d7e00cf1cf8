"""Reports for people: figures, HTML and Markdown pages, diff, and a real browser render."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from autotune.cli import main
from autotune.diff import diff_plans
from autotune.figures import FIGURES, allocation_figure, layer_rows, short_label
from autotune.plan import Plan
from autotune.render import render_html, render_markdown, write_report
from autotune.tuner import autotune
from tests.conftest import make_tiny_bert

SMALL = {"seq_len": 32, "calibration_windows": 8, "sensitivity_windows": 2, "heldout_windows": 4}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def tuned_plan(tokenizer) -> Plan:
    result = autotune(make_tiny_bert(), "35%", "cpu", tokenizer=tokenizer, progress=False, **SMALL)
    return result.plan


HAND_WRITTEN = Plan(
    layers={
        "_default": {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True},
        "re:.*query": {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False},
        "encoder.layer.0.output.dense": {
            "method": "rtn",
            "bits": 3,
            "group_size": 32,
            "symmetric": True,
        },
    }
)


def test_every_figure_draws_for_a_tuned_plan(tuned_plan: Plan) -> None:
    for name, make in FIGURES.items():
        figure = make(tuned_plan)
        assert isinstance(figure, Figure), name
        assert figure.axes, name


def test_layer_rows_come_from_the_profile(tuned_plan: Plan) -> None:
    rows = {row.name: row for row in layer_rows(tuned_plan)}
    profile = tuned_plan.profile["layers"]
    assert set(rows) == set(profile)
    for name, row in rows.items():
        assert row.bits == profile[name]["bits_per_weight"]
        assert row.bytes == profile[name]["bytes"]


def test_a_hand_written_plan_draws_what_it_can() -> None:
    assert allocation_figure(HAND_WRITTEN) is not None  # the one exact layer name
    assert FIGURES["sensitivity"](HAND_WRITTEN) is None
    assert FIGURES["candidates"](HAND_WRITTEN) is None
    assert FIGURES["predicted_measured"](HAND_WRITTEN) is None


@pytest.mark.parametrize(
    ("label", "short"),
    [
        ("int4-g32-asym", "4 g32 a"),
        ("int8-ch-sym", "8 ch s"),
        ("keep", "fp"),
        ("w8a8-sq0.6", "w8a8 .6"),
    ],
)
def test_short_labels(label: str, short: str) -> None:
    assert short_label(label) == short


def test_report_files(tuned_plan: Plan, tmp_path: Path) -> None:
    written = write_report(tuned_plan, tmp_path / "report.html")
    names = {p.name for p in written}
    assert {"report.html", "report.md"} <= names
    assert {f"{name}.png" for name in FIGURES} <= names
    page = (tmp_path / "report.html").read_text()
    notes = (tmp_path / "report.md").read_text()
    for name in FIGURES:
        assert f"report_files/{name}.png" in page and f"report_files/{name}.png" in notes
    for layer in tuned_plan.profile["layers"]:
        assert layer in page and layer in notes
    assert "Predicted and measured" in page and "stored bytes" in notes
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "report.html",
        "report.md",
        "report_files",
    ]


def test_report_cli_prints_or_writes(tuned_plan: Plan, tmp_path: Path, capsys) -> None:
    path = tmp_path / "plan.json"
    tuned_plan.save(path)
    assert main(["report", str(path)]) == 0
    assert "stored bytes" in capsys.readouterr().out
    assert main(["report", str(path), "-o", str(tmp_path / "out" / "r.md")]) == 0
    assert (tmp_path / "out" / "r.html").is_file() and (tmp_path / "out" / "r_files").is_dir()


def test_diff_names_changed_layers_and_figures(tuned_plan: Plan, tmp_path: Path, capsys) -> None:
    other = Plan.from_dict(json.loads(tuned_plan.to_json()))
    layer = next(iter(other.profile["layers"]))
    other.layers[layer] = {"method": "rtn", "bits": 2, "group_size": 32, "symmetric": False}
    other.layers["pooler.extra"] = {"method": "none"}
    other.predicted["bytes"] += 1000
    result = diff_plans(tuned_plan, other)
    assert [c[0] for c in result.changed] == [layer]
    assert result.added == [("pooler.extra", "keep")]
    assert (
        "stored bytes",
        tuned_plan.predicted["bytes"],
        other.predicted["bytes"],
    ) in result.figures
    assert diff_plans(tuned_plan, tuned_plan).identical
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    tuned_plan.save(a)
    other.save(b)
    assert main(["diff", str(a), str(a)]) == 0
    capsys.readouterr()
    assert main(["diff", str(a), str(b), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [c["layer"] for c in report["changed"]] == [layer]
    assert not report["identical"]


VIRIDIS_YELLOW = np.array([0.992, 0.906, 0.145])


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_report_renders_in_a_headless_browser(tuned_plan: Plan, tmp_path: Path) -> None:
    """The page loads with its figures: the screenshot holds the heat map's colours."""
    write_report(tuned_plan, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--hide-scrollbars",
        "--window-size=1200,2600",
        "--virtual-time-budget=5000",
        f"--screenshot={shot}",
        (tmp_path / "report.html").as_uri(),
    ]
    subprocess.run(command, capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = imread(shot)[..., :3]
    assert pixels.shape[0] >= 2000 and pixels.shape[1] >= 1000
    assert pixels.std() > 0.05  # not a blank page
    yellow = np.abs(pixels - VIRIDIS_YELLOW).max(axis=-1) < 0.06
    assert yellow.sum() > 500, "the allocation heat map did not render"


def test_the_candidates_figure_draws_a_recorded_pareto_front(tuned_plan: Plan) -> None:
    without = FIGURES["candidates"](tuned_plan)
    plan = Plan.from_dict(tuned_plan.to_dict())
    plan.search["pareto"] = [
        {"error": 0.2, "bytes": 40_000, "latency_ms": 1.0, "avg_bits": 3.0, "layers": {}},
        {"error": 0.1, "bytes": 60_000, "latency_ms": 1.2, "avg_bits": 4.0, "layers": {}},
    ]
    front = FIGURES["candidates"](plan).axes[0].get_lines()
    assert not any("Pareto" in str(line.get_label()) for line in without.axes[0].get_lines())
    (line,) = [line for line in front if "Pareto" in str(line.get_label())]
    assert list(line.get_xdata()) == [0.04, 0.06]
    assert list(line.get_ydata()) == [0.2, 0.1]


TIMED_ON_CPU_FOR_A100 = Plan(
    layers={"_default": {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}},
    target={"name": "a100-80gb", "kind": "gpu"},
    budget={"memory_bytes": 2000},
    predicted={"bytes": 1000, "original_bytes": 4000, "latency_shape": [1, 128]},
    measured={
        "bytes": 1000,
        "latency_p50_ms": 21.89,
        "latency_p90_ms": 22.51,
        "device": "cpu: some cpu, 2 threads",
        "baseline": {"latency_p50_ms": 15.88},
    },
)


def test_pages_name_the_machine_beside_a_gpu_targets_latency() -> None:
    markdown = render_markdown(TIMED_ON_CPU_FOR_A100, "r_files", [])
    page = render_html(TIMED_ON_CPU_FOR_A100, "r_files", [])
    header = next(line for line in markdown.splitlines() if line.startswith("| figure"))
    assert header.split(" | ")[2] == "measured (this cpu)"
    latency = next(line for line in markdown.splitlines() if line.startswith("| latency p50"))
    assert latency.split(" | ")[2] == "21.89 ms [this cpu]"
    assert "<th>measured (this cpu)</th>" in page
    assert '<td class="num">21.89 ms [this cpu]</td>' in page
    for text in (markdown, page):
        assert "15.88 ms on this cpu (compressed is 1.38x slower)" in text
        assert "0.73x" not in text and "faster" not in text
