"""The shipped examples stay valid."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from autotune.plan import Plan
from autotune.targets import get_target

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_hand_written_plan_resolves_against_the_demo_model(demo_dir: Path) -> None:
    import transformers

    from autotune.apply import check_options

    model = transformers.AutoModel.from_pretrained(demo_dir, local_files_only=True)
    plan = Plan.load(EXAMPLES / "hand_written_plan.json", model=model)
    options = {ref.name: opt for ref, opt in plan.layer_options(model).items()}
    check_options(model, options)
    assert options["encoder.layer.1.attention.self.key"].label == "int4-g64-asym"
    assert options["encoder.layer.4.attention.self.key"].label == "int8-ch-sym"
    assert options["pooler.dense"].label == "keep"


def test_example_target_file_loads() -> None:
    spec = get_target("my-laptop", [EXAMPLES / "my_targets.json"])
    assert spec.kind == "cpu" and spec.bandwidth > 0


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_example_scripts_parse(path: Path) -> None:
    ast.parse(path.read_text())
