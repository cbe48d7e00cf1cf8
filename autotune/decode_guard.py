"""A memory budget's generation speed: no slower than the fastest plan as good as the
runtime's own file of that size.

A budget of bytes alone leaves a plan's speed free, and in llama.cpp types of equal bytes
generate at very different speeds: in a decode step on small-lm IQ3_S took 2.2x Q4_K's time
at 3.44 bits per weight against 4.5, so plans that spend the bytes best took up to 1.61x
the time of llama.cpp's mix of their size per generated token (``benchmarks/llama_cpp.py``).
A runtime names its reference plans (:meth:`autotune.runtimes.Runtime.reference_plans`:
for llama.cpp, the files ``llama-quantize --pure`` writes with one of its mixes' base
types). When the budget sets no decode limit, the largest reference that fits the budget's
other limits is the yardstick (:func:`guard_rule`); once every layer's options are scored,
the fastest plan within those limits whose summed error is at most the reference's is found
(a MILP with the predicted decode time as its objective), and the plan is searched with its
decode step within ``slack`` of that plan's (:func:`decode_guard`). The yardstick is not the
reference's own speed: llama.cpp's mixes give a few tensors of a slow base type (Q3_K)
faster types and generate faster than that type's pure file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from autotune.allocation import allocate_tied, choice_table, non_latency
from autotune.costs import CostModel
from autotune.errors import AutotuneError
from search.allocator import InfeasibleError
from search.space import ChoiceTable

RUNTIME_DEFAULT = "runtime"  # the slack the runtime declares
DECODE = "decode_seconds"


@dataclass(frozen=True)
class GuardRule:
    """The reference a memory budget's decode step is held to: its name, each layer's
    option label, its bytes and predicted decode step, and the slack allowed."""

    reference: str
    labels: Mapping[str, str]
    reference_bytes: int
    reference_s: float
    slack: float


@dataclass(frozen=True)
class DecodeGuard:
    """The decode limit a plan was searched under: within ``slack`` of the fastest plan
    predicted as good as the reference."""

    rule: GuardRule
    reference_error: float
    fastest_s: float

    @property
    def limit_s(self) -> float:
        return self.fastest_s * (1.0 + self.rule.slack)

    def describe(self) -> str:
        rule = self.rule
        return (
            f"decode step at most {1e3 * self.limit_s:.4g} ms, {100 * rule.slack:g}% over the "
            f"fastest plan predicted as good as {rule.reference} ({1e3 * self.fastest_s:.4g} "
            f"ms; that file {1e3 * rule.reference_s:.4g} ms, {rule.reference_bytes:,} B); "
            "--decode-slack off lifts it"
        )

    def to_dict(self) -> dict[str, Any]:
        rule = self.rule
        return {
            "reference": rule.reference,
            "reference_bytes": rule.reference_bytes,
            "reference_ms": round(1e3 * rule.reference_s, 6),
            "reference_error": self.reference_error,
            "fastest_as_good_ms": round(1e3 * self.fastest_s, 6),
            "slack": rule.slack,
            "limit_ms": round(1e3 * self.limit_s, 6),
        }


def checked_slack(value: Any) -> float | str | None:
    """``value`` as a decode slack: ``None`` (off), :data:`RUNTIME_DEFAULT`, or a fraction of
    at least 0; anything else is refused in one line."""
    if value is None or value == RUNTIME_DEFAULT:
        return value
    if isinstance(value, str) and value.strip().lower() == "off":
        return None
    try:
        slack = float(value)
    except (TypeError, ValueError):
        slack = math.nan
    if isinstance(value, bool) or not (math.isfinite(slack) and slack >= 0):
        raise AutotuneError(
            f"decode slack {value!r} is not allowed: a fraction of at least 0 (0.05: at most "
            f"5% slower than the yardstick), 'off', or {RUNTIME_DEFAULT!r}"
        )
    return slack


def _assignment(table: ChoiceTable, labels: Mapping[str, str]) -> list[int] | None:
    try:
        return [
            choices.index(labels[variable])
            for variable, choices in zip(table.variables, table.choices, strict=True)
        ]
    except (KeyError, ValueError):  # a layer without the reference's option
        return None


def guard_rule(
    costs: CostModel,
    limits: Mapping[str, float],
    references: Mapping[str, Mapping[str, str]],
    slack: float,
) -> GuardRule | None:
    """The largest of ``references`` (name -> layer -> option label) that fits ``limits``
    but their latency ones (ties: the faster); ``None`` without decode prices or a fitting
    reference."""
    if costs.decode_seconds is None or not references:
        return None
    table = choice_table(costs, {n: [0.0] * len(o) for n, o in costs.options.items()})
    fitting = []
    for name, labels in references.items():
        chosen = _assignment(table, labels)
        if chosen is not None and table.fits(chosen, non_latency(limits)):
            size = table.total("bytes", chosen)
            fitting.append((size, -table.total(DECODE, chosen), name))
    if not fitting:
        return None
    size, minus_seconds, name = max(fitting)
    return GuardRule(name, dict(references[name]), round(size), -minus_seconds, slack)


def decode_guard(
    rule: GuardRule,
    costs: CostModel,
    limits: Mapping[str, float],
    errors: Mapping[str, Mapping[str, float]],
    ties: Sequence[Sequence[str]] = (),
) -> DecodeGuard:
    """The guard of ``rule`` on the layers' summed ``errors`` (layer -> label -> error): the
    fastest plan within ``limits`` (but their latency ones) whose error is at most the
    reference's."""
    scores = {
        n: [errors[n].get(o.label, math.inf) for o in opts] for n, opts in costs.options.items()
    }
    scored = choice_table(costs, scores)
    reference = _assignment(scored, rule.labels)
    assert reference is not None  # the rule came from this cost model
    reference_error = scored.score(reference)
    known = [np.isfinite(s) for s in scored.scores]
    table = ChoiceTable(
        scored.variables,
        scored.choices,
        [np.where(k, d, np.inf) for k, d in zip(known, scored.costs[DECODE], strict=True)],
        {
            **scored.costs,
            "error": [np.where(k, s, 0.0) for k, s in zip(known, scored.scores, strict=True)],
        },
        {**scored.fixed, "error": 0.0},
    )
    bound = {**non_latency(limits), "error": reference_error * (1 + 1e-9) + 1e-15}
    try:
        fastest = table.total(DECODE, allocate_tied(table, bound, ties).assignment)
    except InfeasibleError:  # the reference itself, where the solver finds nothing better
        fastest = rule.reference_s
    return DecodeGuard(rule, float(reference_error), min(fastest, rule.reference_s))
