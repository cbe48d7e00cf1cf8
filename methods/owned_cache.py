"""Values kept while the objects they were made from live, within a byte cap."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

V = TypeVar("V")


class OwnedCache(Generic[V]):
    """Values kept per owners (objects, ``None`` for an absent one) and key, least recently
    used out first within a byte cap (``size_of`` a value's bytes). An entry goes as soon as
    one of its owners is collected, so a new object that takes a freed one's id never meets
    the freed one's value."""

    def __init__(self, cap_bytes: int, size_of: Callable[[V], int]) -> None:
        self.cap = cap_bytes
        self.size_of = size_of
        self.used = 0
        self.entries: OrderedDict[tuple[Hashable, ...], tuple[list, V, int]] = OrderedDict()

    def get(
        self, owners: Sequence[object | None], key: tuple[Hashable, ...], make: Callable[[], V]
    ) -> V:
        """The value kept for ``owners`` under ``key``, else ``make()``'s (kept if it fits)."""
        full = (*(id(owner) for owner in owners), *key)
        entry = self.entries.get(full)
        if entry is not None and all(
            (ref is None and owner is None) or (ref is not None and ref() is owner)
            for ref, owner in zip(entry[0], owners, strict=True)
        ):
            self.entries.move_to_end(full)
            return entry[1]
        self._drop(full)
        value = make()
        size = self.size_of(value)
        if size <= self.cap:
            while self.used + size > self.cap:
                self._drop(next(iter(self.entries)))
            refs = [
                None if owner is None else weakref.ref(owner, lambda _: self._drop(full))
                for owner in owners
            ]
            self.entries[full] = (refs, value, size)
            self.used += size
        return value

    def _drop(self, full: tuple[Hashable, ...]) -> None:
        entry = self.entries.pop(full, None)
        if entry is not None:
            self.used -= entry[2]
