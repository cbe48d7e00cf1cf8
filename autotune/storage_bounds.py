"""What a budget asks of a model's storage, answered from layer shapes alone.

Before any calibration data is read or any layer timed, the stored bytes and weight bits of
the model as it is and of its smallest plan follow from the layers' shapes and the options
offered. A budget below the smallest plan is refused at once, and a storage-only budget the
uncompressed model already meets is answered at once: every layer is kept and nothing is
profiled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from autotune.budget import Budget
from autotune.errors import InfeasibleBudgetError
from autotune.layers import LayerRef, compressible_layers, weight_numel
from methods.base import Option
from methods.errors import OptionError
from methods.keep import KeepOption
from methods.registry import method_of
from profilers.measure import model_bytes


@dataclass(frozen=True)
class StorageBounds:
    """Stored bytes and weight bits of the model kept as it is and of its smallest plan."""

    kept_bytes: int
    smallest_bytes: int
    kept_bits: int
    smallest_bits: int
    total_weights: int

    @classmethod
    def of(
        cls, model: nn.Module, layers: Sequence[LayerRef], options: Mapping[str, Sequence[Option]]
    ) -> StorageBounds:
        keep = KeepOption()
        kept_bytes = model_bytes(model)
        all_layers = compressible_layers(model, min_numel=0)
        kept_bits = sum(8 * method_of(keep).cost(r.shape, keep).weight_bytes for r in all_layers)
        saved_bytes = saved_bits = 0
        for ref in layers:
            kept = method_of(keep).cost(ref.shape, keep)
            costs = [_cost(ref, o) for o in options.get(ref.name, ())]
            costs = [c for c in costs if c is not None]
            if costs:
                saved_bytes += max(0, kept.bytes - min(c[0] for c in costs))
                saved_bits += max(0, 8 * kept.weight_bytes - min(c[1] for c in costs))
        return cls(
            kept_bytes=kept_bytes,
            smallest_bytes=kept_bytes - saved_bytes,
            kept_bits=kept_bits,
            smallest_bits=kept_bits - saved_bits,
            total_weights=max(1, weight_numel(model)),
        )

    def refuse_unreachable(self, budget: Budget) -> None:
        """Raise :class:`InfeasibleBudgetError` when no plan meets the storage terms (a
        serving budget, whose memory also holds the KV cache and activations, is checked
        once those are known)."""
        parts, smallest = [], {}
        if budget.context:
            return
        memory = budget.memory_limit(self.kept_bytes)
        if memory is not None and self.smallest_bytes > memory:
            smallest["bytes"] = float(self.smallest_bytes)
            parts.append(
                f"the smallest plan for this model stores {self.smallest_bytes:,} bytes "
                f"({self.smallest_bytes / 1e6:.3f} MB), above the limit of {memory:,} bytes"
            )
        if budget.avg_bits is not None and self.smallest_bits > budget.avg_bits * (
            self.total_weights
        ):
            fewest = self.smallest_bits / self.total_weights
            smallest["bits"] = float(self.smallest_bits)
            parts.append(
                f"the fewest stored bits per weight reachable is {fewest:.3f}, "
                f"above {budget.avg_bits:g}"
            )
        if parts:
            raise InfeasibleBudgetError(
                f"budget {budget.spec} cannot be met: " + "; ".join(parts), smallest
            )

    def met_as_is(self, budget: Budget) -> bool:
        """Whether the uncompressed model meets a budget of storage terms only (latency and
        serving-memory terms need timing and activations: they are checked once priced)."""
        if budget.bounds_latency or budget.bounds_decode or budget.context:
            return False
        memory = budget.memory_limit(self.kept_bytes)
        if memory is None and budget.avg_bits is None:
            return False
        if memory is not None and self.kept_bytes > memory:
            return False
        return budget.avg_bits is None or self.kept_bits <= budget.avg_bits * self.total_weights


def _cost(ref: LayerRef, option: Option) -> tuple[int, int] | None:
    try:
        cost = method_of(option).cost(ref.shape, option)
    except OptionError:
        return None
    return cost.bytes, 8 * cost.weight_bytes


def keep_only(options: Mapping[str, Sequence[Option]]) -> dict[str, list[Option]]:
    """Every layer offered only to be kept as it is."""
    return {name: [KeepOption()] for name in options}
