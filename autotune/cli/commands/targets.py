"""``autotune targets``: list the hardware registry, aliases included."""

from __future__ import annotations

import argparse
import json
from typing import Any

from autotune.cli.exit_codes import EXIT_OK


def cmd_targets(args: argparse.Namespace) -> int:
    """Print the registry as a table, or as JSON with ``--json``."""
    from autotune.targets import aliases_by_target, load_registry

    specs, aliases = load_registry(args.target_file)
    named = aliases_by_target(specs, aliases)
    if args.json:
        print(
            json.dumps([s.to_dict() | {"aliases": named[s.name]} for s in specs.values()], indent=2)
        )
        return EXIT_OK
    rows = [
        ("name", "aliases", "kind", "memory", "bandwidth", "peak (dense)", "fast weight formats")
    ]
    rows += [_row(spec, named[spec.name]) for spec in specs.values()]
    rows.append(("local", "-", "probed", "-", "-", "measured on this machine when used", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip())
    return EXIT_OK


def _row(spec: Any, aliases: list[str]) -> tuple[str, ...]:
    """One target's row of the table."""
    peaks = ", ".join(f"{k} {v / 1e12:.3g}T" for k, v in spec.peak_flops.items())
    return (
        spec.name,
        ", ".join(aliases) or "-",
        spec.kind,
        f"{spec.memory_bytes / 2**30:.0f} GiB",
        f"{spec.bandwidth / 1e9:.0f} GB/s",
        peaks,
        ", ".join(spec.kernels) or "-",
    )
