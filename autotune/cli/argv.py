"""Reading the command line: values that start with '-', and a budget spread over words."""

from __future__ import annotations

import argparse
import re

from autotune.cli.parser import Parser

# a budget's terms, as ``autotune.budget`` reads them, so that '15 MB' is known for one
_BUDGET_TERM = (
    r"(?:[a-z]+\s*=\s*)?(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:e[+-]?[0-9]+)?\s*"
    r"(?:[kmgt]i?b|b|[uµm]?s|bits?|%)"
)
_BUDGET_TEXT = re.compile(rf"{_BUDGET_TERM}(?:\s*,\s*{_BUDGET_TERM})*", re.IGNORECASE)


def parse(parser: Parser, argv: list[str]) -> argparse.Namespace:
    """The parsed command line; raises :class:`UsageError` on a malformed one."""
    argv = attach_dash_values(parser, argv)
    args, extras = parser.parse_known_args(argv)
    if extras:
        command = parser.commands.get(getattr(args, "command", None) or "", parser)
        command.error(split_budget(argv) or f"unrecognized arguments: {' '.join(extras)}")
    return args


def attach_dash_values(parser: Parser, argv: list[str]) -> list[str]:
    """``--budget -15MB`` as ``--budget=-15MB``: after an option that takes one value, a word
    that starts with '-' but is none of the command's options is that value (argparse would
    take it for an option and say the value is missing)."""
    start = next((i for i, token in enumerate(argv) if not token.startswith("-")), len(argv))
    command = parser.commands.get(argv[start]) if start < len(argv) else None
    if command is None:
        return argv
    out, rest = argv[: start + 1], iter(argv[start + 1 :])
    for token in rest:
        if token == "--":
            return [*out, token, *rest]
        value = next(rest, None) if token in command.valued else None
        if value is None:
            out.append(token)
        elif value.startswith("-") and not command.is_option(value):
            out.append(f"{token}={value}")
        else:
            out.extend([token, value])
    return out


def split_budget(argv: list[str]) -> str | None:
    """The hint for ``--budget 15 MB``: a budget spread over several words."""
    for i, token in enumerate(argv):
        if token == "--budget" and i + 1 < len(argv):
            words, rest = [argv[i + 1]], argv[i + 2 :]
        elif token.startswith("--budget="):
            words, rest = [token.partition("=")[2]], argv[i + 1 :]
        else:
            continue
        for word in rest:
            if not _BUDGET_TEXT.fullmatch(" ".join([*words, word])):
                break
            words.append(word)
        if len(words) > 1:
            return (
                f"a budget is one word: --budget {''.join(words)} "
                f"(or quoted: --budget '{' '.join(words)}')"
            )
    return None
