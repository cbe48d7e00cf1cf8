"""The registry of compression methods: one registration per method, nothing central."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import nn

from methods.base import Method, Observer, Option
from methods.errors import OptionError
from methods.option_fields import short_repr

_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Register a method instance under ``method.name`` (re-registration replaces it)."""
    if not method.name:
        raise ValueError("a method needs a non-empty name")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise OptionError(
            f"unknown method {short_repr(name, 80)}; registered: {sorted(_METHODS)}"
        ) from None


def registered_methods() -> dict[str, Method]:
    return dict(_METHODS)


def method_of(option: Option) -> Method:
    return get_method(option.method)


def option_from_dict(data: Any) -> Option:
    """Build an option from its JSON form, e.g. ``{"method": "rtn", "bits": 4, ...}``; each
    field is checked against its declared type (:meth:`Option.from_fields`)."""
    if not isinstance(data, dict) or "method" not in data:
        raise OptionError(
            f"an option must be an object with a 'method' field, got {short_repr(data, 80)}"
        )
    fields = dict(data)
    name = fields.pop("method")
    if not isinstance(name, str):
        raise OptionError(f"an option's method must be a string, got {short_repr(name, 80)}")
    method = get_method(name)
    try:
        return method.option_type.from_fields(fields)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, OptionError):
            raise
        raise OptionError(f"bad option {short_repr(data, 80)}: {exc}") from None


def convert_each(
    module: nn.Module,
    options: Sequence[Option],
    observer_of: Callable[[Option], Observer | None],
) -> Iterator[tuple[Option, nn.Module | OptionError]]:
    """Every option's converted ``module`` (or the :class:`OptionError` that refused it), each
    method's options handed to its :meth:`Method.convert_many` together so that work they
    share on the layer is done once; methods in order of first appearance."""
    by_method: dict[str, list[Option]] = {}
    for option in options:
        by_method.setdefault(option.method, []).append(option)
    for name, group in by_method.items():
        yield from get_method(name).convert_many(module, group, observer_of)
