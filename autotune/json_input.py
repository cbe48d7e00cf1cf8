"""Reading JSON that a user hands in: plans, target files, safetensors headers and indexes.

Every reader goes through :func:`parse_json` or :func:`read_json`, which bound what the
standard library leaves open: the size of the text, its nesting depth (checked by a scan
without recursion before ``json.loads`` runs, so a file nested 100,000 deep is one clear
error, not a ``RecursionError``), the length of integers (Python refuses to convert more
than 4,300 digits, and converting fewer takes quadratic time), and numbers that are not
finite (``NaN``, ``Infinity`` and ``1e400`` are not JSON values autotune writes). Text must
be UTF-8 (a byte-order mark is allowed). Each problem is one line raised as the caller's
own error class.

:func:`check_json_value` makes the same promises for data that arrives as Python objects
(``Plan.from_dict``), walking it without recursion.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import jsonschema

from autotune.errors import AutotuneError

MAX_BYTES = 64 * 2**20  # the largest JSON file read (a plan of a large model is a few MB)
MAX_DEPTH = 64  # the deepest nesting of arrays and objects (plans use 6)
MAX_INT_DIGITS = 30  # longer integers are refused (the largest figure autotune writes has 16)

# a string (escapes included; an unterminated one runs to the end) or a bracket: each
# character has one way to match, so the scan is linear
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)


def _nesting_depth(text: str, limit: int) -> int:
    """The deepest nesting of ``text``'s arrays and objects, ignoring brackets in strings;
    stops counting once ``limit`` is passed."""
    if text.count("[") + text.count("{") <= limit:
        return 0  # too few brackets to nest deeper
    depth = deepest = 0
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif token in "]}":
            depth -= 1
    return deepest


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {_clip(text)} is out of range (at most about 1.8e308)")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(
            f"an integer of {len(text.lstrip('-'))} digits is out of range "
            f"(at most {MAX_INT_DIGITS} digits)"
        )
    return int(text)


def _clip(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def short_repr(value: Any, width: int = 40) -> str:
    """``repr(value)`` cut to ``width`` characters, also for integers too long to print."""
    try:
        text = repr(value)
    except ValueError:  # an integer beyond Python's limit on digits converted to text
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    return _clip(text, width)


def parse_json(
    text: str | bytes,
    origin: str,
    error: type[AutotuneError],
    *,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    finite: bool = True,
) -> Any:
    """The JSON value of ``text`` (UTF-8 bytes or a string), or ``error`` naming ``origin``
    and what is wrong: too large, not UTF-8, nested too deep, not JSON, or a number out of
    range. ``finite=False`` lets ``NaN``, ``Infinity`` and ``1e400`` through as floats (for
    files other tools write, such as a model's config)."""
    if len(text) > max_bytes:
        raise error(f"{origin} is {len(text):,} bytes long; at most {max_bytes:,} are read")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise error(
                f"{origin} is not UTF-8 text (byte {exc.start} is {text[exc.start]:#04x})"
            ) from None
    else:
        text = text.removeprefix("\ufeff")
    if _nesting_depth(text, max_depth) > max_depth:
        raise error(f"{origin} nests arrays and objects more than {max_depth} deep")
    try:
        if not finite:
            return json.loads(text, parse_int=_bounded_int)
        return json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except json.JSONDecodeError as exc:
        raise error(
            f"{origin} is not valid JSON ({exc.msg}: line {exc.lineno}, column {exc.colno}); "
            "is it truncated?"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise error(f"{origin} is not usable JSON: {exc}") from None


def read_json(
    path: str | os.PathLike[str],
    error: type[AutotuneError],
    *,
    what: str = "file",
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    finite: bool = True,
) -> Any:
    """The JSON value of the file at ``path`` (see :func:`parse_json`); ``what`` names the
    kind of file in the errors (``"plan file"``)."""
    file = Path(path)
    if not file.is_file():
        raise error(f"{what} {str(file)!r} does not exist")
    try:
        size = file.stat().st_size
        if size > max_bytes:
            raise error(f"{file} is {size:,} bytes long; at most {max_bytes:,} are read")
        with open(file, "rb") as handle:  # no larger buffer than the file needs
            data = handle.read(min(size, max_bytes) + 1)
    except OSError as exc:
        raise error(f"cannot read {what} {file}: {exc.strerror or exc}") from None
    return parse_json(
        data, str(file), error, max_bytes=max_bytes, max_depth=max_depth, finite=finite
    )


_PLAIN = re.compile(r"[\w.:@+-]*")


def _describe(path: list[Any]) -> str:
    """A path into a JSON value as ``layers/pooler.dense/bits``; keys that are not plain
    text are quoted, so that the path stays on one line."""
    parts = [str(p) if _PLAIN.fullmatch(str(p)) else short_repr(p) for p in path]
    return "/".join(parts) or "top level"


def check_json_value(
    value: Any,
    origin: str,
    error: type[AutotuneError],
    *,
    max_depth: int = MAX_DEPTH,
) -> None:
    """Refuse ``value`` unless it is what :func:`parse_json` could return: ``None``,
    booleans, integers of at most ``MAX_INT_DIGITS`` digits, finite floats, strings, lists
    and string-keyed dicts of those, nested at most ``max_depth`` deep. Walks iteratively."""
    stack: list[tuple[Any, list[Any]]] = [(value, [])]
    while stack:
        item, where = stack.pop()
        if len(where) > max_depth:
            raise error(f"{origin} nests arrays and objects more than {max_depth} deep")
        if item is None or isinstance(item, (bool, str)):
            continue
        if isinstance(item, int):
            if abs(item) >= 10**MAX_INT_DIGITS:
                raise error(f"{origin}: {_describe(where)}: integer out of range")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise error(f"{origin}: {_describe(where)}: {item} is not a finite number")
        elif isinstance(item, list):
            stack.extend((v, [*where, i]) for i, v in enumerate(item))
        elif isinstance(item, dict):
            for key, v in item.items():
                if not isinstance(key, str):
                    raise error(
                        f"{origin}: {_describe(where)}: key {short_repr(key)} is not a string"
                    )
                stack.append((v, [*where, key]))
        else:
            raise error(
                f"{origin}: {_describe(where)}: a {type(item).__name__} is not a JSON value; "
                "allowed: null, true/false, numbers, strings, arrays and objects"
            )


def _strict_types() -> jsonschema.TypeChecker:
    """JSON Schema types where ``integer`` means an int, not a float like ``4.0``."""
    base = jsonschema.Draft202012Validator.TYPE_CHECKER
    return base.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    )


StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, type_checker=_strict_types()
)


def check_schema(
    data: Any,
    schema: dict[str, Any] | Any,
    origin: str,
    error: type[AutotuneError],
    what: str = "",
) -> None:
    """Refuse ``data`` unless it fits ``schema`` (a schema dict, or a :data:`StrictValidator`
    made once for it; draft 2020-12, integers strict), naming the place that does not fit."""
    validator = StrictValidator(schema) if isinstance(schema, dict) else schema
    problem = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if problem is None:
        return
    message = _clip(problem.message.replace("\n", "\\n"), 200)
    intro = f"{origin} does not fit the {what} at" if what else f"{origin}:"
    raise error(f"{intro} {_describe(list(problem.absolute_path))}: {message}")
