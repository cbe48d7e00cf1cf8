"""methods.owned_cache: values kept while their owners live, within a byte cap."""

from __future__ import annotations

import gc

from methods.owned_cache import OwnedCache


class Owner:
    pass


def test_a_value_is_made_once_per_owners_and_key_and_goes_with_any_owner() -> None:
    cache: OwnedCache[str] = OwnedCache(cap_bytes=100, size_of=len)
    first, second = Owner(), Owner()
    made = []

    def make(value: str):
        return lambda: made.append(value) or value

    assert cache.get((first, None), ("k",), make("a")) == "a"
    assert cache.get((first, None), ("k",), make("b")) == "a"  # kept
    assert cache.get((first, second), ("k",), make("c")) == "c"  # other owners
    assert cache.get((first, None), ("j",), make("d")) == "d"  # another key
    assert made == ["a", "c", "d"] and cache.used == 3
    del second
    gc.collect()
    assert len(cache.entries) == 2 and cache.used == 2  # its entry went with it
    del first
    gc.collect()
    assert not cache.entries and cache.used == 0


def test_the_least_recently_used_go_for_room_and_a_value_over_the_cap_is_not_kept() -> None:
    cache: OwnedCache[str] = OwnedCache(cap_bytes=4, size_of=len)
    owner = Owner()
    cache.get((owner,), (1,), lambda: "aa")
    cache.get((owner,), (2,), lambda: "bb")
    cache.get((owner,), (1,), lambda: "xx")  # a hit: 1 is now the most recent
    cache.get((owner,), (3,), lambda: "cc")
    assert [key[1] for key in cache.entries] == [1, 3] and cache.used == 4
    assert cache.get((owner,), (4,), lambda: "toolong") == "toolong"
    assert [key[1] for key in cache.entries] == [1, 3]
