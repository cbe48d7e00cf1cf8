"""The option type of the low-rank methods, their bit widths and default grid."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from methods.base import LayerShape, Option
from methods.rtn import QuantOption

ALLOWED_BITS = (16, 8, 4)
# (rank fraction, bits) of the default grid; options not smaller than the float16 layer are
# dropped. 4-bit factors at half rank cost about what 8-bit ones at a quarter do, and keep
# far more of a weight whose spectrum is flat.
GRID = ((0.25, 8), (0.125, 16), (0.25, 16), (0.5, 16), (0.5, 4))


@dataclass(frozen=True)
class LowRankOption(Option):
    """Rank ``rank``, or ``fraction`` of ``min(rows, cols)`` (exactly one of them set; give
    ``fraction=None`` with a rank); factors stored in float16 (``bits=16``) or as symmetric
    ``bits``-bit codes with one float16 scale per row (``group_size=None``) or per group."""

    method: ClassVar[str] = "svd"
    rank: int | None = None
    fraction: float | None = 0.25
    bits: int = 16
    group_size: int | None = None

    @property
    def label(self) -> str:
        size = f"{self.rank}" if self.rank is not None else f"{100 * (self.fraction or 0):g}%"
        label = f"{self.method}-r{size}"
        if self.bits != 16:
            label += f"+int{self.bits}"
            if self.group_size is not None:
                label += f"-g{self.group_size}"
        return label

    def rank_for(self, shape: LayerShape) -> int:
        """The rank used on a layer of this shape (a fraction is rounded half up)."""
        if self.rank is not None:
            return self.rank
        return max(1, math.floor((self.fraction or 0) * min(shape.rows, shape.cols) + 0.5))

    def storage(self) -> QuantOption:
        """The RTN option both factors are stored with (integer factors only)."""
        return QuantOption(self.bits, self.group_size, symmetric=True)


@dataclass(frozen=True)
class WhitenedSVDOption(LowRankOption):
    method: ClassVar[str] = "whitened_svd"


@dataclass(frozen=True)
class FisherSVDOption(LowRankOption):
    method: ClassVar[str] = "fisher_svd"


def factor_shapes(shape: LayerShape, rank: int) -> tuple[LayerShape, LayerShape]:
    """Shapes of ``A`` (``x -> x A^T``) and of ``B`` (``h -> h B^T + bias``)."""
    first = LayerShape("linear", rank, shape.cols, False, shape.dtype)
    second = LayerShape("linear", shape.rows, rank, shape.has_bias, shape.dtype)
    return first, second
