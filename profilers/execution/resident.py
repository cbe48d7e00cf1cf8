"""A model held whole in memory, run stage by stage as a streamed one is.

:class:`ResidentModel` gives an in-memory model the interface of
:class:`profilers.execution.streaming.StreamedModel` (blocks, recorded calls, prefix and
suffix), with nothing to load or release, so the stage-by-stage tools of
:mod:`profilers.execution.stages` (block output sensitivity, side-by-side evaluation)
give the same figures on a model in memory as on the same model streamed from its
safetensors files.
"""

from __future__ import annotations

from torch import nn

from profilers.execution.adapters import adapter_for
from profilers.execution.checkpoint import CheckpointError
from profilers.execution.streaming import StreamedModel


class ResidentModel(StreamedModel):
    """``model``'s blocks, already in memory: loading and releasing them does nothing."""

    def __init__(self, model: nn.Module) -> None:  # no checkpoint to match
        self.model = model.eval()
        self.checkpoint = None  # type: ignore[assignment]
        self.blocks = adapter_for(model).blocks(model)
        if not self.blocks:
            raise CheckpointError(
                f"{type(model).__name__} has no stack of blocks to run one at a time"
            )
        self._tensors = []
        self._tuple_output = None
        self._extra = self._forward_extras()

    def load(self, within: nn.Module, skip: tuple[str, ...] = ()) -> None:
        return None

    def release(self, within: nn.Module) -> None:
        return None
