"""The importance matrix a plan's ``gguf`` options were encoded with, as llama.cpp's imatrix
file (the GGUF form ``llama-imatrix`` writes and ``llama-quantize --imatrix`` reads).

For every layer the plan gives an importance-matrix option (only those: llama-quantize weighs
every tensor the file covers): ``<tensor>.in_sum2``, the sum over calibration tokens of each input
column's square (F32), and ``<tensor>.counts``, the tokens (F32), under the GGUF tensor names
of the model's export; ``general.type`` is ``imatrix`` with the dataset, chunk count and chunk
size keys llama-quantize requires. The sums come from the plan's own calibration batches
(rebuilt as :func:`autotune.apply.plan_calibration` rebuilds them) fed through the float model
as the tune fed them, so llama-quantize with this file gives an importance-matrix type the
codes the plan's export holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autotune.export.base import ExportError
from autotune.io import write_atomic
from autotune.plan import Plan
from methods.gguf import GGUFOption
from methods.observers import ChannelObserver
from profilers.execution.observe import collect_observers

IMATRIX_TYPE = "imatrix"


def layer_statistics(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], layers: set[str]
) -> dict[str, ChannelObserver]:
    """The input sums of squares over ``batches`` of each linear layer named in ``layers``,
    observed as a conversion observes them (any importance-matrix option asks for the same
    statistic; Q8_0 stands in for all)."""
    stand_in = [GGUFOption("Q8_0", imatrix=True)]
    observers = collect_observers(model, {name: stand_in for name in sorted(layers)}, batches)
    return {layer: observer for (layer, _), observer in observers.items()}  # type: ignore[misc]


def write_imatrix(
    model: nn.Module,
    plan: Plan,
    path: str | Path,
    *,
    tokenizer: Any = None,
    calibration: Any = None,
    layers: Iterable[str] | None = None,
) -> int:
    """Write the imatrix file of ``plan`` on ``model`` (float) to ``path``, atomically;
    returns the number of tensors it covers. ``layers``: these linear layers instead of the
    plan's weighted ones (e.g. every one, for llama-quantize's own mixes)."""
    import gguf

    from autotune.apply import plan_calibration
    from autotune.export.gguf_families import family_of, gguf_arch

    family = family_of(model)
    options = plan.layer_options(model)
    weighted = {ref.name for ref, option in options.items() if getattr(option, "imatrix", False)}
    if layers is not None:
        weighted = set(layers)
    if not weighted:
        raise ExportError("the plan gives no layer an importance matrix: there is none to write")
    batches = plan_calibration(plan, model, tokenizer, calibration)
    statistics = layer_statistics(model, batches, weighted)
    names = gguf.get_tensor_name_map(gguf_arch(family), model.config.num_hidden_layers)
    described = plan.calibration or {}

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch=family.arch)
        writer.add_type(IMATRIX_TYPE)
        writer.add_array(gguf.Keys.IMatrix.DATASETS, [str(described.get("source", "calibration"))])
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, len(batches))
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, int(described.get("seq_len", 128)))
        for layer, observer in statistics.items():
            name = names.get_name(f"{layer}.weight", try_suffixes=(".weight",))
            if name is None or not observer.tokens:
                continue
            sums = observer.sumsq.numpy().astype(np.float32).reshape(1, -1)
            writer.add_tensor(f"{name}.in_sum2", sums)
            writer.add_tensor(f"{name}.counts", np.array([[observer.tokens]], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_atomic(path, write)
    return len(statistics)
