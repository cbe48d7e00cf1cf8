"""Stage by stage passes over a streamed model: profiles, variants, side-by-side models."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

from autotune.apply import compress
from autotune.costs import layer_options
from autotune.layers import compressible_layers
from methods.base import LayerShape
from methods.gptq import GPTQOption
from methods.registry import method_of
from methods.rtn import QuantOption
from profilers.execution.checkpoint import Checkpoint, parameters_on_meta
from profilers.execution.stages import Variant, compare, evaluate, profile, stage_of
from profilers.execution.streaming import StreamedModel

VOCAB = 128


@pytest.fixture(scope="module")
def model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def folder(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path, max_shard_size="60KB")
    return path


def open_streamed(folder: Path) -> StreamedModel:
    config = transformers.AutoConfig.from_pretrained(folder)
    with parameters_on_meta():
        skeleton = transformers.LlamaForCausalLM._from_config(config)
    return StreamedModel(skeleton, Checkpoint(folder))


@pytest.fixture(scope="module")
def data() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=generator)} for _ in range(3)]


class Collect:
    """A judge that keeps every batch's outputs: ``(references, outputs)``."""

    def __init__(self) -> None:
        self.references: list = []
        self.outputs: list = []

    def add(self, index, reference, output) -> None:
        assert index == len(self.outputs)
        self.references.append(reference)
        self.outputs.append(output)

    def result(self):
        return self.references, self.outputs


def test_each_layer_belongs_to_the_prefix_a_block_or_the_suffix(folder: Path) -> None:
    streamed = open_streamed(folder)
    stages = stage_of(streamed, [r.name for r in compressible_layers(streamed.model)])
    assert stages["model.embed_tokens"] == -1
    assert stages["model.layers.1.mlp.up_proj"] == 1
    assert stages["lm_head"] == 3


def test_variants_give_the_outputs_of_the_model_compressed_in_memory(
    model, folder: Path, data
) -> None:
    layers = compressible_layers(model)
    rtn = {r.name: QuantOption(4, 32, False) for r in layers}
    gptq = {r.name: GPTQOption(4, 32, False) for r in layers if r.shape.kind == "linear"}
    results = evaluate(
        open_streamed(folder),
        data,
        {"rtn": Variant(rtn), "gptq": Variant(gptq)},
        judge=Collect,
        observe=data,
    )
    expected = {
        "rtn": compress(copy.deepcopy(model), rtn),
        "gptq": compress(copy.deepcopy(model), gptq, calibration=data),
    }
    with torch.inference_mode():
        for key, compressed in expected.items():
            reference, outputs = results[key]
            for batch, ref, out in zip(data, reference, outputs, strict=True):
                assert torch.equal(ref["logits"], model(**batch).logits)
                assert torch.equal(out["logits"], compressed(**batch).logits)


def test_a_sink_receives_the_compressed_state_of_every_stage(model, folder: Path, data) -> None:
    options = {r.name: QuantOption(8, None, True) for r in compressible_layers(model)}
    states: dict[str, dict[str, torch.Tensor]] = {}
    evaluate(
        open_streamed(folder),
        data[:1],
        {"plan": Variant(options, sink=lambda stage, state: states.setdefault(stage, state))},
        judge=Collect,
    )
    assert list(states) == ["model.layers.0", "model.layers.1", "model.layers.2", "outer"]
    merged = {k: v for state in states.values() for k, v in state.items()}
    assert merged.keys() == compress(copy.deepcopy(model), options).state_dict().keys()
    assert merged["model.layers.1.self_attn.q_proj.codes"].dtype == torch.int8


def test_block_layers_are_scored_on_their_block_output(model, folder: Path, data) -> None:
    streamed = open_streamed(folder)
    layers = compressible_layers(streamed.model)
    options = layer_options(layers, ["rtn"], ["int8-ch-sym", "int3-g32-asym"])
    table = profile(streamed, options, data[:1])
    assert table.metric == "nmse" and set(table.errors) == set(options)
    assert all(errors["keep"] == 0.0 for errors in table.errors.values())
    assert all(
        errors["int3-g32-asym"] > errors["int8-ch-sym"] > 0 for errors in table.errors.values()
    )
    # by hand: the normalised squared error of block 1's output with only gate_proj at int3
    name, option = "model.layers.1.mlp.gate_proj", QuantOption(3, 32, False)
    seen = []
    handle = model.model.layers[1].register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.inference_mode():
            model(**data[0])
            compressed = compress(copy.deepcopy(model), {name: option})
            handle.remove()
            handle = compressed.model.layers[1].register_forward_hook(
                lambda m, a, out: seen.append(out)
            )
            compressed(**data[0])
    finally:
        handle.remove()
    expected = float((seen[1] - seen[0]).pow(2).sum() / seen[0].pow(2).sum())
    assert table.errors[name][option.label] == pytest.approx(expected, rel=1e-4)


def test_two_streamed_models_run_side_by_side(model, folder: Path, data, tmp_path: Path) -> None:
    options = {r.name: QuantOption(4, 64, True) for r in compressible_layers(model)}
    compressed = compress(copy.deepcopy(model), options)
    safetensors.torch.save_model(compressed, str(tmp_path / "model.safetensors"))
    # the compressed model as a skeleton of meta modules, its stored tensors read from disk
    config = transformers.AutoConfig.from_pretrained(folder)
    with parameters_on_meta():
        skeleton = transformers.LlamaForCausalLM._from_config(config)
    for name, option in options.items():
        module = skeleton.get_submodule(name)
        skeleton.set_submodule(
            name, method_of(option).empty(LayerShape.of(module), option, like=module)
        )
    other = StreamedModel(skeleton, Checkpoint(tmp_path))
    reference, outputs = compare(open_streamed(folder), other, data, Collect)
    with torch.inference_mode():
        for batch, ref, out in zip(data, reference, outputs, strict=True):
            assert torch.equal(ref["logits"], model(**batch).logits)
            assert torch.equal(out["logits"], compressed(**batch).logits)
