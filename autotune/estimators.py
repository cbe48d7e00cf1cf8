"""Sensitivity estimators: how each (layer, option) is scored before the allocator runs.

Each is a :class:`SensitivityEstimator` with a name (``--sensitivity NAME``) and a ``table``
method; :func:`register_estimator` adds one, and the tuner, ``autotune profile`` and the
command line read the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import ClassVar

from torch import nn

from autotune.errors import AutotuneError
from methods.base import Option
from profilers.cache import SensitivityCache
from profilers.observe import Observers
from profilers.sensitivity import SensitivityTable, measure_sensitivity


class SensitivityEstimator(ABC):
    """Scores every option of every layer; lower is better, comparable across layers."""

    name: ClassVar[str]
    description: ClassVar[str]
    cacheable: ClassVar[bool] = False  # whether its entries are kept in the on-disk cache
    steps_per_option: ClassVar[bool] = False  # whether ``progress`` counts (layer, option)s

    @abstractmethod
    def table(
        self,
        model: nn.Module,
        options: Mapping[str, list[Option]],
        batches: list,
        *,
        observers: Observers,
        cache: SensitivityCache | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> SensitivityTable:
        """The scores; ``model`` is restored before this returns."""


ESTIMATORS: dict[str, SensitivityEstimator] = {}


def register_estimator(estimator: SensitivityEstimator) -> SensitivityEstimator:
    ESTIMATORS[estimator.name] = estimator
    return estimator


def get_estimator(name: str) -> SensitivityEstimator:
    if name not in ESTIMATORS:
        raise AutotuneError(f"unknown sensitivity {name!r}; allowed: {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


class EndToEnd(SensitivityEstimator):
    name = "end-to-end"
    description = "the model's output error with only that layer compressed (default)"
    cacheable = True
    steps_per_option = True

    def table(self, model, options, batches, *, observers, cache=None, progress=None):
        return measure_sensitivity(
            model, options, batches, progress=progress, observers=observers, cache=cache
        )


class Fisher(SensitivityEstimator):
    name = "fisher"
    description = (
        "a second-order estimate from the weight perturbation and squared gradients (ranks "
        "like end-to-end on the demo at a tenth of the time)"
    )

    def table(self, model, options, batches, *, observers, cache=None, progress=None):
        from profilers.proxies import fisher_table

        return fisher_table(model, options, batches, observers=observers)


class LocalError(SensitivityEstimator):
    name = "local"
    description = "the layer's own output error on its calibration inputs"

    def table(self, model, options, batches, *, observers, cache=None, progress=None):
        from profilers.proxies import local_error_table

        return local_error_table(model, options, batches, observers=observers)


for _estimator in (EndToEnd(), Fisher(), LocalError()):
    register_estimator(_estimator)
