"""The settings of ``autotune()`` that ``autotune tune`` reads from its arguments, whether
the model is tuned in memory or block by block."""

from __future__ import annotations

import argparse
from typing import Any


def tune_settings(args: argparse.Namespace, methods: Any, labels: Any) -> dict[str, Any]:
    """Keyword settings of :func:`autotune.tuner.autotune` from the command line."""
    return {
        "calibration": args.calibration,
        "heldout": args.heldout,
        "seed": args.seed,
        "methods": methods,
        "option_labels": labels,
        "trust_remote_code": args.trust_remote_code,
        "progress": not args.quiet,
        "measure": not args.no_measure,
        "sensitivity": args.sensitivity,
        "search": args.search,
        "max_evals": args.max_evals,
        "timeout": args.timeout,
        "storage": args.storage,
        "study_name": args.study,
        "structured": {"ffn": args.prune_ffn, "heads": args.prune_heads},
        "runtime": args.runtime,
        "decode_slack": args.decode_slack,
        "relative_to": args.relative_to,
    }
