"""Type checks of option fields read from JSON, and the short reprs their errors quote.

An option is a frozen dataclass whose fields are declared ``int``, ``bool``, ``float``,
``str``, a ``Literal`` or a union of these with ``None``. This module checks each value read
from JSON against its field's declared type (``int`` refuses bools and ``4.0``, ``float``
refuses NaN and inf and takes integers as floats), and words what a field allows when a
value is refused. Ranges are no concern of it: each method's ``check`` judges those.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Literal

from methods.errors import OptionError

if TYPE_CHECKING:
    from methods.base import Option


def short_repr(value: Any, width: int = 60) -> str:
    """``repr(value)`` cut to ``width`` characters, also for integers too long to print."""
    try:
        text = repr(value)
    except ValueError:  # an integer beyond Python's limit on digits converted to text
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    return text if len(text) <= width else text[: width - 3] + "..."


def checked_fields(cls: type[Option], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as the keyword arguments of ``cls``, each value of its field's declared type
    (integers given for a ``float`` field made floats); else :class:`OptionError`."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known, key=repr)
    if unknown:
        raise OptionError(
            f"unknown field(s) {short_repr(unknown)} for method {cls.method!r}; "
            f"allowed: {sorted(known)}"
        )
    hints = _field_types(cls)
    values = {}
    for name, value in data.items():
        if not _fits(value, hints[name]):
            raise OptionError(
                f"{cls.method} option field {name!r} must be {_type_text(hints[name])}, "
                f"got {short_repr(value)}"
            )
        values[name] = float(value) if _wants_float(value, hints[name]) else value
    return values


@functools.cache
def _field_types(cls: type[Option]) -> dict[str, Any]:
    """The declared type of each dataclass field of an option class."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in fields(cls)}


def _members(kind: Any) -> tuple[Any, ...]:
    """The members of a union (``int | None``), or the type alone."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return typing.get_args(kind)
    return (kind,)


def _fits(value: Any, kind: Any) -> bool:
    """Whether a JSON value has the declared field type ``kind``."""
    for member in _members(kind):
        if member is Any:
            return True
        if member is type(None) and value is None:
            return True
        if member is bool and isinstance(value, bool):
            return True
        if member is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if member is float and _is_number(value):
            return True
        if member is str and isinstance(value, str):
            return True
        if typing.get_origin(member) is Literal and value in typing.get_args(member):
            return True
    return False


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _wants_float(value: Any, kind: Any) -> bool:
    """An integer given for a field declared ``float`` (and not also ``int``)."""
    members = _members(kind)
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and float in members
        and (int not in members)
    )


def _type_text(kind: Any) -> str:
    names = {
        bool: "true or false",
        int: "an integer",
        float: "a finite number",
        str: "a string",
        type(None): "null",
    }
    parts = []
    for member in _members(kind):
        if typing.get_origin(member) is Literal:
            parts.append("one of " + ", ".join(repr(v) for v in typing.get_args(member)))
        else:
            parts.append(names.get(member, getattr(member, "__name__", str(member))))
    return " or ".join(parts)
