"""A model streamed from its safetensors files one block at a time, never whole in memory.

The model is built with its parameters on the ``meta`` device; every pass over it loads
one block's weights, runs the data through, and frees them (:mod:`profilers.execution.streaming`).
Plans are evaluated side by side in one pass each (:func:`profilers.execution.stages.evaluate`),
against the model as given run in the same pass, so no reference output is kept; calibrated
options observe the calibration batches stage by stage as the pass reaches them. The
compressed model is written shard by shard and measured by reading it back.
"""

from __future__ import annotations

from pathlib import Path

from autotune.errors import AutotuneError
from autotune.executors.base import Executor, Opened, Split, register_executor
from autotune.fingerprint import fingerprint
from autotune.runtimes import get_runtime
from autotune.streamed import Figures, open_streamed, validate_saved, write_streamed
from methods.registry import get_method, method_of
from profilers.execution.observe import plan_needs_statistics
from profilers.execution.stages import Variant, evaluate, stage_of
from profilers.quality import metric_for, select_outputs

WHOLE_MODEL = "need the whole model in memory"


@register_executor
class BlockByBlock(Executor):
    name = "block-by-block"
    description = (
        "streamed from safetensors one block at a time (models larger than memory); the "
        "compressed model is written shard by shard"
    )
    holds_whole_model = False
    default_sensitivity = "block-output"
    # none: a GPTQ sweep costs rows x cols^2 per option, and on the large layers of a model
    # that does not fit in memory that outruns the rest of the tune (ask with --methods)

    def refuse(self, budget, spec, config, methods, estimator):
        if self.save_to is None:
            raise AutotuneError(
                "block by block, the compressed model is written as it is made: give a folder "
                "to write it to (save_to, or --save-model DIR)"
            )
        if spec.name == "local":
            raise AutotuneError(
                "a model tuned block by block is priced on a named target (e.g. cpu, a100): "
                "'local' times the whole model in memory"
            )
        if budget.bounds_decode or budget.context is not None:
            raise AutotuneError(
                "decode and serving-memory budgets need the whole model in memory; tuned "
                "block by block, a budget takes memory, bits, a share of the size and latency"
            )
        refused = sorted(m for m in set(methods) if get_method(m).needs_whole_model)
        if refused:
            raise AutotuneError(
                f"method(s) {', '.join(refused)} need backward passes through the whole model "
                "and cannot be tuned block by block"
            )
        structured = config.search.structured
        if structured and any(structured.values()):
            raise AutotuneError(f"structured pruning (FFN neurons, heads) {WHOLE_MODEL}")
        if get_runtime(config.runtime).export_format is not None:  # priced and checked in it
            raise AutotuneError(
                f"--runtime {config.runtime} {WHOLE_MODEL} (its export is written and checked "
                "from the compressed model); block by block, autotune's own modules: torch"
            )
        if config.inplace:
            raise AutotuneError("block by block, the model on disk is never changed: no inplace")
        refusal = estimator.streaming_refusal()
        if refusal is not None:
            raise AutotuneError(refusal)

    def open(self, model, config, tokenizer):
        if not isinstance(model, (str, Path)):
            raise AutotuneError(
                "block by block, the model is read from a folder of safetensors files (or "
                "demo, tiny-lm), not from an nn.Module in memory"
            )
        self.streamed, loaded = open_streamed(model, config.trust_remote_code)
        skeleton = self.streamed.model
        original_fp = fingerprint(skeleton, self.streamed.state_tensors())
        return Opened(
            skeleton, skeleton, tokenizer or loaded.tokenizer, loaded.source, False, original_fp
        )

    def split(self, name, batches):
        return Split(name, batches, None)  # the reference runs beside every plan

    def metric(self, split):
        """From the outer modules alone: the suffix run on the prefix's output."""
        streamed, batch = self.streamed, split.batches[0]
        hidden = streamed.first_calls([batch])[0].hidden
        return metric_for(select_outputs(streamed.finish([batch], [hidden])[0]))

    def calibrated(self, layers, options, batches):
        """No statistics are kept (each pass observes its stages); the layers outside the
        blocks are offered no calibrated option (a head or pooler may see too few tokens)."""
        self.calibration = batches
        stages = stage_of(self.streamed, list(options))
        inner = range(len(self.streamed.blocks))
        left_out = {}
        for name, opts in options.items():
            if stages[name] in inner:
                continue
            kept = [o for o in opts if not method_of(o).needs_calibration(o)]
            if len(kept) < len(opts):
                left_out[name] = len(opts) - len(kept)
                options[name] = kept
        return {}, left_out

    @property
    def run(self):
        return self.streamed.forward_pass

    def sensitivity(self, estimator, options, batches, observers, cache, progress, decide=None):
        return estimator.streamed_table(self.streamed, options, batches, progress)

    def errors(self, plans, split, metric):
        """Every plan in one pass over ``split`` (after the calibration batches, which its
        calibrated options observe)."""
        calibrated = any(plan_needs_statistics(options) for options in plans.values())
        observe = self.calibration if calibrated and split.name != "calibration" else []
        batches = [*observe, *split.batches]
        parts = ["observed"] * len(observe) + [split.name] * len(split.batches)
        figures = evaluate(
            self.streamed,
            batches,
            {name: Variant(options) for name, options in plans.items()},
            lambda: Figures(batches, parts),
            observe=(observe or split.batches) if calibrated else None,
        )
        return {name: found[split.name] for name, found in figures.items()}

    def apply(self, options):
        self.options = dict(options)  # written block by block by write()

    def write(self, plan, tokenizer, calibration):
        assert self.save_to is not None
        batches = calibration if plan_needs_statistics(self.options) else []
        return write_streamed(self.streamed, self.options, plan, self.save_to, batches, tokenizer)

    def measure(self, setup, data, priced, scored, plan):
        assert self.save_to is not None
        return validate_saved(
            self.streamed, self.save_to, data.heldout.batches, scored.table.metric
        )
