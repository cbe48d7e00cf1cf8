"""Whether a command works block by block."""

from __future__ import annotations

import argparse
import sys


def streams(args: argparse.Namespace) -> bool:
    """Whether to work block by block: asked for, or the model is too large for memory."""
    from autotune.streamed import too_large_for_memory

    if args.low_memory:
        return True
    reason = too_large_for_memory(args.model)
    if reason and not args.quiet:
        print(f"[autotune] {reason}: working block by block", file=sys.stderr)
    return reason is not None
