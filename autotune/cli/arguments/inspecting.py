"""The options of the commands that load no model: report, diff, targets."""

from __future__ import annotations

from typing import Any

from autotune.cli.arguments.shared import PLAN_HELP, TARGET_FILE_HELP


def add_report(sub: Any) -> None:
    """Add ``report``: a plan's report."""
    report = sub.add_parser(
        "report", help="a plan's report: text, or HTML and Markdown with figures"
    )
    report.add_argument("plan", help=PLAN_HELP)
    report.add_argument("-o", "--output", help="write OUTPUT.html, OUTPUT.md and OUTPUT_files/")
    report.add_argument("--json", action="store_true", help="machine-readable output")


def add_diff(sub: Any) -> None:
    """Add ``diff``: compare two plans."""
    diff = sub.add_parser("diff", help="compare two plans (exit 0 same options, 1 different)")
    diff.add_argument("a", help="first plan JSON file")
    diff.add_argument("b", help="second plan JSON file")
    diff.add_argument("--json", action="store_true", help="machine-readable output")


def add_targets(sub: Any) -> None:
    """Add ``targets``: list the hardware registry."""
    targets = sub.add_parser("targets", help="list the hardware registry, aliases included")
    targets.add_argument("--target-file", action="append", default=[], help=TARGET_FILE_HELP)
    targets.add_argument("--json", action="store_true", help="machine-readable output")
