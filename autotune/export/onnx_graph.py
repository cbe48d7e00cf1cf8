"""The float ONNX graph a compressed model's export starts from.

``torch.onnx.export`` (the dynamo exporter, without its graph optimiser, so that every weight
keeps its parameter name) traces a copy of the model whose compressed layers are float
stand-ins of their shape; their weight initializers are left out, to be replaced by the nodes
of :mod:`autotune.export.onnx_nodes`. Also the graph's signature (inputs, outputs) and the
example inputs of the trace.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autotune.export.base import ExportError
from methods.quantized import QuantizedEmbedding

OPSET = 21
PREFIX = "model."  # the exported wrapper holds the model under this attribute


@dataclass(frozen=True)
class Signature:
    """The graph's inputs and outputs, and whether the model takes ``use_cache``."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    use_cache: bool


class _Outputs(nn.Module):
    """The model with named tensor inputs and a tuple of tensor outputs."""

    def __init__(self, model: nn.Module, signature: Signature) -> None:
        super().__init__()
        self.model = model
        self.signature = signature

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        given = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
        }
        kwargs = {k: given[k] for k in self.signature.inputs}
        if self.signature.use_cache:
            kwargs["use_cache"] = False
        out = self.model(**kwargs, return_dict=True)
        return tuple(out[k] for k in self.signature.outputs)


def model_signature(model: nn.Module, example: Mapping[str, torch.Tensor]) -> Signature:
    """What the exported graph takes and gives: ``logits`` of a causal LM, else
    ``last_hidden_state`` (and ``pooler_output`` where the model has one)."""
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params or getattr(model, "config", None) is None:
        raise ExportError(
            f"--format onnx needs a transformers model taking input_ids, got {type(model).__name__}"
        )
    inputs = tuple(k for k in ("input_ids", "attention_mask", "token_type_ids") if k in params)
    use_cache = "use_cache" in params
    kwargs: dict[str, Any] = {k: example[k] for k in inputs}
    if use_cache:
        kwargs["use_cache"] = False
    with torch.inference_mode():
        out = model(**kwargs, return_dict=True)
    wanted = ("logits",) if "logits" in out else ("last_hidden_state", "pooler_output")
    outputs = tuple(k for k in wanted if isinstance(out.get(k), torch.Tensor))
    if not outputs:
        raise ExportError(
            f"--format onnx found neither logits nor last_hidden_state in the outputs of "
            f"{type(model).__name__}"
        )
    return Signature(inputs, outputs, use_cache)


def example_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Two rows of eight tokens, the second with its last two masked (the trace must not take
    the unmasked shortcut)."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 100)
    ids = (torch.arange(16).reshape(2, 8) * 7 + 3) % max(vocab - 1, 1) + 1
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def float_skeleton(model: nn.Module, layers: Mapping[str, nn.Module]) -> nn.Module:
    """A copy of ``model`` with each compressed layer replaced by a float layer of its shape
    whose weight is never filled (its initializer is dropped before it is written). The
    compressed layers themselves are not copied: the copy meets the stand-ins in their place."""
    memo = {id(module): _stand_in(module) for module in layers.values()}
    return copy.deepcopy(model, memo).eval()


def _stand_in(module: nn.Module) -> nn.Module:
    """An uninitialised float layer of ``module``'s shape, with its float bias."""
    if isinstance(module, QuantizedEmbedding):
        table = nn.Embedding(
            module.num_embeddings, module.embedding_dim, module.padding_idx, device="meta"
        )
        return table.to_empty(device="cpu")
    bias = module.bias is not None
    linear = nn.Linear(module.cols, module.rows, bias=bias, device="meta").to_empty(device="cpu")
    if bias:
        linear.bias = nn.Parameter(module.bias.detach().float().clone(), requires_grad=False)
    return linear


def export_float_graph(model: nn.Module, layers: Mapping[str, nn.Module]) -> Any:
    """The ``ModelProto`` of ``model`` with float stand-ins for its compressed layers, whose
    weight initializers are left out (the nodes reading them are still there)."""
    if importlib.util.find_spec("onnxscript") is None:
        raise ExportError(
            "--format onnx needs onnxscript (torch's ONNX exporter): pip install onnxscript"
        )
    example = example_inputs(model)
    signature = model_signature(model, example)
    wrapper = _Outputs(float_skeleton(model, layers), signature)
    axes = {k: {0: "batch", 1: "sequence"} for k in signature.inputs}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                wrapper,
                (),
                kwargs={k: example[k] for k in signature.inputs},
                dynamo=True,
                optimize=False,
                opset_version=OPSET,
                input_names=list(signature.inputs),
                output_names=list(signature.outputs),
                dynamic_shapes=axes,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many kinds
            raise ExportError(f"--format onnx: torch.onnx.export failed: {exc}") from exc
    _simplify(program.model)
    initializers = program.model.graph.initializers
    for name in layers:
        initializers.pop(PREFIX + name + ".weight", None)
    return program.model_proto


# constants of at most this many elements are folded: shapes, scales and the like
FOLDED_ELEMENTS = 64


def _simplify(model: Any) -> None:
    """Fold what the graph computes from shapes alone (attention's ``1 / sqrt(head size)``
    from its query's shape, the casts and multiplications around it) and share repeated
    subexpressions, as the exporter's own optimiser does, in place. ONNX Runtime cannot fold
    a shape of a tensor with symbolic dimensions, so without this every attention layer ran
    those nodes on each call. Weights are held out as graph inputs meanwhile, so that none is
    folded into another constant: each keeps its name and the node that reads it."""
    from onnxscript import optimizer

    graph = model.graph
    held = {
        name: value
        for name, value in graph.initializers.items()
        if value.const_value is not None and value.const_value.size > FOLDED_ELEMENTS
    }
    tensors = {name: value.const_value for name, value in held.items()}
    for name, value in held.items():
        graph.initializers.pop(name)
        value.const_value = None
        graph.inputs.append(value)
    try:
        optimizer.optimize(
            model, input_size_limit=FOLDED_ELEMENTS, output_size_limit=FOLDED_ELEMENTS * 16
        )
    finally:
        for name, value in held.items():
            graph.inputs.remove(value)
            value.const_value = tensors[name]
            graph.register_initializer(value)
