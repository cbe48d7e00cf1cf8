"""A named target's latency is recomputed from the plan's layers, never read back from it
(autotune.repriced, autotune.validate, autotune.report)."""

from __future__ import annotations

import copy

import pytest

from autotune.budget import Budget
from autotune.measured_figures import Measured
from autotune.plan import Plan
from autotune.report import Report
from autotune.repriced import LABEL, plan_roofline, profile_roofline
from autotune.tuner import autotune
from autotune.validate import plan_checks, validate_plan
from profilers.kernel_support import KERNELS
from tests.autotune.test_causal_lm import tiny_llama, token_batches

TARGET = "a100-80gb"
SEQ = 32


@pytest.fixture(scope="module")
def tuned() -> Plan:
    """A plan the tuner made for a named target; its prediction is the reference figure."""
    result = autotune(
        tiny_llama(),
        "60%",
        TARGET,
        search="allocator",
        latency_seq_len=SEQ,
        calibration=token_batches(),
        progress=False,
    )
    return result.plan


def edited(plan: Plan, budget: str, **predicted: float) -> Plan:
    """``plan`` with another budget and hand-edited predicted figures."""
    out = copy.deepcopy(plan)
    out.budget = Budget.parse(budget, seq_len=SEQ).to_dict()
    out.predicted.update(predicted)
    return out


def latency_check(plan: Plan, phase: str):
    result = validate_plan(
        plan,
        tiny_llama(),
        heldout=token_batches()[-1:],
        measure_latency=False,
        calibration=token_batches(),
    )
    return result, next(c for c in result.checks if c.name == f"{phase} p50")


def test_recomputed_latency_is_the_tuners_prediction(tuned: Plan) -> None:
    ids = token_batches()[0]["input_ids"][:1, :SEQ]
    priced = plan_roofline(tuned, tiny_llama(), {"input_ids": ids}, ids)
    assert priced.latency_ms == pytest.approx(tuned.predicted["latency_ms"], rel=1e-5)
    assert priced.decode_ms == pytest.approx(tuned.predicted["decode_ms"], rel=1e-5)
    from_plan = profile_roofline(tuned)
    assert from_plan is not None
    assert from_plan.latency_ms == pytest.approx(tuned.predicted["latency_ms"], rel=1e-5)
    assert from_plan.decode_ms == pytest.approx(tuned.predicted["decode_ms"], rel=1e-5)


@pytest.mark.parametrize("phase", ["latency", "decode"])
def test_an_edited_prediction_under_the_budget_does_not_pass(tuned: Plan, phase: str) -> None:
    real = tuned.predicted[f"{phase}_ms"]
    term = f"{0.8 * real:.6g}ms" if phase == "latency" else f"decode={0.8 * real:.6g}ms"
    plan = edited(tuned, f"60%,{term}", **{f"{phase}_ms": 0.5 * real})
    result, check = latency_check(plan, phase)
    assert not check.holds and not result.ok
    assert LABEL in check.measured and f"{real:.4g} ms" in check.measured
    assert "not a measurement" in check.note
    assert Report(plan).holds()[phase] is False


@pytest.mark.parametrize("phase", ["latency", "decode"])
def test_an_edited_prediction_over_the_budget_does_not_fail(tuned: Plan, phase: str) -> None:
    real = tuned.predicted[f"{phase}_ms"]
    term = f"{1.25 * real:.6g}ms" if phase == "latency" else f"decode={1.25 * real:.6g}ms"
    plan = edited(tuned, f"60%,{term}", **{f"{phase}_ms": 2 * real})
    result, check = latency_check(plan, phase)
    assert check.holds and result.ok
    assert Report(plan).holds()[phase] is True


def test_the_report_labels_the_roofline_and_the_kernels_it_did_not_price(tuned: Plan) -> None:
    plan = edited(tuned, "60%", latency_ms=1e-9)
    text = str(Report(plan))
    real = tuned.predicted["latency_ms"]
    assert f"{real:.4g} ms [{LABEL}]" in text
    assert f"{1e-9:.4g} ms" not in text
    for kernel in plan.target["kernels"]:
        note = (
            f"{kernel} listed by {TARGET} but not run by autotune's modules on cuda: "
            "priced as dequantize"
        )
        assert (note in text) == (kernel in KERNELS)  # llama.cpp's kernel is not theirs
    assert "gguf_block" in plan.target["kernels"] and "gguf_block" not in text


def test_a_kernel_the_modules_run_is_priced_without_a_note(tuned: Plan) -> None:
    plan = copy.deepcopy(tuned)
    plan.target = {**plan.target, "kind": "cpu"}  # the same kernel table on a CPU
    assert "not run by autotune's modules" not in str(Report(plan))


@pytest.mark.parametrize(("share", "holds"), [(0.8, False), (1.25, True)])
def test_checks_without_the_model_reprice_the_plans_layers(
    tuned: Plan, share: float, holds: bool
) -> None:
    """As a block-by-block validation checks (no model in memory to price)."""
    real = tuned.predicted["latency_ms"]
    plan = edited(tuned, f"{share * real:.6g}ms", latency_ms=real / share**2)
    now = Measured(bytes=1, state_bytes=1, avg_bits=16.0, latency=None, heldout_error=None)
    check = next(c for c in plan_checks(plan, now, 0.1) if c.name == "latency p50")
    assert check.holds is holds
    assert f"{real:.4g} ms {LABEL}" == check.measured


def test_a_plan_without_a_profile_is_not_priced_from_its_recorded_figure(tuned: Plan) -> None:
    real = tuned.predicted["latency_ms"]
    plan = edited(tuned, f"60%,{0.8 * real:.6g}ms", latency_ms=0.5 * real)
    plan.profile = {}
    report = Report(plan)
    assert "latency" not in report.holds()
    assert "not recomputed" in str(report)
    _, check = latency_check(plan, "latency")  # with the model, validate still recomputes
    assert not check.holds


@pytest.mark.parametrize(("share", "holds"), [(0.9, False), (1.1, True)])
def test_a_relative_budget_recomputes_the_originals_latency_too(
    tuned: Plan, share: float, holds: bool
) -> None:
    """The plan's recorded original latency is edited the other way: it is not read back."""
    real, original = tuned.predicted["latency_ms"], tuned.predicted["original_latency_ms"]
    ratio = share * real / original
    lying = original * (10 if not holds else 0.1)
    plan = edited(tuned, f"60%,{ratio:.6g}x", original_latency_ms=lying)
    _, check = latency_check(plan, "latency")
    assert check.holds is holds
    assert f"{ratio:.6g}x the original's {original:.4g} ms, recomputed alike" in check.expected
    # without the model the layers are repriced onto the recorded original, as they are
    now = Measured(bytes=1, state_bytes=1, avg_bits=16.0, latency=None, heldout_error=None)
    honest = edited(tuned, f"60%,{ratio:.6g}x")
    offline = next(c for c in plan_checks(honest, now, 0.1) if c.name == "latency p50")
    assert offline.holds is holds
