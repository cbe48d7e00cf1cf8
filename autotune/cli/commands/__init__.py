"""The commands, by name: each takes the parsed command line and returns the exit code."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from autotune.cli.commands.apply import cmd_apply
from autotune.cli.commands.diff import cmd_diff
from autotune.cli.commands.export import cmd_export
from autotune.cli.commands.profile import cmd_profile
from autotune.cli.commands.report import cmd_report
from autotune.cli.commands.targets import cmd_targets
from autotune.cli.commands.tune import cmd_tune
from autotune.cli.commands.validate import cmd_validate

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "tune": cmd_tune,
    "validate": cmd_validate,
    "apply": cmd_apply,
    "profile": cmd_profile,
    "report": cmd_report,
    "diff": cmd_diff,
    "targets": cmd_targets,
    "export": cmd_export,
}
