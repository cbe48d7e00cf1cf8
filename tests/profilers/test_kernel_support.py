"""Which kernels autotune's modules run on which device kind (profilers.kernel_support)."""

from __future__ import annotations

import pytest
import torch

import methods  # noqa: F401  (registers every method)
from methods import kernels
from methods.base import LayerShape
from methods.registry import registered_methods
from profilers.kernel_support import (
    KERNELS,
    PATH_ENTRIES,
    allowed_kernel_entries,
    runs_kernel,
    unrun_kernels,
)


def test_every_format_a_method_names_is_registered() -> None:
    shape = LayerShape("linear", 256, 512)
    formats = {
        method.runtime_format(shape, option)
        for method in registered_methods().values()
        if method.supports(shape)
        for option in method.grid(shape)
    }
    assert formats - {"dense", *PATH_ENTRIES} <= set(KERNELS)


def test_the_registry_asks_the_modules_own_predicates() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runs_kernel("int8_weight_only", "cpu") == kernels.int8_kernel_usable(cpu, 1, 256)
    assert runs_kernel("int8_weight_only", "gpu") == kernels.int8_kernel_usable(cuda, 1, 256)
    assert runs_kernel("int4_weight_only", "gpu") == kernels.int4_kernel_usable(
        cuda, 1, 256, 256, 128
    )


def test_no_module_runs_a_kernel_on_cuda_today() -> None:
    assert unrun_kernels(["int8_weight_only", "int4_weight_only", "int8_dynamic"], "gpu") == [
        "int8_weight_only",
        "int4_weight_only",
        "int8_dynamic",
    ]


def test_only_a_runtimes_own_kernels_are_noted_as_unrun() -> None:
    """A kernel table lists what the device has for every runtime: llama.cpp's block kernel
    is no concern of autotune's modules, nor theirs of llama.cpp."""
    listed = ["int8_weight_only", "gguf_block", "dequantize"]
    assert "gguf_block" not in unrun_kernels(listed, "gpu")
    assert unrun_kernels(listed, "cpu", "llama.cpp") == []
    assert unrun_kernels(listed, "gpu", "vllm") == []
    with pytest.raises(ValueError, match="unknown runtime"):
        unrun_kernels(listed, "cpu", "tensorrt")


def test_paths_and_unknown_names_are_not_kernels() -> None:
    assert unrun_kernels(["dequantize", "lookup"], "cpu") == []
    assert not runs_kernel("int4_weight_onyl", "cpu")
    assert set(PATH_ENTRIES) <= set(allowed_kernel_entries())


def test_the_process_kernel_switch_does_not_change_pricing() -> None:
    before = runs_kernel("int8_weight_only", "cpu")
    saved = kernels.POLICY.enabled
    kernels.set_kernel_policy(enabled=False)
    try:
        assert runs_kernel("int8_weight_only", "cpu") == before
        assert kernels.POLICY.enabled is False
    finally:
        kernels.set_kernel_policy(enabled=saved)


def test_an_unknown_device_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown device kind 'tpu'; allowed: cpu, gpu"):
        runs_kernel("int8_weight_only", "tpu")
