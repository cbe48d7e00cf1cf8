"""The report's search line and reference notes say what the selection split decided."""

from __future__ import annotations

import pytest

from autotune.plan import Plan
from autotune.report import Report

RTN4 = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}


def _plan(selection: dict, best_uniform: dict | None = None) -> Plan:
    measured = {"heldout_error": 0.02, "bytes": 1000}
    if best_uniform is not None:
        measured["best_uniform"] = best_uniform
    return Plan(
        layers={"_default": RTN4},
        target={"name": "local"},
        budget={"memory_bytes": 2000},
        predicted={"bytes": 1000, "original_bytes": 4000},
        measured=measured,
        search={"algorithm": "allocator", "chosen": "x", "selection": selection},
    )


def test_search_line_says_when_a_uniform_plan_beat_the_front_runner() -> None:
    won = _plan({"windows": 8, "front_runner": "allocator", "chosen": "uniform int4-g32-asym"})
    line = Report(won).search_line()
    assert line is not None
    assert "'uniform int4-g32-asym' beat the calibration front runner 'allocator'" in line
    assert "8 windows" in line

    kept = _plan({"windows": 8, "front_runner": "allocator", "chosen": "allocator"})
    assert "front runner" not in (Report(kept).search_line() or "")


def test_search_line_gives_the_decode_guard_it_was_searched_under() -> None:
    plan = _plan({"windows": 8, "front_runner": "allocator", "chosen": "allocator"})
    assert "decode step" not in (Report(plan).search_line() or "")
    plan.search["decode_guard"] = {
        "reference": "llama-quantize --pure Q3_K",
        "reference_ms": 0.45,
        "fastest_as_good_ms": 0.3267,
        "slack": 0.05,
        "limit_ms": 0.343,
    }
    line = Report(plan).search_line() or ""
    assert (
        "decode step searched within 0.343 ms, 5% over the fastest plan predicted as good as "
        "llama-quantize --pure Q3_K (0.3267 ms)" in line
    )


def test_search_line_says_which_check_was_of_a_plan_under_a_loosened_limit() -> None:
    plan = _plan({"windows": 8, "front_runner": "allocator", "chosen": "allocator"})
    check = {"budget": "latency", "budget_ms": 2.5, "predicted_ms": 2.4, "met": True}
    plan.search["latency_checks"] = [
        {**check, "plan": "allocator", "search": 1, "measured_ms": 2.1},
        {**check, "plan": "allocator", "search": 2, "measured_ms": 2.3, "loosened": True},
    ]
    line = Report(plan).search_line() or ""
    assert "latency check of search 1's plan: 2.1 ms measured" in line
    assert "latency check of search 2's plan (under a loosened limit): 2.3 ms measured" in line


def test_best_uniform_note_gives_both_sizes_and_the_error_ratio() -> None:
    plan = _plan(
        {"windows": 8, "front_runner": "allocator", "chosen": "allocator"},
        {"option": "int4-g32-asym", "heldout_error": 0.08, "selection_error": 0.07, "bytes": 990},
    )
    note = next(n for n in Report(plan).notes() if n.startswith("best uniform"))
    assert "on the selection split (int4-g32-asym)" in note
    assert "990 B against this plan's 1,000 B" in note
    assert "0.25x that" in note


@pytest.mark.parametrize(
    ("baseline", "compressed", "words"),
    [(15.88, 21.89, "1.38x slower"), (21.0, 15.0, "1.40x faster"), (10.0, 10.02, "as fast")],
)
def test_speed_is_worded_with_a_ratio_of_at_least_one(baseline, compressed, words) -> None:
    from autotune.report_text import speed_words

    assert speed_words(baseline, compressed) == words


@pytest.mark.parametrize(
    ("target", "device", "header"),
    [
        ("local", "cpu: some cpu", "measured"),
        ("a100", "cpu: some cpu, 2 threads", "measured (this cpu)"),
        ("cpu", "cuda: H100", "measured (this gpu)"),
    ],
)
def test_the_measured_column_names_the_machine_when_the_target_is_another(
    target, device, header
) -> None:
    plan = _plan({"windows": 8, "front_runner": "allocator", "chosen": "allocator"})
    plan.target = {"name": target}
    plan.measured = {**(plan.measured or {}), "device": device}
    report = Report(plan)
    report.priced = lambda: None  # no profile to reprice: the header is what is checked
    assert report.figure_rows()[0][2] == header


def _timed_plan(target: dict, device: str = "cpu: some cpu, 2 threads") -> Plan:
    plan = _plan({"windows": 8, "front_runner": "allocator", "chosen": "allocator"})
    plan.target = target
    plan.predicted = {**plan.predicted, "latency_shape": [1, 128]}
    plan.measured = {
        **(plan.measured or {}),
        "latency_p50_ms": 21.89,
        "latency_p90_ms": 22.51,
        "device": device,
        "baseline": {"latency_p50_ms": 15.88},
    }
    return plan


def _row(report: Report, prefix: str) -> tuple[str, ...]:
    return next(row for row in report.figure_rows() if row[0].startswith(prefix))


@pytest.mark.parametrize(
    ("target", "device", "tagged"),
    [
        ({"name": "a100-80gb", "kind": "gpu"}, "cpu: some cpu, 2 threads", True),
        ({"name": "cpu", "kind": "cpu"}, "cuda: NVIDIA H100", True),
        ({"name": "cpu", "kind": "cpu"}, "cpu: some cpu, 2 threads", False),
        ({"name": "local", "kind": "cpu"}, "cpu: some cpu, 2 threads", False),
    ],
)
def test_latency_timed_on_another_kind_of_device_is_tagged_with_it(target, device, tagged) -> None:
    report = Report(_timed_plan(target, device))
    kind = "gpu" if device.startswith("cuda") else "cpu"
    tag = f" [this {kind}]"
    assert _row(report, "latency p50")[2] == "21.89 ms" + (tag if tagged else "")
    assert _row(report, "  p90")[2] == "22.51 ms" + (tag if tagged else "")
    assert _row(report, "stored bytes")[2] == "1,000 B (0.001 MB)"  # bytes are the same anywhere


def test_the_text_table_stays_aligned_with_the_machine_named() -> None:
    text = str(Report(_timed_plan({"name": "a100-80gb", "kind": "gpu"})))
    header = next(line for line in text.splitlines() if line.startswith("figure "))
    latency = next(line for line in text.splitlines() if line.startswith("latency p50"))
    assert "measured (this cpu)" in header
    column = header.index("measured (this cpu)")
    assert latency[column:].startswith("21.89 ms [this cpu]")
    assert header.index("budget") == latency.index("-", column + len("21.89 ms [this cpu]"))


@pytest.mark.parametrize(
    ("target", "where"),
    [({"name": "a100-80gb", "kind": "gpu"}, " on this cpu"), ({"name": "local"}, "")],
)
def test_the_reference_note_says_where_the_uncompressed_model_was_timed(target, where) -> None:
    notes = Report(_timed_plan(target)).notes()
    reference = next(n for n in notes if n.startswith("reference"))
    assert f"measured p50 15.88 ms{where} (compressed is 1.38x slower)" in reference


def test_the_json_report_says_where_it_was_measured() -> None:
    named = Report(_timed_plan({"name": "a100-80gb", "kind": "gpu"})).to_dict()
    assert named["measured_on"] == {
        "device": "cpu: some cpu, 2 threads",
        "kind": "cpu",
        "is_target": False,
        "same_kind_as_target": False,
    }
    local = Report(_timed_plan({"name": "local"})).to_dict()["measured_on"]
    assert local["is_target"] and local["same_kind_as_target"]
    assert Report(_plan({})).to_dict()["measured_on"] is None  # no device recorded


@pytest.mark.parametrize(
    ("measured_ms", "baseline_ms", "holds"), [(6.9, 10.0, True), (7.1, 10.0, False)]
)
def test_a_relative_budget_holds_against_the_original_timed_beside_the_plan(
    measured_ms: float, baseline_ms: float, holds: bool
) -> None:
    """The original predicted at 20 ms, timed at ``baseline_ms`` beside the plan: 0.7x of
    what was timed, not of the prediction."""
    plan = _plan({})
    plan.budget = {"spec": "0.7x", "batch_size": 1, "seq_len": 16}
    plan.predicted.update(latency_ms=12.0, original_latency_ms=20.0)
    plan.measured.update(
        latency_p50_ms=measured_ms, baseline={"latency_p50_ms": baseline_ms}, device="cpu: x"
    )
    report = Report(plan)
    assert report.latency_budget_ms() == pytest.approx(7.0)
    assert report.holds()["latency"] is holds
    row = next(r for r in report.figure_rows() if r[0].startswith("latency p50"))
    assert row[3] == "7 ms (0.7x original)"
    plan.target = {"name": "cpu", "kind": "cpu"}  # a named target: against the prediction
    assert Report(plan).latency_budget_ms() == pytest.approx(14.0)


def test_a_relative_budget_is_judged_on_the_multiple_timed_in_the_same_rounds() -> None:
    """p50 over p50 is 0.75x, above a 0.7x budget, but the rounds that timed both put the
    plan at 0.66x the original in the median round: the rounds decide, and are shown."""
    plan = _plan({})
    plan.budget = {"spec": "0.7x", "batch_size": 1, "seq_len": 16}
    plan.predicted.update(latency_ms=12.0, original_latency_ms=20.0)
    multiple = {"p50": 0.66, "low": 0.61, "high": 0.69, "rounds": 24, "confidence": 0.95}
    plan.measured.update(
        latency_p50_ms=7.5,
        baseline={"latency_p50_ms": 10.0, "latency_ratio": multiple},
        device="cpu: x",
    )
    report = Report(plan)
    assert report.holds()["latency"] is True
    row = next(r for r in report.figure_rows() if r[0].startswith("  x original"))
    assert row[1:4] == ("0.6x", "0.66x (95% CI 0.61-0.69, 24 rounds)", "0.7x")
    plan.measured["baseline"]["latency_ratio"] = {**multiple, "p50": 0.72}
    assert Report(plan).holds()["latency"] is False
    # an ms term beside it is judged on the plan's own p50
    plan.measured["baseline"]["latency_ratio"] = multiple
    plan.budget = {"spec": "0.7x,7ms", "batch_size": 1, "seq_len": 16}
    assert Report(plan).holds()["latency"] is False
    plan.target = {"name": "cpu", "kind": "cpu"}  # a named target: no timed multiple
    assert Report(plan).measured_multiple("latency") is None
