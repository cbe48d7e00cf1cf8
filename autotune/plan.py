"""Plans: which option each layer takes, with everything needed to trust and re-check it.

A plan is JSON, never pickle. ``layers`` maps layer names to options; a hand-written plan may
use ``re:<regex>`` keys (matched against whole layer names, first match in file order wins)
and a ``_default`` entry. Exact names beat patterns, patterns beat ``_default``, and layers
matched by nothing stay as they are.

Patterns are Python regular expressions run by the ``regex`` package (the syntax of ``re``),
whose ``timeout`` bounds each match: a pattern that backtracks catastrophically, e.g.
``re:(a|aa)+$``, is refused after :data:`MATCH_TIMEOUT_S` instead of hanging, and all the
matching of one resolution stops after :data:`MATCHING_BUDGET_S`. Keys are at most 1000
characters.

A plan is read with :func:`autotune.json_input.read_json` (size, nesting depth, UTF-8,
finite numbers) and checked on load against ``data/plan.schema.json`` with integers strict,
its options parsed with their declared field types, its budget parsed and its target spec
built, so that every command meets a bad field as one :class:`PlanError`.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import regex
from torch import nn

from autotune import __version__
from autotune.budget import Budget
from autotune.errors import AutotuneError, FingerprintMismatchError, PlanError
from autotune.fingerprint import fingerprint, same_model, short
from autotune.io import write_text_atomic
from autotune.json_input import StrictValidator, check_json_value, check_schema, read_json
from autotune.layers import LayerRef, compressible_layers
from methods.base import Option
from methods.errors import OptionError
from methods.keep import KeepOption
from methods.registry import option_from_dict
from methods.tied import untie_output_embeddings
from profilers.execution.adapters import adapter_for
from profilers.hardware import HardwareSpec

SCHEMA_VERSION = 2
DEFAULT_KEY = "_default"
PATTERN_PREFIX = "re:"
LOCAL_TARGET = "local"
MATCH_TIMEOUT_S = 0.5  # the longest one pattern may take on one layer name
MATCHING_BUDGET_S = 5.0  # the longest all the matching of one resolution may take


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 2 added ``profile`` (per-layer shapes, costs and errors); v1 plans have none."""
    return {**data, "schema_version": 2, "profile": data.get("profile", {})}


MIGRATIONS = {1: _v1_to_v2}  # from version -> function returning the next version


def migrate(data: dict[str, Any], origin: str = "plan") -> dict[str, Any]:
    """Bring plan data of an older schema version to the current one, step by step."""
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        return data  # the schema check names the problem
    if version > SCHEMA_VERSION:
        raise PlanError(
            f"{origin} has schema version {version}, newer than this autotune "
            f"({__version__}) reads (up to {SCHEMA_VERSION}); upgrade autotune"
        )
    while version < SCHEMA_VERSION:
        if version not in MIGRATIONS:
            raise PlanError(
                f"{origin} has schema version {version}, which no migration reads; "
                f"supported: {sorted(MIGRATIONS)} and {SCHEMA_VERSION}"
            )
        data = MIGRATIONS[version](data)
        version = data["schema_version"]
    return data


@functools.cache
def _schema_text() -> str:
    return resources.files("autotune").joinpath("data/plan.schema.json").read_text("utf-8")


def plan_schema() -> dict[str, Any]:
    return json.loads(_schema_text())


@functools.cache
def _validator() -> Any:
    return StrictValidator(plan_schema())


@functools.lru_cache(maxsize=4096)
def compile_pattern(key: str) -> regex.Pattern:
    """The regex of a ``re:`` layer key, or :class:`PlanError` if it is not one."""
    try:
        return regex.compile(key[len(PATTERN_PREFIX) :])
    except (regex.error, RecursionError, OverflowError, ValueError) as exc:
        raise PlanError(f"layer pattern {key[:100]!r} is not a valid regex: {exc}") from None


class _Matcher:
    """Full matches of layer patterns, each bounded by :data:`MATCH_TIMEOUT_S` and all of
    them together by :data:`MATCHING_BUDGET_S`."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + MATCHING_BUDGET_S

    def __call__(self, key: str, name: str) -> bool:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise PlanError(
                f"matching the plan's layer patterns took more than {MATCHING_BUDGET_S:g} s; "
                "use simpler patterns (or exact layer names)"
            )
        try:
            return (
                compile_pattern(key).fullmatch(name, timeout=min(MATCH_TIMEOUT_S, left)) is not None
            )
        except TimeoutError:
            raise PlanError(
                f"layer pattern {key[:100]!r} took more than {MATCH_TIMEOUT_S:g} s to match "
                f"the layer name {name[:100]!r} (it backtracks without end); use a simpler "
                "pattern"
            ) from None


@dataclass
class Plan:
    layers: dict[str, dict[str, Any]]
    structure: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    predicted: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] | None = None
    search: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)  # the runtime's export, described
    tool: dict[str, Any] = field(
        default_factory=lambda: {"name": "autotune", "version": __version__}
    )
    created: str = field(
        default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    )
    schema_version: int = SCHEMA_VERSION

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "tool": self.tool,
            "created": self.created,
            "model": self.model,
            "target": self.target,
            "budget": self.budget,
            "calibration": self.calibration,
            "layers": self.layers,
            "structure": self.structure,
            "predicted": self.predicted,
            "measured": self.measured,
            "search": self.search,
            "profile": self.profile,
            **({"export": self.export} if self.export else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON, atomically."""
        write_text_atomic(path, self.to_json())

    @classmethod
    def from_dict(cls, data: Any, origin: str = "plan") -> Plan:
        """A plan from JSON data: checked for JSON types and depth, migrated, checked against
        the schema, its options, budget and target parsed; else one :class:`PlanError`."""
        if not isinstance(data, dict):
            raise PlanError(f"{origin} must hold a JSON object, not {type(data).__name__}")
        check_json_value(data, origin, PlanError)
        data = migrate(data, origin)
        check_schema(data, _validator(), origin, PlanError, "plan schema")
        known = {k: data[k] for k in data if k in cls.__dataclass_fields__}
        plan = cls(**known)
        plan.options()  # every option must parse
        plan._check_budget(origin)
        plan._check_target(origin)
        return plan

    def _check_budget(self, origin: str) -> None:
        if not self.budget:
            return
        try:
            Budget.from_dict(self.budget)
        except AutotuneError as exc:
            raise PlanError(f"{origin}: budget: {exc}") from None

    def _check_target(self, origin: str) -> None:
        """The target is absent, ``{"name": "local"}`` (measured, not priced), or a whole
        hardware spec: validate and report price a named target's latency from it."""
        if not self.target or self.target == {"name": LOCAL_TARGET}:
            return
        if not set(self.target) - {"name"}:
            raise PlanError(
                f"{origin}: target {self.target.get('name')!r} has a name but no hardware "
                "figures to price the plan on; give the whole spec (as `autotune tune` writes "
                'it, the fields of a target file entry) or {"name": "local"}'
            )
        try:
            HardwareSpec.from_dict(self.target)
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise PlanError(
                f"{origin}: target is not a hardware spec ({type(exc).__name__}: {exc}); "
                'give the fields of a target file entry, or {"name": "local"}'
            ) from None

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None, strict: bool = True) -> Plan:
        """Read a plan; with ``model``, check it was made for that model."""
        data = read_json(path, PlanError, what="plan file")
        plan = cls.from_dict(data, origin=str(path))
        if model is not None:
            plan.check_model(model, strict=strict)
        return plan

    # -------------------------------------------------------------- options
    def options(self) -> dict[str, Option]:
        """Every entry of ``layers`` parsed into an option (keys unchanged)."""
        parsed = {}
        for key, value in self.layers.items():
            if key.startswith(PATTERN_PREFIX):
                compile_pattern(key)
            try:
                parsed[key] = option_from_dict(value)
            except OptionError as exc:
                raise PlanError(f"layer {key[:100]!r}: {exc}") from None
        return parsed

    def resolve(self, layer_names: list[str], strict: bool = True) -> dict[str, Option]:
        """The option of each named layer: exact name, then first matching pattern, then
        ``_default``, else keep. With ``strict``, names and patterns that match no layer
        are errors."""
        parsed = self.options()
        names = set(layer_names)
        exact = {
            k: v for k, v in parsed.items() if k != DEFAULT_KEY and not k.startswith(PATTERN_PREFIX)
        }
        patterns = [(key, opt) for key, opt in parsed.items() if key.startswith(PATTERN_PREFIX)]
        matches = _Matcher()
        if strict:
            unknown = sorted(set(exact) - names)
            if unknown:
                raise PlanError(
                    f"the plan names {len(unknown)} layer(s) this model does not have as a "
                    f"compressible layer, e.g. {unknown[0][:100]!r}"
                )
            for key, _ in patterns:
                if not any(matches(key, n) for n in layer_names):
                    raise PlanError(f"layer pattern {key[:100]!r} matches no layer of this model")
        default = parsed.get(DEFAULT_KEY, KeepOption())
        resolved = {}
        for name in layer_names:
            if name in exact:
                resolved[name] = exact[name]
                continue
            match = next((opt for key, opt in patterns if matches(key, name)), None)
            resolved[name] = match if match is not None else default
        return resolved

    def layer_options(self, model: nn.Module, strict: bool = True) -> dict[LayerRef, Option]:
        """Resolve this plan against every linear and embedding layer of ``model``."""
        refs = compressible_layers(model, min_numel=0)
        resolved = self.resolve([r.name for r in refs], strict=strict)
        return {ref: resolved[ref.name] for ref in refs}

    def kept_units(self) -> dict[str, list[int]]:
        """Units (FFN neurons, attention heads) kept per output layer; empty when the plan
        prunes no structure."""
        return {k: list(v) for k, v in (self.structure.get("kept") or {}).items()}

    def shaped(self, model: nn.Module) -> nn.Module:
        """``model`` itself with the plan's structured pruning done in place (layers shrink
        before their options apply) and tied output embeddings made to read their input
        embedding's table (:func:`methods.tied.untie_output_embeddings`), so that the table
        is one layer, compressed once."""
        kept = self.kept_units()
        if kept:
            from methods.structured import apply_kept_units

            try:
                apply_kept_units(model, kept, adapter_for(model).unit_groups(model))
            except OptionError as exc:
                raise PlanError(f"the plan's structure does not fit this model: {exc}") from None
        untie_output_embeddings(model)
        return model

    # ---------------------------------------------------------- fingerprint
    def check_positions(self, model: nn.Module) -> None:
        """Refuse a plan whose calibration or budget reads more tokens per sequence than
        ``model`` has positions: it was not made for this model (its windows are cut at the
        model's positions when it is tuned)."""
        config = getattr(model, "config", None)
        positions = getattr(config, "max_position_embeddings", None)
        seq_len = (self.calibration or {}).get("seq_len")
        if isinstance(positions, int) and isinstance(seq_len, int) and seq_len > positions:
            raise PlanError(
                f"the plan's calibration.seq_len is {seq_len} tokens, beyond the model's "
                f"{positions} positions; a plan tuned for this model has at most {positions}"
            )
        if self.budget:
            try:
                Budget.from_dict(self.budget).check_positions(adapter_for(model).max_context(model))
            except AutotuneError as exc:
                raise PlanError(f"the plan's budget does not fit this model: {exc}") from None

    def check_model(
        self, model: nn.Module, strict: bool = True, actual: dict[str, Any] | None = None
    ) -> None:
        """Raise :class:`FingerprintMismatchError` if the plan was made for another model
        (only a warning with ``strict=False``; plans without a fingerprint always pass), and
        :class:`PlanError` if it reads more positions than the model has
        (:meth:`check_positions`). ``actual`` is the model's fingerprint when it is already
        known."""
        self.check_positions(model)
        expected = self.model.get("fingerprint")
        if not expected:
            return
        actual = actual or fingerprint(model)
        if same_model(expected, actual):
            return
        what = "structure" if expected["structure"] != actual["structure"] else "weights"
        message = (
            f"plan was made for model fingerprint {short(expected)}, this model is "
            f"{short(actual)} (its {what} differ)"
        )
        if strict:
            raise FingerprintMismatchError(message)
        import warnings

        warnings.warn(message, stacklevel=2)
