"""The identity option: the layer stays as it is, in its own dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from methods.base import Cost, LayerShape, Method, Observer, Option, dtype_from_name
from methods.registry import register


@dataclass(frozen=True)
class KeepOption(Option):
    method: ClassVar[str] = "none"

    @property
    def label(self) -> str:
        return "keep"


class Keep(Method):
    name: ClassVar[str] = "none"
    option_type: ClassVar[type[Option]] = KeepOption

    def supports(self, shape: LayerShape) -> bool:
        return True

    def check(self, shape: LayerShape, option: Option, layer: str = "layer") -> None:
        return None

    def cost(self, shape: LayerShape, option: Option) -> Cost:
        flops = 2 * shape.rows * shape.cols if shape.kind == "linear" else 0
        return Cost(shape.numel * shape.element_size, shape.bias_bytes, flops)

    def grid(self, shape: LayerShape) -> list[Option]:
        return [KeepOption()]

    def runtime_format(self, shape: LayerShape, option: Option) -> str:
        return "dense"

    def convert(
        self, module: nn.Module, option: Option, observer: Observer | None = None
    ) -> nn.Module:
        """Returns ``module`` itself: keeping a layer costs no copy."""
        return module

    def empty(self, shape: LayerShape, option: Option, like: nn.Module | None = None) -> nn.Module:
        dtype = dtype_from_name(shape.dtype)
        if shape.kind == "linear":
            layer = nn.Linear(
                shape.cols, shape.rows, bias=shape.has_bias, dtype=dtype, device="meta"
            )
        else:
            layer = nn.Embedding(shape.rows, shape.cols, dtype=dtype, device="meta")
        return layer.to_empty(device="cpu")


register(Keep())
