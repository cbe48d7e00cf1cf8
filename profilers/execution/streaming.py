"""Run a model stored as safetensors one block at a time, for models larger than memory.

A transformer is a stack of blocks between a few outer modules (embeddings, final norm, head).
:class:`StreamedModel` holds a model built with its parameters on the ``meta`` device (they
take no memory), keeps the outer parameters loaded, and loads one block's weights at a time
from a :class:`Checkpoint`, reading only those tensors' bytes from disk (no file is mapped
whole, so the process's address space grows by one block, not by the model). Activations
stream from block to block: only the hidden states of the batches at hand are kept.

A forward pass is split in three kinds of stage: the *prefix* (everything before the first
block, e.g. the embeddings; its output is the first block's input), one stage per block, and
the *suffix* (what follows the last block: final norm, head). :meth:`StreamedModel.stage`
gives each stage as a module of its own, so per-layer profiling and conversion run on it
exactly as they run on a whole model.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from profilers.execution.adapters import adapter_for
from profilers.execution.checkpoint import Checkpoint, CheckpointError
from profilers.memory import return_free_memory

Batch = dict[str, torch.Tensor]


@dataclass
class _Tensor:
    """A parameter (or stored buffer) of the model: its name, where the checkpoint holds
    it, and every (module, attribute) it is registered at (several for a tied parameter)."""

    name: str
    source: str | None
    places: list[tuple[nn.Module, str]]
    kind: str = "_parameters"  # or "_buffers": the module dict it lives in

    @property
    def is_parameter(self) -> bool:
        return self.kind == "_parameters"


class _Captured(Exception):
    """Raised by a block to stop a forward pass once its input is recorded."""


@dataclass
class BlockCall:
    """How a block is called for one batch; the hidden states are ``args[0]`` or the
    ``hidden_states`` keyword."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> BlockCall:
        if self.args:
            return BlockCall((hidden, *self.args[1:]), self.kwargs)
        return BlockCall(self.args, {**self.kwargs, "hidden_states": hidden})


class StreamedModel:
    """A model whose parameters live in a checkpoint and are loaded a block at a time.

    ``model`` is built with its parameters on the ``meta`` device (see
    :func:`parameters_on_meta`). The outer parameters are loaded at once and stay; blocks are
    loaded by :meth:`loaded`. Calling conventions of the blocks are learnt from the model's
    own forward pass, so any stack of blocks that hands its hidden states from one block to
    the next (BERT, GPT-2, Llama, OPT, Qwen2, ...) can be streamed.
    """

    def __init__(self, model: nn.Module, checkpoint: Checkpoint) -> None:
        self.model = model.eval()
        self.checkpoint = checkpoint
        self.blocks = adapter_for(model).blocks(model)
        if not self.blocks:
            raise CheckpointError(
                f"{type(model).__name__} has no stack of blocks to stream one at a time"
            )
        self._tensors = self._match_checkpoint()
        self._tuple_output: bool | None = None
        self._extra = self._forward_extras()
        self.load(self.model, skip=tuple(name for name, _ in self.blocks))

    # ----------------------------------------------------------------- weights
    def _match_checkpoint(self) -> list[_Tensor]:
        """Every parameter of the model (a tied one once, with all its places), and every
        persistent buffer on the ``meta`` device (the stored tensors of compressed modules),
        with the checkpoint tensor each is read from."""
        names = set(self.checkpoint.names)
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        groups: dict[int, _Tensor] = {}
        for module_name, module in self.model.named_modules():
            stored = [(attr, p, "_parameters") for attr, p in module._parameters.items()]
            stored += [
                (attr, b, "_buffers")
                for attr, b in module._buffers.items()
                if b is not None
                and b.device.type == "meta"
                and attr not in module._non_persistent_buffers_set
            ]
            for attr, tensor, kind in stored:
                if tensor is None:
                    continue
                name = f"{module_name}.{attr}" if module_name else attr
                group = groups.setdefault(id(tensor), _Tensor(name, None, [], kind))
                group.places.append((module, attr))
                if group.source is None:
                    candidates = [name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")]
                    group.source = next((c for c in candidates if c in names), None)
        missing = [g.name for g in groups.values() if g.source is None]
        if missing:
            raise CheckpointError(
                f"{len(missing)} tensor(s) of {type(self.model).__name__} are not in the "
                f"checkpoint at {self.checkpoint.folder}, e.g. {missing[0]!r}"
            )
        return list(groups.values())

    def _replace(self, within: nn.Module, make, skip: tuple[str, ...] = ()) -> None:
        # loading is not part of the model's computation: op counters and tracers of the
        # pass that asked for the block (see profilers.opcount, profilers.memory) miss it
        with _disable_current_modes():
            self._replace_all(within, make, skip)

    def _replace_all(self, within: nn.Module, make, skip: tuple[str, ...]) -> None:
        inside = set(map(id, within.modules()))
        skipped = {
            id(module)
            for name, module in within.named_modules()
            if name and any(name == s or name.startswith(s + ".") for s in skip)
        }
        for group in self._tensors:
            owners = {id(module) for module, _ in group.places}
            if not owners & inside or owners & inside <= skipped:
                continue
            module, attr = group.places[0]
            new = make(getattr(module, group.kind)[attr], group)
            for module, attr in group.places:
                getattr(module, group.kind)[attr] = new

    def load(self, within: nn.Module, skip: tuple[str, ...] = ()) -> None:
        """Read every parameter (and stored buffer) under ``within``, not under the ``skip``
        submodule names, from the checkpoint, in the dtype the model was built with."""

        def read(old: torch.Tensor, group: _Tensor) -> torch.Tensor:
            assert group.source is not None
            tensor = self.checkpoint.read(group.source)
            if tuple(tensor.shape) != tuple(old.shape):
                raise CheckpointError(
                    f"checkpoint tensor {group.source!r} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(old.shape)}"
                )
            tensor = tensor.to(old.dtype)
            return nn.Parameter(tensor, requires_grad=False) if group.is_parameter else tensor

        self._replace(within, read, skip)

    def release(self, within: nn.Module) -> None:
        """Parameters under ``within`` back on the ``meta`` device, their memory freed and
        given back to the system (so that the next block does not add to it)."""

        def drop(old: torch.Tensor, group: _Tensor) -> torch.Tensor:
            meta = old.detach().to("meta")
            return nn.Parameter(meta, requires_grad=False) if group.is_parameter else meta

        self._replace(within, drop)
        return_free_memory()

    def state_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of the model's state dict in order, what is on the ``meta``
        device read from the checkpoint one tensor at a time (in the model's dtypes)."""
        sources = {
            (id(module), attr): group.source
            for group in self._tensors
            for module, attr in group.places
        }
        for module_name, module in self.model.named_modules():
            prefix = f"{module_name}." if module_name else ""
            stored = list(module._parameters.items()) + [
                (attr, b)
                for attr, b in module._buffers.items()
                if attr not in module._non_persistent_buffers_set
            ]
            for attr, tensor in stored:
                if tensor is None:
                    continue
                if tensor.device.type == "meta":
                    source = sources[(id(module), attr)]
                    assert source is not None
                    tensor = self.checkpoint.read(source).to(tensor.dtype)
                yield prefix + attr, tensor

    @contextlib.contextmanager
    def loaded(self, index: int) -> Iterator[nn.Module]:
        """Block ``index`` with its weights in memory for the duration."""
        block = self.blocks[index][1]
        self.load(block)
        try:
            yield block
        finally:
            self.release(block)

    # ---------------------------------------------------------------- running
    def _forward_extras(self) -> dict[str, Any]:
        parameters = inspect.signature(self.model.forward).parameters
        return {"use_cache": False} if "use_cache" in parameters else {}

    def _call_model(self, batch: Batch) -> Any:
        return self.model(**batch, **self._extra)

    @contextlib.contextmanager
    def _patched(self, forwards: dict[int, Any]) -> Iterator[None]:
        blocks = [self.blocks[i][1] for i in forwards]
        for block, forward in zip(blocks, forwards.values(), strict=True):
            block.forward = forward  # type: ignore[method-assign]
        try:
            yield
        finally:
            for block in blocks:
                del block.forward

    def _wrap(self, hidden: torch.Tensor) -> Any:
        return (hidden,) if self._tuple_output else hidden

    def first_calls(self, batches: Sequence[Batch]) -> list[BlockCall]:
        """The first block's call for each batch (the prefix's output)."""
        calls: list[BlockCall] = []

        def record(*args: Any, **kwargs: Any) -> Any:
            calls.append(BlockCall(args, kwargs))
            raise _Captured

        with torch.inference_mode(), self._patched({0: record}):
            for batch in batches:
                with contextlib.suppress(_Captured):
                    self._call_model(batch)
        return calls

    def calls(self, batches: Sequence[Batch]) -> list[list[BlockCall]]:
        """How every block is called for each batch (``[block][batch]``), its hidden states
        aside: blocks may be called with keywords of their own (e.g. per-layer masks)."""
        if not batches:
            return [[] for _ in self.blocks]
        first = self.first_calls(batches)
        if self._tuple_output is None:
            with self.loaded(0) as block, torch.inference_mode():
                out = block(*first[0].args, **first[0].kwargs)
            self._tuple_output = isinstance(out, tuple)
        recorded: list[list[BlockCall]] = [[] for _ in self.blocks]

        def recorder(index: int):
            def forward(*args: Any, **kwargs: Any) -> Any:
                call = BlockCall(args, kwargs)
                recorded[index].append(call)
                return self._wrap(call.hidden)

            return forward

        forwards = {i: recorder(i) for i in range(len(self.blocks))}
        with torch.inference_mode(), self._patched(forwards):
            for batch in batches:
                self._call_model(batch)
        return recorded

    def run_block(self, block: nn.Module, calls: Sequence[BlockCall]) -> list[torch.Tensor]:
        """``block``'s output hidden states for each call."""
        outputs = []
        with torch.inference_mode():
            for call in calls:
                out = block(*call.args, **call.kwargs)
                outputs.append(out[0] if isinstance(out, tuple) else out)
        return outputs

    def finish(self, batches: Sequence[Batch], hidden: Sequence[torch.Tensor]) -> list[Any]:
        """The model's outputs for ``batches`` when the last block produced ``hidden``: the
        suffix runs on them (every block passes its input through; the first returns
        ``hidden``)."""
        results = []

        def identity(*args: Any, **kwargs: Any) -> Any:
            return self._wrap(BlockCall(args, kwargs).hidden)

        for batch, last in zip(batches, hidden, strict=True):

            def first(*args: Any, last: torch.Tensor = last, **kwargs: Any) -> Any:
                return self._wrap(last)

            forwards = {i: identity for i in range(1, len(self.blocks))}
            forwards[0] = first
            with torch.inference_mode(), self._patched(forwards):
                results.append(self._call_model(batch))
        return results

    def forward_pass(self, **inputs: Any) -> Any:
        """One forward pass of the model on ``inputs`` as the model is called in memory
        (its defaults kept), each block loaded for its turn."""

        def loading(block: nn.Module):
            def forward(*args: Any, **kwargs: Any) -> Any:
                self.load(block)
                try:
                    return type(block).forward(block, *args, **kwargs)
                finally:
                    self.release(block)

            return forward

        forwards = {i: loading(block) for i, (_, block) in enumerate(self.blocks)}
        with self._patched(forwards):
            return self.model(**inputs)

    def forward(self, batches: Sequence[Batch]) -> list[Any]:
        """The model's outputs for ``batches``, loading one block at a time."""
        calls = self.calls(batches)
        hidden = [call.hidden for call in calls[0]]
        for index in range(len(self.blocks)):
            with self.loaded(index) as block:
                hidden = self.run_block(
                    block, [c.with_hidden(h) for c, h in zip(calls[index], hidden, strict=True)]
                )
        return self.finish(batches, hidden)
