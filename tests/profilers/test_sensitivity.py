"""Per-(layer, option) output error with prefix replay (profilers.sensitivity)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from profiler_helpers import Batch
from torch import nn

from methods.base import Option
from methods.errors import OptionError
from methods.keep import KeepOption
from methods.registry import method_of
from methods.rtn import QuantOption
from profilers.quality import metric_for, output_error, run_outputs
from profilers.sensitivity import SensitivityTable, measure_sensitivity

Counter = Callable[[nn.Module], list[int]]

KEEP = KeepOption()
INT8 = QuantOption(8, None, True)
INT2 = QuantOption(2, 32, False)
OPTIONS = [KEEP, INT8, INT2]

BERT_LAYERS = [
    "embeddings.word_embeddings",  # before the block stack
    "encoder.layer.0.attention.self.query",  # in the first block
    "encoder.layer.1.intermediate.dense",  # in the last block
    "encoder.layer.1.output.dense",
    "pooler.dense",  # after the stack
]


def options_for(layers: list[str], options: list[Option] = OPTIONS) -> dict[str, list[Option]]:
    return {layer: list(options) for layer in layers}


def errors_without_replay(
    model: nn.Module, options: dict[str, list[Option]], batches: list[Batch]
) -> dict[str, dict[str, float]]:
    """The same table computed the slow way: swap the layer, run the whole model."""
    reference = run_outputs(model, batches)
    metric = metric_for(reference[0])
    errors: dict[str, dict[str, float]] = {}
    for layer, layer_options in options.items():
        original = model.get_submodule(layer)
        errors[layer] = {}
        for option in layer_options:
            try:
                compressed = method_of(option).convert(original, option)
            except OptionError:
                continue
            model.set_submodule(layer, compressed)
            try:
                errors[layer][option.label] = output_error(model, batches, reference, metric)
            finally:
                model.set_submodule(layer, original)
    return errors


def assert_tables_match(table: SensitivityTable, expected: dict[str, dict[str, float]]) -> None:
    assert table.errors.keys() == expected.keys()
    for layer, row in expected.items():
        assert table.errors[layer].keys() == row.keys(), layer
        for label, value in row.items():
            got = table.errors[layer][label]
            assert got == pytest.approx(value, rel=1e-6, abs=1e-18), (layer, label)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- tiny BERT (NMSE) ----------------------------------------------------------------------


def test_bert_table_shape_and_metric(bert: nn.Module, batches: list[Batch]) -> None:
    table = measure_sensitivity(bert, options_for(BERT_LAYERS), batches)
    assert table.metric == "nmse"
    assert table.prefix_cached
    assert list(table.errors) == BERT_LAYERS
    assert all(list(row) == ["keep", INT8.label, INT2.label] for row in table.errors.values())
    assert table.evaluations == len(BERT_LAYERS) * (len(OPTIONS) - 1)  # keep runs nothing
    assert table.skipped == {}
    assert table.seconds > 0


def test_keep_costs_exactly_nothing(bert: nn.Module, batches: list[Batch]) -> None:
    table = measure_sensitivity(bert, options_for(BERT_LAYERS), batches)
    assert all(row["keep"] == 0.0 for row in table.errors.values())
    alone = measure_sensitivity(bert, {name: [KEEP] for name in BERT_LAYERS}, batches)
    assert alone.errors == {name: {"keep": 0.0} for name in BERT_LAYERS}
    assert alone.evaluations == 0  # the unchanged model is not run again


def test_two_bits_hurt_more_than_eight_bits_in_every_layer(
    bert: nn.Module, batches: list[Batch]
) -> None:
    table = measure_sensitivity(bert, options_for(BERT_LAYERS), batches)
    for layer, row in table.errors.items():
        assert 0.0 < row[INT8.label] < row[INT2.label], layer


def test_the_model_is_unchanged_afterwards(bert: nn.Module, batches: list[Batch]) -> None:
    before = snapshot(bert)
    modules = {layer: bert.get_submodule(layer) for layer in BERT_LAYERS}
    reference = run_outputs(bert, batches)

    measure_sensitivity(bert, options_for(BERT_LAYERS), batches)

    after = bert.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(bert.get_submodule(layer) is module for layer, module in modules.items())
    for module in bert.modules():
        assert not module._forward_hooks
        assert not module._forward_pre_hooks
        assert "forward" not in vars(module)
    for expected, got in zip(reference, run_outputs(bert, batches), strict=True):
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_prefix_replay_gives_the_errors_of_full_runs(bert: nn.Module, batches: list[Batch]) -> None:
    options = options_for(BERT_LAYERS)
    table = measure_sensitivity(bert, options, batches)
    assert table.prefix_cached
    assert_tables_match(table, errors_without_replay(bert, options, batches))


def test_blocks_before_the_layer_are_replayed_not_run(
    bert: nn.Module, batches: list[Batch], call_counter: Counter
) -> None:
    first = call_counter(bert.encoder.layer[0].attention)
    second = call_counter(bert.encoder.layer[1].attention)
    measure_sensitivity(bert, options_for(["encoder.layer.1.output.dense"]), batches)
    # block 0 runs only while the reference is recorded; block 1 also once per option that
    # changes the layer (keep does not)
    assert first == [len(batches)]
    assert second == [len(batches) * len(OPTIONS)]


def test_progress_is_reported_once_per_option(bert: nn.Module, batches: list[Batch]) -> None:
    steps: list[int] = []
    table = measure_sensitivity(bert, options_for(BERT_LAYERS[:2]), batches, progress=steps.append)
    assert steps == [1] * 2 * len(OPTIONS)
    assert table.evaluations == 2 * (len(OPTIONS) - 1)  # keep's error needs no evaluation


def test_options_a_layer_cannot_take_are_skipped_with_the_reason(
    bert: nn.Module, batches: list[Batch]
) -> None:
    too_wide = QuantOption(4, 64, False)  # groups of 64 on a 32-wide layer
    layer = "encoder.layer.0.attention.self.query"
    table = measure_sensitivity(bert, {layer: [INT8, too_wide]}, batches)
    assert list(table.errors[layer]) == [INT8.label]
    assert list(table.skipped[layer]) == [too_wide.label]
    assert "group size 64" in table.skipped[layer][too_wide.label]
    assert table.evaluations == 1


def test_a_model_without_a_block_stack_is_measured_without_replay() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    batches = [{"input": torch.randn(4, 32)}, {"input": torch.randn(3, 32)}]
    options = options_for(["0", "2"])
    table = measure_sensitivity(model, options, batches)
    assert not table.prefix_cached
    assert table.metric == "nmse"
    assert_tables_match(table, errors_without_replay(model, options, batches))


# --- causal LMs (KL) -----------------------------------------------------------------------


def test_gpt2_is_judged_by_kl(gpt2: nn.Module, batches: list[Batch]) -> None:
    options = options_for(["transformer.wte", "transformer.h.0.attn.c_attn", "lm_head"])
    table = measure_sensitivity(gpt2, options, batches)
    assert table.metric == "kl"
    assert table.prefix_cached
    assert table.errors["lm_head"]["keep"] == 0.0
    assert 0.0 < table.errors["lm_head"][INT8.label] < table.errors["lm_head"][INT2.label]
    # GPT-2's Conv1D layers (weights stored [in, out]) are quantised like linear layers
    conv = table.errors["transformer.h.0.attn.c_attn"]
    assert conv["keep"] == 0.0 and 0.0 < conv[INT8.label] < conv[INT2.label]
    assert "transformer.h.0.attn.c_attn" not in table.skipped
    assert_tables_match(table, errors_without_replay(gpt2, options, batches))


def test_llama_replay_inside_the_stack_matches_full_runs(
    llama: nn.Module, batches: list[Batch]
) -> None:
    layers = ["model.embed_tokens", "model.layers.1.mlp.down_proj", "lm_head"]
    options = options_for(layers)
    table = measure_sensitivity(llama, options, batches)
    assert table.metric == "kl"
    assert table.prefix_cached
    assert_tables_match(table, errors_without_replay(llama, options, batches))


def test_modules_kept_converted_are_measured_and_new_ones_kept(
    bert: nn.Module, batches: list[Batch]
) -> None:
    from profilers.converted import ConvertedModules

    layer = "encoder.layer.1.output.dense"
    original = bert.get_submodule(layer)
    converted = ConvertedModules(cap_bytes=1 << 30)
    # a module kept under INT8's label is what gets measured for INT8, not a new conversion
    converted.put(layer, INT8.label, method_of(INT2).convert(original, INT2), original)
    table = measure_sensitivity(bert, {layer: [INT8, INT2]}, batches, converted=converted)
    assert table.errors[layer][INT8.label] == table.errors[layer][INT2.label]
    fresh = measure_sensitivity(bert, {layer: [INT8]}, batches)
    assert fresh.errors[layer][INT8.label] < table.errors[layer][INT8.label]
    assert converted.get(layer, INT2.label) is not None  # converted here, kept for later
