"""``autotune export``: write a plan's compressed model for another runtime."""

from __future__ import annotations

import argparse

from autotune.cli.commands.output import emit
from autotune.cli.exit_codes import EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """Export the plan's compressed model in ``--format`` to ``--output``."""
    from autotune.export import export_plan
    from autotune.loading import load_model

    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code)
    result = export_plan(
        args.plan, loaded.model, args.format, args.output, tokenizer=loaded.tokenizer
    )
    compressed = sum(1 for scheme in result.layers.values() if scheme != "float")
    emit(
        args,
        f"{args.format}: {result.bytes:,} bytes written to {result.path} ({compressed} of "
        f"{len(result.layers)} layers compressed)",
        result.to_dict(),
    )
    return EXIT_OK
