"""GPTQ weight quantisation (Frantar et al., 2022), stored in RTN's integer format.

RTN rounds each weight on its own. GPTQ quantises the columns of a linear layer one at a time
and, after each, spreads the rounding error over the columns not yet quantised so that the
layer's output on calibration inputs ``X`` changes as little as possible: it minimises
``||X W^T - X Q^T||^2`` through the Hessian ``H = 2 X^T X / n`` of that loss. With
``U = chol(H^-1)`` (upper), quantising column ``j`` to ``q`` updates the later columns by
``-(w_j - q) / U_jj * U_j,j+1:``. Updates are applied lazily, one block of columns at a time
(one matrix product per block instead of a rank-one update per column).

* Dampening: ``damp * mean(diag H)`` is added to the diagonal (more if Cholesky fails).
* Dead inputs (never non-zero in calibration): their diagonal is set to 1 and their weight
  column to 0.
* Activation order (``act_order``): columns are processed by decreasing ``diag H``. Scales are
  then fitted per group of *original* columns before the sweep ("static groups"), and codes
  are stored in the original column order, so the storage is RTN's: ``QuantizedLinear`` with
  the same codes, scales and offsets layout, the same bytes and the same kernels. Without
  ``act_order`` a group's scale is fitted when the sweep reaches it, on the updated weights.

Observers: every option of a layer asked for before calibration runs shares one Hessian
observer (one ``cols x cols`` matrix per layer, not per option; see methods/observers.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from methods.base import Cost, LayerShape, Method, Observer, Option, finite_weight
from methods.errors import OptionError
from methods.gptq_solver import (
    FACTORS,
    GPTQ_DTYPE,
    FactorOf,
    Quantized,
    factor,
    gptq_quantize,
    gptq_quantize_many,
)
from methods.observers import SHARED, HessianObserver
from methods.registry import get_method, register
from methods.rtn import QuantOption, check_quant_option, quant_cost

# As RTN's grid without 8 bits (GPTQ gains little there): 4-bit per row and in groups, 3- and
# 2-bit in groups; always with activation order, which costs nothing in storage.
GRID = {8: (None, 128), 4: (None, 128, 64, 32), 3: (128, 64, 32), 2: (64, 32)}


@dataclass(frozen=True)
class GPTQOption(Option):
    """``bits``-bit codes in RTN's format, fitted by GPTQ; ``damp`` is the fraction of the mean
    Hessian diagonal added to its diagonal."""

    method: ClassVar[str] = "gptq"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    act_order: bool = True
    damp: float = 0.01

    @property
    def label(self) -> str:
        group = "ch" if self.group_size is None else f"g{self.group_size}"
        label = f"gptq{self.bits}-{group}-{'sym' if self.symmetric else 'asym'}"
        if self.damp != 0.01:
            label += f"-d{self.damp:g}"
        return label + ("-ao" if self.act_order else "")

    def storage(self) -> QuantOption:
        """The RTN option with the same stored format."""
        return QuantOption(self.bits, self.group_size, self.symmetric)


class GPTQ(Method):
    name: ClassVar[str] = "gptq"
    version: ClassVar[str] = "3"  # 2: factor and sweep in float32; 3: factor in one pass
    option_type: ClassVar[type[Option]] = GPTQOption

    def supports(self, shape: LayerShape) -> bool:
        return shape.kind == "linear"

    def check(self, shape: LayerShape, option: Option, layer: str = "layer") -> None:
        assert isinstance(option, GPTQOption)
        if shape.kind != "linear":
            raise OptionError(f"{layer}: gptq quantises linear layers only, not {shape.kind}")
        check_quant_option(shape, option, layer)  # type: ignore[arg-type]
        if not isinstance(option.act_order, bool):
            raise OptionError(
                f"{layer}: gptq act_order must be true or false, got {option.act_order!r}"
            )
        damp = option.damp
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 <= damp <= 1:
            raise OptionError(
                f"{layer}: gptq damp {damp!r} is out of range; allowed: a number in [0, 1]"
            )

    def cost(self, shape: LayerShape, option: Option) -> Cost:
        assert isinstance(option, GPTQOption)
        return quant_cost(shape, option.storage())

    def grid(self, shape: LayerShape) -> list[Option]:
        return [
            GPTQOption(bits, group, symmetric, act_order=True)
            for bits, groups in GRID.items()
            for group in groups
            if group is None or shape.cols % group == 0
            for symmetric in (True, False)
        ]

    def runtime_format(self, shape: LayerShape, option: Option) -> str:
        assert isinstance(option, GPTQOption)
        return get_method("rtn").runtime_format(shape, option.storage())

    def needs_calibration(self, option: Option) -> bool:
        return True

    def stand_in(self, option: Option) -> Option | None:
        assert isinstance(option, GPTQOption)
        return option.storage()

    def observer(self, module: nn.Module, option: Option) -> Observer | None:
        """The layer's Hessian observer: shared with every option (of any method) that asks
        for one before calibration runs, a new one after."""
        cols = LayerShape.of(module).cols
        return SHARED.get(module, HessianObserver, lambda: HessianObserver(cols))

    @torch.no_grad()
    def convert(
        self, module: nn.Module, option: Option, observer: Observer | None = None
    ) -> nn.Module:
        assert isinstance(option, GPTQOption)
        weight, hessian = self._inputs(module, option, observer)
        factor_of = self._factor_of(module, observer, weight, hessian, option.label)
        quantized = gptq_quantize(weight, hessian, option, option.label, factor_of)
        return self._module(module, option, quantized)

    @torch.no_grad()
    def convert_many(
        self,
        module: nn.Module,
        options: Sequence[Option],
        observer_of: Callable[[Option], Observer | None],
    ) -> Iterator[tuple[Option, nn.Module | OptionError]]:
        """The options that share an observer are solved together: one factor of the inverse
        Hessian per dampening, and one stacked sweep for many options (methods/gptq_solver.py);
        each gets the codes :meth:`convert` gives it."""
        by_observer: dict[int, list[GPTQOption]] = {}
        observers: dict[int, Observer | None] = {}
        for option in options:
            assert isinstance(option, GPTQOption)
            observer = observer_of(option)
            by_observer.setdefault(id(observer), []).append(option)
            observers[id(observer)] = observer
        done: dict[Option, nn.Module | OptionError] = {}
        for key, group in by_observer.items():
            try:
                weight, hessian = self._inputs(module, group[0], observers[key])
                for option in group[1:]:
                    self.check(LayerShape.of(module), option)
            except OptionError:  # each option is refused with its own reason
                for option in group:
                    done[option] = self._refusal(module, option, observers[key])
                continue
            factor_of = self._factor_of(module, observers[key], weight, hessian, group[0].label)
            results = gptq_quantize_many(weight, hessian, group, group[0].label, factor_of)
            try:
                for option, result in zip(group, results, strict=True):
                    done[option] = self._module(module, option, result)
            except OptionError as exc:
                for option in group:
                    done.setdefault(option, exc)
        for option in options:
            yield option, done[option]

    @staticmethod
    def _factor_of(
        module: nn.Module,
        observer: Observer | None,
        weight: torch.Tensor,
        hessian: torch.Tensor,
        label: str,
    ) -> FactorOf:
        """The layer's factors, kept with its observer (:data:`FACTORS`) while the weight and
        what the observer saw stay as they are."""
        stored = module.weight
        state = (stored.data_ptr(), stored._version, tuple(stored.shape))
        seen = (getattr(observer, "tokens", 0), getattr(observer, "calls", 0))
        return lambda damp, act_order: FACTORS.get(
            (observer,),
            (*state, *seen, damp, act_order),
            lambda: factor(weight, hessian, damp, act_order, label, GPTQ_DTYPE),
        )

    def _refusal(
        self, module: nn.Module, option: GPTQOption, observer: Observer | None
    ) -> nn.Module | OptionError:
        try:
            return self.convert(module, option, observer)
        except OptionError as exc:
            return exc

    def _inputs(
        self, module: nn.Module, option: GPTQOption, observer: Observer | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's weight and its calibration Hessian, checked."""
        shape = LayerShape.of(module)
        self.check(shape, option)
        if not isinstance(observer, HessianObserver) or observer.tokens == 0:
            raise OptionError(
                f"{option.label} needs calibration: a Hessian observer that saw the layer's "
                "inputs (none was given)"
                if observer is None
                else f"{option.label} needs calibration: the observer given saw no inputs"
            )
        if observer.cols != shape.cols:
            raise OptionError(
                f"{option.label}: the observer saw inputs of width {observer.cols}, "
                f"the layer takes {shape.cols}"
            )
        weight = finite_weight(module, option.label)
        hessian = observer.hessian(GPTQ_DTYPE)
        if not torch.isfinite(hessian).all():
            raise OptionError(f"{option.label}: the calibration inputs hold NaN or inf values")
        return weight, hessian

    def _module(self, module: nn.Module, option: GPTQOption, result: Quantized) -> nn.Module:
        out = self.empty(LayerShape.of(module), option, like=module)
        out.store(result.codes, result.scales, result.offsets)
        if out.bias is not None:
            out.bias.copy_(module.bias.detach())
        return out

    def empty(self, shape: LayerShape, option: Option, like: nn.Module | None = None) -> nn.Module:
        assert isinstance(option, GPTQOption)
        if shape.kind != "linear":
            raise OptionError(f"{option.label}: gptq quantises linear layers only")
        return get_method("rtn").empty(shape, option.storage(), like=like)


register(GPTQ())
