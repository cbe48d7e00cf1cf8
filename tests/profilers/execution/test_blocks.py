"""Finding a model's block stack and replaying recorded block outputs
(profilers.execution.blocks)."""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable
from typing import Any

import pytest
import torch
from profiler_helpers import Batch
from torch import nn

from profilers.execution.blocks import BlockCache, block_index, find_blocks

Counter = Callable[[nn.Module], list[int]]
Pair = namedtuple("Pair", ["hidden", "aux"])


class Block(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class Stack(nn.Module):
    """embed -> blocks -> head, blocks run in list order."""

    def __init__(self, blocks: int, width: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(blocks))
        self.head = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def names(blocks: list[tuple[str, nn.Module]]) -> list[str]:
    return [name for name, _ in blocks]


def module_order(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules()]


# --- find_blocks ---------------------------------------------------------------------------


def test_find_blocks_of_bert(bert: nn.Module) -> None:
    blocks = find_blocks(bert)
    assert names(blocks) == ["encoder.layer.0", "encoder.layer.1"]
    assert [block for _, block in blocks] == list(bert.encoder.layer)


def test_find_blocks_of_gpt2(gpt2: nn.Module) -> None:
    blocks = find_blocks(gpt2)
    assert names(blocks) == ["transformer.h.0", "transformer.h.1"]
    assert all(block is gpt2.transformer.h[i] for i, (_, block) in enumerate(blocks))


def test_find_blocks_takes_the_longest_list_of_one_module_type() -> None:
    model = nn.Module()
    model.short = nn.ModuleList(Block() for _ in range(2))
    model.mixed = nn.ModuleList([Block(), nn.ReLU(), Block(), nn.ReLU(), Block()])
    model.long = nn.ModuleList(Block() for _ in range(3))
    model.single = nn.ModuleList([Block()])
    assert names(find_blocks(model)) == ["long.0", "long.1", "long.2"]


def test_find_blocks_ignores_single_module_lists_and_plain_containers() -> None:
    model = nn.Module()
    model.single = nn.ModuleList([Block()])
    model.seq = nn.Sequential(Block(), Block(), Block())
    assert find_blocks(model) == []


def test_find_blocks_of_a_module_list_at_the_root() -> None:
    model = nn.ModuleList([Block(), Block()])
    assert names(find_blocks(model)) == ["0", "1"]


# --- block_index ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        ("embeddings.word_embeddings", 0),
        ("embeddings.position_embeddings", 0),
        ("encoder.layer.0", 0),
        ("encoder.layer.0.attention.self.query", 0),
        ("encoder.layer.1.attention.output.dense", 1),
        ("encoder.layer.1.output.dense", 1),
        ("pooler.dense", 2),
    ],
)
def test_block_index_in_bert(bert: nn.Module, layer: str, expected: int) -> None:
    assert block_index(find_blocks(bert), layer, module_order(bert)) == expected


@pytest.mark.parametrize(
    ("layer", "expected"),
    [("transformer.wte", 0), ("transformer.h.1.mlp.c_fc", 1), ("lm_head", 2)],
)
def test_block_index_in_gpt2(gpt2: nn.Module, layer: str, expected: int) -> None:
    assert block_index(find_blocks(gpt2), layer, module_order(gpt2)) == expected


@pytest.mark.parametrize(
    ("layer", "expected"),
    [("embed", 0), ("layers.1.fc", 1), ("layers.10.fc", 10), ("layers.11", 11), ("head", 12)],
)
def test_block_index_does_not_confuse_block_1_with_block_10(layer: str, expected: int) -> None:
    model = Stack(12)
    assert block_index(find_blocks(model), layer, module_order(model)) == expected


def test_block_index_without_blocks_is_zero() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    assert block_index([], "1", module_order(model)) == 0


# --- BlockCache ----------------------------------------------------------------------------


def record(model: nn.Module, batches: list[Batch]) -> tuple[BlockCache, list[Any]]:
    cache = BlockCache(find_blocks(model))
    with torch.inference_mode(), cache.recording():
        outputs = [model(**batch) for batch in batches]
    return cache, outputs


def replay(model: nn.Module, cache: BlockCache, count: int, batches: list[Batch]) -> list[Any]:
    outputs = []
    with torch.inference_mode(), cache.replaying(count):
        for i, batch in enumerate(batches):
            cache.batch = i
            outputs.append(model(**batch))
    return outputs


def test_recording_keeps_one_output_per_block_and_batch(
    bert: nn.Module, batches: list[Batch]
) -> None:
    cache, _ = record(bert, batches)
    assert [len(outputs) for outputs in cache.outputs] == [len(batches)] * 2
    assert all(not block._forward_hooks for _, block in cache.blocks)


@pytest.mark.parametrize("count", [0, 1, 2])
def test_replay_reproduces_bert_bit_for_bit(
    bert: nn.Module, batches: list[Batch], count: int
) -> None:
    cache, reference = record(bert, batches)
    for expected, got in zip(reference, replay(bert, cache, count, batches), strict=True):
        assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
        assert torch.equal(got.pooler_output, expected.pooler_output)


@pytest.mark.parametrize("count", [1, 2])
def test_replay_reproduces_gpt2_bit_for_bit(
    gpt2: nn.Module, batches: list[Batch], count: int
) -> None:
    cache, reference = record(gpt2, batches)
    for expected, got in zip(reference, replay(gpt2, cache, count, batches), strict=True):
        assert torch.equal(got.logits, expected.logits)


def test_replayed_blocks_do_not_run(
    bert: nn.Module, batches: list[Batch], call_counter: Counter
) -> None:
    cache, _ = record(bert, batches)
    inner = [call_counter(bert.encoder.layer[i].attention) for i in range(2)]
    outer = [call_counter(bert.encoder.layer[i]) for i in range(2)]
    replay(bert, cache, 1, batches)
    assert inner[0] == [0]  # block 0 served its recording: nothing inside it ran
    assert inner[1] == [len(batches)]
    assert outer == [[len(batches)], [len(batches)]]  # hooks on the block itself still fire


def test_replay_ignores_changes_inside_replayed_blocks_only(
    bert: nn.Module, batches: list[Batch]
) -> None:
    cache, reference = record(bert, batches)
    with torch.no_grad():
        for param in bert.encoder.layer[0].parameters():
            param.mul_(0.5)
    replayed = replay(bert, cache, 1, batches)
    rerun = replay(bert, cache, 0, batches)
    for expected, got, changed in zip(reference, replayed, rerun, strict=True):
        assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
        assert not torch.equal(changed.last_hidden_state, expected.last_hidden_state)


def test_replay_restores_the_real_forward(bert: nn.Module, batches: list[Batch]) -> None:
    cache, reference = record(bert, batches)
    with pytest.raises(RuntimeError, match="boom"), cache.replaying(2):
        assert all("forward" in vars(block) for _, block in cache.blocks)
        raise RuntimeError("boom")
    assert all("forward" not in vars(block) for _, block in cache.blocks)
    with torch.no_grad():
        bert.encoder.layer[0].output.dense.weight.zero_()
        rerun = bert(**batches[0])
    assert not torch.equal(rerun.last_hidden_state, reference[0].last_hidden_state)


def test_replay_selects_the_recording_of_the_current_batch() -> None:
    torch.manual_seed(0)
    model = Stack(3)
    inputs = [torch.randn(2, 4), torch.randn(5, 4)]
    cache = BlockCache(find_blocks(model))
    with torch.no_grad(), cache.recording():
        reference = [model(x) for x in inputs]
    with torch.no_grad(), cache.replaying(3):
        for i in (1, 0, 1):
            cache.batch = i
            assert torch.equal(model(torch.zeros(1, 4)), reference[i])


class InPlaceBlock(nn.Module):
    """Scales its input in place and returns it: a consumer that mutates what it is given."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.factor).add_(1.0)


class InPlaceStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(InPlaceBlock(f) for f in (2.0, 3.0, 5.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for layer in self.layers:
            x = layer(x)
        return x


def test_recordings_survive_in_place_changes_by_later_blocks() -> None:
    model = InPlaceStack()
    inputs = torch.arange(4.0)
    cache = BlockCache(find_blocks(model))
    with torch.no_grad(), cache.recording():
        reference = model(inputs)
    assert torch.equal(cache.outputs[0][0], inputs * 2 + 1)
    for _ in range(2):  # a second replay must not see what the first one's consumers did
        with torch.no_grad(), cache.replaying(1):
            assert torch.equal(model(inputs), reference)


class StructuredBlock(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(3, 3)

    def forward(self, x: Any) -> Any:
        hidden = self.fc(unwrap(x))
        aux = hidden.sum(-1)
        if self.kind == "tuple":
            return (hidden, aux)
        if self.kind == "namedtuple":
            return Pair(hidden, aux)
        if self.kind == "list":
            return [hidden, aux]
        return {"hidden": hidden, "aux": [aux, 7]}


def unwrap(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        return value["hidden"]
    return value[0]


class StructuredStack(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(StructuredBlock(kind) for _ in range(3))

    def forward(self, x: torch.Tensor) -> Any:
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("kind", ["tuple", "namedtuple", "list", "dict"])
def test_replay_of_structured_block_outputs(kind: str) -> None:
    torch.manual_seed(0)
    model = StructuredStack(kind)
    inputs = torch.randn(2, 3)
    cache = BlockCache(find_blocks(model))
    with torch.no_grad(), cache.recording():
        reference = model(inputs)
    with torch.no_grad(), cache.replaying(2):
        first = cache.blocks[1][1](torch.zeros(1))
        got = model(inputs)
    assert type(first) is type(reference)
    assert torch.equal(unwrap(got), unwrap(reference))
    recorded = cache.outputs[1][0]
    assert unwrap(first) is not unwrap(recorded)  # a copy, not the recording itself
    assert torch.equal(unwrap(first), unwrap(recorded))
