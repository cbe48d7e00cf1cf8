"""Stored bytes and measured latency of a model (profilers.measure)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from profiler_helpers import Batch, make_batch
from torch import nn

from methods.base import LayerShape
from methods.quantized import QuantizedEmbedding, QuantizedLinear
from methods.registry import get_method
from methods.rtn import QuantOption
from profilers.measure import (
    LatencyStats,
    measure_latency,
    model_bytes,
    state_dict_bytes,
    weight_storage_bytes,
)

Counter = Callable[[nn.Module], list[int]]
FLOAT = 4  # bytes of a float32

VOCAB, WIDTH = 50, 8


class TinyLM(nn.Module):
    """Embedding -> linear head, optionally tied, with a persistent and a transient buffer."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(3))
        self.register_buffer("scratch", torch.zeros(5), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids) * self.scale[0])


def tensor_bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def float_weights(model: nn.Module, skip: str = "") -> int:
    """Bytes of the weights of all nn.Linear / nn.Embedding modules but ``skip``."""
    return sum(
        tensor_bytes(module.weight)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Embedding)) and name != skip
    )


# --- model_bytes / state_dict_bytes --------------------------------------------------------


def test_model_bytes_counts_a_tied_weight_once() -> None:
    table = VOCAB * WIDTH * FLOAT
    buffers = (3 + 5) * FLOAT
    assert model_bytes(TinyLM(tied=False)) == 2 * table + buffers
    assert model_bytes(TinyLM(tied=True)) == table + buffers


def test_model_bytes_of_gpt2_counts_its_tied_embedding_once(gpt2: nn.Module) -> None:
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    every = sum(tensor_bytes(p) for _, p in gpt2.named_parameters(remove_duplicate=False))
    buffers = sum(tensor_bytes(b) for b in gpt2.buffers())
    assert model_bytes(gpt2) == every - tensor_bytes(gpt2.lm_head.weight) + buffers


def test_meta_tensors_are_told_apart_and_a_tied_one_counted_once() -> None:
    """Every meta tensor has data pointer 0: they are keyed by the tensor object instead."""
    with torch.device("meta"):
        tied, untied = TinyLM(tied=True), TinyLM(tied=False)
    table = VOCAB * WIDTH * FLOAT
    assert model_bytes(tied) == table + (3 + 5) * FLOAT
    assert model_bytes(untied) == 2 * table + (3 + 5) * FLOAT
    assert weight_storage_bytes(tied) == table
    assert weight_storage_bytes(untied) == 2 * table


def test_model_bytes_counts_every_dtype_at_its_size() -> None:
    model = nn.Sequential(nn.Linear(16, 8).to(torch.bfloat16), nn.Linear(8, 4).double())
    expected = (16 * 8 + 8) * 2 + (8 * 4 + 4) * 8
    assert model_bytes(model) == expected


def test_model_bytes_counts_parameters_that_are_slices_of_one_storage() -> None:
    flat = torch.randn(2 * 32)
    model = nn.Module()
    model.first = nn.Parameter(flat[:32].view(4, 8))
    model.second = nn.Parameter(flat[32:].view(4, 8))
    assert model_bytes(model) == 2 * 32 * FLOAT


def test_state_dict_bytes_counts_tied_weights_once_and_skips_transient_buffers() -> None:
    table = VOCAB * WIDTH * FLOAT
    tied, untied = TinyLM(tied=True), TinyLM(tied=False)
    assert set(tied.state_dict()) == {"embed.weight", "head.weight", "scale"}
    assert state_dict_bytes(tied) == table + 3 * FLOAT
    assert state_dict_bytes(untied) == 2 * table + 3 * FLOAT
    assert model_bytes(tied) - state_dict_bytes(tied) == 5 * FLOAT


def test_state_dict_bytes_of_bert_leaves_out_its_non_persistent_buffers(bert: nn.Module) -> None:
    transient = sum(
        tensor_bytes(getattr(module, name))
        for module in bert.modules()
        for name in module._non_persistent_buffers_set
    )
    assert transient > 0
    assert state_dict_bytes(bert) == model_bytes(bert) - transient


def test_state_dict_bytes_of_a_quantised_layer_are_its_buffers(bert: nn.Module) -> None:
    layer = "encoder.layer.0.intermediate.dense"
    original = bert.get_submodule(layer)
    before = state_dict_bytes(bert)
    quantised = get_method("rtn").convert(original, QuantOption(4, 32, False))
    bert.set_submodule(layer, quantised)
    buffers = sum(tensor_bytes(b) for b in quantised.buffers())
    params = sum(tensor_bytes(p) for p in original.parameters())
    assert state_dict_bytes(bert) == before - params + buffers


# --- weight_storage_bytes ------------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [
        QuantOption(8, None, True),
        QuantOption(8, None, False),
        QuantOption(4, 32, False),
        QuantOption(3, None, True),
        QuantOption(2, 32, False),
    ],
    ids=lambda option: option.label,
)
def test_weight_storage_bytes_with_one_quantised_linear(
    bert: nn.Module, option: QuantOption
) -> None:
    layer = "encoder.layer.1.output.dense"
    original = bert.get_submodule(layer)
    others = float_weights(bert, skip=layer)
    assert weight_storage_bytes(bert) == others + tensor_bytes(original.weight)

    quantised = get_method("rtn").convert(original, option)
    assert isinstance(quantised, QuantizedLinear)
    bert.set_submodule(layer, quantised)
    stored = (
        tensor_bytes(quantised.codes)
        + tensor_bytes(quantised.scales)
        + tensor_bytes(quantised.offsets)
    )
    assert (quantised.offsets is None) == option.symmetric
    assert weight_storage_bytes(bert) == others + stored
    # what the method promised is what is stored; the bias is not weight storage
    assert stored == get_method("rtn").cost(LayerShape.of(original), option).weight_bytes


def test_weight_storage_bytes_with_a_quantised_embedding(bert: nn.Module) -> None:
    layer = "embeddings.word_embeddings"
    original = bert.get_submodule(layer)
    quantised = get_method("rtn").convert(original, QuantOption(4, None, True))
    assert isinstance(quantised, QuantizedEmbedding)
    bert.set_submodule(layer, quantised)
    stored = tensor_bytes(quantised.codes) + tensor_bytes(quantised.scales)
    assert weight_storage_bytes(bert) == float_weights(bert, skip=layer) + stored


def test_weight_storage_bytes_counts_a_tied_weight_once() -> None:
    assert weight_storage_bytes(TinyLM(tied=True)) == VOCAB * WIDTH * FLOAT
    assert weight_storage_bytes(TinyLM(tied=False)) == 2 * VOCAB * WIDTH * FLOAT


def test_weight_storage_bytes_leaves_out_biases_norms_and_buffers(bert: nn.Module) -> None:
    assert weight_storage_bytes(bert) == float_weights(bert)
    assert weight_storage_bytes(bert) < model_bytes(bert)


# --- measure_latency -----------------------------------------------------------------------


@pytest.fixture
def tiny_inputs() -> Batch:
    return make_batch(2, 8)


@pytest.mark.parametrize(("warmup", "repeats"), [(0, 1), (1, 2), (2, 7)])
def test_measure_latency_runs_warmup_plus_repeats(
    bert: nn.Module, tiny_inputs: Batch, call_counter: Counter, warmup: int, repeats: int
) -> None:
    calls = call_counter(bert)
    stats = measure_latency(bert, tiny_inputs, warmup=warmup, repeats=repeats)
    assert isinstance(stats, LatencyStats)
    assert stats.repeats == repeats
    assert calls == [warmup + repeats]
    assert 0 < stats.p50_ms <= stats.p90_ms
    assert stats.mean_ms > 0


def test_measure_latency_stops_at_the_deadline_after_three_runs(
    bert: nn.Module, tiny_inputs: Batch
) -> None:
    stats = measure_latency(bert, tiny_inputs, warmup=0, repeats=50, max_seconds=0.0)
    assert stats.repeats == 3


def test_latency_stats_to_dict() -> None:
    stats = LatencyStats(1.0, 2.0, 1.5, 4)
    assert stats.to_dict() == {"p50_ms": 1.0, "p90_ms": 2.0, "mean_ms": 1.5, "repeats": 4}


def test_interleaved_latencies_time_every_model_alike() -> None:
    from profilers.measure import measure_latencies

    calls: dict[str, int] = {"a": 0, "b": 0}

    class Counting(torch.nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls[self.name] += 1
            return x * 2

    stats = measure_latencies(
        {"a": Counting("a"), "b": Counting("b")}, {"x": torch.ones(3)}, warmup=2, rounds=10
    )
    assert calls == {"a": 12, "b": 12}
    assert {name: s.repeats for name, s in stats.items()} == {"a": 10, "b": 10}
    assert all(s.p50_ms <= s.p90_ms for s in stats.values())
