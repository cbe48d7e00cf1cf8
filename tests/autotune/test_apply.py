from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autotune.apply import apply_plan
from autotune.layers import compressible_layers
from autotune.plan import Plan
from methods import OptionError, QuantizedEmbedding, QuantizedLinear, get_method
from profilers.measure import model_bytes
from tests.conftest import make_tiny_bert

PLAN = Plan(
    layers={
        "_default": {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True},
        r"re:encoder\.layer\.1\..*": {
            "method": "rtn",
            "bits": 4,
            "group_size": 32,
            "symmetric": False,
        },
        "embeddings.word_embeddings": {
            "method": "rtn",
            "bits": 3,
            "group_size": 32,
            "symmetric": False,
        },
        "embeddings.token_type_embeddings": {"method": "none"},
    }
)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_apply_builds_real_storage_and_leaves_the_original_alone() -> None:
    model = make_tiny_bert()
    before = _state(model)
    compressed = apply_plan(model, PLAN)
    assert compressed is not model
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.pooler.dense, torch.nn.Linear)
    assert isinstance(compressed.pooler.dense, QuantizedLinear)
    assert compressed.encoder.layer[1].output.dense.bits == 4
    assert compressed.encoder.layer[0].output.dense.bits == 8
    word = compressed.embeddings.word_embeddings
    assert isinstance(word, QuantizedEmbedding) and word.bits == 3
    assert isinstance(compressed.embeddings.token_type_embeddings, torch.nn.Embedding)


def test_bytes_equal_the_sum_of_option_costs() -> None:
    model = make_tiny_bert()
    compressed = apply_plan(model, PLAN)
    resolved = PLAN.layer_options(model)
    expected = model_bytes(model)
    for ref, option in resolved.items():
        keep = get_method("none").cost(ref.shape, option)
        expected += get_method(option.method).cost(ref.shape, option).bytes - keep.bytes
    assert model_bytes(compressed) == expected


def test_inplace_changes_the_given_model() -> None:
    model = make_tiny_bert()
    result = apply_plan(model, PLAN, inplace=True)
    assert result is model
    assert isinstance(model.pooler.dense, QuantizedLinear)


def test_outputs_stay_close_to_the_original() -> None:
    model = make_tiny_bert()
    compressed = apply_plan(model, Plan(layers={"_default": PLAN.layers["_default"]}))
    ids = torch.randint(1000, 2000, (2, 12))
    with torch.inference_mode():
        ref = model(input_ids=ids).last_hidden_state
        out = compressed(input_ids=ids).last_hidden_state
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


def test_an_option_the_layer_cannot_take_names_layer_and_allowed_values() -> None:
    bad = Plan(
        layers={"pooler.dense": {"method": "rtn", "bits": 4, "group_size": 48, "symmetric": True}}
    )
    with pytest.raises(OptionError) as info:
        apply_plan(make_tiny_bert(), bad)
    message = str(info.value)
    assert "pooler.dense" in message and "48" in message and "allowed" in message


def test_apply_from_paths(tiny_bert_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    PLAN.save(path)
    compressed = apply_plan(str(tiny_bert_dir), path)
    assert isinstance(compressed.pooler.dense, QuantizedLinear)
    names = {ref.name for ref in compressible_layers(compressed, min_numel=0)}
    assert "embeddings.token_type_embeddings" in names
