"""``autotune export``: write a plan's compressed model for another runtime."""

from __future__ import annotations

import argparse

from autotune.cli.commands.output import emit
from autotune.cli.exit_codes import EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """Export the plan's compressed model in ``--format`` to ``--output``."""
    from autotune.export import ExportError, export_plan
    from autotune.loading import load_model
    from autotune.plan import Plan

    if args.imatrix and args.format != "gguf":
        raise ExportError(
            f"--imatrix is llama.cpp's file and goes with --format gguf, not {args.format}"
        )
    plan = Plan.load(args.plan)
    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code)
    result = export_plan(plan, loaded.model, args.format, args.output, tokenizer=loaded.tokenizer)
    compressed = sum(1 for scheme in result.layers.values() if scheme != "float")
    text = (
        f"{args.format}: {result.bytes:,} bytes written to {result.path} ({compressed} of "
        f"{len(result.layers)} layers compressed)"
    )
    data = result.to_dict()
    if args.imatrix:
        from autotune.export.imatrix import write_imatrix

        covered = write_imatrix(loaded.model, plan, args.imatrix, tokenizer=loaded.tokenizer)
        text += f"\nimatrix of {covered} layers written to {args.imatrix}"
        data["imatrix"] = str(args.imatrix)
    emit(args, text, data)
    return EXIT_OK
