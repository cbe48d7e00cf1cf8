"""``autotune tune`` block by block, for a model larger than memory."""

from __future__ import annotations

import argparse
from typing import Any

from autotune.cli.commands.output import emit
from autotune.cli.commands.tune_settings import tune_settings
from autotune.cli.exit_codes import EXIT_BROKEN, EXIT_OK


def tune_streamed(
    args: argparse.Namespace, budget: Any, target: Any, methods: Any, labels: Any
) -> int:
    """Tune block by block, writing the compressed model as it is made."""
    from autotune.streamed import tune_streamed as run

    _check_streamable(args)
    settings = tune_settings(args, methods, labels)
    result = run(args.model, budget, target, save_to=args.save_model, **settings)
    if args.output:
        result.plan.save(args.output)
    text = result.report.layer_table() + "\n\n" + str(result.report)
    text += f"\ncompressed model written to {result.saved}"
    if args.output:
        text += f"\nplan written to {args.output}"
    emit(args, text, result.plan.to_dict())
    return EXIT_OK if all(result.report.holds().values()) else EXIT_BROKEN


def _check_streamable(args: argparse.Namespace) -> None:
    """Refuse a missing --save-model (what else block by block cannot do, the block-by-block
    executor refuses itself)."""
    from autotune.errors import AutotuneError

    if not args.save_model:
        raise AutotuneError(
            "block by block, the compressed model is written as it is made: add --save-model DIR"
        )
