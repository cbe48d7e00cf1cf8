"""Budgets: what the compressed model must meet, parsed from text, a dict or keywords.

Text is one or more comma-separated terms, all of which must hold:

* memory: ``15MB``, ``8GB`` (powers of 1000), ``8GiB`` (powers of 1024), ``123456B``
* latency of one forward pass at the budget's input shape on the target: ``20ms``, ``1.5s``,
  ``800us``; for a causal LM that pass is the prefill, and ``prefill=20ms`` says the same
* time per generated token of a causal LM: ``decode=5ms`` (one new token for each of
  ``batch_size`` sequences, attending to ``context`` tokens, or ``seq_len`` without one)
* average stored bits per weight, scales and offsets included: ``4.5bits``
* share of the original size: ``25%``

Memory counts every stored byte of the model: compressed and uncompressed weights,
embeddings, scales, offsets, biases, norms and buffers. With a ``context`` (tokens a causal
LM keeps per sequence), memory is what serving needs: the stored bytes, plus the KV cache of
``batch_size`` sequences of ``context`` tokens in ``kv_dtype``, plus the activation peak at
the budget's input shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
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
KV_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1}
_LATENCY_UNITS = {"us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3}
_TERM = re.compile(
    r"^\s*(?:([a-z]+)\s*=\s*)?([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zµ%]+)\s*$",
    re.IGNORECASE,
)
_PHASES = {"prefill": "latency_ms", "decode": "decode_ms"}
SYNTAX = (
    "each term is a number with a unit: memory (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), "
    "latency (us, ms, s; 'prefill=20ms', or 'decode=5ms' per generated token), average bits "
    "('4.5bits') or a share of the original size ('25%'); join terms with commas, "
    "e.g. '8GB,20ms' or '4GB,decode=8ms'"
)


def _format_bytes(n: int) -> str:
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


@dataclass(frozen=True)
class Budget:
    """Constraints on the compressed model; ``None`` means unconstrained.

    ``batch_size`` and ``seq_len`` fix the input shape latency is predicted and measured at.
    """

    memory_bytes: int | None = None
    latency_ms: float | None = None
    decode_ms: float | None = None
    avg_bits: float | None = None
    size_ratio: float | None = None
    batch_size: int = 1
    seq_len: int = 128
    context: int | None = None
    kv_dtype: str = "float16"

    def __post_init__(self) -> None:
        checks = (
            ("memory", self.memory_bytes),
            ("latency", self.latency_ms),
            ("decode latency", self.decode_ms),
            ("average bits", self.avg_bits),
            ("size ratio", self.size_ratio),
        )
        for name, value in checks:
            if value is not None and not value > 0:
                raise BudgetError(f"budget {name} must be positive, got {value}")
        if self.size_ratio is not None and self.size_ratio > 1:
            raise BudgetError(f"budget size share must be at most 100%, got {self.size_ratio:.4g}")
        if self.avg_bits is not None and self.avg_bits > 64:
            raise BudgetError(f"average bits must be at most 64, got {self.avg_bits}")
        if self.batch_size < 1 or self.seq_len < 1:
            raise BudgetError("batch size and sequence length must be at least 1")
        if self.context is not None and (
            isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 1
        ):
            raise BudgetError(f"context must be a positive number of tokens, got {self.context!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise BudgetError(
                f"unknown KV cache dtype {self.kv_dtype!r}; allowed: {', '.join(KV_DTYPES)}"
            )
        if self.is_empty:
            raise BudgetError(f"the budget sets no constraint; {SYNTAX}")

    @property
    def is_empty(self) -> bool:
        return all(
            v is None
            for v in (
                self.memory_bytes,
                self.latency_ms,
                self.decode_ms,
                self.avg_bits,
                self.size_ratio,
            )
        )

    @property
    def decode_context(self) -> int:
        """Tokens a decode step attends to: the serving context, else the sequence length."""
        return self.context if self.context is not None else self.seq_len

    @classmethod
    def parse(cls, spec: Any, **shape: Any) -> Budget:
        """A budget from a string, a dict, a ``Budget`` or ``None`` plus keywords (those set
        to ``None`` are left as the budget has them)."""
        shape = {k: v for k, v in shape.items() if v is not None}
        if isinstance(spec, Budget):
            return replace(spec, **shape) if shape else spec
        if isinstance(spec, dict):
            return cls.from_dict({**spec, **shape})
        if isinstance(spec, str):
            return cls(**_parse_terms(spec), **shape)
        if spec is None:
            return cls(**shape)
        raise BudgetError(f"a budget is a string, a dict or a Budget, not {type(spec).__name__}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budget:
        """Accepts ``{"spec": "15MB", "batch_size": 1}`` or explicit fields
        (``memory``/``memory_bytes``, ``latency``/``latency_ms``/``prefill``,
        ``decode``/``decode_ms``, ``bits``/``avg_bits``, ``ratio``/``size_ratio``); strings
        with units are allowed in each."""
        data = dict(data)
        fields: dict[str, Any] = {}
        if "spec" in data:
            fields.update(_parse_terms(str(data.pop("spec"))))
        aliases = {
            "memory": "memory_bytes",
            "latency": "latency_ms",
            "prefill": "latency_ms",
            "decode": "decode_ms",
            "bits": "avg_bits",
            "ratio": "size_ratio",
        }
        for key, value in data.items():
            name = aliases.get(key, key)
            if name in ("batch_size", "seq_len"):
                fields[name] = _positive_int(name, value)
            elif name == "context":
                fields[name] = None if value is None else _positive_int(name, value)
            elif name == "kv_dtype":
                fields[name] = str(value)
            elif name in ("memory_bytes", "latency_ms", "decode_ms", "avg_bits", "size_ratio"):
                if value is None:
                    continue
                if name in fields:
                    raise BudgetError(f"the budget sets {name} twice")
                fields[name] = _field_value(name, value)
            else:
                raise BudgetError(
                    f"unknown budget field {key!r}; allowed: spec, memory, latency, prefill, "
                    "decode, bits, ratio, batch_size, seq_len, context, kv_dtype"
                )
        return cls(**fields)

    @property
    def spec(self) -> str:
        """The canonical text form, e.g. ``"15MB,20ms"``."""
        terms = []
        if self.memory_bytes is not None:
            terms.append(_format_bytes(self.memory_bytes))
        if self.size_ratio is not None:
            terms.append(f"{100 * self.size_ratio:.6g}%")
        if self.avg_bits is not None:
            terms.append(f"{self.avg_bits:g}bits")
        if self.latency_ms is not None:
            terms.append(f"{self.latency_ms:g}ms")
        if self.decode_ms is not None:
            terms.append(f"decode={self.decode_ms:g}ms")
        return ",".join(terms)

    def memory_limit(self, original_bytes: int) -> int | None:
        """The byte limit after combining an absolute limit and a share of the original."""
        limits = []
        if self.memory_bytes is not None:
            limits.append(self.memory_bytes)
        if self.size_ratio is not None:
            limits.append(int(self.size_ratio * original_bytes))
        return min(limits) if limits else None

    def check_positions(self, limit: int | None) -> None:
        """Refuse input shapes longer than a model with ``limit`` positions can take."""
        if limit is None:
            return
        if self.seq_len > limit:
            raise BudgetError(
                f"latency is judged at {self.seq_len} tokens per sequence, beyond the model's "
                f"{limit} positions: choose a sequence length of at most {limit} (--seq-len)"
            )
        if self.decode_ms is not None and self.decode_context > limit:
            raise BudgetError(
                f"decode is judged with {self.decode_context} tokens of context, beyond the "
                f"model's {limit} positions: choose a context of at most {limit}"
            )

    @property
    def kv_bytes_per_element(self) -> int:
        return KV_DTYPES[self.kv_dtype]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spec": self.spec,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
        }
        if self.context is not None:
            out.update(context=self.context, kv_dtype=self.kv_dtype)
        return out

    def describe(self) -> str:
        parts = []
        serving = (
            f" (weights + {self.kv_dtype} KV cache of {self.batch_size} x {self.context} tokens "
            "+ activation peak)"
            if self.context is not None
            else " stored"
        )
        if self.memory_bytes is not None:
            parts.append(f"at most {self.memory_bytes:,} bytes{serving}")
        if self.size_ratio is not None:
            parts.append(f"at most {100 * self.size_ratio:.4g}% of the original size")
        if self.avg_bits is not None:
            parts.append(f"at most {self.avg_bits:g} stored bits per weight (scales included)")
        if self.latency_ms is not None:
            parts.append(
                f"p50 latency at most {self.latency_ms:g} ms at batch {self.batch_size} x "
                f"{self.seq_len} tokens"
            )
        if self.decode_ms is not None:
            parts.append(
                f"p50 decode at most {self.decode_ms:g} ms per token at batch "
                f"{self.batch_size} with {self.decode_context} tokens of context"
            )
        return "; ".join(parts)

    def __str__(self) -> str:
        return self.spec


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BudgetError(f"budget {name} must be a positive integer, got {value!r}")
    return value


def _field_value(name: str, value: Any) -> float | int:
    if isinstance(value, str):
        parsed = _parse_terms(value)
        if name == "decode_ms" and list(parsed) == ["latency_ms"]:
            parsed = {name: parsed["latency_ms"]}  # {"decode": "5ms"}
        if list(parsed) != [name]:
            raise BudgetError(f"budget field {name} got {value!r}; {SYNTAX}")
        return parsed[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BudgetError(f"budget field {name} must be a number or a string, got {value!r}")
    if name == "memory_bytes":
        if float(value) != int(value):
            raise BudgetError(f"memory_bytes must be a whole number of bytes, got {value}")
        return int(value)
    return float(value)


def _parse_terms(text: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    terms = [t for t in text.split(",")]
    if not text.strip() or any(not t.strip() for t in terms):
        raise BudgetError(f"malformed budget {text!r}: {SYNTAX}")
    for term in terms:
        match = _TERM.match(term)
        if not match:
            raise BudgetError(f"malformed budget term {term.strip()!r}: {SYNTAX}")
        phase, digits, unit = match.groups()
        try:
            exact = Decimal(digits)
        except InvalidOperation:
            raise BudgetError(f"malformed budget term {term.strip()!r}: {SYNTAX}") from None
        number, lowered = float(exact), unit.lower()
        if phase is not None and (phase.lower() not in _PHASES or lowered not in _LATENCY_UNITS):
            raise BudgetError(
                f"malformed budget term {term.strip()!r}: only latency terms take a phase "
                f"({', '.join(p + '=' for p in _PHASES)}); {SYNTAX}"
            )
        if lowered in _MEMORY_UNITS:
            total = exact * _MEMORY_UNITS[lowered]
            if total != total.to_integral_value():
                raise BudgetError(f"budget term {term.strip()!r} is not a whole number of bytes")
            name, value = "memory_bytes", int(total)
        elif lowered in _LATENCY_UNITS:
            name = _PHASES[phase.lower()] if phase is not None else "latency_ms"
            value = number * _LATENCY_UNITS[lowered]
        elif lowered in ("bits", "bit"):
            name, value = "avg_bits", number
        elif unit == "%":
            name, value = "size_ratio", number / 100
        else:
            raise BudgetError(f"unknown unit {unit!r} in budget term {term.strip()!r}: {SYNTAX}")
        if name in fields:
            what = {"latency_ms": "latency (prefill)", "decode_ms": "decode latency"}.get(
                name, name.split("_")[0]
            )
            raise BudgetError(f"budget {text!r} constrains {what} twice")
        fields[name] = value
    return fields
