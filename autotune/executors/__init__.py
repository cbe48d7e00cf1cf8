"""Executors: how the tune's stages run the model (see :mod:`autotune.executors.base`)."""

from autotune.executors.base import (
    EXECUTORS,
    Executor,
    Opened,
    Split,
    get_executor,
    register_executor,
)
from autotune.executors.blocks import BlockByBlock
from autotune.executors.memory import InMemory

__all__ = [
    "EXECUTORS",
    "BlockByBlock",
    "Executor",
    "InMemory",
    "Opened",
    "Split",
    "get_executor",
    "register_executor",
]
