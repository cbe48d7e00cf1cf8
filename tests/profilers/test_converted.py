"""Converted modules kept up to a byte cap."""

from __future__ import annotations

from torch import nn

from profilers.converted import ConvertedModules
from profilers.measure import state_dict_bytes


def test_modules_are_kept_until_the_cap_and_the_original_never() -> None:
    original = nn.Linear(8, 8)
    first, second = nn.Linear(8, 8), nn.Linear(8, 8)
    size = state_dict_bytes(first)
    kept = ConvertedModules(cap_bytes=size + size // 2)
    kept.put("a", "x", original, original)
    assert kept.get("a", "x") is None
    kept.put("a", "y", first, original)
    kept.put("a", "z", second, original)  # would pass the cap
    assert kept.get("a", "y") is first and kept.get("a", "z") is None
    assert kept.used == size


def test_retain_frees_what_it_drops() -> None:
    original = nn.Linear(8, 8)
    kept = ConvertedModules(cap_bytes=1 << 20)
    for label in "xyz":
        kept.put("a", label, nn.Linear(8, 8), original)
    kept.retain({("a", "y")})
    assert [kept.get("a", label) is not None for label in "xyz"] == [False, True, False]
    assert kept.used == state_dict_bytes(nn.Linear(8, 8))
    kept.clear()
    assert kept.used == 0 and kept.get("a", "y") is None
