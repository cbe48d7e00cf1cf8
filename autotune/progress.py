"""Progress messages and bars of a tune, on stderr."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def say(self, message: str) -> None:
        if self.enabled:
            print(f"[autotune] {message}", file=sys.stderr, flush=True)

    def bar(self, total: int, desc: str):
        return tqdm(
            total=total,
            desc=desc,
            disable=None if self.enabled else True,
            leave=False,
            file=sys.stderr,
        )
