"""Per-layer latency measured inside the model (profilers.latency_table). No assertion here
compares speeds (timings are noisy); they check what is timed and that the model survives."""

from __future__ import annotations

import time

import torch

from methods.base import LayerShape
from methods.keep import KeepOption
from methods.rtn import QuantOption
from methods.smoothquant import W8A8Option
from profilers.execution.observe import collect_observers
from profilers.latency_table import measure_in_model
from tests.profilers.profiler_helpers import Batch, make_batch, make_bert

OPTIONS = [KeepOption(), QuantOption(8, None, True), QuantOption(4, 32, False), W8A8Option(0.6)]


def _layers(model: torch.nn.Module) -> dict[str, list]:
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return {name: list(OPTIONS) for name in names}


def test_every_shape_and_option_is_timed_and_the_model_restored(batches: list[Batch]) -> None:
    model = make_bert()
    layers = _layers(model)
    observers = collect_observers(model, layers, batches)
    before = {name: model.get_submodule(name) for name in layers}
    inputs = make_batch(1, 8)
    with torch.inference_mode():
        expected = model(**inputs).last_hidden_state
    result = measure_in_model(model, layers, inputs, observers=observers, rounds=2)
    shapes = {LayerShape.of(before[name]) for name in layers}
    assert set(result.layers) == {(s, o.label) for s in shapes for o in OPTIONS}
    assert all(seconds > 0 for seconds in result.layers.values())
    assert 0 <= result.rest <= result.whole
    assert all(model.get_submodule(name) is module for name, module in before.items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.inference_mode():
        assert torch.equal(model(**inputs).last_hidden_state, expected)


def test_options_a_layer_cannot_take_are_left_out(batches: list[Batch]) -> None:
    model = make_bert()  # hidden width 32: no group of 128 divides it
    name = "encoder.layer.0.attention.self.query"
    layers = {name: [KeepOption(), QuantOption(4, 128, False)]}
    result = measure_in_model(model, layers, make_batch(1, 4), rounds=1)
    shape = LayerShape.of(model.get_submodule(name))
    assert set(result.layers) == {(shape, "keep")}


class _SlowHead(torch.nn.Module):
    """Stands for a tied output layer that reads the embedding's table: takes 50 ms."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return x


class _EmbedThenHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(300, 64)
        self.head = _SlowHead()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids))


def test_modules_timed_with_a_layer_count_as_that_layer() -> None:
    model = _EmbedThenHead()
    layers = {"embed": [KeepOption(), QuantOption(8, None, True)]}
    inputs = {"input_ids": torch.arange(8)[None]}
    apart = measure_in_model(model, layers, inputs, rounds=1)
    assert apart.rest >= 0.05 and all(s < 0.05 for s in apart.layers.values())
    together = measure_in_model(model, layers, inputs, rounds=1, also_timed={"embed": [model.head]})
    assert len(together.layers) == 2 and all(s >= 0.05 for s in together.layers.values())
    assert together.rest < 0.05
    assert not model.head._forward_hooks and not model.head._forward_pre_hooks
