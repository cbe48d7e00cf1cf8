"""``autotune validate``: re-check a plan against a model."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from autotune.cli.commands.output import emit
from autotune.cli.commands.streaming import streams
from autotune.cli.exit_codes import EXIT_BROKEN, EXIT_OK

if TYPE_CHECKING:
    from autotune.plan import Plan


def cmd_validate(args: argparse.Namespace) -> int:
    """Exit 0 when the plan holds on the model, 1 when a budget or tolerance is broken."""
    from autotune.plan import Plan
    from autotune.validate import validate_plan

    plan = Plan.load(args.plan)
    if args.runtime is not None:
        _check_runtime(plan, args.runtime)
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


def _check_runtime(plan: Plan, name: str) -> None:
    """Refuse a ``--runtime`` that is not the one the plan was tuned for."""
    from autotune.errors import PlanError
    from autotune.runtimes import get_runtime

    get_runtime(name)  # an unknown name is refused with the allowed ones
    tuned_for = plan.target.get("runtime") or "torch"
    if name != tuned_for:
        raise PlanError(
            f"the plan was tuned for runtime {tuned_for}, not {name}: validate checks it where "
            "it was tuned (leave out --runtime)"
        )
