"""Latency of GGUF tensor types timed in llama.cpp on this machine (``--runtime llama.cpp
--target local``).

For every option label, one GGUF file gives each layer that offers the label that type (the
rest stay F32); all files and the all-F32 one are loaded at once and timed in rounds that
visit each in turn: prompt processing of the latency shape's tokens, or, for a decode shape,
one token at a time up to its context. A layer's share of a variant's gain over F32 is its
share of the variant's weights (llama.cpp's matmuls scale with them), so the sum over any
uniform plan is that variant's measured time, and a mixed plan is priced as the sum of its
layers' shares; the F32 time itself is split among layers by weights too (the split of a
constant changes no plan's total).
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from autotune.layers import LayerRef, compressible_layers
from methods.base import LayerShape, Option
from methods.gguf import GGUFOption
from methods.gguf_types import NEEDS_IMATRIX
from methods.keep import KeepOption
from profilers.latency_table import InModelLatency
from profilers.measure import LatencyStats, latency_stats
from profilers.paired_timing import Limit

ROUNDS = 5  # rounds of the table, which times a file per option label
FILE_ROUNDS = 15  # rounds of a plan's file beside the float one
KEEP = KeepOption().label
DECODE_STEPS = 16


@dataclasses.dataclass(frozen=True)
class ContextLength:
    """The context a decode input attends to, as a frozen KV cache reports it."""

    tokens: int

    def get_seq_length(self) -> int:
        return self.tokens


def shaped_inputs(rows: int, tokens: int, context: int = 0) -> dict[str, Any]:
    """Inputs of ``rows`` sequences of ``tokens`` new tokens after ``context`` tokens, as
    :func:`shape_of` reads them (the file timings need no values)."""
    import torch

    ids = torch.zeros(rows, tokens, dtype=torch.long)
    return {"input_ids": ids, "cache": ContextLength(context)} if context else {"input_ids": ids}


def shape_of(inputs: Mapping[str, Any]) -> tuple[int, int, int]:
    """(rows, new tokens per row, context before them) of a prefill or decode input."""
    ids = inputs["input_ids"]
    rows, tokens = int(ids.shape[0]), int(ids.shape[1])
    context = 0
    for value in inputs.values():
        length = getattr(value, "get_seq_length", None)
        if callable(length):
            context = int(length())
    return rows, tokens, context


def time_file(model: Any, rows: int, tokens: int, context: int) -> float:
    """Seconds llama.cpp takes for ``rows`` sequences of ``tokens`` new tokens after
    ``context`` tokens (prefill: one batch; decode: per step, one token at a time, the steps
    timed ending at position ``context``)."""
    from autotune.export.llama_cpp import time_tokens

    prompt = [3 + i % 200 for i in range(max(context, 1) + tokens)]
    if context == 0:
        pp, _ = time_tokens(model, prompt[:tokens], 0)
        return rows * pp
    # the steps end at the shape's position, so a table of learned positions (GPT-2) is
    # never read past the context that the budget was checked against
    start = max(context + 1 - DECODE_STEPS, 1)
    _, tg = time_tokens(model, prompt[:start], DECODE_STEPS)
    return rows * tg * tokens


def converted_copy(model: nn.Module, chosen: Mapping[str, Option], observers: Any) -> nn.Module:
    """A copy of ``model`` with the ``chosen`` layers converted (the others as they are)."""
    from autotune.apply import compress

    work = copy.deepcopy(model)
    compress(work, dict(chosen), observers=observers)
    return work


def write_variants(
    model: nn.Module,
    variants: Mapping[str, Mapping[str, Option]],
    folder: Path,
    tokenizer: Any = None,
    observers: Any = None,
    written: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """One GGUF file in ``folder`` per variant: ``model`` with that variant's layers
    converted (none: the model as it is); ``written(name)`` after each."""
    from autotune.export.gguf import GGUFExporter

    exporter = GGUFExporter()
    paths = {}
    for index, (name, chosen) in enumerate(variants.items()):
        paths[name] = folder / f"v{index}.gguf"
        work = converted_copy(model, chosen, observers) if chosen else model
        exporter.write(work, None, paths[name], tokenizer)
        if written is not None:
            written(name)
    return paths


def measure_in_llama_cpp(
    model: nn.Module,
    timed: Mapping[str, list[Option]],
    inputs: Mapping[str, Any],
    tokenizer: Any = None,
    progress: Callable[[int], None] | None = None,
    rounds: int = ROUNDS,
    observers: Any = None,
) -> InModelLatency:
    """Seconds per (layer shape, label) of every option in ``timed``, from one GGUF file per
    label timed in llama.cpp (see the module's docstring)."""
    refs = {ref.name: ref for ref in compressible_layers(model, min_numel=0)}
    labels: dict[str, dict[str, Option]] = {}  # timed label -> layer -> option timed
    aliases: dict[str, str] = {}  # an option's label -> the label it is timed as
    for name, options in timed.items():
        for option in options:
            if not isinstance(option, KeepOption):
                same = timing_form(option)
                labels.setdefault(same.label, {})[name] = same
                aliases[option.label] = same.label

    def written(label: str) -> None:
        if progress is not None and label != KEEP:
            progress(len({refs[n].shape for n in labels[label]}))

    with tempfile.TemporaryDirectory(prefix="autotune-llama-") as folder:
        variants = {KEEP: {}, **labels}
        paths = write_variants(model, variants, Path(folder), tokenizer, observers, written)
        measured = measure_files(paths, inputs, rounds)
    seconds = {k: v.p50_ms / 1e3 for k, v in measured.items()}
    result = split(seconds, labels, timed, refs)
    for (shape, label), value in list(result.layers.items()):
        for alias, same in aliases.items():
            if same == label and alias != label:
                result.layers[(shape, alias)] = value
    return result


def timing_form(option: Option) -> Option:
    """The option as it runs: an importance matrix changes a type's codes, not its speed,
    so the plain type is timed for both (and needs no calibration to build)."""
    if isinstance(option, GGUFOption) and option.imatrix and option.type not in NEEDS_IMATRIX:
        return dataclasses.replace(option, imatrix=False)
    return option


def split(
    seconds: Mapping[str, float],
    labels: Mapping[str, Mapping[str, Option]],
    timed: Mapping[str, list[Option]],
    refs: Mapping[str, LayerRef],
) -> InModelLatency:
    """Per (shape, label) seconds from each variant's time (see the module's docstring)."""
    weights = {name: refs[name].shape.numel for name in timed}
    total = sum(weights.values()) or 1
    whole = seconds[KEEP]
    layers: dict[tuple[LayerShape, str], float] = {}
    for name in timed:
        shape = refs[name].shape
        layers[(shape, KEEP)] = whole * weights[name] / total
    for label, chosen in labels.items():
        gain = seconds[label] - whole
        inside = sum(weights[n] for n in chosen) or 1
        for name in chosen:
            shape = refs[name].shape
            keep = layers[(shape, KEEP)]
            layers[(shape, label)] = max(keep + gain * weights[name] / inside, 0.0)
    return InModelLatency(layers=layers, whole=whole, rest=0.0)


def measure_files(
    paths: Mapping[str, Path],
    inputs: Mapping[str, Any],
    rounds: int | None = None,
    limit: Limit | None = None,
) -> dict[str, LatencyStats]:
    """Each GGUF file's latency at the shape of ``inputs``, timed in turn each round (the
    order reversed every other round) for ``rounds`` (default :data:`FILE_ROUNDS`, as many
    more as a ``limit`` allows); with a ``limit`` on ``"model"`` (against ``"baseline"``),
    the rounds stop once its verdict is settled."""
    from autotune.export.llama_cpp import LlamaCppModel

    if rounds is None:
        rounds = FILE_ROUNDS if limit is None else limit.rounds(FILE_ROUNDS)

    rows, tokens, context = shape_of(inputs)
    n_ctx = context + max(tokens, DECODE_STEPS) + 2
    loaded = {k: LlamaCppModel(p, n_ctx=n_ctx, all_logits=False) for k, p in paths.items()}
    samples: dict[str, list[float]] = {k: [] for k in loaded}
    try:
        order = list(loaded.items())
        for done in range(rounds):
            for key, llm in order if done % 2 == 0 else reversed(order):
                samples[key].append(time_file(llm, rows, tokens, context))
            if limit is not None and limit.settles(samples):
                break
    finally:
        for llm in loaded.values():
            llm.close()
    return {k: latency_stats(v) for k, v in samples.items()}
