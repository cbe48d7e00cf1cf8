"""The registered pruning methods: magnitude, Wanda and SparseGPT."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from methods.base import LayerShape, Observer, Option
from methods.errors import OptionError
from methods.gptq_solver import work_dtype
from methods.observers import SHARED, ChannelObserver, HessianObserver
from methods.pruning.masks import score_mask
from methods.pruning.method import SPARSEGPT_GRID, PruningMethod
from methods.pruning.options import MagnitudeOption, SparseGPTOption, WandaOption
from methods.pruning.sparsegpt import shrink_hessian, sparsegpt_prune
from methods.registry import register


class Magnitude(PruningMethod):
    name: ClassVar[str] = "magnitude"
    version: ClassVar[str] = "1"
    option_type: ClassVar[type[Option]] = MagnitudeOption

    @torch.no_grad()
    def convert(
        self, module: nn.Module, option: Option, observer: Observer | None = None
    ) -> nn.Module:
        shape, weight = self._prepare(module, option)
        out = self.empty(shape, option, like=module)
        out.load_pruned(score_mask(weight.abs(), option), weight)
        return self._finish(module, out)


class Wanda(PruningMethod):
    name: ClassVar[str] = "wanda"
    version: ClassVar[str] = "1"
    option_type: ClassVar[type[Option]] = WandaOption

    def needs_calibration(self, option: Option) -> bool:
        return True

    def observer(self, module: nn.Module, option: Option) -> Observer | None:
        """The layer's channel-norm observer, shared with every option that asks for one
        before calibration runs."""
        cols = LayerShape.of(module).cols
        return SHARED.get(module, ChannelObserver, lambda: ChannelObserver(cols))

    @torch.no_grad()
    def convert(
        self, module: nn.Module, option: Option, observer: Observer | None = None
    ) -> nn.Module:
        shape, weight = self._prepare(module, option)
        observer = self._calibration(module, option, observer, ChannelObserver)
        norms = observer.norms().to(weight.device)
        if not torch.isfinite(norms).all():
            raise OptionError(f"{option.label}: the calibration inputs hold NaN or inf values")
        scores = weight.double().abs() * norms[None, :]
        out = self.empty(shape, option, like=module)
        out.load_pruned(score_mask(scores, option), weight)
        return self._finish(module, out)


class SparseGPT(PruningMethod):
    name: ClassVar[str] = "sparsegpt"
    version: ClassVar[str] = "2"  # 2: the inverse Hessian factored in one pass
    option_type: ClassVar[type[Option]] = SparseGPTOption
    grid_entries = SPARSEGPT_GRID

    def needs_calibration(self, option: Option) -> bool:
        return True

    def observer(self, module: nn.Module, option: Option) -> Observer | None:
        """The layer's Hessian observer, shared with every option (GPTQ, whitened SVD...)
        that asks for one before calibration runs."""
        cols = LayerShape.of(module).cols
        return SHARED.get(module, HessianObserver, lambda: HessianObserver(cols))

    @torch.no_grad()
    def convert(
        self, module: nn.Module, option: Option, observer: Observer | None = None
    ) -> nn.Module:
        shape, weight = self._prepare(module, option)
        observer = self._calibration(module, option, observer, HessianObserver)
        hessian = observer.hessian(work_dtype(weight.device))
        if not torch.isfinite(hessian).all():
            raise OptionError(f"{option.label}: the calibration inputs hold NaN or inf values")
        hessian = shrink_hessian(hessian, observer.tokens)
        result = sparsegpt_prune(weight, hessian, option, label=option.label)
        out = self.empty(shape, option, like=module)
        out.store(result.mask, result.values, result.scales, result.offsets)
        return self._finish(module, out)


register(Magnitude())
register(Wanda())
register(SparseGPT())
