"""The ``autotune`` argument parser, with one subcommand parser per command."""

from __future__ import annotations

from autotune import __version__
from autotune.cli.arguments.inspecting import add_diff, add_report, add_targets
from autotune.cli.arguments.planned import add_apply, add_export, add_validate
from autotune.cli.arguments.profile import add_profile
from autotune.cli.arguments.tune import add_tune
from autotune.cli.parser import Parser


def build_parser() -> Parser:
    """The ``autotune`` parser; its ``commands`` holds the subcommand parsers by name."""
    parser = Parser(
        prog="autotune",
        description="Hardware-aware per-layer compression plans for PyTorch / Hugging Face models.",
        epilog="exit codes: 0 ok, 1 budget or tolerance broken, 2 bad input, 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"autotune {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )
    for add in (
        add_tune,
        add_validate,
        add_apply,
        add_export,
        add_profile,
        add_report,
        add_diff,
        add_targets,
    ):
        add(sub)
    parser.commands = dict(sub.choices)
    return parser
