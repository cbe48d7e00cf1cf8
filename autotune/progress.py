"""Progress messages and bars of a tune, on stderr.

On a terminal a phase is a tqdm bar. When stderr is piped or written to a log, a bar would be
either silent or a stream of carriage returns, so a phase prints plain lines instead: when it
starts, at most every ``LINE_EVERY_S`` seconds while it runs, and when it ends.
"""

from __future__ import annotations

import sys
import time
from typing import Any

LINE_EVERY_S = 30.0


class Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def say(self, message: str) -> None:
        if self.enabled:
            print(f"[autotune] {message}", file=sys.stderr, flush=True)

    def bar(self, total: int, desc: str) -> Any:
        """A context manager with ``update(n)``: a bar on a terminal, lines elsewhere."""
        if self.enabled and total > 0 and not _is_terminal(sys.stderr):
            return LineProgress(total, desc)
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            desc=desc,
            disable=None if self.enabled else True,
            leave=False,
            file=sys.stderr,
        )


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """A phase's progress as ``[autotune] desc: done/total (pct%), elapsed`` lines."""

    def __init__(self, total: int, desc: str, every_s: float = LINE_EVERY_S) -> None:
        self.total, self.desc, self.every_s = total, desc, every_s
        self.done = 0
        self.start = self.last = time.monotonic()

    def __enter__(self) -> LineProgress:
        self._line(f"{self.desc}: {self.total:,} steps")
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self._line(f"{self.desc}: done, {self.done:,}/{self.total:,} in {self._elapsed()}")

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            share = 100.0 * self.done / self.total
            self._line(
                f"{self.desc}: {self.done:,}/{self.total:,} ({share:.0f}%), {self._elapsed()}"
            )

    def _elapsed(self) -> str:
        seconds = time.monotonic() - self.start
        return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"

    @staticmethod
    def _line(text: str) -> None:
        print(f"[autotune] {text}", file=sys.stderr, flush=True)
