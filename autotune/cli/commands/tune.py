"""``autotune tune``: find the best plan for a budget on a target."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from autotune.cli.commands.output import emit
from autotune.cli.commands.streaming import streams
from autotune.cli.commands.tune_settings import tune_settings
from autotune.cli.exit_codes import EXIT_BROKEN, EXIT_OK


def cmd_tune(args: argparse.Namespace) -> int:
    """Tune in memory, or block by block when asked or the model is too large."""
    budget, target = _checked_problem(args)
    methods = _words(args.methods)
    labels = _words(args.options)
    args.streamed = streams(args)
    if args.streamed and args.export:
        from autotune.errors import AutotuneError

        raise AutotuneError("--export is not available block by block; run autotune export")
    if args.streamed:
        from autotune.cli.commands.tune_streamed import tune_streamed

        return tune_streamed(args, budget, target, methods, labels)
    return _tune_in_memory(args, budget, target, methods, labels)


def _checked_problem(args: argparse.Namespace) -> tuple[Any, Any]:
    """The budget and target, with runtime, engine and estimator checked before any loading."""
    from autotune.budget import Budget
    from autotune.estimators import get_estimator
    from autotune.runtimes import get_runtime
    from autotune.searching import check_settings
    from autotune.targets import get_target

    budget = Budget.parse(
        args.budget,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        context=args.context,
        kv_dtype=args.kv_dtype,
    )
    target = get_target(args.target, args.target_file)  # fail fast on a bad target
    runtime = get_runtime(args.runtime)
    runtime.check_target(target, args.target)
    if args.relative_to is not None:
        from autotune.reference_file import open_reference

        open_reference(args.relative_to, runtime, budget, args.target)
    if getattr(args, "export", None) and runtime.export_format is None:
        from autotune.runtimes import RUNTIMES, RuntimeChoiceError

        exported = ", ".join(n for n, r in RUNTIMES.items() if r.export_format)
        raise RuntimeChoiceError(
            f"--export writes the --runtime's format and {args.runtime} has none; allowed "
            f"runtimes: {exported}"
        )
    if getattr(args, "export", None):
        from autotune.export import ExportError, get_exporter

        exporter = get_exporter(runtime.export_format)
        if exporter.missing():
            raise ExportError(
                f"--export {args.export} needs {', '.join(exporter.missing())}: pip install "
                f"{exporter.install}"
            )
    check_settings(args.search, args.max_evals, args.timeout, args.storage)
    if args.sensitivity is not None:
        get_estimator(args.sensitivity)  # registered engines and estimators, before any loading
    return budget, target


def _words(text: str | None) -> list[str] | None:
    """A comma-separated list, or None when not given."""
    return [w.strip() for w in text.split(",") if w.strip()] if text else None


def _tune_in_memory(
    args: argparse.Namespace, budget: Any, target: Any, methods: Any, labels: Any
) -> int:
    """Load the whole model, tune it, and write what was asked for."""
    from autotune.loading import load_model
    from autotune.saved import save_compressed
    from autotune.tuner import autotune

    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code)
    settings = tune_settings(args, methods, labels)
    result = autotune(
        loaded.model,
        budget,
        target,
        tokenizer=loaded.tokenizer,
        inplace=False,
        cache=False if args.no_cache else (args.cache_dir or True),
        **settings,
    )
    result.plan.model["source"] = loaded.source
    if args.output:
        result.plan.save(args.output)
    if args.save_model:
        save_compressed(result.model, result.plan, args.save_model, loaded.tokenizer)
    if args.export:
        from autotune.export import get_exporter
        from autotune.runtimes import get_runtime

        fmt = get_runtime(args.runtime).export_format
        assert fmt is not None
        out = Path(args.export)
        written = get_exporter(fmt).write(result.model, result.plan, out, loaded.tokenizer)
        args.exported = written
    text = result.report.layer_table() + "\n\n" + str(result.report) + _next_steps(args)
    emit(args, text, result.plan.to_dict())
    holds = result.report.holds()
    return EXIT_OK if all(holds.values()) else EXIT_BROKEN


def _next_steps(args: argparse.Namespace) -> str:
    """Where the plan and model went, and the commands that go on from them."""
    from autotune.runtimes import get_runtime

    text = ""
    if args.output:
        text += f"\nplan written to {args.output}"
    if args.save_model:
        text += f"\ncompressed model written to {args.save_model} (autotune.load_compressed)"
    elif args.output:
        text += f"\nto save the compressed model: autotune apply {args.output} {args.model} -o DIR"
    written = getattr(args, "exported", None)
    if written is not None:
        text += f"\n{written.format} export written to {written.path} ({written.bytes:,} bytes)"
    elif args.output:
        fmt = get_runtime(args.runtime).export_format
        if fmt is not None:
            text += (
                f"\nfor {args.runtime}: autotune export {args.output} {args.model} "
                f"--format {fmt} -o OUT"
            )
    return text
