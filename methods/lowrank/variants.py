"""The registered low-rank methods: plain, whitened and Fisher-weighted SVD."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from methods.base import LayerShape, Observer, Option
from methods.errors import OptionError
from methods.lowrank.factorisations import (
    DAMP,
    fisher_factors,
    truncated_svd,
    whitened_factors,
)
from methods.lowrank.method import LowRank
from methods.lowrank.observer import FisherObserver
from methods.lowrank.options import FisherSVDOption, LowRankOption, WhitenedSVDOption
from methods.observers import SHARED, HessianObserver
from methods.registry import register


class PlainSVD(LowRank):
    def factorise(
        self, weight: torch.Tensor, rank: int, option: LowRankOption, observer: Observer | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return truncated_svd(weight, rank)[:2]


class WhitenedSVD(LowRank):
    name: ClassVar[str] = "whitened_svd"
    option_type: ClassVar[type[Option]] = WhitenedSVDOption
    # Gaussian layers are calibrated on few tokens (conformance: 90 for 64 or 384 inputs):
    # input directions they miss are fitted only through the dampening
    off_target: ClassVar[float] = 1.1

    def needs_calibration(self, option: Option) -> bool:
        return True

    def observer(self, module: nn.Module, option: Option) -> Observer | None:
        cols = LayerShape.of(module).cols
        return SHARED.get(module, HessianObserver, lambda: HessianObserver(cols))

    def factorise(
        self, weight: torch.Tensor, rank: int, option: LowRankOption, observer: Observer | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(observer, HessianObserver) or observer.tokens == 0:
            raise OptionError(
                f"{option.label} needs calibration: a Hessian observer that saw the layer's "
                "inputs" + (" (none was given)" if observer is None else " (it saw none)")
            )
        if observer.cols != weight.shape[1]:
            raise OptionError(
                f"{option.label}: the observer saw inputs of width {observer.cols}, "
                f"the layer takes {weight.shape[1]}"
            )
        hessian = observer.hessian(weight.dtype).to(weight.device)
        if not torch.isfinite(hessian).all():
            raise OptionError(f"{option.label}: the calibration inputs hold NaN or inf values")
        return whitened_factors(weight, hessian, rank, DAMP, option.label)


class FisherSVD(LowRank):
    name: ClassVar[str] = "fisher_svd"
    option_type: ClassVar[type[Option]] = FisherSVDOption
    off_target: ClassVar[float] = 1.1
    needs_whole_model: ClassVar[bool] = True  # Fisher information: backward passes

    def needs_calibration(self, option: Option) -> bool:
        return True

    def observer(self, module: nn.Module, option: Option) -> Observer | None:
        shape = LayerShape.of(module)
        return SHARED.get(module, FisherObserver, lambda: FisherObserver(shape.rows, shape.cols))

    def factorise(
        self, weight: torch.Tensor, rank: int, option: LowRankOption, observer: Observer | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(observer, FisherObserver) or observer.fisher is None:
            raise OptionError(
                f"{option.label} needs calibration: an observer that received the weight's "
                "Fisher information" + (" (none was given)" if observer is None else "")
            )
        if (observer.rows, observer.cols) != tuple(weight.shape):
            raise OptionError(
                f"{option.label}: Fisher information of a {observer.rows}x{observer.cols} "
                f"weight for a {weight.shape[0]}x{weight.shape[1]} layer"
            )
        fisher = observer.fisher.to(device=weight.device, dtype=weight.dtype)
        if not torch.isfinite(fisher).all():
            raise OptionError(f"{option.label}: the Fisher information holds NaN or inf values")
        return fisher_factors(weight, fisher, rank)


register(PlainSVD())
register(WhitenedSVD())
register(FisherSVD())
