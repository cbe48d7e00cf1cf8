"""FP8 weights: E4M3 codes with one float32 scale per output row, and optionally inputs
rounded to E4M3 per token as they arrive (dynamic activations).

These are the FP8 formats GPU runtimes run from a compressed-tensors checkpoint
(``float-quantized``): weight-only (vLLM's Marlin FP8 W8A16 kernel on Ampere and later) and
with dynamic per-token activations (FP8 W8A8 on the FP8 tensor cores of Ada and Hopper).

* Weights: row ``r`` stores ``q = e4m3(w / s_r)`` with ``s_r = max|w_r| / 448`` (448 is
  E4M3's largest value; a row of zeros gets float32's epsilon, as compressed-tensors gives
  it); the layer computes with ``q * s_r``, which is what compressed-tensors decompresses.
* Activations (``activations=True``): each input row (token) ``x`` is replaced by
  ``e4m3(x / t) * t`` with ``t = max|x| / 448`` (epsilon where zero) before the product,
  compressed-tensors' dynamic per-token rounding step for step.

In autotune's own modules the weight is decoded on each call (no FP8 kernel on CPUs), so
FP8 is searched by default only where a runtime that runs FP8 kernels is targeted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods import workspace
from methods.base import (
    Cost,
    InputRounding,
    KeepsStoredFormat,
    LayerShape,
    Method,
    Observer,
    Option,
    dtype_from_name,
    finite_weight,
)
from methods.errors import OptionError
from methods.registry import register
from methods.weight_only import WeightOnlyLinear

CODE_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0
SCALE_BYTES = 4  # float32, one per row
ZERO_SCALE = torch.finfo(torch.float32).eps  # a scale that would be 0
# Relative output error of a Gaussian layer: E4M3 keeps 3 mantissa bits, so a weight's
# rounding error is about 2**-4 / sqrt(3) of its size (2.4%, measured 2.3-2.5% on the
# conformance layers); rounding the inputs as well adds as much again in quadrature.
WEIGHT_ERROR_BOUND = 0.035
ACTIVATION_ERROR_BOUND = 0.05


@dataclass(frozen=True)
class Fp8Option(Option):
    """E4M3 weights with a float32 scale per row; ``activations``: inputs rounded to E4M3
    per token as well."""

    method: ClassVar[str] = "fp8"
    activations: bool = False

    @property
    def label(self) -> str:
        return "fp8-ch-a8" if self.activations else "fp8-ch"


def fp8_scales(weight: torch.Tensor) -> torch.Tensor:
    """Each row's float32 scale ``max|w_r| / 448`` (epsilon for a row of zeros)."""
    scales = weight.float().abs().amax(dim=1) / E4M3_MAX
    return torch.where(scales == 0, torch.full_like(scales, ZERO_SCALE), scales)


def fp8_codes(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """E4M3 codes of ``weight / scales`` (round to nearest even, within +-448)."""
    scaled = weight.float() / scales[:, None]
    return scaled.clamp(-E4M3_MAX, E4M3_MAX).to(CODE_DTYPE)


def fp8_decode(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight ``codes * scales`` (one scale per row)."""
    return codes.float() * scales[:, None]


def round_inputs(x: torch.Tensor) -> torch.Tensor:
    """Each row of ``x`` rounded to E4M3 with its own scale ``max|x| / 448`` and scaled
    back, in ``x``'s dtype (compressed-tensors' dynamic per-token FP8 rounding)."""
    scale = x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX
    scale = torch.where(scale == 0, torch.full_like(scale, ZERO_SCALE), scale)
    codes = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(CODE_DTYPE)
    return codes.to(x.dtype) * scale


class Fp8Linear(WeightOnlyLinear, KeepsStoredFormat):
    """A linear layer stored as E4M3 ``codes`` ``[rows, cols]`` and float32 ``scales``
    ``[rows]``; with ``activations`` its inputs are rounded to E4M3 per token."""

    stored_buffers = ("codes", "scales")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        activations: bool = False,
        bias: bool = True,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.rows, self.cols, self.activations = out_features, in_features, activations
        self.register_buffer(
            "codes", torch.zeros(out_features, in_features, dtype=CODE_DTYPE, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, device=device))
        self._set_linear(in_features, out_features, bias, bias_dtype, device)

    def load_weight(self, weight: torch.Tensor) -> None:
        """Store ``weight`` (``[rows, cols]``) as codes and scales."""
        scales = fp8_scales(weight)
        self.scales.copy_(scales)
        self.codes.copy_(fp8_codes(weight, scales))

    def dequantize(
        self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The float weight the codes stand for (``[r, cols]``), freshly allocated."""
        codes = self.codes if rows is None else self.codes[rows]
        scales = self.scales if rows is None else self.scales[rows]
        return fp8_decode(codes, scales).to(dtype)

    def scratch_needs(self, dtype: torch.dtype) -> dict[str, int]:
        """Bytes of the scratch slot a forward pass may grow (see methods/workspace.py)."""
        return {"weight": self.rows * self.cols * 4}

    def dequantize_scratch(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight of :meth:`dequantize`, decoded in float32 into this thread's scratch
        buffer (valid until the next call) and cast to ``dtype`` where that differs."""
        weight = workspace.scratch(
            "weight", self.rows * self.cols, torch.float32, self.codes.device
        )
        weight = weight.view(self.rows, self.cols)
        weight.copy_(self.codes)
        weight.mul_(self.scales[:, None])
        return weight if dtype == torch.float32 else weight.to(dtype)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.activations:
            x2 = round_inputs(x2)
        return F.linear(x2, self.forward_weight(x2.dtype))

    def extra_repr(self) -> str:
        return f"{self.linear_repr()}, e4m3 per channel, activations={self.activations}"


class Fp8(Method):
    """E4M3 weights per channel, weight-only or with dynamic per-token E4M3 inputs."""

    name: ClassVar[str] = "fp8"
    option_type: ClassVar[type[Option]] = Fp8Option

    def supports(self, shape: LayerShape) -> bool:
        return shape.kind == "linear"

    def check(self, shape: LayerShape, option: Option, layer: str = "layer") -> None:
        assert isinstance(option, Fp8Option)
        if shape.kind != "linear":
            raise OptionError(f"{layer}: fp8 quantises linear layers only")

    def cost(self, shape: LayerShape, option: Option) -> Cost:
        weight = shape.rows * shape.cols + shape.rows * SCALE_BYTES
        return Cost(weight, shape.bias_bytes, 2 * shape.rows * shape.cols)

    def grid(self, shape: LayerShape) -> list[Option]:
        return [Fp8Option(False), Fp8Option(True)]

    def error_bound(self, shape: LayerShape, option: Option) -> float:
        assert isinstance(option, Fp8Option)
        return ACTIVATION_ERROR_BOUND if option.activations else WEIGHT_ERROR_BOUND

    def input_rounding(self, option: Option) -> InputRounding | None:
        assert isinstance(option, Fp8Option)
        return InputRounding("fp8-e4m3-token", round_inputs) if option.activations else None

    def simulated_weight(
        self,
        module: nn.Module,
        option: Option,
        observer: Observer | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        weight = finite_weight(module, option.label)
        if rows is not None:  # each row has its own scale
            weight = weight[rows]
        scales = fp8_scales(weight)
        return fp8_decode(fp8_codes(weight, scales), scales)

    def convert(
        self, module: nn.Module, option: Option, observer: Observer | None = None
    ) -> nn.Module:
        assert isinstance(option, Fp8Option)
        shape = LayerShape.of(module)
        self.check(shape, option)
        weight = finite_weight(module, option.label)
        out = self.empty(shape, option, like=module)
        assert isinstance(out, Fp8Linear)
        out.load_weight(weight)
        if out.bias is not None:
            out.bias.copy_(module.bias.detach())
        return out

    def empty(self, shape: LayerShape, option: Option, like: nn.Module | None = None) -> nn.Module:
        assert isinstance(option, Fp8Option)
        device = like.weight.device if like is not None else None
        return Fp8Linear(
            shape.cols,
            shape.rows,
            option.activations,
            bias=shape.has_bias,
            bias_dtype=dtype_from_name(shape.dtype),
            device=device,
        )


register(Fp8())
