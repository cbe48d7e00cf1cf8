"""An argument parser whose errors are one line, and its help formatter."""

from __future__ import annotations

import argparse
import re
from typing import Any, NoReturn

_CHOOSE_FROM = re.compile(r"\(choose from (.*)\)$")


class UsageError(Exception):
    """A malformed command line, told in one line that names the command."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{prog}: error: {message}; run '{prog} --help' for usage")


class HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default after its help, unless there is none or the help tells it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default == []
        ):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors raise :class:`UsageError` (one line) instead of
    printing the usage and exiting, and which knows its options that take one value."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.options: set[str] = set()  # every option string
        self.valued: set[str] = set()  # option strings that take exactly one value
        self.commands: dict[str, Parser] = {}  # subcommand parsers, by name
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.options.update(action.option_strings)
        if action.option_strings and action.nargs is None:
            self.valued.update(action.option_strings)
        return action

    def error(self, message: str) -> NoReturn:
        match = _CHOOSE_FROM.search(message)
        if match:
            allowed = ", ".join(c.strip().strip("'\"") for c in match.group(1).split(","))
            message = f"{message[: match.start()]}(allowed: {allowed})"
        elif self.commands and message.endswith("COMMAND"):
            message += f" (allowed: {', '.join(self.commands)})"
        raise UsageError(self.prog, message)

    def is_option(self, token: str) -> bool:
        """Whether ``token`` names one of this parser's options (or abbreviates one)."""
        if token == "--" or token.split("=", 1)[0] in self.options:
            return True
        if token.startswith("--"):
            stem = token.split("=", 1)[0]
            return any(option.startswith(stem) for option in self.options)
        return token[:2] in self.options
