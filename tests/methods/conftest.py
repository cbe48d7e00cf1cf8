"""Fixtures shared by the tests of the ``methods`` package."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from methods import kernels, workspace


@pytest.fixture
def policy() -> Iterator[kernels.KernelPolicy]:
    """Kernels on with a known cut-over (16 tokens) for the test; the process policy is
    restored afterwards, whatever the test changed."""
    saved = dataclasses.replace(kernels.POLICY)
    try:
        yield kernels.set_kernel_policy(enabled=True, int8_max_tokens=16, int4_max_tokens=16)
    finally:
        kernels.set_kernel_policy(
            enabled=saved.enabled,
            int8_max_tokens=saved.int8_max_tokens,
            int4_max_tokens=saved.int4_max_tokens,
        )


@pytest.fixture(autouse=True)
def fresh_scratch() -> Iterator[None]:
    """Every test starts without scratch buffers, so that one left by an earlier test (for
    instance allocated under ``torch.inference_mode``, see test_workspace.py) cannot decide
    its outcome."""
    workspace.release()
    yield
    workspace.release()
