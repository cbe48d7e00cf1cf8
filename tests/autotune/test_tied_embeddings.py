"""Tied input/output embeddings: tuned as one layer, compressed once, counted once."""

from __future__ import annotations

import copy
import dataclasses
import json
import struct
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from autotune.apply import apply_plan
from autotune.costs import build_costs, layer_options
from autotune.layers import compressible_layers
from autotune.plan import Plan
from autotune.saved import load_compressed, save_compressed
from autotune.targets import get_target
from autotune.tuner import TuneResult, autotune
from autotune.validate import validate_plan
from methods.base import LayerShape
from methods.rtn import QuantOption
from methods.tied import TiedHead, untie_output_embeddings
from profilers.latency_table import InModelLatency
from profilers.measure import model_bytes
from profilers.roofline import layer_latency

VOCAB = 512
CASES = {
    "gpt2": ("transformer.wte", "lm_head"),
    "llama": ("model.embed_tokens", "lm_head"),
}


def build(kind: str) -> nn.Module:
    """A tiny tied causal LM built from a config (no ``architectures``: saving records the
    class)."""
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2,
            n_embd=64,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=128,
            bos_token_id=0,
        )
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


def token_batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, VOCAB, (4, 32), generator=generator)} for _ in range(4)]


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module", params=list(CASES))
def tuned(request) -> tuple[str, nn.Module, torch.Tensor, TuneResult]:
    """A tied model, its logits before tuning, and the result of tuning it to 30%."""
    kind = request.param
    model = build(kind)
    before = logits(model)
    result = autotune(  # RTN alone: the plan re-applies without the calibration batches
        model,
        "30%",
        "cpu",
        calibration=token_batches(),
        progress=False,
        search="allocator",
        methods=["rtn"],
    )
    return kind, model, before, result


def test_the_users_model_stays_tied_and_unchanged(tuned) -> None:
    kind, model, before, _ = tuned
    embedding, head = CASES[kind]
    assert type(model.get_submodule(head)) is nn.Linear
    assert model.get_submodule(head).weight is model.get_submodule(embedding).weight
    assert torch.equal(logits(model), before)


def test_the_table_is_one_compressed_layer_counted_once(tuned) -> None:
    kind, model, _, result = tuned
    embedding, head = CASES[kind]
    plan = result.plan
    assert plan.model["tied"] == {head: embedding}
    assert plan.layers[embedding]["method"] != "none"
    assert head not in plan.layers
    compressed_head = result.model.get_submodule(head)
    assert isinstance(compressed_head, TiedHead)
    assert compressed_head.table is result.model.get_submodule(embedding)
    assert not isinstance(compressed_head.table, nn.Embedding)
    assert model_bytes(result.model) == plan.predicted["bytes"] == plan.measured["bytes"]
    assert plan.predicted["bytes"] <= 0.3 * model_bytes(model)
    assert Plan.from_dict(json.loads(plan.to_json())).model["tied"] == {head: embedding}


def test_the_embedding_is_charged_for_the_head_it_serves() -> None:
    """The table's options are priced as a lookup plus a linear layer of its shape that runs
    the int8 kernel for int8 per-row codes and dequantises otherwise (no int4 kernel)."""
    spec = get_target("cpu")
    tied = build("gpt2")
    untied = copy.deepcopy(tied)
    untie_output_embeddings(untied)
    inputs = {"input_ids": IDS[:1, :8]}  # 8 tokens: within the kernels' token limit
    layers = compressible_layers(untied)
    options = layer_options(layers, ["rtn"])
    costs = build_costs(untied, layers, options, spec, inputs)
    table = LayerShape.of(untied.transformer.wte)
    head = LayerShape("linear", table.rows, table.cols, False, table.dtype)
    formats = {"keep": "dense", "int8-ch-sym": "int8_weight_only"}
    pairs = zip(options["transformer.wte"], costs.seconds["transformer.wte"], strict=True)
    for option, seconds in pairs:
        fmt = formats.get(option.label, "dequantize")
        lookup = layer_latency(table, option, spec, 8)
        assert seconds == pytest.approx(lookup + layer_latency(head, option, spec, 8, fmt=fmt))
    int4 = QuantOption(4, None, True)
    dequantised = costs.seconds["transformer.wte"][options["transformer.wte"].index(int4)]
    assert dequantised > layer_latency(table, int4, spec, 8) + layer_latency(head, int4, spec, 8)
    # left out of the search, the pair is charged as kept, beside the same rest of the model
    rest = [ref for ref in layers if ref.name != "transformer.wte"]
    rest_options = {ref.name: options[ref.name] for ref in rest}
    before = build_costs(tied, rest, rest_options, spec, inputs).fixed_seconds
    after = build_costs(untied, rest, rest_options, spec, inputs).fixed_seconds
    assert after - before == pytest.approx(costs.seconds["transformer.wte"][0])


def test_measured_costs_time_the_head_with_its_embedding(monkeypatch: pytest.MonkeyPatch) -> None:
    timed_with: dict[str, list[nn.Module]] = {}

    def measure(model, layers, inputs, *, also_timed=None, **_) -> InModelLatency:
        timed_with.update(also_timed or {})
        shapes = {name: LayerShape.of(model.get_submodule(name)) for name in layers}
        seconds = {(shapes[n], o.label): 1.0 for n, opts in layers.items() for o in opts}
        return InModelLatency(seconds, 1.0, 0.0)

    monkeypatch.setattr("autotune.latency_models.measure_in_model", measure)
    model = build("gpt2")
    untie_output_embeddings(model)
    layers = compressible_layers(model)
    local = dataclasses.replace(get_target("cpu"), name="local")
    build_costs(model, layers, layer_options(layers, ["rtn"]), local, {"input_ids": IDS})
    assert timed_with == {"transformer.wte": [model.lm_head]}


def test_applying_the_plan_gives_the_tuned_model(tuned) -> None:
    kind, model, before, result = tuned
    _, head = CASES[kind]
    applied = apply_plan(model, result.plan)
    assert isinstance(applied.get_submodule(head), TiedHead)
    assert torch.equal(logits(applied), logits(result.model))
    assert not torch.equal(logits(applied), before)
    assert torch.equal(logits(model), before)
    checked = validate_plan(result.plan, model, heldout=token_batches(), measure_latency=False)
    assert checked.ok, str(checked)
    assert torch.equal(logits(model), before)


def test_saved_and_loaded_the_table_is_held_once(tuned, tmp_path: Path) -> None:
    kind, _, _, result = tuned
    embedding, head = CASES[kind]
    expected = logits(result.model)
    folder = save_compressed(result.model, result.plan, tmp_path / "saved")
    raw = (folder / "model.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    names = set(json.loads(raw[8 : 8 + size])) - {"__metadata__"}
    assert not any(name.startswith(f"{head}.") for name in names)
    assert {n for n in names if n.startswith(f"{embedding}.")} >= {f"{embedding}.codes"}
    reloaded = load_compressed(folder)
    assert isinstance(reloaded.get_submodule(head), TiedHead)
    assert torch.equal(logits(reloaded), expected)
    assert model_bytes(reloaded) == result.plan.predicted["bytes"]
