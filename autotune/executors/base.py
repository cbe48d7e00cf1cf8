"""What differs between a model tuned whole in memory and one streamed block by block.

The tune's stages (:mod:`autotune.pipeline`) are the same for both; where they run the
model they ask the :class:`Executor`: open it, run the reference outputs of a data split,
observe calibration statistics, score every (layer, option), measure the error of whole
plans, compress the model, write it and measure the result. :func:`register_executor` adds
one; ``TuneConfig.executor`` names it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from autotune.errors import AutotuneError
from methods.base import Option
from profilers.cache import SensitivityCache
from profilers.execution.observe import Observers
from profilers.hardware import HardwareSpec
from profilers.sensitivity import SensitivityTable

if TYPE_CHECKING:
    from autotune.agreement import Agreement
    from autotune.budget import Budget
    from autotune.estimators import SensitivityEstimator
    from autotune.layers import LayerRef
    from autotune.pipeline.choose import Scored
    from autotune.pipeline.config import TuneConfig
    from autotune.pipeline.prepare import Data, Setup
    from autotune.pipeline.price import Priced
    from autotune.plan import Plan
    from autotune.refinement import Decide

Batch = dict[str, torch.Tensor]
Outputs = dict[str, torch.Tensor]
PlanOptions = Mapping[str, Option]


@dataclass
class Split:
    """A data split: its batches and the outputs of the model as given on them
    (``reference``; ``None`` where the executor recomputes them in every pass)."""

    name: str
    batches: list[Batch]
    reference: list[Outputs] | None


@dataclass
class Opened:
    """The model as given (``original``), the model the tune works on (``work``: the same
    object when tuned in place), and where it came from."""

    original: nn.Module
    work: nn.Module
    tokenizer: Any
    source: str
    inplace: bool
    fingerprint: str


class Executor(ABC):
    """Runs the model for the tune's stages; one instance serves one tune."""

    name: ClassVar[str]
    description: ClassVar[str]
    holds_whole_model: ClassVar[bool]  # whole-model work (decode, timing, pruning) possible
    default_sensitivity: ClassVar[str]
    # calibrated methods offered by default beside RTN (when no methods are asked for)
    default_calibrated_methods: ClassVar[tuple[str, ...]] = ()

    def __init__(self, save_to: str | Path | None = None) -> None:
        self.save_to = None if save_to is None else Path(save_to)

    def refuse(
        self,
        budget: Budget,
        spec: HardwareSpec,
        config: TuneConfig,
        methods: Sequence[str],
        estimator: SensitivityEstimator,
    ) -> None:
        """Refuse, before the model is opened, what this executor cannot do (one line)."""
        return None

    @abstractmethod
    def open(self, model: nn.Module | str | Path, config: TuneConfig, tokenizer: Any) -> Opened:
        """Load ``model`` as this executor works on it."""

    @abstractmethod
    def split(self, name: str, batches: list[Batch]) -> Split:
        """A data split with the reference outputs this executor keeps of it."""

    @abstractmethod
    def metric(self, split: Split) -> str:
        """The model's error metric (``kl`` for logits, ``nmse`` otherwise)."""

    @abstractmethod
    def calibrated(
        self, layers: Sequence[LayerRef], options: dict[str, list[Option]], batches: list[Batch]
    ) -> tuple[Observers, dict[str, int]]:
        """Calibration statistics kept for the tune, and the calibrated options left out
        (in place, counted per layer) where a layer sees too few tokens for them."""

    def agreement(
        self,
        layers: Sequence[LayerRef],
        options: dict[str, list[Option]],
        observers: Observers,
        selection: list[Batch],
    ) -> list[Agreement]:
        """Each calibrated method's gain over its stand-in on calibration and on the
        ``selection`` inputs, per layer (:mod:`autotune.agreement`); none where the executor
        keeps no calibration statistics."""
        return []

    @property
    def run(self) -> Callable[..., Any] | None:
        """The forward pass that prices count (``None``: the model itself)."""
        return None

    @abstractmethod
    def sensitivity(
        self,
        estimator: SensitivityEstimator,
        options: Mapping[str, list[Option]],
        batches: list[Batch],
        observers: Observers,
        cache: SensitivityCache | None,
        progress: Callable[[int], None] | None,
        decide: Decide | None = None,
    ) -> SensitivityTable:
        """Every (layer, option) scored by ``estimator``; ``decide`` is the allocator's choice
        on a table of errors, for estimators that refine where it depends on them."""

    @abstractmethod
    def errors(
        self, plans: Mapping[str, PlanOptions], split: Split, metric: str
    ) -> dict[str, float]:
        """The output error of each plan on ``split`` against the model as given."""

    def swapped(self, options: PlanOptions) -> AbstractContextManager[nn.Module]:
        """The whole working model with ``options``' modules in place of its layers,
        restored on leaving (executors that hold the whole model only)."""
        raise NotImplementedError(f"the {self.name} executor does not hold the whole model")

    @abstractmethod
    def apply(self, options: PlanOptions) -> None:
        """Compress the working model as ``options`` say (where it is held in memory)."""

    @abstractmethod
    def write(self, plan: Plan, tokenizer: Any, calibration: list[Batch]) -> Path | None:
        """Write the compressed model to ``save_to`` (if set); the folder written."""

    @abstractmethod
    def measure(
        self, setup: Setup, data: Data, priced: Priced, scored: Scored, plan: Plan
    ) -> dict[str, Any]:
        """The measured figures of the compressed model (held-out data only) for
        ``plan.measured``."""


EXECUTORS: dict[str, type[Executor]] = {}


def register_executor(executor: type[Executor]) -> type[Executor]:
    EXECUTORS[executor.name] = executor
    return executor


def get_executor(name: str, save_to: str | Path | None = None) -> Executor:
    if name not in EXECUTORS:
        raise AutotuneError(f"unknown executor {name!r}; allowed: {', '.join(EXECUTORS)}")
    return EXECUTORS[name](save_to)
