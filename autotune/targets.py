"""The hardware registry: named targets kept as data, user files, and ``local``.

Built-in entries live in ``autotune/data/targets.json`` with a source for each figure. Users
add or override entries with their own JSON files (``--target-file``), in the same format.
``local`` probes and micro-benchmarks this machine.

Target files are read with :func:`autotune.json_input.read_json` (size, depth, UTF-8 and
finite numbers bounded) and every figure is held within physical sense: memory from 1 KiB
to 1 PB, bandwidth from 1 MB/s to 100 TB/s, peak FLOP/s from 1 MFLOP/s to 1 EFLOP/s, a
per-operation overhead of at most one second.
"""

from __future__ import annotations

import copy
import difflib
import functools
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from autotune.errors import TargetError
from autotune.json_input import check_schema, parse_json, read_json
from methods.gguf_types import TYPE_FALLBACKS as BLOCK_TYPES
from profilers.hardware import HardwareSpec
from profilers.kernel_support import allowed_kernel_entries

MAX_MEMORY_BYTES = 10**15  # 1 PB
MIN_MEMORY_BYTES = 2**10
MAX_BANDWIDTH = 100e12  # bytes per second: 100 TB/s
MIN_BANDWIDTH = 1e6  # 1 MB/s
MAX_PEAK_FLOPS = 1e18
MIN_PEAK_FLOPS = 1e6
MAX_OP_OVERHEAD_S = 1.0
_NAME = {"type": "string", "minLength": 1, "maxLength": 200}
_KERNEL_SCHEMA = {
    "type": "object",
    "required": ["compute_dtype", "efficiency"],
    "properties": {
        "compute_dtype": _NAME,
        "max_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": 2**31},
        "efficiency": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "source": {"type": "string"},
    },
    "additionalProperties": False,
}
_PEAKS_SCHEMA = {
    "type": "object",
    "propertyNames": {"minLength": 1, "maxLength": 200},
    "additionalProperties": {
        "type": "number",
        "minimum": MIN_PEAK_FLOPS,
        "maximum": MAX_PEAK_FLOPS,
    },
}
_EFFICIENCY = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
_OP_OVERHEAD = {"type": "number", "minimum": 0, "maximum": MAX_OP_OVERHEAD_S}
_SOURCES = {"type": "object", "additionalProperties": {"type": "string"}}
_KERNELS = {"type": "object", "additionalProperties": _KERNEL_SCHEMA}
_BLOCK_RATES = {  # profilers.hardware.HardwareSpec.block_rates
    "type": "object",
    "additionalProperties": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
}
RUNTIME_SCHEMA: dict[str, Any] = {  # profilers.hardware.RuntimePrices
    "type": "object",
    "properties": {
        "efficiency": _EFFICIENCY,
        "op_overhead_s": _OP_OVERHEAD,
        "peak_flops": _PEAKS_SCHEMA,
        "kernels": _KERNELS,
        "sources": _SOURCES,
        "block_rates": _BLOCK_RATES,
    },
    "additionalProperties": False,
}
ENTRY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "kind", "description", "memory_bytes", "bandwidth", "peak_flops"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]*$", "maxLength": 100},
        "kind": {"enum": ["cpu", "gpu"]},
        "description": {"type": "string"},
        "memory_bytes": {
            "type": "integer",
            "minimum": MIN_MEMORY_BYTES,
            "maximum": MAX_MEMORY_BYTES,
        },
        "bandwidth": {"type": "number", "minimum": MIN_BANDWIDTH, "maximum": MAX_BANDWIDTH},
        "peak_flops": {**_PEAKS_SCHEMA, "minProperties": 1},
        "dense_dtype": _NAME,
        "efficiency": _EFFICIENCY,
        "op_overhead_s": _OP_OVERHEAD,
        "int8_pairs_saturate": {"type": "boolean"},
        "kernels": _KERNELS,
        "sources": _SOURCES,
        "block_rates": _BLOCK_RATES,
        "runtimes": {"type": "object", "additionalProperties": RUNTIME_SCHEMA},
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


def _checked(data: Any, origin: str) -> dict[str, Any]:
    """Parsed target file data, refused unless it fits :data:`FILE_SCHEMA`."""
    if isinstance(data, dict) and "targets" not in data and "name" in data:
        data = {"targets": [data]}
    check_schema(data, FILE_SCHEMA, origin, TargetError)
    _check_kernel_names(data, origin)
    return data


def _check_kernel_names(data: dict[str, Any], origin: str) -> None:
    """A kernel or runtime name autotune does not know is a typo, not a device without it."""
    from autotune.runtimes import RUNTIMES

    allowed = allowed_kernel_entries()
    for index, entry in enumerate(data["targets"]):
        runtimes = entry.get("runtimes", {})
        strange = sorted(set(runtimes) - set(RUNTIMES))
        if strange:
            raise TargetError(
                f"{origin}: targets/{index}/runtimes: unknown runtime {strange[0]!r} in "
                f"{entry['name']!r}; allowed: {', '.join(RUNTIMES)}"
            )
        tables = {"kernels": entry.get("kernels", {})}
        tables.update({f"runtimes/{n}/kernels": r.get("kernels", {}) for n, r in runtimes.items()})
        _refuse_unknown(tables, allowed, "kernel", f"{origin}: targets/{index}", entry["name"])
        rates = {"block_rates": entry.get("block_rates", {})}
        rates.update(
            {f"runtimes/{n}/block_rates": r.get("block_rates", {}) for n, r in runtimes.items()}
        )
        where = f"{origin}: targets/{index}"
        _refuse_unknown(rates, sorted(BLOCK_TYPES), "block type", where, entry["name"])


def _refuse_unknown(
    tables: Mapping[str, Mapping[str, Any]],
    allowed: Sequence[str],
    what: str,
    where: str,
    name: str,
) -> None:
    """Refuse the first key of ``tables`` (section -> table) that ``allowed`` lacks."""
    for section, table in tables.items():
        unknown = sorted(set(table) - set(allowed))
        if unknown:
            raise TargetError(
                f"{where}/{section}: unknown {what} {unknown[0]!r} in {name!r}; "
                f"allowed: {', '.join(allowed)}"
            )


@functools.cache
def _builtin() -> dict[str, Any]:
    """The built-in targets, read once (callers only read them)."""
    text = resources.files("autotune").joinpath("data/targets.json").read_bytes()
    return _checked(parse_json(text, "built-in targets.json", TargetError), "built-in targets.json")


def load_registry(
    target_files: Iterable[str | Path] = (),
) -> tuple[dict[str, HardwareSpec], dict[str, str]]:
    """All named targets and aliases; later files override earlier entries of the same name."""
    specs: dict[str, HardwareSpec] = {}
    aliases: dict[str, str] = {}
    sources = [copy.deepcopy(_builtin())]
    for path in target_files:
        file = Path(path)
        sources.append(_checked(read_json(file, TargetError, what="target file"), str(file)))
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
        raise TargetError(
            f"unknown target {name!r}; {_did_you_mean(key, known)}known targets: {', '.join(known)}"
        )
    return specs[key]


def _did_you_mean(key: str, known: Iterable[str]) -> str:
    """``"did you mean 'a100'? "`` for a near miss of a known name, else nothing."""
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""


def aliases_by_target(
    specs: Mapping[str, HardwareSpec], aliases: Mapping[str, str]
) -> dict[str, list[str]]:
    """Each target's aliases, sorted (as :func:`load_registry` returns both)."""
    named: dict[str, list[str]] = {name: [] for name in specs}
    for alias, name in sorted(aliases.items()):
        if name in named:
            named[name].append(alias)
    return named


def list_targets(target_files: Iterable[str | Path] = ()) -> list[HardwareSpec]:
    """Every named target (``local`` aside), user files included."""
    specs, _ = load_registry(target_files)
    return list(specs.values())
