"""Budget text: the units, the term pattern and the reading of comma-separated terms.

This module turns budget text such as ``"8GB,decode=5ms"`` into the constraint fields it
sets (exactly, in decimal arithmetic, after bounding the text's length and each number's
exponent), and writes figures back as the shortest text that reads back the same. It knows
nothing of the :class:`autotune.budget.Budget` those fields build, nor of their bounds.
"""

from __future__ import annotations

import re
from decimal import Context, Decimal, InvalidOperation, localcontext
from typing import Any

from autotune.errors import BudgetError

_MEMORY_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_LATENCY_UNITS = {
    "us": Decimal("0.001"),
    "µs": Decimal("0.001"),
    "ms": Decimal(1),
    "s": Decimal(1000),
}
MAX_SPEC_CHARS = 200
_MAX_EXPONENT = 30  # a number in budget text beyond 1e30 (or below 1e-30) is refused as is
# exact decimal arithmetic for every number that fits in MAX_SPEC_CHARS characters
EXACT = Context(prec=2 * MAX_SPEC_CHARS, Emax=10 * MAX_SPEC_CHARS, Emin=-10 * MAX_SPEC_CHARS)
# one term: an optional phase, a number, a unit; every character has one way to match
_TERM = re.compile(
    r"(?:([a-z]+)\s*=\s*)?([0-9]+(?:\.[0-9]+)?|\.[0-9]+)(e[+-]?[0-9]+)?\s*([a-zµ%]+)",
    re.IGNORECASE,
)
_PHASES = {"prefill": "latency_ms", "decode": "decode_ms"}
# a latency term in ``x``: a multiple of the original model's latency on the target
RATIOS = {"latency_ms": "latency_ratio", "decode_ms": "decode_ratio"}
SYNTAX = (
    "each term is a number with a unit: memory (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), "
    "latency (us, ms, s; 'prefill=20ms', or 'decode=5ms' per generated token; or a multiple of "
    "the original model's, '0.7x', 'decode=0.5x'), average bits ('4.5bits') or a share of the "
    "original size ('25%'); join terms with commas, e.g. '8GB,20ms' or '4GB,decode=0.8x'"
)


def number_text(value: float) -> str:
    """The shortest text that reads back as exactly ``value`` (``20``, ``0.8``, ``1e-05``)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def format_bytes(n: int) -> str:
    """Shortest exact text for ``n`` bytes: ``15MB``, ``8GiB``, ``15.5MB`` or ``123B``."""
    levels = (("TiB", "TB"), ("GiB", "GB"), ("MiB", "MB"), ("KiB", "KB"))
    for binary, decimal in levels:
        for unit in (binary, decimal):
            size = _MEMORY_UNITS[unit.lower()]
            if n >= size and n % size == 0:
                return f"{n // size}{unit}"
        size = _MEMORY_UNITS[decimal.lower()]
        value = Decimal(n) / size
        if n >= size and value == value.quantize(Decimal("0.000001")):
            return f"{value.normalize():f}{decimal}"
    return f"{n}B"


def _number(text: str, term: str) -> Decimal:
    """The exact value of a number in budget text, refused beyond 1e30 or below 1e-30."""
    try:
        exact = Decimal(text)
    except InvalidOperation:
        raise BudgetError(f"malformed budget term {term!r}: {SYNTAX}") from None
    if exact.is_zero():
        return Decimal(0)
    if not -_MAX_EXPONENT <= exact.adjusted() <= _MAX_EXPONENT:
        raise BudgetError(
            f"the number in budget term {term!r} is out of range (1e-{_MAX_EXPONENT} to "
            f"1e{_MAX_EXPONENT}); {SYNTAX}"
        )
    return exact


def _term(term: str) -> tuple[str, int | float]:
    """The field one budget term sets, and its value."""
    match = _TERM.fullmatch(term)
    if not match:
        raise BudgetError(f"malformed budget term {term!r}: {SYNTAX}")
    phase, digits, exponent, unit = match.groups()
    exact, lowered = _number(digits + (exponent or ""), term), unit.lower()
    timed = lowered in _LATENCY_UNITS or lowered == "x"
    if phase is not None and (phase.lower() not in _PHASES or not timed):
        raise BudgetError(
            f"malformed budget term {term!r}: only latency terms take a phase "
            f"({', '.join(p + '=' for p in _PHASES)}); {SYNTAX}"
        )
    with localcontext(EXACT):
        if lowered in _MEMORY_UNITS:
            total = exact * _MEMORY_UNITS[lowered]
            if total != total.to_integral_value():
                raise BudgetError(f"budget term {term!r} is not a whole number of bytes")
            return "memory_bytes", int(total)
        if lowered in _LATENCY_UNITS:
            name = _PHASES[phase.lower()] if phase is not None else "latency_ms"
            return name, float(exact * _LATENCY_UNITS[lowered])
        if lowered == "x":
            name = _PHASES[phase.lower()] if phase is not None else "latency_ms"
            return RATIOS[name], float(exact)
        if lowered in ("bits", "bit"):
            return "avg_bits", float(exact)
        if unit == "%":
            return "size_ratio", float(exact / 100)
    raise BudgetError(f"unknown unit {unit!r} in budget term {term!r}: {SYNTAX}")


def parse_terms(text: str) -> dict[str, Any]:
    """The fields a budget text sets; its length is bounded before anything else."""
    if len(text) > MAX_SPEC_CHARS:
        raise BudgetError(
            f"a budget text is at most {MAX_SPEC_CHARS} characters, this one has "
            f"{len(text):,}; {SYNTAX}"
        )
    terms = text.split(",")
    if not text.strip() or any(not t.strip() for t in terms):
        raise BudgetError(f"malformed budget {text!r}: {SYNTAX}")
    values: dict[str, Any] = {}
    for term in terms:
        name, value = _term(term.strip())
        if name in values:
            what = {
                "latency_ms": "latency (prefill)",
                "decode_ms": "decode latency",
                "latency_ratio": "latency (prefill) relative to the original",
                "decode_ratio": "decode latency relative to the original",
            }.get(name, name.split("_")[0])
            raise BudgetError(f"budget {text!r} constrains {what} twice")
        values[name] = value
    return values
