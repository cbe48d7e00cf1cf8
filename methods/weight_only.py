"""The shared frame of weight-only compressed linear layers: stored weight, float bias.

Such a layer computes ``y = x W^T + bias`` in the input's dtype, where ``W`` comes from its
compressed buffers on each call. Subclasses say how ``W`` is stored and decoded; the bias,
the flattening of leading dimensions and the ``extra_repr`` head are the same for all.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class WeightOnlyLinear(nn.Module):
    """Mixin for a linear layer whose weight is stored compressed and whose bias is a float
    buffer ``bias`` (``None`` without one), registered after the weight's buffers.

    Hooks: :meth:`forward_weight` gives the float ``[out, in]`` weight one call multiplies by
    (by default the storage's ``dequantize_scratch``); :meth:`matmul` computes ``x W^T``
    without the bias (override it to run a kernel). With ``fused_bias`` the whole call is one
    ``F.linear`` of the input, :meth:`forward_weight` and the bias (no kernel, no flattening).
    """

    in_features: int
    out_features: int
    bias: torch.Tensor | None
    fused_bias: ClassVar[bool] = False

    def _set_linear(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        bias_dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        """Record the layer's widths and register its bias buffer (zeros, or ``None``)."""
        self.in_features, self.out_features = in_features, out_features
        bias_tensor = torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None
        self.register_buffer("bias", bias_tensor)

    def forward_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight ``[out, in]`` in ``dtype`` for one call (may be a scratch buffer,
        valid until the next call)."""
        return self.dequantize_scratch(dtype)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 W^T`` for inputs ``[tokens, in]``, without the bias."""
        return F.linear(x2, self.forward_weight(x2.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_bias:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.forward_weight(x.dtype), bias)
        shape = x.shape
        y = self.matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def linear_repr(self) -> str:
        """The head every such layer's ``extra_repr`` starts with."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )

    def extra_repr(self) -> str:
        storage = super().extra_repr()
        return f"{self.linear_repr()}, {storage}" if storage else self.linear_repr()
