"""Wall time of the README's quick start, this checkout against another revision.

Runs ``autotune tune demo --budget 15MB --target cpu -o plan.json --save-model ...`` (what
``scripts/demo`` runs after its set-up) as a fresh process with an empty sensitivity cache,
alternating between this checkout and ``--against`` (a git revision, checked out into a
temporary worktree and imported from there), so both meet the same machine load. Prints one
row per run: wall seconds of the whole process, the tune's stage seconds, the held-out error
and the chosen plan's stored bytes, then the median wall time of each and their ratio.
With ``--warm``, each version first runs once untimed to fill a sensitivity cache of its own,
which its timed runs then read: a second tune of the model, as a user's next budget is.

Run: ``python benchmarks/quick_start_time.py --against HEAD~5`` (about 2 minutes per pair of
runs; ``--rounds 3`` by default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND = ["tune", "demo", "--budget", "15MB", "--target", "cpu"]
STAGES = ("price", "score", "search", "select", "measure")


def run(source: Path, work: Path, cache: Path | None = None) -> dict:
    """One quick start from the code under ``source``, with ``cache`` as its sensitivity
    cache (default: a cold one in ``work``)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(source),
        "AUTOTUNE_CACHE": str(cache or work / "cache"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    plan = work / "plan.json"
    command = [sys.executable, "-m", "autotune.cli", *COMMAND, "-o", str(plan)]
    command += ["--save-model", str(work / "compressed")]
    began = time.perf_counter()
    subprocess.run(command, env=env, cwd=work, check=True, capture_output=True)
    wall = time.perf_counter() - began
    written = json.loads(plan.read_text())
    search = written.get("search", {})
    return {
        "wall": wall,
        "stages": search.get("stage_seconds", {}),
        "error": written["measured"]["heldout_error"],
        "bytes": written["predicted"]["bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="a git revision to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--warm", action="store_true", help="time second tunes: each version's cache filled first"
    )
    args = parser.parse_args()
    revision = subprocess.run(
        ["git", "rev-parse", "--short", args.against],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as scratch:
        other = Path(scratch) / "other"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(other), revision],
            cwd=ROOT,
            check=True,
        )
        try:
            versions = {"this checkout": ROOT, revision: other}
            caches: dict[str, Path | None] = dict.fromkeys(versions)
            if args.warm:
                for index, name in enumerate(versions):
                    caches[name] = Path(scratch) / f"cache-{index}"
                    with tempfile.TemporaryDirectory() as work:
                        run(versions[name], Path(work), caches[name])  # untimed: fills it
            walls: dict[str, list[float]] = {name: [] for name in versions}
            print(
                "| round | code | wall s | "
                + " | ".join(f"{s} s" for s in STAGES)
                + " | held-out error | stored bytes |"
            )
            print("|---:|---|---:|" + "---:|" * len(STAGES) + "---:|---:|")
            for round_ in range(1, args.rounds + 1):
                order = list(versions) if round_ % 2 else list(reversed(versions))
                for name in order:
                    with tempfile.TemporaryDirectory() as work:
                        row = run(versions[name], Path(work), caches[name])
                    walls[name].append(row["wall"])
                    stages = " | ".join(f"{row['stages'].get(s, 0.0):.1f}" for s in STAGES)
                    print(
                        f"| {round_} | {name} | {row['wall']:.1f} | {stages} | "
                        f"{row['error']:.5f} | {row['bytes']:,} |",
                        flush=True,
                    )
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, check=False
            )
    ours, theirs = (statistics.median(w) for w in walls.values())
    print(
        f"\nmedian wall: this checkout {ours:.1f} s, {revision} {theirs:.1f} s; "
        f"ratio {ours / theirs:.2f}"
    )


if __name__ == "__main__":
    main()
