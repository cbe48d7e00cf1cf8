"""Sensitivity estimators: how each (layer, option) is scored before the allocator runs.

Each is a :class:`SensitivityEstimator` with a name (``--sensitivity NAME``) and a ``table``
method; :func:`register_estimator` adds one, and the tuner, ``autotune profile`` and the
command line read the registry.
"""

from __future__ import annotations

import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from autotune.errors import AutotuneError
from autotune.refinement import Decide, Reach, anchors, front, next_to_measure
from methods.base import LayerShape, Option
from methods.registry import method_of
from profilers.cache import SensitivityCache
from profilers.converted import ConvertedModules
from profilers.execution.observe import Observers
from profilers.execution.streaming import StreamedModel
from profilers.sensitivity import SensitivityTable, measure_sensitivity


@dataclass(frozen=True)
class Scoring:
    """What an estimator may use beside the model, options and batches (see
    :meth:`SensitivityEstimator.table`)."""

    observers: Observers
    cache: SensitivityCache | None = None
    progress: Callable[[int], None] | None = None
    decide: Decide | None = None
    converted: ConvertedModules | None = None


class SensitivityEstimator(ABC):
    """Scores every option of every layer; lower is better, comparable across layers."""

    name: ClassVar[str]
    description: ClassVar[str]
    cacheable: ClassVar[bool] = False  # whether its entries are kept in the on-disk cache
    cache_name: ClassVar[str] = ""  # the table its cached entries belong to (default: name)
    steps_per_option: ClassVar[bool] = False  # whether ``progress`` counts (layer, option)s
    streams: ClassVar[bool] = False  # whether it scores a model streamed block by block

    def table(
        self,
        model: nn.Module,
        options: Mapping[str, list[Option]],
        batches: list,
        *,
        observers: Observers,
        cache: SensitivityCache | None = None,
        progress: Callable[[int], None] | None = None,
        decide: Decide | None = None,
        converted: ConvertedModules | None = None,
    ) -> SensitivityTable:
        """The scores; ``model`` is restored before this returns. ``decide`` is the
        allocator's choice per layer on a table of errors (``None`` outside a tune, where
        there is no budget); ``converted`` keeps converted modules for the stages after."""
        scoring = Scoring(observers, cache, progress, decide, converted)
        return self.score(model, options, batches, scoring)

    @abstractmethod
    def score(
        self,
        model: nn.Module,
        options: Mapping[str, list[Option]],
        batches: list,
        scoring: Scoring,
    ) -> SensitivityTable:
        """What :meth:`table` returns, its keyword arguments gathered in ``scoring``."""

    def streamed_table(
        self,
        streamed: StreamedModel,
        options: Mapping[str, list[Option]],
        batches: list,
        progress: Callable[[int], None] | None = None,
    ) -> SensitivityTable:
        """The scores of a model streamed block by block (only where ``streams``)."""
        raise AutotuneError(self.streaming_refusal() or f"{self.name} cannot stream")

    def streaming_refusal(self) -> str | None:
        """Why this estimator cannot score a model streamed block by block (``None``: it
        can)."""
        if self.streams:
            return None
        allowed = ", ".join(n for n, e in ESTIMATORS.items() if e.streams)
        return (
            f"sensitivity {self.name!r} needs the whole model in memory; block by block, "
            f"allowed: {allowed}"
        )


ESTIMATORS: dict[str, SensitivityEstimator] = {}


def register_estimator(estimator: SensitivityEstimator) -> SensitivityEstimator:
    ESTIMATORS[estimator.name] = estimator
    return estimator


def get_estimator(name: str) -> SensitivityEstimator:
    if name not in ESTIMATORS:
        raise AutotuneError(f"unknown sensitivity {name!r}; allowed: {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


class EndToEnd(SensitivityEstimator):
    name = cache_name = "end-to-end"
    description = "the model's output error with only that layer compressed, for every pair"
    cacheable = True
    steps_per_option = True

    def score(self, model, options, batches, scoring):
        return measure_sensitivity(
            model,
            options,
            batches,
            progress=scoring.progress,
            observers=scoring.observers,
            cache=scoring.cache,
        )


class Fisher(SensitivityEstimator):
    name = "fisher"
    description = (
        "a second-order estimate from the weight perturbation and squared gradients (ranks "
        "like end-to-end on the demo at a tenth of the time)"
    )

    def score(self, model, options, batches, scoring):
        from profilers.proxies import fisher_table

        return fisher_table(model, options, batches, observers=scoring.observers)


class LocalError(SensitivityEstimator):
    name = "local"
    description = "the layer's own output error on its calibration inputs"

    def score(self, model, options, batches, scoring):
        from profilers.proxies import local_error_table

        return local_error_table(model, options, batches, observers=scoring.observers)


class Hybrid(SensitivityEstimator):
    """End-to-end errors where the allocator can use them, Fisher estimates elsewhere.

    Every option is first given its Fisher estimate. Per layer, an option that stores more
    bytes than another and is estimated worse is never worth choosing, so only the options
    on the front of (bytes, estimate), and those the estimate cannot see (no float weight,
    such as activation quantisation), are measured end to end; the others keep their
    estimate scaled by the median ratio of measured to estimated error of their method on
    the layer."""

    name = "hybrid"
    description = (
        "Fisher estimates for every option, end-to-end errors for the options on each "
        "layer's front of bytes against estimate"
    )
    cacheable = True
    cache_name = EndToEnd.cache_name  # its measured entries are end-to-end ones
    steps_per_option = True

    def score(self, model, options, batches, scoring):
        from profilers.proxies import fisher_table

        start = time.perf_counter()
        observers, cache, progress = scoring.observers, scoring.cache, scoring.progress
        estimate = fisher_table(model, options, batches, observers=observers)
        front = {name: _front(model, name, opts, estimate) for name, opts in options.items()}
        if progress is not None:
            progress(sum(len(o) - len(front[n]) for n, o in options.items()))
        measured = measure_sensitivity(
            model, front, batches, progress=progress, observers=observers, cache=cache
        )
        errors = {
            name: _merged(
                measured.errors.get(name, {}), estimate.errors.get(name, {}), options[name]
            )
            for name in options
        }
        estimated = sum(len(e) for e in errors.values()) - sum(
            len(e) for e in measured.errors.values()
        )
        return SensitivityTable(
            metric=measured.metric,
            errors=errors,
            evaluations=measured.evaluations + estimate.evaluations,
            seconds=time.perf_counter() - start,
            skipped=measured.skipped,
            prefix_cached=measured.prefix_cached,
            scored_by={
                "end-to-end": sum(len(e) for e in measured.errors.values()),
                "fisher": estimated,
            },
        )


class Refined(SensitivityEstimator):
    """Fisher estimates everywhere, end-to-end errors where the allocator's plan depends on
    them.

    Every option gets its Fisher estimate, and the options it cannot see are measured end to
    end. Then, in rounds, the allocator chooses on the errors so far (measured ones, and each
    method's estimates scaled by its measured-to-estimated ratio on the layer) and the
    options its choice depends on (:func:`autotune.refinement.near_choice`) are measured,
    until a choice needs no new measurement. The first round measures, beside each layer's
    choice on the bare estimates, one option per method near it in bytes, so every method's
    scale is measured. Without a choice to refine (a profile outside a tune) it measures what
    ``hybrid`` measures."""

    name = "refined"
    description = (
        "Fisher estimates for every option, end-to-end errors for the options the "
        "allocator's plan depends on (the default in memory)"
    )
    cacheable = True
    cache_name = EndToEnd.cache_name  # its measured entries are end-to-end ones
    steps_per_option = True
    reach = Reach()

    def score(self, model, options, batches, scoring):
        observers, cache, progress = scoring.observers, scoring.cache, scoring.progress
        decide, converted = scoring.decide, scoring.converted
        if decide is None:
            return ESTIMATORS[Hybrid.name].score(model, options, batches, scoring)
        start = time.perf_counter()
        estimate = _estimates(model, options, batches, observers, converted, cache)
        sizes = {name: _sizes(model, name, opts) for name, opts in options.items()}
        measured = _Measured(model, batches, observers, cache, progress, converted)
        chosen = decide({n: dict(e) for n, e in estimate.errors.items()})
        measured.run(
            {
                name: [o for o in opts if o.label not in estimate.errors.get(name, {})]
                + anchors(opts, sizes[name], estimate.errors.get(name, {}), chosen[name])
                for name, opts in options.items()
            }
        )
        rounds = 1
        while True:
            errors = {
                name: _merged(measured.errors.get(name, {}), estimate.errors.get(name, {}), opts)
                for name, opts in options.items()
            }
            if rounds > self.reach.rounds:
                break
            chosen = decide(errors)
            pending = next_to_measure(options, sizes, errors, measured.tried, chosen, self.reach)
            if not pending:
                break
            measured.run(pending)
            rounds += 1
        if converted is not None:  # what the search will try again is near the choice
            converted.retain({(n, label) for n, e in measured.errors.items() for label in e})
        pairs = sum(len(e) for e in errors.values())
        exact = sum(len(e) for e in measured.errors.values())
        if progress is not None:
            progress(sum(len(o) for o in options.values()) - measured.steps)
        return SensitivityTable(
            metric=measured.metric or estimate.metric,
            errors=errors,
            evaluations=measured.evaluations + estimate.evaluations,
            seconds=time.perf_counter() - start,
            skipped=measured.skipped,
            prefix_cached=measured.prefix_cached,
            scored_by={"end-to-end": exact, "fisher": pairs - exact},
            rounds=rounds,
        )


class _Measured:
    """End-to-end errors measured so far, round by round."""

    def __init__(self, model, batches, observers, cache, progress, converted) -> None:
        self.model, self.batches, self.observers = model, batches, observers
        self.cache, self.progress, self.converted = cache, progress, converted
        self.errors: dict[str, dict[str, float]] = {}
        self.tried: dict[str, set[str]] = {}
        self.skipped: dict[str, dict[str, str]] = {}
        self.evaluations = self.steps = 0
        self.metric = ""
        self.prefix_cached = False

    def run(self, pending: Mapping[str, list[Option]]) -> None:
        pending = {name: opts for name, opts in pending.items() if opts}
        if not pending:
            return
        table = measure_sensitivity(
            self.model,
            pending,
            self.batches,
            progress=self.progress,
            observers=self.observers,
            cache=self.cache,
            converted=self.converted,
        )
        for name, opts in pending.items():
            self.errors.setdefault(name, {}).update(table.errors.get(name, {}))
            self.tried.setdefault(name, set()).update(o.label for o in opts)
            self.skipped.setdefault(name, {}).update(table.skipped.get(name, {}))
            self.steps += len(opts)
        self.skipped = {name: s for name, s in self.skipped.items() if s}
        self.evaluations += table.evaluations
        self.metric = table.metric
        self.prefix_cached = self.prefix_cached or table.prefix_cached


def _estimates(
    model: nn.Module,
    options: Mapping[str, list[Option]],
    batches: list,
    observers: Observers,
    converted: ConvertedModules | None,
    cache: SensitivityCache | None,
) -> SensitivityTable:
    """Fisher estimates of every option, each from its method's stand-in where it names one
    (GPTQ: the RTN option stored alike), so no calibrated option is converted to be
    estimated; read from and written to ``cache``'s companion table when one is given."""
    from profilers.proxies import fisher_table

    proxy = {
        name: {o.label: method_of(o).stand_in(o) or o for o in opts}
        for name, opts in options.items()
    }
    stored = cache.companion(STAND_IN_ESTIMATES) if cache is not None else None
    if (
        stored is not None
        and stored.metric
        and all(stored.has(name, by_label) for name, by_label in proxy.items())
    ):
        raw = {
            name: {
                label: value for label in by_label if (value := stored.get(name, label)) is not None
            }
            for name, by_label in proxy.items()
        }
        return SensitivityTable(metric=stored.metric, errors=raw, evaluations=0, seconds=0.0)
    needed = {
        name: list({o.label: o for o in by_label.values()}.values())
        for name, by_label in proxy.items()
    }
    table = fisher_table(model, needed, batches, observers=observers, keep=converted)
    table.errors = {
        name: {
            label: table.errors[name][stand_in.label]
            for label, stand_in in by_label.items()
            if stand_in.label in table.errors.get(name, {})
        }
        for name, by_label in proxy.items()
    }
    if stored is not None:
        stored.metric = table.metric
        for name, by_label in proxy.items():
            for label in by_label:
                stored.put(name, label, table.errors[name].get(label))
        stored.save()
    return table


STAND_IN_ESTIMATES = "fisher, from stand-ins"


def _sizes(model: nn.Module, name: str, options: list[Option]) -> dict[str, int]:
    """Each option's stored bytes on layer ``name``."""
    shape = LayerShape.of(model.get_submodule(name))
    return {o.label: method_of(o).cost(shape, o).bytes for o in options}


def _front(
    model: nn.Module, name: str, options: list[Option], estimate: SensitivityTable
) -> list[Option]:
    """The options of a layer no cheaper option of the same method beats on the estimate, and
    those it lacks. Fronts are per method: a weight-space estimate compares the formats of one
    method well, but it misjudges a calibrated method (GPTQ) against an uncalibrated one, since
    the calibrated one moves its larger weight error into directions the inputs do not
    excite."""
    scores = estimate.errors.get(name, {})
    sizes = _sizes(model, name, options)
    kept = {
        o.label
        for method in dict.fromkeys(o.method for o in options)
        for o in front([o for o in options if o.method == method], sizes, scores)
    }
    return [o for o in options if o.label in kept or o.label not in scores]


def _merged(
    measured: dict[str, float], estimated: dict[str, float], options: list[Option]
) -> dict[str, float]:
    """Measured errors, and each method's estimates scaled by that method's median
    measured-to-estimated ratio on the layer (the layer's median where the method has none)."""
    method = {o.label: o.method for o in options}

    def median_ratio(labels: list[str]) -> float | None:
        ratios = [
            measured[label] / estimated[label]
            for label in labels
            if estimated.get(label, 0.0) > 0.0 and measured[label] > 0.0
        ]
        return statistics.median(ratios) if ratios else None

    layer_scale = median_ratio(list(measured)) or 1.0
    scale = {
        name: median_ratio([label for label in measured if method.get(label) == name])
        for name in set(method.values())
    }
    return {
        **{
            label: (scale.get(method.get(label, "")) or layer_scale) * value
            for label, value in estimated.items()
        },
        **measured,
    }


class BlockOutput(SensitivityEstimator):
    """The error at the output of the layer's block: what a model streamed block by block
    can measure (one block in memory at a time), and the same figure in memory."""

    name = "block-output"
    description = (
        "the output error of the layer's block with only that layer compressed (the layer's "
        "own output error outside the blocks); the default block by block"
    )
    streams = True
    steps_per_option = True

    def score(self, model, options, batches, scoring):
        from profilers.execution.checkpoint import CheckpointError
        from profilers.execution.resident import ResidentModel

        try:
            resident = ResidentModel(model)
        except CheckpointError as exc:
            raise AutotuneError(f"sensitivity {self.name!r}: {exc}") from None
        return self.streamed_table(resident, options, batches, scoring.progress)

    def streamed_table(self, streamed, options, batches, progress=None):
        from profilers.execution.stages import profile

        return profile(streamed, options, batches, progress=progress)


for _estimator in (EndToEnd(), Fisher(), LocalError(), Hybrid(), Refined(), BlockOutput()):
    register_estimator(_estimator)
