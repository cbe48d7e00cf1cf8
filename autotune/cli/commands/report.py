"""``autotune report``: a plan's report, as text or as HTML and Markdown files."""

from __future__ import annotations

import argparse

from autotune.cli.commands.output import emit
from autotune.cli.exit_codes import EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    """Print the plan's report, or write it to ``--output`` with figures."""
    from autotune.plan import Plan
    from autotune.render import write_report
    from autotune.report import Report

    plan = Plan.load(args.plan)
    report = Report(plan)
    if args.output:
        written = write_report(plan, args.output)
        emit(args, "\n".join(f"wrote {p}" for p in written), [str(p) for p in written])
    else:
        emit(args, report.layer_table() + "\n\n" + str(report), report.to_dict())
    return EXIT_OK
