"""Wall time per stage of a tune, for the plan's search record."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class StageClock:
    """Runs stages and keeps each one's wall time in seconds, by name, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, stage: Callable[..., T], *args: Any) -> T:
        start = time.perf_counter()
        try:
            return stage(*args)
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)
