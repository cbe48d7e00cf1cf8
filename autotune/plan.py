"""Plans: which option each layer takes, with everything needed to trust and re-check it.

A plan is JSON, never pickle. ``layers`` maps layer names to options; a hand-written plan may
use ``re:<regex>`` keys (matched against whole layer names, first match in file order wins)
and a ``_default`` entry. Exact names beat patterns, patterns beat ``_default``, and layers
matched by nothing stay as they are.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
from torch import nn

from autotune import __version__
from autotune.errors import FingerprintMismatchError, PlanError
from autotune.fingerprint import fingerprint, same_model, short
from autotune.io import write_text_atomic
from autotune.layers import LayerRef, compressible_layers
from methods.base import Option
from methods.errors import OptionError
from methods.keep import KeepOption
from methods.registry import option_from_dict
from methods.tied import untie_output_embeddings

SCHEMA_VERSION = 2
DEFAULT_KEY = "_default"
PATTERN_PREFIX = "re:"


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


def plan_schema() -> dict[str, Any]:
    text = resources.files("autotune").joinpath("data/plan.schema.json").read_text("utf-8")
    return json.loads(text)


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
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON, atomically."""
        write_text_atomic(path, self.to_json())

    @classmethod
    def from_dict(cls, data: Any, origin: str = "plan") -> Plan:
        if not isinstance(data, dict):
            raise PlanError(f"{origin} must hold a JSON object, not {type(data).__name__}")
        data = migrate(data, origin)
        try:
            jsonschema.validate(data, plan_schema())
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "top level"
            raise PlanError(
                f"{origin} does not fit the plan schema at {where}: {exc.message}"
            ) from None
        known = {k: data[k] for k in data if k in cls.__dataclass_fields__}
        plan = cls(**known)
        plan.options()  # every option must parse
        return plan

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None, strict: bool = True) -> Plan:
        """Read a plan; with ``model``, check it was made for that model."""
        file = Path(path)
        if not file.is_file():
            raise PlanError(f"plan file {str(file)!r} does not exist")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise PlanError(f"{file} is not a text file") from None
        except json.JSONDecodeError as exc:
            raise PlanError(
                f"{file} is not valid JSON ({exc.msg}: line {exc.lineno}, column {exc.colno}); "
                "is it truncated?"
            ) from None
        plan = cls.from_dict(data, origin=str(file))
        if model is not None:
            plan.check_model(model, strict=strict)
        return plan

    # -------------------------------------------------------------- options
    def options(self) -> dict[str, Option]:
        """Every entry of ``layers`` parsed into an option (keys unchanged)."""
        parsed = {}
        for key, value in self.layers.items():
            if key.startswith(PATTERN_PREFIX):
                try:
                    re.compile(key[len(PATTERN_PREFIX) :])
                except re.error as exc:
                    raise PlanError(f"layer pattern {key!r} is not a valid regex: {exc}") from None
            try:
                parsed[key] = option_from_dict(value)
            except OptionError as exc:
                raise PlanError(f"layer {key!r}: {exc}") from None
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
        patterns = [
            (key, re.compile(key[len(PATTERN_PREFIX) :]), opt)
            for key, opt in parsed.items()
            if key.startswith(PATTERN_PREFIX)
        ]
        if strict:
            unknown = sorted(set(exact) - names)
            if unknown:
                raise PlanError(
                    f"the plan names {len(unknown)} layer(s) this model does not have as a "
                    f"compressible layer, e.g. {unknown[0]!r}"
                )
            for key, regex, _ in patterns:
                if not any(regex.fullmatch(n) for n in layer_names):
                    raise PlanError(f"layer pattern {key!r} matches no layer of this model")
        default = parsed.get(DEFAULT_KEY, KeepOption())
        resolved = {}
        for name in layer_names:
            if name in exact:
                resolved[name] = exact[name]
                continue
            match = next((opt for _, regex, opt in patterns if regex.fullmatch(name)), None)
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
                apply_kept_units(model, kept)
            except OptionError as exc:
                raise PlanError(f"the plan's structure does not fit this model: {exc}") from None
        untie_output_embeddings(model)
        return model

    # ---------------------------------------------------------- fingerprint
    def check_model(
        self, model: nn.Module, strict: bool = True, actual: dict[str, Any] | None = None
    ) -> None:
        """Raise :class:`FingerprintMismatchError` if the plan was made for another model
        (only a warning with ``strict=False``; plans without a fingerprint always pass).
        ``actual`` is the model's fingerprint when it is already known."""
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
