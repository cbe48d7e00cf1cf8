"""Where end-to-end measurements can change the allocator's decision.

A cheap estimate scores every (layer, option); measuring one end to end costs a forward pass
of the model. The allocator's plan depends only on a few options per layer: the one it
chooses, the options beside it on the layer's front of bytes against error, and options whose
estimate could be too high to put them on that front. :func:`next_to_measure` names those that
are not measured yet, given the estimates, what is measured and the allocator's choice on the
two merged; repeating until it names none leaves a decision made on measured errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from methods.base import Option

Errors = Mapping[str, Mapping[str, float]]  # errors[layer][label]
Sizes = Mapping[str, Mapping[str, int]]  # stored bytes[layer][label]
Decide = Callable[[dict[str, dict[str, float]]], dict[str, str]]  # errors -> label per layer


@dataclass(frozen=True)
class Reach:
    """How far from the allocator's choice measurements go.

    ``steps``: front options on each side of the chosen one. ``band``: an estimate may be this
    factor too high; an unmeasured option within the steps' byte range whose estimate times
    ``band`` would reach the front is measured too. ``rounds``: the most decisions re-made.

    The default measures the chosen options alone, round after round until the choice rests
    on measured errors or three rounds are spent. One front neighbour on each side, a 0.8
    band and eight rounds measured about twice the pairs (1.5-2.1x the scoring time) for
    plans of 0.94x-1.08x the held-out error on the bundled models
    (``benchmarks/estimators.py``)."""

    steps: int = 0
    band: float = 1.0
    rounds: int = 3


def front(
    options: list[Option], sizes: Mapping[str, int], errors: Mapping[str, float]
) -> list[Option]:
    """The options no cheaper (or equally cheap) option beats on ``errors``, by bytes."""
    kept, best = [], math.inf
    scored = [o for o in options if o.label in errors]
    for option in sorted(scored, key=lambda o: (sizes[o.label], errors[o.label])):
        if errors[option.label] < best:
            kept.append(option)
            best = errors[option.label]
    return kept


def anchors(
    options: list[Option], sizes: Mapping[str, int], estimates: Mapping[str, float], chosen: str
) -> list[Option]:
    """The chosen option, and for each method the estimated option nearest it in bytes: one
    measurement per method puts that method's estimates on the measured scale."""
    size = max(sizes[chosen], 1)
    picked = [o for o in options if o.label == chosen]
    for method in dict.fromkeys(o.method for o in options):
        own = [o for o in options if o.method == method and o.label in estimates]
        if own:
            nearest = min(own, key=lambda o: abs(math.log(max(sizes[o.label], 1) / size)))
            if nearest not in picked:
                picked.append(nearest)
    return picked


def near_choice(
    options: list[Option],
    sizes: Mapping[str, int],
    errors: Mapping[str, float],
    chosen: str,
    reach: Reach,
) -> list[Option]:
    """The options the decision at ``chosen`` depends on: its front neighbours within
    ``reach.steps``, and the options in their byte range that an estimate ``reach.band`` times
    lower would put on the front."""
    line = front(options, sizes, errors)
    at = next((i for i, o in enumerate(line) if o.label == chosen), None)
    picked = [o for o in options if o.label == chosen]
    if at is None:
        return picked
    picked += [o for o in line[max(0, at - reach.steps) : at + reach.steps + 1] if o not in picked]
    low = sizes[line[max(0, at - reach.steps)].label]
    high = sizes[line[min(len(line) - 1, at + reach.steps)].label]
    for option in options:
        size = sizes[option.label]
        if option in picked or option.label not in errors or not low <= size <= high:
            continue
        floor = min(
            (
                errors[o.label]
                for o in options
                if o is not option and o.label in errors and sizes[o.label] <= size
            ),
            default=math.inf,
        )
        if errors[option.label] * reach.band < floor:
            picked.append(option)
    return picked


def next_to_measure(
    options: Mapping[str, list[Option]],
    sizes: Sizes,
    errors: Errors,
    measured: Mapping[str, Collection[str]],
    chosen: Mapping[str, str],
    reach: Reach,
) -> dict[str, list[Option]]:
    """Per layer, the options near the allocator's choice not measured (or refused) yet."""
    out = {}
    for name, offered in options.items():
        near = near_choice(offered, sizes[name], errors[name], chosen[name], reach)
        pending = [o for o in near if o.label not in measured.get(name, {})]
        if pending:
            out[name] = pending
    return out
