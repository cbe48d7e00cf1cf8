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
        measure=not args.no_measure,
        sensitivity=args.sensitivity,
        search=args.search,
        max_evals=args.max_evals,
        timeout=args.timeout,
        storage=args.storage,
        study_name=args.study,
        structured={"ffn": args.prune_ffn, "heads": args.prune_heads},
        runtime=args.runtime,
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
    """Refuse a missing --save-model (what else block by block cannot do, the block-by-block
    executor refuses itself)."""
    from autotune.errors import AutotuneError

    if not args.save_model:
        raise AutotuneError(
            "block by block, the compressed model is written as it is made: add --save-model DIR"
        )
