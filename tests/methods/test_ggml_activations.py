"""Activations rounded as llama.cpp's kernels round them before their dot products."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from methods.ggml_activations import ROUNDINGS, VEC_DOT_TYPES, round_activations, vec_dot_type
from methods.gguf import IMATRIX_GRID, PLAIN_GRID
from methods.gguf_types import allowed_types


def inputs(rows: int = 6, cols: int = 512, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # columns of unequal scale, as a transformer's hidden states have
    scales = torch.logspace(-1.0, 1.0, cols)
    return torch.randn(rows, cols, generator=generator) * scales


def test_every_type_a_plan_can_name_has_a_vec_dot_type() -> None:
    for name in set(allowed_types()) | set(PLAIN_GRID) | set(IMATRIX_GRID):
        assert vec_dot_type(name) in ROUNDINGS
    assert set(VEC_DOT_TYPES) == set(allowed_types())


def test_q8_0_activations_are_ggmls_q8_0_blocks_decoded() -> None:
    """For the legacy types llama.cpp converts activations to Q8_0: the same values as
    encoding them to Q8_0 blocks with gguf's port of llama.cpp's encoder and decoding them."""
    x = inputs()
    blocks = quants.quantize(x.numpy(), GGMLQuantizationType.Q8_0)
    decoded = quants.dequantize(blocks, GGMLQuantizationType.Q8_0)
    for weight_type in ("Q4_0", "Q5_1", "IQ4_NL", "Q8_0"):
        assert np.array_equal(round_activations(x, weight_type).numpy(), decoded)


def test_q8_k_activations_are_256_blocks_of_8_bit_codes() -> None:
    x = inputs()
    rounded = round_activations(x, "Q4_K")
    assert not torch.equal(rounded, x)
    blocks, original = rounded.reshape(6, 2, 256), x.reshape(6, 2, 256)
    index = original.abs().argmax(-1, keepdim=True)
    peak = original.gather(-1, index)
    step = peak.abs() / 127
    codes = blocks / step
    # whole codes in [-127, 127], the block's largest value kept exactly
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.abs().max() <= 127 + 1e-3
    assert torch.allclose(blocks.gather(-1, index), peak)
    assert ((blocks - original).abs() <= step / 2 * (1 + 1e-5)).all()
    # blocks of 256 are coarser than Q8_0's 32 on unequal columns
    coarse = (rounded - x).norm()
    fine = (round_activations(x, "Q8_0") - x).norm()
    assert coarse > fine


def test_a_zero_block_stays_zero() -> None:
    x = inputs()
    x[0, :256] = 0.0
    x[1, :32] = 0.0
    assert torch.equal(round_activations(x, "Q6_K")[0, :256], torch.zeros(256))
    assert torch.equal(round_activations(x, "Q8_0")[1, :32], torch.zeros(32))
    assert torch.isfinite(round_activations(x, "Q6_K")).all()


def test_float_types_round_to_their_dtype_and_f32_is_untouched() -> None:
    x = inputs()
    assert torch.equal(round_activations(x, "F32"), x)
    assert torch.equal(round_activations(x, "F16"), x.half().float())
    assert torch.equal(round_activations(x, "BF16"), x.bfloat16().float())


def test_a_width_that_is_not_whole_blocks_is_refused() -> None:
    with pytest.raises(ValueError, match="blocks of 256"):
        round_activations(torch.randn(2, 320), "Q4_K")
