"""The whole model in memory: a working copy (or the model itself, tuned in place) that
every stage runs directly; plans are evaluated with their converted modules swapped in."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from autotune.agreement import agreements
from autotune.apply import compress
from autotune.candidates import ModuleCache, evaluate, swapped
from autotune.costs import drop_undercalibrated
from autotune.executors.base import Executor, Opened, Split, register_executor
from autotune.fingerprint import fingerprint
from autotune.latency_models import measuring_model
from autotune.loading import load_model
from autotune.measured_figures import measure_model
from profilers.converted import default_cap
from profilers.execution.observe import collect_observers
from profilers.quality import metric_for, run_outputs


@register_executor
class InMemory(Executor):
    name = "in-memory"
    description = "the whole model in memory (a working copy unless tuned in place)"
    holds_whole_model = True
    default_sensitivity = "refined"
    # GPTQ beats RTN at equal bytes (the README's methods table); its options of a layer
    # share one Hessian factor and one sweep, so they cost little beside their scoring
    default_calibrated_methods = ("gptq",)

    def open(self, model, config, tokenizer):
        source, inplace = "nn.Module", config.inplace
        if isinstance(model, (str, Path)):
            loaded = load_model(model, trust_remote_code=config.trust_remote_code)
            model, tokenizer, source, inplace = (
                loaded.model,
                tokenizer or loaded.tokenizer,
                loaded.source,
                True,
            )
        model.eval()
        original_fp = fingerprint(model)
        self.work = model if inplace else copy.deepcopy(model)
        self.modules: ModuleCache | None = None
        return Opened(model, self.work, tokenizer, source, inplace, original_fp)

    def split(self, name, batches):
        return Split(name, batches, run_outputs(self.work, batches))

    def metric(self, split):
        assert split.reference is not None
        return metric_for(split.reference[0])

    def calibrated(self, layers, options, batches):
        observers = collect_observers(self.work, options, batches)
        left_out = drop_undercalibrated(layers, options, observers)
        self.modules = ModuleCache(self.work, cap_bytes=default_cap(self.work), observers=observers)
        return observers, left_out

    def agreement(self, layers, options, observers, selection):
        keep = self.modules.converted if self.modules is not None else None
        return agreements(self.work, layers, options, observers, selection, keep)

    def sensitivity(self, estimator, options, batches, observers, cache, progress, decide=None):
        return estimator.table(
            self.work,
            options,
            batches,
            observers=observers,
            cache=cache,
            progress=progress,
            decide=decide,
            converted=self.modules.converted if self.modules is not None else None,
        )

    def errors(self, plans, split, metric):
        assert split.reference is not None and self.modules is not None
        return {
            name: evaluate(self.work, options, split.batches, split.reference, metric, self.modules)
            for name, options in plans.items()
        }

    @contextmanager
    def swapped(self, options):
        assert self.modules is not None
        with swapped(self.work, options, self.modules):
            yield self.work

    def apply(self, options):
        modules = self.modules
        prebuilt = None
        if modules is not None:
            prebuilt = {
                n: modules.get(n, o, self.work.get_submodule(n)) for n, o in options.items()
            }
        compress(self.work, options, prebuilt=prebuilt)
        self._release()

    def write(self, plan, tokenizer, calibration):
        if self.save_to is None:
            return None
        from autotune.saved import save_compressed

        save_compressed(self.work, plan, self.save_to, tokenizer)
        return self.save_to

    def _release(self) -> None:
        """Free the converted modules kept for the search."""
        if self.modules is not None:
            self.modules.converted.clear()

    def measure(self, setup, data, priced, scored, plan):
        """Bytes, latency beside the original (where the plan's runtime runs it, when its
        latency model times there), the runtime's export checked, and held-out error."""
        budget, metric, work = setup.budget, scored.table.metric, self.work
        baseline = None if setup.inplace else setup.original
        limits = {p: budget.timing_limit(p, baseline is not None) for p in ("latency", "decode")}
        # the reference file a budget's multiples are of, timed beside the plan instead
        beside: dict[str, Any] = {phase: baseline for phase in limits}
        if setup.reference is not None:  # every phase the runtime times it in
            for phase in setup.runtime.reference_phases:
                beside[phase] = setup.reference.path
                limits[phase] = budget.timing_limit(phase, True)
        latency_model = measuring_model(setup.spec)
        elsewhere = latency_model.measure(
            work, plan, beside["latency"], priced.latency_inputs, limits["latency"]
        )
        measured = measure_model(
            work,
            total_weights=priced.costs.total_weights,
            latency_inputs=priced.latency_inputs,
            decode_inputs=priced.decode,
            heldout=(data.heldout.batches, data.heldout.reference),
            metric=metric,
            baseline=baseline,
            limits=limits if elsewhere is None else None,  # else timed where it runs
        )
        if elsewhere is not None:  # timed where the plan will run, not in autotune's modules
            measured.latency = elsewhere["model"]
            measured.baseline_latency = elsewhere.get("baseline")
            if priced.decode is not None and latency_model.measures_decode:
                decode = latency_model.measure(
                    work, plan, beside["decode"], priced.decode, limits["decode"]
                )
                measured.decode, measured.baseline_decode = decode["model"], decode.get("baseline")
        figures: dict[str, Any] = measured.to_dict([budget.batch_size, budget.seq_len], metric)
        runtime = setup.runtime
        exported = runtime.stored_bytes(work, plan, tokenizer=setup.tokenizer)
        if exported is not None:  # counted in the runtime's export, as the budget counts them
            figures.update(exported, bytes_counted_in=runtime.export_format)
        if elsewhere is not None:
            figures["timed_in"] = latency_model.name
        if setup.reference is not None and "baseline" in figures:
            figures["baseline"]["reference_file"] = setup.reference.to_dict()
            figures["baseline"]["timed"] = (
                "the reference file (--relative-to), interleaved with the compressed model"
            )
        in_runtime = runtime.measure_export(
            work,
            plan,
            setup.tokenizer,
            data.heldout.batches,
            data.heldout.reference,
            metric,
            original=baseline,
        )
        if in_runtime is not None:
            figures["in_runtime"] = in_runtime
        if priced.baseline is not None and priced.baseline.latency is not None:
            figures["baseline"] = {
                **priced.baseline.latency_figures(),
                "timed": "before tuning (the model was tuned in place)",
            }
        return figures
