"""Tests of methods/workspace.py: per-thread scratch buffers for on-the-fly dequantisation."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from methods import workspace
from methods.quantized import QuantizedEmbedding, QuantizedLinear

CPU = torch.device("cpu")


def test_scratch_has_the_size_dtype_and_device_asked_for() -> None:
    buffer = workspace.scratch("a", 10, torch.float16, CPU)
    assert buffer.shape == (10,)
    assert buffer.dtype == torch.float16
    assert buffer.device == CPU


def test_scratch_is_reused_and_grown() -> None:
    big = workspace.scratch("a", 100, torch.float32, CPU)
    small = workspace.scratch("a", 40, torch.float32, CPU)
    assert small.data_ptr() == big.data_ptr()  # no new allocation for a smaller request
    bigger = workspace.scratch("a", 1000, torch.float32, CPU)
    assert bigger.numel() == 1000
    again = workspace.scratch("a", 500, torch.float32, CPU)
    assert again.data_ptr() == bigger.data_ptr()


def test_slots_and_dtypes_do_not_share_buffers() -> None:
    a = workspace.scratch("a", 16, torch.float32, CPU)
    b = workspace.scratch("b", 16, torch.float32, CPU)
    c = workspace.scratch("a", 16, torch.bfloat16, CPU)
    pointers = {a.data_ptr(), b.data_ptr(), c.data_ptr()}
    assert len(pointers) == 3


def test_release_frees_the_buffers() -> None:
    workspace.scratch("a", 64, torch.float32, CPU)
    assert workspace._LOCAL.buffers
    workspace.release()
    assert workspace._LOCAL.buffers == {}
    assert workspace.scratch("a", 8, torch.float32, CPU).numel() == 8


def test_threads_get_their_own_buffers() -> None:
    mine = workspace.scratch("a", 256, torch.float32, CPU)
    theirs: list[int] = []
    thread = threading.Thread(
        target=lambda: theirs.append(workspace.scratch("a", 256, torch.float32, CPU).data_ptr())
    )
    thread.start()
    thread.join()
    assert theirs and theirs[0] != mine.data_ptr()


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_scratch_from_inference_mode_can_be_used_outside_it(bits: int) -> None:
    torch.manual_seed(bits)
    module = QuantizedLinear(64, 48, bits, 32, False)
    module.load_weight(torch.randn(48, 64))
    x = torch.randn(40, 64)  # many tokens: the dequantising path
    expected = F.linear(x, module.dequantize()) + module.bias
    with torch.inference_mode():
        module(x)
    assert torch.equal(module(x), expected)


def test_embedding_lookups_do_not_use_the_scratch() -> None:
    module = QuantizedEmbedding(30, 64, 3, 32, True)
    module.load_weight(torch.randn(30, 64))
    with torch.inference_mode():
        module(torch.tensor([1, 2]))
    out = module(torch.tensor([1, 2]))
    assert torch.equal(out, module.dequantize()[[1, 2]])
