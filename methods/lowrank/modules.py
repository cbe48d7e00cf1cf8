"""Modules that hold the two factors of a low-rank layer."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from methods.base import KeepsStoredFormat
from methods.quantized import QuantizedLinear
from methods.weight_only import WeightOnlyLinear


class Float16Factor(WeightOnlyLinear, KeepsStoredFormat):
    """``x -> x W^T (+ bias)`` with ``W`` stored as float16, cast to the input dtype on use."""

    stored_buffers = ("weight",)
    fused_bias: ClassVar[bool] = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        weight = torch.zeros(out_features, in_features, dtype=torch.float16, device=device)
        self.register_buffer("weight", weight)
        self._set_linear(in_features, out_features, bias, bias_dtype, device)

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor) -> None:
        self.weight = weight.to(torch.float16).to(self.weight.device).contiguous()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype)

    def forward_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype)

    def stored_weight_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float16"


class QuantizedFactor(QuantizedLinear):
    """A factor in RTN's integer format that always computes by dequantising its weight."""

    fused_bias: ClassVar[bool] = True


class LowRankLinear(nn.Module):
    """``y = (x A^T) B^T + bias``: ``first`` holds ``A`` [rank, cols], ``second`` holds ``B``
    [rows, rank] and the bias. Its state is the two factors' state and nothing else."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.in_features, self.out_features = first.in_features, second.out_features
        self.rank = first.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` as stored, decoded to ``dtype``."""
        return self.second.dequantize(dtype), self.first.dequantize(dtype)

    def stored_weight_bytes(self) -> int:
        return self.first.stored_weight_bytes() + self.second.stored_weight_bytes()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
