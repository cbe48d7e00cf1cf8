"""``autotune validate``: re-check a plan against a model."""

from __future__ import annotations

import argparse

from autotune.cli.commands.output import emit
from autotune.cli.commands.streaming import streams
from autotune.cli.exit_codes import EXIT_BROKEN, EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    """Exit 0 when the plan holds on the model, 1 when a budget or tolerance is broken."""
    from autotune.plan import Plan
    from autotune.validate import validate_plan

    plan = Plan.load(args.plan)
    if args.tolerance < 0:
        from autotune.errors import AutotuneError

        raise AutotuneError(f"--tolerance must be at least 0, got {args.tolerance}")
    if streams(args):
        from autotune.streamed import validate_streamed

        if args.relative_to is not None:
            from autotune.errors import AutotuneError

            raise AutotuneError(
                "--relative-to times the whole plan beside the file; block by block the plan "
                "is not timed: leave out --low-memory"
            )

        result = validate_streamed(
            plan,
            args.model,
            compressed=args.compressed,
            heldout=args.heldout,
            tolerance=args.tolerance,
            trust_remote_code=args.trust_remote_code,
        )
        emit(args, str(result), result.to_dict())
        return EXIT_OK if result.ok else EXIT_BROKEN
    result = validate_plan(
        plan,
        args.model,
        heldout=args.heldout,
        tolerance=args.tolerance,
        measure_latency=not args.no_latency,
        trust_remote_code=args.trust_remote_code,
        compressed=args.compressed,
        relative_to=args.relative_to,
    )
    emit(args, str(result), result.to_dict())
    return EXIT_OK if result.ok else EXIT_BROKEN
