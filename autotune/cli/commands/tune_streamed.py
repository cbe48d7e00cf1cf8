"""``autotune tune`` block by block, for a model larger than memory."""

from __future__ import annotations

import argparse
from typing import Any

from autotune.cli.commands.output import emit
from autotune.cli.exit_codes import EXIT_BROKEN, EXIT_OK


def tune_streamed(
    args: argparse.Namespace, budget: Any, target: Any, methods: Any, labels: Any
) -> int:
    """Tune block by block, writing the compressed model as it is made."""
    from autotune.streamed import tune_streamed as run

    _check_streamable(args)
    result = run(
        args.model,
        budget,
        target,
        save_to=args.save_model,
        calibration=args.calibration,
        heldout=args.heldout,
        seed=args.seed,
        methods=methods,
        option_labels=labels,
        trust_remote_code=args.trust_remote_code,
        progress=not args.quiet,
    )
    if args.output:
        result.plan.save(args.output)
    text = result.report.layer_table() + "\n\n" + str(result.report)
    text += f"\ncompressed model written to {result.saved}"
    if args.output:
        text += f"\nplan written to {args.output}"
    emit(args, text, result.plan.to_dict())
    return EXIT_OK if all(result.report.holds().values()) else EXIT_BROKEN


def _check_streamable(args: argparse.Namespace) -> None:
    """Refuse the options that need the whole model in memory, and a missing --save-model."""
    from autotune.errors import AutotuneError

    unsupported = {
        "--search": args.search not in ("auto", "allocator"),
        "--sensitivity": args.sensitivity != "end-to-end",
        "--prune-ffn/--prune-heads": bool(args.prune_ffn or args.prune_heads),
        "--storage": args.storage is not None,
        "--runtime": args.runtime != "torch",
    }
    refused = [flag for flag, given in unsupported.items() if given]
    if refused:
        raise AutotuneError(
            f"{', '.join(refused)} need the whole model in memory; block by block a tune "
            "scores layers on their block's output and checks the allocator's plan against "
            "every uniform plan"
        )
    if not args.save_model:
        raise AutotuneError(
            "block by block, the compressed model is written as it is made: add --save-model DIR"
        )
