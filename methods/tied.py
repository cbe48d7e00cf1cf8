"""Tied input and output embeddings: one table serves the row lookup and the output projection.

Language models often use one matrix twice: as the input embedding and, transposed, as the
output layer (``lm_head``). :func:`untie_output_embeddings` replaces each such output layer by
a :class:`TiedHead`, which holds no weight: at every call it reads whatever module sits at the
embedding's place (the ``nn.Embedding``, or a compressed table swapped in later), so the
embedding is one ordinary compressible layer whose storage is held once and serves both uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods import kernels
from methods.base import is_conv1d, is_weight_layer, storage_key
from methods.quantized import QuantizedStorage, RowLookup


class TiedHead(nn.Module):
    """The output projection ``x @ table.T (+ bias)`` of a tied embedding table.

    It keeps a plain reference (no submodule, parameter or buffer) to the module holding the
    embedding and the attribute name, and reads the table there at each call. A table of
    8-bit symmetric per-row codes runs the int8 kernel on its own codes where the kernel
    applies; other compressed tables are dequantised. The original layer's bias is kept.
    A tied GPT-2 ``Conv1D`` (``transposed``) computes ``x @ table`` and always dequantises.
    """

    def __init__(
        self, head: nn.Module, parent: nn.Module, attr: str, embedding_name: str = ""
    ) -> None:
        super().__init__()
        object.__setattr__(self, "_embedding_parent", parent)  # not registered: no copy
        self.embedding_attr = attr
        self.embedding_name = embedding_name or attr
        self.transposed = is_conv1d(head)
        rows, cols = head.weight.shape  # the table's shape
        self.in_features, self.out_features = (rows, cols) if self.transposed else (cols, rows)
        self.bias = getattr(head, "bias", None)

    @property
    def table(self) -> nn.Module:
        """The module now at the embedding's place."""
        return getattr(self._embedding_parent, self.embedding_attr)

    def _int8_usable(self, table: nn.Module, x2: torch.Tensor) -> bool:
        return (
            isinstance(table, QuantizedStorage)
            and not self.transposed
            and table.bits == 8
            and table.symmetric
            and table.group_size == table.cols
            and kernels.int8_kernel_usable(x2.device, x2.shape[0], table.cols)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self.table
        if isinstance(table, nn.Embedding) and not self.transposed:
            return F.linear(x, table.weight, self.bias)  # what the tied nn.Linear computed
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._int8_usable(table, x2):
            y = kernels.int8_matmul(x2, table.codes, table.scales[:, 0])
        else:
            if isinstance(table, nn.Embedding):
                weight = table.weight
            elif hasattr(table, "dequantize_scratch"):
                weight = table.dequantize_scratch(x.dtype)
            else:
                weight = table.dequantize(x.dtype)
            if self.transposed and self.bias is not None:  # what Conv1D computes
                return torch.addmm(self.bias, x2, weight).view(*shape[:-1], self.out_features)
            y = x2 @ weight if self.transposed else F.linear(x2, weight)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def scratch_needs(self, dtype: torch.dtype) -> dict[str, int]:
        """What dequantising the whole table takes (see methods/workspace.py): the table's
        storage declares it (a row-lookup table declares none for its lookups alone)."""
        table = self.table
        if not hasattr(table, "dequantize_scratch"):
            return {}
        storage = super(RowLookup, table) if isinstance(table, RowLookup) else table
        return dict(storage.scratch_needs(dtype))

    def extra_repr(self) -> str:
        return (
            f"embedding={self.embedding_name}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias is not None}"
            + (", transposed" if self.transposed else "")
        )


def tied_pairs(model: nn.Module) -> dict[str, str]:
    """``{layer name: embedding name}`` of every layer (not yet untied) whose weight is an
    ``nn.Embedding``'s weight."""
    embeddings: dict[tuple, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            weight = module.weight
            embeddings.setdefault((storage_key(weight), tuple(weight.shape), weight.dtype), name)
    pairs: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, TiedHead)) or not is_weight_layer(module):
            continue
        weight = module.weight
        embedding = embeddings.get((storage_key(weight), tuple(weight.shape), weight.dtype))
        if embedding is not None:
            pairs[name] = embedding
    return pairs


def untie_output_embeddings(model: nn.Module) -> dict[str, str]:
    """Replace, in place, every layer whose weight is an ``nn.Embedding``'s weight by a
    :class:`TiedHead` of that embedding; returns ``{head name: embedding name}`` (heads
    already replaced included, so a second call changes nothing and returns the same)."""
    tied = {
        name: module.embedding_name
        for name, module in model.named_modules()
        if isinstance(module, TiedHead)
    }
    for name, embedding in tied_pairs(model).items():
        parent_name, _, attr = embedding.rpartition(".")
        parent = model.get_submodule(parent_name)
        model.set_submodule(name, TiedHead(model.get_submodule(name), parent, attr, embedding))
        tied[name] = embedding
    return tied


def tied_heads(model: nn.Module) -> dict[str, list[TiedHead]]:
    """The :class:`TiedHead` modules of ``model``, by the name of the embedding they read."""
    found: dict[str, list[TiedHead]] = {}
    for module in model.modules():
        if isinstance(module, TiedHead):
            found.setdefault(module.embedding_name, []).append(module)
    return found
