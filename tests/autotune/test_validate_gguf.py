"""``validate --compressed model.gguf``: the file's own size, types and llama.cpp's error are
checked against the plan; a file from another plan is refused; each check can fail."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from autotune.errors import PlanError
from autotune.export import export_plan
from autotune.plan import Plan
from autotune.validate import validate_plan
from autotune.validate_gguf import is_gguf, layer_types
from tests.autotune.export.test_gguf import make_model, tune_for_llama_cpp


@pytest.fixture(scope="module")
def tuned(bpe_tokenizer, tmp_path_factory) -> tuple[Plan, Path]:
    """A plan tuned for llama.cpp and its GGUF file."""
    result = tune_for_llama_cpp(2_400_000, bpe_tokenizer)
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    export_plan(result.plan, make_model(), "gguf", path, tokenizer=bpe_tokenizer)
    return result.plan, path


def check(result, name: str):
    return next(c for c in result.checks if c.name.startswith(name))


def test_the_file_passes_its_own_plans_checks(tuned, bpe_tokenizer) -> None:
    plan, path = tuned
    assert is_gguf(path) and not is_gguf(path.parent)
    result = validate_plan(plan, make_model(), tokenizer=bpe_tokenizer, compressed=path)
    assert result.ok, str(result)
    names = {c.name.split(" (")[0] for c in result.checks}
    assert {"memory", "predicted bytes", "tensor types"} <= names
    assert result.measured["bytes"] == path.stat().st_size == plan.measured["bytes"]
    if plan.measured["in_runtime"].get("heldout_error") is not None:
        assert result.measured["measured_in"] == "llama.cpp"
        assert check(result, "held-out error").holds


def test_each_check_reads_the_file_and_can_fail(tuned, bpe_tokenizer) -> None:
    plan, path = tuned
    wrong = copy.deepcopy(plan)
    wrong.predicted["bytes"] = plan.predicted["bytes"] // 2  # the file is larger
    wrong.measured["in_runtime"]["heldout_error"] = 1e-9 * (
        plan.measured["in_runtime"].get("heldout_error") or 1.0
    )
    result = validate_plan(wrong, make_model(), tokenizer=bpe_tokenizer, compressed=path)
    assert not check(result, "predicted bytes").holds
    if plan.measured["in_runtime"].get("heldout_error") is not None:
        assert not check(result, "held-out error").holds


def test_a_layer_stored_in_another_type_is_found(tuned) -> None:
    import gguf

    plan, path = tuned
    other = copy.deepcopy(plan)
    other.layers["model.layers.0.self_attn.q_proj"] = {"method": "gguf", "type": "F16"}
    (found,) = layer_types(gguf.GGUFReader(path), make_model(), other, strict=False)
    assert not found.holds and "(plan: F16)" in found.measured


def test_a_file_from_another_plan_is_refused(tuned, bpe_tokenizer, tmp_path: Path) -> None:
    plan, _ = tuned
    other = Plan(layers={"_default": {"method": "gguf", "type": "Q8_0"}})
    path = tmp_path / "other.gguf"
    export_plan(other, make_model(), "gguf", path, tokenizer=bpe_tokenizer)
    with pytest.raises(PlanError, match="not written from this plan"):
        validate_plan(plan, make_model(), tokenizer=bpe_tokenizer, compressed=path)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_tied_models_file_is_checked_on_its_one_table(
    family: str, bpe_tokenizer, tmp_path
) -> None:
    """A tied embedding is one layer, as the tune and the export see it (the model as
    loaded still has the output layer reading it)."""
    import gguf

    from tests.autotune.export.test_gguf import plan_for

    model = make_model(family, tied=True)
    plan = plan_for(family, "legacy types")
    path = tmp_path / "m.gguf"
    export_plan(plan, model, "gguf", path, tokenizer=bpe_tokenizer)
    (found,) = layer_types(gguf.GGUFReader(path), model, plan, strict=True)
    assert found.holds, found.measured
