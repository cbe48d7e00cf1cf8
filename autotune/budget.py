"""Budgets: what the compressed model must meet, parsed from text, a dict or keywords.

Text is one or more comma-separated terms, all of which must hold:

* memory: ``15MB``, ``8GB`` (powers of 1000), ``8GiB`` (powers of 1024), ``123456B``
* latency of one forward pass at the budget's input shape on the target: ``20ms``, ``1.5s``,
  ``800us``; for a causal LM that pass is the prefill, and ``prefill=20ms`` says the same
* time per generated token of a causal LM: ``decode=5ms`` (one new token for each of
  ``batch_size`` sequences, attending to ``context`` tokens, or ``seq_len`` without one)
* average stored bits per weight, scales and offsets included: ``4.5bits``
* share of the original size: ``25%``
* latency as a multiple of the original model's on the target: ``0.7x`` (a forward pass, or
  the prefill), ``decode=0.5x`` (per generated token). Predicted against the original's
  predicted latency; on ``local`` measured against the original timed beside the plan in the
  same run, so a drift of the machine's speed moves both alike

Memory counts every stored byte of the model: compressed and uncompressed weights,
embeddings, scales, offsets, biases, norms and buffers. With a ``context`` (tokens a causal
LM keeps per sequence), memory is what serving needs: the stored bytes, plus the KV cache of
``batch_size`` sequences of ``context`` tokens in ``kv_dtype``, plus the activation peak at
the budget's input shape.

Every figure is bounded, in text, dict and keyword form alike: memory from 1 byte to 1 PB,
latency from 1 us to a day, average bits up to 64, a share from 0.0000001% to 100%, and
batch sizes and token counts within :data:`MAX_BATCH_SIZE` and :data:`MAX_TOKENS`. Text is
at most :data:`autotune.budget_text.MAX_SPEC_CHARS` characters and is read (by
:mod:`autotune.budget_text`) with a pattern in which every character has one way to match
(linear time), its numbers refused beyond 1e30 before any arithmetic. An accepted budget's
:meth:`Budget.to_dict` parses back to the same budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from decimal import Decimal, localcontext
from typing import Any

from autotune.budget_text import (
    EXACT,
    RATIOS,
    SYNTAX,
    format_bytes,
    number_text,
    parse_terms,
)
from autotune.errors import BudgetError
from autotune.json_input import short_repr
from profilers.paired_timing import Limit

KV_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1}
MAX_MEMORY_BYTES = 10**15  # 1 PB
MIN_LATENCY_MS = 1e-3  # 1 us
MAX_LATENCY_MS = 86_400_000.0  # one day
MIN_AVG_BITS = 1e-3
MAX_AVG_BITS = 64.0
MIN_SIZE_RATIO = 1e-9  # 0.0000001%
MIN_SPEED_RATIO, MAX_SPEED_RATIO = 1e-3, 1e3  # latency as a multiple of the original's
MAX_BATCH_SIZE = 2**20
MAX_TOKENS = 10**7
# constraint fields: what they are called in errors, their bounds, and the bounds as text
_BOUNDS: dict[str, tuple[str, float, float, str, str]] = {
    "memory_bytes": ("memory", 1, MAX_MEMORY_BYTES, "1B", "1 PB (1000TB)"),
    "latency_ms": ("latency", MIN_LATENCY_MS, MAX_LATENCY_MS, "1us", "one day (86400s)"),
    "decode_ms": ("decode latency", MIN_LATENCY_MS, MAX_LATENCY_MS, "1us", "one day (86400s)"),
    "avg_bits": ("average bits", MIN_AVG_BITS, MAX_AVG_BITS, "0.001", "64"),
    "size_ratio": ("size share", MIN_SIZE_RATIO, 1.0, "0.0000001%", "100%"),
    "latency_ratio": (
        "latency relative to the original",
        MIN_SPEED_RATIO,
        MAX_SPEED_RATIO,
        "0.001x",
        "1000x",
    ),
    "decode_ratio": (
        "decode latency relative to the original",
        MIN_SPEED_RATIO,
        MAX_SPEED_RATIO,
        "0.001x",
        "1000x",
    ),
}
_SHAPE_LIMITS = {"batch_size": MAX_BATCH_SIZE, "seq_len": MAX_TOKENS, "context": MAX_TOKENS}
_ALIASES = {
    "memory": "memory_bytes",
    "latency": "latency_ms",
    "prefill": "latency_ms",
    "decode": "decode_ms",
    "bits": "avg_bits",
    "ratio": "size_ratio",
    "speed": "latency_ratio",
    "decode_speed": "decode_ratio",
}
_ALLOWED_KEYS = (
    "spec, memory, latency, prefill, decode, bits, ratio, speed, decode_speed, batch_size, "
    "seq_len, context, kv_dtype (or the field names memory_bytes, latency_ms, decode_ms, "
    "avg_bits, size_ratio, latency_ratio, decode_ratio)"
)


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
    latency_ratio: float | None = None
    decode_ratio: float | None = None
    batch_size: int = 1
    seq_len: int = 128
    context: int | None = None
    kv_dtype: str = "float16"

    def __post_init__(self) -> None:
        for name in _BOUNDS:
            object.__setattr__(self, name, _bounded(name, getattr(self, name)))
        for name, limit in _SHAPE_LIMITS.items():
            value = getattr(self, name)
            if name == "context" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                what = {"batch_size": "batch size", "seq_len": "sequence length"}.get(name, name)
                raise BudgetError(
                    f"budget {what} must be a whole number from 1 to {limit:,}, "
                    f"got {short_repr(value)}"
                )
        if not isinstance(self.kv_dtype, str) or self.kv_dtype not in KV_DTYPES:
            raise BudgetError(
                f"unknown KV cache dtype {short_repr(self.kv_dtype)}; "
                f"allowed: {', '.join(KV_DTYPES)}"
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
                self.latency_ratio,
                self.decode_ratio,
            )
        )

    @property
    def bounds_latency(self) -> bool:
        """Whether a term limits the latency of a forward pass (in ms or relative)."""
        return self.latency_ms is not None or self.latency_ratio is not None

    @property
    def bounds_decode(self) -> bool:
        """Whether a term limits the time per generated token (in ms or relative)."""
        return self.decode_ms is not None or self.decode_ratio is not None

    def latency_limit_ms(self, original_ms: float | None) -> float | None:
        """The forward pass's limit in ms: the tighter of the ms term and the relative term
        times ``original_ms`` (the original model's latency, predicted or measured alike)."""
        return self.phase_limit_ms("latency", original_ms)

    def decode_limit_ms(self, original_ms: float | None) -> float | None:
        """The limit per generated token in ms, as :meth:`latency_limit_ms`."""
        return self.phase_limit_ms("decode", original_ms)

    def phase_ms(self, phase: str) -> float | None:
        """The ms term of ``phase`` (``latency``: the forward pass, or ``decode``)."""
        return self.latency_ms if _phase(phase) == "latency" else self.decode_ms

    def phase_ratio(self, phase: str) -> float | None:
        """The relative term of ``phase``: a multiple of the original's latency."""
        return self.latency_ratio if _phase(phase) == "latency" else self.decode_ratio

    def phase_limit_ms(self, phase: str, original_ms: float | None) -> float | None:
        """:meth:`latency_limit_ms` or :meth:`decode_limit_ms`, by ``phase``."""
        return _tighter(self.phase_ms(phase), self.phase_ratio(phase), original_ms)

    def timing_limit(self, phase: str, beside: bool) -> Limit | None:
        """What a timing of ``phase`` is run long enough to settle: the ms term, and the
        multiple of the original where the original is timed ``beside`` the plan (``None``:
        nothing to settle, the usual rounds)."""
        ms, ratio = self.phase_ms(phase), self.phase_ratio(phase) if beside else None
        return None if ms is None and ratio is None else Limit(ms, ratio)

    @property
    def decode_context(self) -> int:
        """Tokens a decode step attends to: the serving context, else the sequence length."""
        return self.context if self.context is not None else self.seq_len

    @classmethod
    def parse(cls, spec: Any, **shape: Any) -> Budget:
        """A budget from a string, a dict, a ``Budget`` or ``None`` plus keywords (those set
        to ``None`` are left as the budget has them). Keywords are field names or the
        aliases :meth:`from_dict` takes; a constraint may be set once only."""
        shape = {k: v for k, v in shape.items() if v is not None}
        if isinstance(spec, Budget):
            return cls.from_dict({**spec.fields(), **shape})
        if isinstance(spec, dict):
            return cls.from_dict({**spec, **shape})
        if isinstance(spec, str):
            return cls.from_dict({"spec": spec, **shape})
        if spec is None:
            return cls.from_dict(shape)
        raise BudgetError(f"a budget is a string, a dict or a Budget, not {type(spec).__name__}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budget:
        """Accepts ``{"spec": "15MB", "batch_size": 1}`` or explicit fields
        (``memory``/``memory_bytes``, ``latency``/``latency_ms``/``prefill``,
        ``decode``/``decode_ms``, ``bits``/``avg_bits``, ``ratio``/``size_ratio``); strings
        with units are allowed in each."""
        if not isinstance(data, dict):
            raise BudgetError(f"a budget dict was expected, not {type(data).__name__}")
        values: dict[str, Any] = {}
        if "spec" in data:
            if not isinstance(data["spec"], str):
                raise BudgetError(f"budget spec must be a string, got {short_repr(data['spec'])}")
            values.update(parse_terms(data["spec"]))
        for key, value in data.items():
            name = _ALIASES.get(key, key) if isinstance(key, str) else key
            if key == "spec":
                continue
            if name in _SHAPE_LIMITS:
                if value is not None or name != "context":
                    values[name] = value  # checked by the constructor
            elif name == "kv_dtype":
                values[name] = value
            elif name in _BOUNDS:
                if value is None:
                    continue
                name = _relative_form(name, value)
                if name in values:
                    raise BudgetError(f"the budget sets {name} twice")
                values[name] = _field_value(name, value)
            else:
                raise BudgetError(
                    f"unknown budget field {short_repr(key)}; allowed: {_ALLOWED_KEYS}"
                )
        return cls(**values)

    def fields(self) -> dict[str, Any]:
        """Every field by name, unconstrained ones as ``None``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def spec(self) -> str:
        """The canonical text form, e.g. ``"15MB,20ms"``; it parses back exactly."""
        terms = []
        if self.memory_bytes is not None:
            terms.append(format_bytes(self.memory_bytes))
        if self.size_ratio is not None:
            with localcontext(EXACT):
                percent = Decimal(repr(self.size_ratio)) * 100
            terms.append(f"{percent.normalize():f}%")
        if self.avg_bits is not None:
            terms.append(f"{number_text(self.avg_bits)}bits")
        if self.latency_ms is not None:
            terms.append(f"{number_text(self.latency_ms)}ms")
        if self.latency_ratio is not None:
            terms.append(f"{number_text(self.latency_ratio)}x")
        if self.decode_ms is not None:
            terms.append(f"decode={number_text(self.decode_ms)}ms")
        if self.decode_ratio is not None:
            terms.append(f"decode={number_text(self.decode_ratio)}x")
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
        if self.bounds_decode and self.decode_context > limit:
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
            out["context"] = self.context
        if self.context is not None or self.kv_dtype != "float16":
            out["kv_dtype"] = self.kv_dtype
        return out

    def describe(self, multiples_of: str = "the original's") -> str:
        """The budget in words; its multiples are of ``multiples_of`` (a reference file's)."""
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
        if self.latency_ratio is not None:
            parts.append(
                f"p50 latency at most {self.latency_ratio:g}x {multiples_of} at batch "
                f"{self.batch_size} x {self.seq_len} tokens"
            )
        if self.decode_ms is not None:
            parts.append(
                f"p50 decode at most {self.decode_ms:g} ms per token at batch "
                f"{self.batch_size} with {self.decode_context} tokens of context"
            )
        if self.decode_ratio is not None:
            parts.append(
                f"p50 decode at most {self.decode_ratio:g}x {multiples_of} per token at "
                f"batch {self.batch_size} with {self.decode_context} tokens of context"
            )
        return "; ".join(parts)

    def __str__(self) -> str:
        return self.spec


def _phase(phase: str) -> str:
    if phase not in ("latency", "decode"):
        raise ValueError(f"unknown latency phase {phase!r}; allowed: latency, decode")
    return phase


def _tighter(
    milliseconds: float | None, ratio: float | None, original_ms: float | None
) -> float | None:
    """The tighter of an absolute limit and a multiple of the original's ms (``None``: no
    limit); a relative limit needs the original's ms."""
    limits = [] if milliseconds is None else [milliseconds]
    if ratio is not None:
        if original_ms is None:
            raise ValueError("a latency budget relative to the original needs its latency")
        limits.append(ratio * original_ms)
    return min(limits) if limits else None


def _bounded(name: str, value: Any) -> Any:
    """A constraint field checked for type and bounds (floats made ``float``)."""
    if value is None:
        return None
    what, low, high, low_text, high_text = _BOUNDS[name]
    if name == "memory_bytes":
        if isinstance(value, bool) or not isinstance(value, int):
            raise BudgetError(
                f"budget memory must be a whole number of bytes, got {short_repr(value)}"
            )
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BudgetError(f"budget {what} must be a number, got {short_repr(value)}")
        try:
            value = float(value)
        except OverflowError:
            raise BudgetError(f"budget {what} is out of range; at most {high_text}") from None
        if not math.isfinite(value):
            raise BudgetError(f"budget {what} must be a finite number, got {value}")
    if not value > 0:
        raise BudgetError(f"budget {what} must be positive, got {short_repr(value)}")
    if value < low:
        raise BudgetError(f"budget {what} must be at least {low_text}, got {short_repr(value)}")
    if value > high:
        raise BudgetError(f"budget {what} must be at most {high_text}, got {short_repr(value)}")
    return value


def _relative_form(name: str, value: Any) -> str:
    """The field a latency given in ``x`` sets: ``{"latency": "0.7x"}`` is a limit relative
    to the original, as ``{"speed": 0.7}``."""
    if name in RATIOS and isinstance(value, str) and value.strip().lower().endswith("x"):
        return RATIOS[name]
    return name


def _field_value(name: str, value: Any) -> float | int:
    """A constraint given in a dict or as a keyword: a number (bytes, ms, bits, a fraction)
    or text with a unit."""
    if isinstance(value, str):
        parsed = parse_terms(value)
        if name == "decode_ms" and list(parsed) == ["latency_ms"]:
            parsed = {name: parsed["latency_ms"]}  # {"decode": "5ms"}
        if name == "decode_ratio" and list(parsed) == ["latency_ratio"]:
            parsed = {name: parsed["latency_ratio"]}  # {"decode_speed": "0.5x"}
        if list(parsed) != [name]:
            raise BudgetError(f"budget field {name} got {short_repr(value)}; {SYNTAX}")
        return parsed[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BudgetError(
            f"budget field {name} must be a number or a string, got {short_repr(value)}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise BudgetError(f"budget field {name} must be a finite number, got {value}")
    if name == "memory_bytes" and isinstance(value, float):
        if not value.is_integer():
            raise BudgetError(f"memory_bytes must be a whole number of bytes, got {value}")
        return int(value)
    return value
