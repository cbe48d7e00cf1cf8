"""``main``: parse the command line, run the command, turn failures into exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from autotune.cli.arguments import build_parser
from autotune.cli.argv import parse
from autotune.cli.commands import COMMANDS
from autotune.cli.exit_codes import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK
from autotune.cli.interrupt import interrupted
from autotune.cli.parser import UsageError


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``autotune`` on ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parse(parser, list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    except SystemExit as exc:  # --help and --version, after printing
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"autotune: {interrupted(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    """Run the command; bad input found on the way is one line on stderr and exit 2."""
    from autotune.errors import AutotuneError
    from methods.errors import OptionError

    try:
        return COMMANDS[args.command](args)
    except (AutotuneError, OptionError) as exc:
        print(f"autotune: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
