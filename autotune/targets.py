"""The hardware registry: named targets kept as data, user files, and ``local``.

Built-in entries live in ``autotune/data/targets.json`` with a source for each figure. Users
add or override entries with their own JSON files (``--target-file``), in the same format.
``local`` probes and micro-benchmarks this machine.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from autotune.errors import TargetError
from profilers.hardware import HardwareSpec
from profilers.kernel_support import allowed_kernel_entries

_KERNEL_SCHEMA = {
    "type": "object",
    "required": ["compute_dtype", "efficiency"],
    "properties": {
        "compute_dtype": {"type": "string"},
        "max_tokens": {"type": ["integer", "null"], "minimum": 1},
        "efficiency": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "source": {"type": "string"},
    },
    "additionalProperties": False,
}
ENTRY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "kind", "description", "memory_bytes", "bandwidth", "peak_flops"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]*$"},
        "kind": {"enum": ["cpu", "gpu"]},
        "description": {"type": "string"},
        "memory_bytes": {"type": "integer", "minimum": 1},
        "bandwidth": {"type": "number", "exclusiveMinimum": 0},
        "peak_flops": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {"type": "number", "exclusiveMinimum": 0},
        },
        "dense_dtype": {"type": "string"},
        "efficiency": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "op_overhead_s": {"type": "number", "minimum": 0},
        "kernels": {"type": "object", "additionalProperties": _KERNEL_SCHEMA},
        "sources": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
FILE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["targets"],
    "properties": {
        "schema_version": {"const": 1},
        "notes": {"type": "string"},
        "targets": {"type": "array", "items": ENTRY_SCHEMA},
        "aliases": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
LOCAL = "local"


def _read(text: str, origin: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TargetError(f"{origin} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if isinstance(data, dict) and "targets" not in data and "name" in data:
        data = {"targets": [data]}
    try:
        jsonschema.validate(data, FILE_SCHEMA)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "top level"
        raise TargetError(f"{origin}: {where}: {exc.message}") from None
    _check_kernel_names(data, origin)
    return data


def _check_kernel_names(data: dict[str, Any], origin: str) -> None:
    """A kernel name autotune does not know is a typo, not a device without that kernel."""
    allowed = allowed_kernel_entries()
    for index, entry in enumerate(data["targets"]):
        unknown = sorted(set(entry.get("kernels", {})) - set(allowed))
        if unknown:
            raise TargetError(
                f"{origin}: targets/{index}/kernels: unknown kernel {unknown[0]!r} in "
                f"{entry['name']!r}; allowed: {', '.join(allowed)}"
            )


def _builtin() -> dict[str, Any]:
    text = resources.files("autotune").joinpath("data/targets.json").read_text(encoding="utf-8")
    return _read(text, "built-in targets.json")


def load_registry(
    target_files: Iterable[str | Path] = (),
) -> tuple[dict[str, HardwareSpec], dict[str, str]]:
    """All named targets and aliases; later files override earlier entries of the same name."""
    specs: dict[str, HardwareSpec] = {}
    aliases: dict[str, str] = {}
    sources = [_builtin()]
    for path in target_files:
        file = Path(path)
        if not file.is_file():
            raise TargetError(f"target file {str(file)!r} does not exist")
        sources.append(_read(file.read_text(encoding="utf-8"), str(file)))
    for data in sources:
        for entry in data["targets"]:
            if entry["name"] == LOCAL:
                raise TargetError("'local' is reserved for the probed machine; rename the entry")
            specs[entry["name"]] = HardwareSpec.from_dict(entry)
        aliases.update(data.get("aliases", {}))
    return specs, aliases


def get_target(name: str | HardwareSpec, target_files: Iterable[str | Path] = ()) -> HardwareSpec:
    """A hardware spec by name (case-insensitive), alias, or ``local`` (probed now)."""
    if isinstance(name, HardwareSpec):
        return name
    specs, aliases = load_registry(target_files)
    key = str(name).strip().lower()
    if key == LOCAL:
        from profilers.probe import local_spec

        return local_spec()
    key = aliases.get(key, key)
    if key not in specs:
        known = sorted([*specs, *aliases, LOCAL])
        raise TargetError(f"unknown target {name!r}; known targets: {', '.join(known)}")
    return specs[key]


def list_targets(target_files: Iterable[str | Path] = ()) -> list[HardwareSpec]:
    specs, _ = load_registry(target_files)
    return list(specs.values())
