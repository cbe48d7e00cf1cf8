"""How much a layer's input rounding perturbs its product, for weight-space estimates.

Some formats round a layer's inputs before multiplying (llama.cpp converts activations to
8-bit blocks or float16 for each weight type; see :meth:`methods.base.Method.input_rounding`).
A weight-space estimate ``sum_ij F_ij dW_ij^2`` does not see that. With the rounded input
``x + d``, the output moves by ``W' d`` as well as by ``dW x``; with the Fisher diagonal
``F_ij ~ E[g_i^2] E[x_j^2]`` (output sensitivity times input power) and rounding noise
uncorrelated across columns, that adds ``sum_ij F_ij W'_ij^2 r_j``, where
``r_j = E[d_j^2] / E[x_j^2]`` is column ``j``'s rounding noise over its power.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from methods.base import InputRounding
from profilers.execution.observe import run_hooked

Batch = Mapping[str, torch.Tensor]


class _NoiseObserver:
    """Sums each input column's power and, per rounding, its rounding noise's power."""

    def __init__(self, roundings: Sequence[InputRounding]) -> None:
        self.roundings = list(roundings)
        self.power: torch.Tensor | None = None
        self.noise: dict[str, torch.Tensor] = {}
        self.refused: set[str] = set()

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        power = x.pow(2).sum(0)
        self.power = power if self.power is None else self.power + power
        for rounding in self.roundings:
            if rounding.name in self.refused:
                continue
            try:
                noise = (rounding.apply(x) - x).pow(2).sum(0)
            except ValueError:  # a width the format cannot take: its options are refused
                self.refused.add(rounding.name)
                continue
            previous = self.noise.get(rounding.name)
            self.noise[rounding.name] = noise if previous is None else previous + noise

    def ratios(self) -> dict[str, torch.Tensor]:
        """Per rounding, each column's noise over its power (0 for a column never non-zero)."""
        if self.power is None:
            return {}
        live = self.power > 0
        safe = torch.where(live, self.power, torch.ones_like(self.power))
        return {
            name: torch.where(live, noise / safe, torch.zeros_like(noise))
            for name, noise in self.noise.items()
            if name not in self.refused
        }


def rounding_noise(
    model: nn.Module,
    roundings: Mapping[str, Sequence[InputRounding]],
    batches: Sequence[Batch],
) -> dict[str, dict[str, torch.Tensor]]:
    """``[layer][rounding name]``: each input column's rounding noise over its power on
    ``batches``, for the roundings asked of each layer (one forward pass; a rounding the
    layer's width does not allow is left out)."""
    observers = {layer: _NoiseObserver(list(r)) for layer, r in roundings.items() if r}
    handles = [
        model.get_submodule(layer).register_forward_pre_hook(observer)
        for layer, observer in observers.items()
    ]
    run_hooked(model, batches, handles)
    return {layer: observer.ratios() for layer, observer in observers.items()}


def rounding_error(diagonal: torch.Tensor, weight: torch.Tensor, ratio: torch.Tensor) -> float:
    """``sum_ij F_ij W'_ij^2 r_j``: the estimated output error of rounding the inputs of a
    layer with Fisher diagonal ``diagonal`` and (perturbed) weight ``weight``."""
    return float((diagonal * weight.pow(2) * ratio.to(weight.device)[None, :]).sum())
