"""What the three pruning methods share: checks, costs, grid, error bound and storage."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from methods.base import (
    Cost,
    LayerShape,
    Method,
    Observer,
    Option,
    dtype_from_name,
    finite_weight,
)
from methods.errors import OptionError
from methods.pruning.bounds import prune_error_bound
from methods.pruning.options import PruneOption, check_prune_option, parse_pattern
from methods.sparse import FLOAT_BITS, SparseLinear, sparse_weight_bytes

# (pattern, bits) offered by default, each with its block (64 where it divides the width)
GRID = ((None, FLOAT_BITS), ("2:4", FLOAT_BITS), (None, 4), ("2:4", 4))
SPARSEGPT_GRID = (*GRID, ("4:8", FLOAT_BITS))


def grid_block(cols: int, multiple: int) -> int | None:
    """64 if it divides ``cols``, else the divisor of ``cols`` in [8, 128] nearest to 64 that
    is a multiple of ``multiple``; ``None`` when there is none."""
    good = [b for b in range(8, 129) if cols % b == 0 and b % multiple == 0]
    return min(good, key=lambda b: (abs(b - 64), b)) if good else None


class PruningMethod(Method):
    """What the three pruning methods share: options, checks, costs, grid and storage."""

    grid_entries: ClassVar[tuple[tuple[str | None, int], ...]] = GRID

    def supports(self, shape: LayerShape) -> bool:
        return shape.kind == "linear"

    def check(self, shape: LayerShape, option: Option, layer: str = "layer") -> None:
        assert isinstance(option, self.option_type)
        check_prune_option(shape, option, layer)

    def cost(self, shape: LayerShape, option: Option) -> Cost:
        assert isinstance(option, PruneOption)
        weight = sparse_weight_bytes(
            shape.rows,
            shape.cols,
            option.keep,
            option.block,
            option.nm,
            option.bits,
            option.symmetric,
        )
        return Cost(weight, shape.bias_bytes, 2 * shape.rows * shape.cols)

    def grid(self, shape: LayerShape) -> list[Option]:
        if shape.kind != "linear":
            return []
        options = []
        for pattern, bits in self.grid_entries:
            nm = parse_pattern(pattern)
            m = nm[1] if nm else 1
            block = grid_block(shape.cols, m)
            if block is None or shape.cols % m:
                continue
            sparsity = 1 - nm[0] / nm[1] if nm else 0.5
            options.append(self.option_type(sparsity, pattern, block, bits))
        return options

    def error_bound(self, shape: LayerShape, option: Option) -> float:
        assert isinstance(option, PruneOption)
        return prune_error_bound(option)

    def runtime_format(self, shape: LayerShape, option: Option) -> str:
        return "dequantize"

    def empty(self, shape: LayerShape, option: Option, like: nn.Module | None = None) -> nn.Module:
        assert isinstance(option, PruneOption)
        if shape.kind != "linear":
            raise OptionError(f"{option.label}: {self.name} prunes linear layers only")
        return SparseLinear(
            shape.cols,
            shape.rows,
            option.keep,
            option.block,
            option.nm,
            option.bits,
            option.symmetric,
            bias=shape.has_bias,
            bias_dtype=dtype_from_name(shape.dtype),
            device=like.weight.device if like is not None else None,
        )

    def _prepare(self, module: nn.Module, option: Option) -> tuple[LayerShape, torch.Tensor]:
        """Checks shared by every conversion: the option, and a finite weight."""
        assert isinstance(option, PruneOption)
        shape = LayerShape.of(module)
        self.check(shape, option)
        weight = finite_weight(module, option.label)
        return shape, weight

    def _finish(self, module: nn.Module, out: SparseLinear) -> SparseLinear:
        if out.bias is not None:
            out.bias.copy_(module.bias.detach())
        return out

    def _calibration(
        self, module: nn.Module, option: Option, observer: Observer | None, kind: type
    ) -> Any:
        """The observer, checked: of the right kind, fed, and of the layer's width."""
        assert isinstance(option, PruneOption)
        if not isinstance(observer, kind) or observer.tokens == 0:
            raise OptionError(
                f"{option.label} needs calibration: a {kind.__name__} that saw the layer's "
                "inputs (none was given)"
                if observer is None
                else f"{option.label} needs calibration: the observer given saw no inputs"
            )
        cols = LayerShape.of(module).cols
        if observer.cols != cols:
            raise OptionError(
                f"{option.label}: the observer saw inputs of width {observer.cols}, "
                f"the layer takes {cols}"
            )
        return observer
