"""``autotune profile``: sensitivity and cost tables for people and tools."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from autotune.cli import main
from autotune.profiling import profile_model
from autotune.targets import get_target
from methods.registry import get_method, option_from_dict
from tests.conftest import make_tiny_bert


@pytest.fixture(scope="module")
def profile(tokenizer):
    return profile_model(make_tiny_bert(), get_target("cpu"), tokenizer=tokenizer, seq_len=64)


def test_every_layer_and_option_has_exact_bytes_and_latencies(profile) -> None:
    model = make_tiny_bert()
    assert profile.layers
    for name, layer in profile.layers.items():
        from methods.base import LayerShape

        shape = LayerShape.of(model.get_submodule(name))
        assert layer["shape"] == [shape.rows, shape.cols]
        for label, entry in layer["options"].items():
            option = next(o for o in get_method_options(label))
            assert entry["bytes"] == get_method(option.method).cost(shape, option).bytes
            assert entry["prefill_ms"] > 0 and entry["decode_ms"] > 0
            assert entry["prefill_ms"] >= entry["decode_ms"]  # 64 tokens against 1
        assert layer["options"]["keep"]["error"] == 0.0


def get_method_options(label: str):
    from methods.registry import registered_methods

    for method in registered_methods().values():
        for shape_cols in (64, 128):
            from methods.base import LayerShape

            for option in method.grid(LayerShape("linear", 128, shape_cols)):
                if option.label == label:
                    yield option
    if label == "keep":
        yield option_from_dict({"method": "none"})


def test_summary_names_sensitive_layers_and_cost_ranges(profile) -> None:
    text = profile.summary()
    assert "most sensitive layers" in text and "least sensitive layers" in text
    assert "int4-g32-asym" in text and "cost range per option" in text


def test_cli_writes_json_and_csv(tiny_bert_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "profile.json"
    code = main(
        [
            "profile",
            str(tiny_bert_dir),
            "--target",
            "cpu",
            "--seq-len",
            "32",
            "-o",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    rows = list(csv.DictReader((tmp_path / "profile.csv").open()))
    assert len(rows) == sum(len(layer["options"]) for layer in data["layers"].values())
    assert "wrote" in capsys.readouterr().out


def test_cli_fisher_proxy_and_fitted_target(tiny_bert_dir: Path, tmp_path: Path) -> None:
    fitted = tmp_path / "fitted.json"
    code = main(
        [
            "profile",
            str(tiny_bert_dir),
            "--target",
            "cpu",
            "--seq-len",
            "32",
            "--sensitivity",
            "fisher",
            "--fit-target",
            str(fitted),
            "--quiet",
        ]
    )
    assert code == 0
    spec = get_target("cpu-fitted", [fitted])
    assert spec.kind == "cpu" and "fitted" in spec.sources["efficiency"]


def test_a_causal_lm_is_profiled_at_a_decode_step_and_its_tied_table_once() -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    batches = [{"input_ids": torch.randint(0, 256, (2, 32))} for _ in range(4)]
    result = profile_model(
        model, get_target("cpu"), calibration=batches, seq_len=32, sensitivity="local"
    )
    assert "transformer.wte" in result.layers and "lm_head" not in result.layers
    assert isinstance(model.lm_head, torch.nn.Linear)  # the caller's model is not untied
    # the decode step reads a KV cache of the prefill's 32 tokens: it costs less than the
    # prefill, and more than a step after a 4-token prefill
    short = profile_model(
        model, get_target("cpu"), calibration=batches, seq_len=4, sensitivity="local"
    )
    assert short.fixed["decode_ms"] < result.fixed["decode_ms"] < result.fixed["prefill_ms"]
