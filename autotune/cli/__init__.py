"""The ``autotune`` command line.

Exit codes: 0 success (``validate``: the plan holds; ``diff``: same layer options); 1 a budget
or tolerance is broken (``diff``: the plans differ); 2 bad input (a malformed command line,
unknown target, malformed budget or plan, missing model, ...), told in one line on stderr
with nothing written; 130 interrupted (``tune`` and ``profile`` keep the sensitivity
measurements they finished, so running the same command again resumes from them).

Heavy modules (torch, transformers, the tuner) are imported inside the commands, so that
``autotune --help`` stays fast.
"""

from __future__ import annotations

from autotune.cli.arguments import build_parser
from autotune.cli.commands import COMMANDS
from autotune.cli.entry import main
from autotune.cli.exit_codes import EXIT_BAD_INPUT, EXIT_BROKEN, EXIT_INTERRUPTED, EXIT_OK
from autotune.cli.parser import UsageError

__all__ = [
    "COMMANDS",
    "EXIT_BAD_INPUT",
    "EXIT_BROKEN",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "UsageError",
    "build_parser",
    "main",
]
