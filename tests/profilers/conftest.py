"""Fixtures of the profiler tests: tiny random transformers and token batches for them."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import transformers
from profiler_helpers import Batch, make_batch, make_bert, make_gpt2, make_llama


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Run on one thread: tiny matmuls on a busy 2-core machine stall on OpenMP wake-ups."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def bert() -> transformers.BertModel:
    return make_bert()


@pytest.fixture
def gpt2() -> transformers.GPT2LMHeadModel:
    return make_gpt2()


@pytest.fixture
def llama() -> transformers.LlamaForCausalLM:
    return make_llama()


@pytest.fixture
def batches() -> list[Batch]:
    """Two batches of different shapes, each with padding (no length equals HIDDEN)."""
    return [make_batch(2, 8, padded=3, seed=1), make_batch(3, 6, padded=2, seed=2)]


@pytest.fixture
def call_counter() -> Iterator[Callable[[torch.nn.Module], list[int]]]:
    """``count(module)`` -> a one-element list counting the module's forward calls."""
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def count(module: torch.nn.Module) -> list[int]:
        calls = [0]

        def hook(*_: object) -> None:
            calls[0] += 1

        handles.append(module.register_forward_hook(hook))
        return calls

    yield count
    for handle in handles:
        handle.remove()
