"""``autotune diff``: compare two plans."""

from __future__ import annotations

import argparse

from autotune.cli.commands.output import emit
from autotune.cli.exit_codes import EXIT_BROKEN, EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    """Exit 0 when both plans choose the same layer options, 1 when they differ."""
    from autotune.diff import diff_plans
    from autotune.plan import Plan

    result = diff_plans(Plan.load(args.a), Plan.load(args.b))
    emit(args, str(result), result.to_dict())
    return EXIT_OK if result.identical else EXIT_BROKEN
