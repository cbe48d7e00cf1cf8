"""The one line an interrupt leaves: what was kept, and how to resume from it."""

from __future__ import annotations

import argparse


def interrupted(args: argparse.Namespace) -> str:
    """What an interrupt leaves behind, and how to go on from it."""
    if args.command not in ("tune", "profile"):
        return "interrupted"
    notes = [_cache_note(args)]
    if getattr(args, "storage", None):
        notes.append(f"the search's trials are kept in {args.storage}, so its study resumes too")
    return "; ".join(["interrupted", *notes])


def _cache_note(args: argparse.Namespace) -> str:
    """Whether finished sensitivity measurements were kept, and where."""
    why = _not_cached_because(args)
    if why:
        return f"sensitivity measurements are not cached ({why}): running again measures anew"
    from profilers.cache import default_cache_dir

    folder = args.cache_dir or default_cache_dir()
    return (
        f"finished sensitivity measurements are cached in {folder}; running the same command "
        "again resumes from them"
    )


def _not_cached_because(args: argparse.Namespace) -> str | None:
    """Why the sensitivity measurements were not cached, or None if they were."""
    if args.no_cache:
        return "--no-cache"
    if getattr(args, "streamed", False):
        return "block by block"
    from autotune.estimators import get_estimator

    if not get_estimator(args.sensitivity or "end-to-end").cacheable:
        return f"--sensitivity {args.sensitivity}"
    return None
