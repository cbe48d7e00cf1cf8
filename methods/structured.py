"""Structured pruning: remove whole FFN neurons and attention heads, so layers shrink.

A *unit group* is a set of layers that must shrink together to keep the model's shapes
consistent: producers whose output rows form the units (the FFN's up/gate projections; the
query, key and value projections) and one consumer whose input columns read them (the FFN's
down projection; the attention output projection). Removing unit ``u`` deletes
``rows_per_unit`` rows at each producer segment and ``cols_per_unit`` columns of the
consumer. Groups are found by module structure, not by model name:

* FFN: ``intermediate.dense`` -> ``output.dense`` (BERT-like), ``gate_proj``/``up_proj`` ->
  ``down_proj`` (Llama, Mistral, Qwen2), ``c_fc`` -> ``c_proj`` (GPT-2, ``Conv1D``),
  ``fc1`` -> ``fc2`` (OPT).
* Attention: ``self.query/key/value`` -> ``output.dense`` (BERT-like), ``q_proj/k_proj/v_proj``
  -> ``o_proj`` or ``out_proj`` (Llama family, OPT), ``c_attn`` (fused) -> ``c_proj`` (GPT-2).
  With grouped-query attention a unit is one key/value head with the query heads that share
  it, so the grouping stays intact.

Units are ranked by a Wanda-like structured score measured on calibration inputs: the sum
over the unit's consumer columns of ``||X_j|| * ||W_:,j||``. The same number of units is
removed in every group (``round(fraction * units)``, at least one kept), and the attributes
that attention modules read at run time (``num_heads``, ``split_size``...) are updated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from methods.base import is_conv1d, linear_weight
from methods.errors import OptionError

UnitKind = Literal["ffn", "heads"]
UNIT_KINDS: tuple[UnitKind, ...] = ("ffn", "heads")


@dataclass(frozen=True)
class Segment:
    """``rows_per_unit`` output rows per unit of ``layer``, starting at row ``offset``."""

    layer: str
    offset: int
    rows_per_unit: int


@dataclass(frozen=True)
class UnitGroup:
    """Layers that shrink together when units (neurons, heads) are removed."""

    kind: UnitKind
    container: str
    producers: tuple[Segment, ...]
    consumer: str
    cols_per_unit: int
    units: int

    def consumer_columns(self, units: torch.Tensor) -> torch.Tensor:
        """Input columns of the consumer that belong to ``units`` (sorted unit indices)."""
        base = units[:, None] * self.cols_per_unit
        return (base + torch.arange(self.cols_per_unit)).reshape(-1)

    def producer_rows(self, layer: str, units: torch.Tensor) -> torch.Tensor:
        """Output rows of producer ``layer`` that belong to ``units``, in row order."""
        rows = [
            seg.offset + (units[:, None] * seg.rows_per_unit + torch.arange(seg.rows_per_unit))
            for seg in self.producers
            if seg.layer == layer
        ]
        return torch.cat([r.reshape(-1) for r in rows]).sort().values


def _child(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _out_width(module: nn.Module) -> int:
    return linear_weight(module).shape[0]


def _is_dense(module: nn.Module | None) -> bool:
    return module is not None and (isinstance(module, nn.Linear) or is_conv1d(module))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _ffn_group(name: str, module: nn.Module) -> UnitGroup | None:
    patterns = (
        (("intermediate.dense",), "output.dense"),
        (("gate_proj", "up_proj"), "down_proj"),
        (("c_fc",), "c_proj"),
        (("fc1",), "fc2"),
    )
    for producers, consumer in patterns:
        layers = [_child(module, p) for p in (*producers, consumer)]
        if not all(_is_dense(m) for m in layers):
            continue
        width = _out_width(layers[0])
        if any(_out_width(m) != width for m in layers[:-1]):
            continue
        if linear_weight(layers[-1]).shape[1] != width:
            continue
        segments = tuple(Segment(_join(name, p), 0, 1) for p in producers)
        return UnitGroup("ffn", name, segments, _join(name, consumer), 1, width)
    return None


def _attention_group(name: str, module: nn.Module) -> UnitGroup | None:
    if all(_is_dense(_child(module, p)) for p in ("self.query", "self.key", "self.value")):
        inner = module.get_submodule("self")
        out = _child(module, "output.dense")
        head_dim = getattr(inner, "attention_head_size", None)
        if not _is_dense(out) or not isinstance(head_dim, int):
            return None
        heads = _out_width(inner.query) // head_dim
        segments = tuple(
            Segment(_join(name, f"self.{p}"), 0, head_dim) for p in ["query", "key", "value"]
        )
        return UnitGroup("heads", name, segments, _join(name, "output.dense"), head_dim, heads)
    if all(_is_dense(_child(module, p)) for p in ("q_proj", "k_proj", "v_proj")):
        out_name = next((p for p in ("o_proj", "out_proj") if _is_dense(_child(module, p))), None)
        head_dim = getattr(module, "head_dim", None)
        if out_name is None or not isinstance(head_dim, int):
            return None
        q_heads = _out_width(module.q_proj) // head_dim
        kv_heads = _out_width(module.k_proj) // head_dim
        if kv_heads == 0 or q_heads % kv_heads:
            return None
        per_group = q_heads // kv_heads
        segments = (
            Segment(_join(name, "q_proj"), 0, per_group * head_dim),
            Segment(_join(name, "k_proj"), 0, head_dim),
            Segment(_join(name, "v_proj"), 0, head_dim),
        )
        return UnitGroup(
            "heads", name, segments, _join(name, out_name), per_group * head_dim, kv_heads
        )
    c_attn, c_proj = _child(module, "c_attn"), _child(module, "c_proj")
    head_dim = getattr(module, "head_dim", None)
    if _is_dense(c_attn) and _is_dense(c_proj) and isinstance(head_dim, int):
        width = linear_weight(c_proj).shape[1]
        if _out_width(c_attn) != 3 * width:
            return None
        segments = tuple(Segment(_join(name, "c_attn"), k * width, head_dim) for k in range(3))
        return UnitGroup(
            "heads", name, segments, _join(name, "c_proj"), head_dim, width // head_dim
        )
    return None


def find_unit_groups(model: nn.Module, kinds: Iterable[UnitKind] = UNIT_KINDS) -> list[UnitGroup]:
    """Every FFN and attention group of ``model`` whose layout is recognised."""
    wanted = set(kinds)
    groups: list[UnitGroup] = []
    for name, module in model.named_modules():
        for kind, finder in (("ffn", _ffn_group), ("heads", _attention_group)):
            if kind in wanted and (group := finder(name, module)) is not None:
                groups.append(group)
    return groups


@torch.no_grad()
def unit_scores(
    model: nn.Module, groups: Sequence[UnitGroup], batches: Sequence[Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Per group (keyed by consumer) the score of each unit: the sum over its consumer
    columns of ``||X_j|| * ||W_:,j||``, with ``X`` the consumer's calibration inputs."""
    if not batches:
        raise OptionError("structured pruning needs calibration batches to rank units")
    sums: dict[str, torch.Tensor] = {}

    def recorder(layer: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().float()
            x = x.reshape(-1, x.shape[-1])
            total = x.pow(2).sum(0)
            sums[layer] = sums[layer] + total if layer in sums else total

        return hook

    handles = [
        model.get_submodule(g.consumer).register_forward_pre_hook(recorder(g.consumer))
        for g in groups
    ]
    try:
        for batch in batches:
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    scores = {}
    for group in groups:
        if group.consumer not in sums:
            raise OptionError(f"{group.consumer}: received no input on the calibration batches")
        weight = linear_weight(model.get_submodule(group.consumer)).float()
        per_column = sums[group.consumer].sqrt() * weight.norm(dim=0)
        scores[group.consumer] = per_column.reshape(group.units, group.cols_per_unit).sum(1)
    return scores


def units_to_keep(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Sorted indices of the units kept when ``round(fraction * n)`` of the lowest-scoring are
    removed (at least one unit is kept; ties go to the lower index)."""
    if not 0.0 <= fraction < 1.0:
        raise OptionError(f"structured fraction {fraction!r} is out of range; allowed: [0, 1)")
    n = scores.numel()
    keep = max(1, n - round(fraction * n))
    order = torch.argsort(-scores.double(), stable=True)
    return order[:keep].sort().values


def _set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Replace the ``[out, in]`` weight of a linear or Conv1D layer, updating its sizes."""
    stored = weight.t() if is_conv1d(module) else weight
    module.weight = nn.Parameter(stored.contiguous(), requires_grad=module.weight.requires_grad)
    if is_conv1d(module):
        module.nf, module.nx = weight.shape
    else:
        module.out_features, module.in_features = weight.shape


@torch.no_grad()
def _keep_rows(module: nn.Module, rows: torch.Tensor) -> None:
    _set_weight(module, linear_weight(module)[rows])
    if getattr(module, "bias", None) is not None:
        module.bias = nn.Parameter(module.bias[rows].contiguous(), module.bias.requires_grad)


@torch.no_grad()
def _keep_cols(module: nn.Module, cols: torch.Tensor) -> None:
    _set_weight(module, linear_weight(module)[:, cols])


def _update_attention_attributes(module: nn.Module, group: UnitGroup, kept: int) -> None:
    """Attributes attention modules read at run time, for ``kept`` units."""
    width = kept * group.cols_per_unit
    target = _child(module, "self") if group.producers[0].layer.endswith("self.query") else module
    head_dim = getattr(target, "head_dim", None) or getattr(target, "attention_head_size", None)
    q_heads = width // head_dim if head_dim else None
    for attribute, value in (
        ("num_heads", q_heads),
        ("num_attention_heads", q_heads),
        ("num_key_value_heads", kept if group.cols_per_unit != head_dim else q_heads),
        ("all_head_size", width),
        ("split_size", width),
    ):
        if value is not None and isinstance(getattr(target, attribute, None), int):
            setattr(target, attribute, value)


def remove_units(model: nn.Module, group: UnitGroup, keep: torch.Tensor) -> UnitGroup:
    """Shrink ``group``'s layers in place to the units ``keep``; the shrunken group."""
    keep = torch.as_tensor(keep, dtype=torch.int64).sort().values
    if keep.numel() == 0 or int(keep.min()) < 0 or int(keep.max()) >= group.units:
        raise OptionError(
            f"{group.consumer}: kept units must be distinct indices in 0..{group.units - 1}"
        )
    if keep.unique().numel() != keep.numel():
        raise OptionError(f"{group.consumer}: kept units must be distinct")
    for layer in dict.fromkeys(seg.layer for seg in group.producers):
        _keep_rows(model.get_submodule(layer), group.producer_rows(layer, keep))
    _keep_cols(model.get_submodule(group.consumer), group.consumer_columns(keep))
    kept = keep.numel()
    if group.kind == "heads":
        _update_attention_attributes(model.get_submodule(group.container), group, kept)
    offsets: dict[str, int] = {}
    segments = []
    for seg in group.producers:
        segments.append(Segment(seg.layer, offsets.get(seg.layer, 0), seg.rows_per_unit))
        offsets[seg.layer] = offsets.get(seg.layer, 0) + kept * seg.rows_per_unit
    return UnitGroup(
        group.kind, group.container, tuple(segments), group.consumer, group.cols_per_unit, kept
    )


def prune_structured(
    model: nn.Module,
    fractions: Mapping[UnitKind, float],
    batches: Sequence[Mapping[str, torch.Tensor]],
    groups: Sequence[UnitGroup] | None = None,
) -> dict[str, list[int]]:
    """Remove the lowest-scoring ``fractions[kind]`` of units of every group (``groups``:
    the model's, as its adapter finds them; default :func:`find_unit_groups`), in place.

    Returns the kept units per consumer layer, which :func:`apply_kept_units` replays on an
    unpruned copy of the model without calibration."""
    unknown = sorted(set(fractions) - set(UNIT_KINDS))
    if unknown:
        raise OptionError(f"unknown structured unit kind(s) {unknown}; allowed: {list(UNIT_KINDS)}")
    kinds = [k for k, f in fractions.items() if f > 0]
    groups = [g for g in (find_unit_groups(model) if groups is None else groups) if g.kind in kinds]
    missing = sorted(set(kinds) - {g.kind for g in groups})
    if missing:
        raise OptionError(
            f"structured pruning of {missing}: no such units found in "
            f"{type(model).__name__}; recognised layouts are listed in methods/structured.py"
        )
    scores = unit_scores(model, groups, batches)
    kept = {g.consumer: units_to_keep(scores[g.consumer], fractions[g.kind]) for g in groups}
    return apply_kept_units(model, {k: v.tolist() for k, v in kept.items()}, groups)


def apply_kept_units(
    model: nn.Module,
    kept: Mapping[str, Sequence[int]],
    groups: Sequence[UnitGroup] | None = None,
) -> dict[str, list[int]]:
    """Shrink the groups named by their consumer layer to the given units, in place
    (``groups``: as in :func:`prune_structured`)."""
    by_consumer = {g.consumer: g for g in (find_unit_groups(model) if groups is None else groups)}
    unknown = sorted(set(kept) - set(by_consumer))
    if unknown:
        raise OptionError(
            f"structured pruning names {unknown[:3]}, which are not the output layer of an "
            f"FFN or attention block of this model; allowed: {sorted(by_consumer)[:4]}..."
        )
    for consumer, units in kept.items():
        remove_units(model, by_consumer[consumer], torch.tensor(list(units), dtype=torch.int64))
    return {k: [int(u) for u in v] for k, v in kept.items()}
