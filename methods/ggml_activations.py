"""How llama.cpp rounds a matrix multiplication's activations before its dot products.

llama.cpp's CPU kernels do not multiply a quantised weight by float activations: each weight
type names a "vec_dot" type, and every row of activations is first converted to it (block
quantised to 8 bits for the quantised types, rounded to 16 bits for the float ones). That
rounding is part of the error a GGUF file has in llama.cpp, and at 8 bits per weight most of
it. :func:`round_activations` applies the same rounding in torch, so a layer's output in
autotune's modules is the output llama.cpp computes, up to summation order:

* ``Q8_0`` (weights Q8_0, Q5_0, Q4_0, IQ4_NL): blocks of 32, scale ``amax / 127`` stored as
  float16, codes ``round(x * 127 / amax)`` (to nearest even, as the AVX code rounds);
* ``Q8_1`` (Q5_1, Q4_1): the same codes and scale (plus a block sum the kernel uses for the
  weights' minimum);
* ``Q8_K`` (the K- and i-quants): blocks of 256, scale ``-max / 127`` in float32 where
  ``max`` is the value of largest magnitude, codes clamped to 127;
* ``F16`` / ``BF16``: the activations rounded to that float type; ``F32``: unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# the vec_dot type of each weight type (llama.cpp's ``type_traits_cpu``)
VEC_DOT_TYPES: dict[str, str] = {
    "F32": "F32",
    "F16": "F16",
    "BF16": "BF16",
    "Q8_0": "Q8_0",
    "Q5_0": "Q8_0",
    "Q4_0": "Q8_0",
    "IQ4_NL": "Q8_0",
    "Q5_1": "Q8_1",
    "Q4_1": "Q8_1",
    "Q6_K": "Q8_K",
    "Q5_K": "Q8_K",
    "Q4_K": "Q8_K",
    "Q3_K": "Q8_K",
    "Q2_K": "Q8_K",
    "IQ4_XS": "Q8_K",
    "IQ3_S": "Q8_K",
    "IQ3_XXS": "Q8_K",
    "IQ2_S": "Q8_K",
    "IQ2_XS": "Q8_K",
    "IQ2_XXS": "Q8_K",
}


def vec_dot_type(weight_type: str) -> str:
    """The type llama.cpp converts activations to before multiplying by ``weight_type``."""
    return VEC_DOT_TYPES[weight_type]


def round_activations(x: torch.Tensor, weight_type: str) -> torch.Tensor:
    """``x`` (``[tokens, cols]``) as llama.cpp's kernels for ``weight_type`` read it."""
    return ROUNDINGS[vec_dot_type(weight_type)](x)


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    rows, cols = x.shape
    if cols % size:
        raise ValueError(f"activations of width {cols} do not split into blocks of {size}")
    return x.float().reshape(rows, cols // size, size)


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(x, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    scale = (amax / 127.0).to(torch.float16).float()
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    codes = torch.round(blocks * inverse)
    return (codes * scale).reshape(x.shape).to(x.dtype)


def _q8_k(x: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(x, 256)
    index = blocks.abs().argmax(-1, keepdim=True)
    peak = blocks.gather(-1, index)  # the signed value of largest magnitude
    safe = torch.where(peak == 0, torch.ones_like(peak), peak)
    inverse = -127.0 / safe
    codes = torch.round(blocks * inverse).clamp(max=127.0)
    out = codes * (1.0 / inverse)
    return torch.where(peak == 0, torch.zeros_like(out), out).reshape(x.shape).to(x.dtype)


def _rounded_to(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x.to(dtype).to(x.dtype)


# how each vec_dot type rounds a row of activations
ROUNDINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F32": lambda x: x,
    "F16": _rounded_to(torch.float16),
    "BF16": _rounded_to(torch.bfloat16),
    "Q8_0": _q8_0,
    "Q8_1": _q8_0,  # the same codes; its block sum only serves the weights' minimum
    "Q8_K": _q8_k,
}
