"""Tests of methods/kernels.py: the CPU int8/int4 kernels, the int4 layout, and the policy."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods import kernels
from methods.packing import pack_codes, unpack_codes
from methods.quantized import QuantizedLinear
from methods.registry import get_method
from methods.rtn import QuantOption

# (rows, cols): rows=48 is not a multiple of the kernel's row blocks, so converting it back
# takes the gather fallback on common CPUs; the others are block layouts.
LAYOUT_SHAPES = [(16, 32), (48, 64), (384, 128), (32, 256), (64, 96)]


def random_nibbles(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 16, (rows, cols), dtype=torch.uint8, generator=generator)


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return float((actual.double() - reference.double()).norm() / reference.double().norm())


# --- the int4 kernel layout ---------------------------------------------------------------


def check_layout_round_trip(rows: int, cols: int, seed: int) -> None:
    codes = random_nibbles(rows, cols, seed)
    portable = pack_codes(codes, 4)
    kernel = kernels.to_int4_kernel_layout(portable, rows, cols)
    assert kernel.dtype == torch.uint8
    assert kernel.numel() == portable.numel()  # the same bytes, in another order
    assert torch.equal(kernels.int4_codes_from_kernel_layout(kernel, rows, cols), codes)
    back = kernels.from_int4_kernel_layout(kernel, rows, cols)
    assert back.shape == portable.shape
    assert torch.equal(back, portable)
    assert torch.equal(unpack_codes(back, 4, cols), codes)


@pytest.mark.parametrize(("rows", "cols"), LAYOUT_SHAPES)
def test_int4_layout_round_trip(rows: int, cols: int) -> None:
    check_layout_round_trip(rows, cols, seed=rows + cols)


@pytest.mark.parametrize(("rows", "cols"), LAYOUT_SHAPES)
def test_int4_layout_round_trip_by_gather(
    rows: int, cols: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gather fallback (used when the layout is not of block form) on every shape."""
    monkeypatch.setattr(kernels, "_int4_block_layout", lambda rows, cols: None)
    check_layout_round_trip(rows, cols, seed=rows * cols)


def test_int4_layout_of_block_form_is_found_for_block_shapes() -> None:
    """Shapes whose rows are a multiple of 32 use the fast block path on this CPU; the block
    description must reproduce the op's own permutation exactly."""
    for rows, cols in [(32, 64), (384, 128)]:
        layout = kernels._int4_block_layout(rows, cols)
        if layout is None:
            pytest.skip("this CPU's int4 kernel layout is not of block form")
        block, inverse = layout
        assert rows % block == 0
        assert torch.equal(torch.sort(inverse).values, torch.arange(block))


@pytest.mark.parametrize(("rows", "cols", "group"), [(16, 32, 32), (48, 64, 32), (384, 128, 64)])
@pytest.mark.parametrize("tokens", [1, 5])
def test_int4_matmul_matches_float_reference(rows: int, cols: int, group: int, tokens: int) -> None:
    torch.manual_seed(rows + cols + tokens)
    codes = random_nibbles(rows, cols, seed=rows)
    kernel = kernels.to_int4_kernel_layout(pack_codes(codes, 4), rows, cols)
    n_groups = cols // group
    scales = torch.rand(rows, n_groups) * 0.1 + 0.01
    zeros = torch.randn(rows, n_groups) * 0.05
    scales_and_zeros = torch.stack((scales.t(), zeros.t()), dim=-1).contiguous()
    x = torch.randn(tokens, cols)

    weight = (codes.double() - 8).reshape(rows, n_groups, group) * scales.double().unsqueeze(-1)
    weight = (weight + zeros.double().unsqueeze(-1)).reshape(rows, cols)
    reference = x.double() @ weight.t()

    out = kernels.int4_matmul(x, kernel, group, scales_and_zeros)
    assert out.shape == (tokens, rows)
    assert out.dtype == x.dtype
    assert relative_error(out, reference) < 1e-2


@pytest.mark.parametrize(("rows", "cols"), [(48, 64), (16, 80), (1536, 384)])
@pytest.mark.parametrize("tokens", [1, 7])
def test_int8_matmul_matches_float_reference(rows: int, cols: int, tokens: int) -> None:
    torch.manual_seed(rows + tokens)
    codes = torch.randint(-128, 128, (rows, cols), dtype=torch.int8)
    scales = torch.rand(rows) * 0.01 + 1e-3
    x = torch.randn(tokens, cols)
    reference = x.double() @ (codes.double() * scales.double()[:, None]).t()
    out = kernels.int8_matmul(x, codes, scales)
    assert out.shape == (tokens, rows)
    assert out.dtype == x.dtype
    assert relative_error(out, reference) < 1e-2


# --- which group size the int4 kernel runs a weight with -----------------------------------


@pytest.mark.parametrize("group", kernels.INT4_KERNEL_GROUPS)
def test_int4_group_for_kernel_groups(group: int) -> None:
    cols = 2 * max(kernels.INT4_KERNEL_GROUPS)
    assert kernels.int4_group_for(48, cols, group) == group
    assert kernels.int4_group_for(40, cols, group) is None  # rows not a multiple of 16


def largest_kernel_group_dividing(cols: int) -> int | None:
    dividing = [g for g in kernels.INT4_KERNEL_GROUPS if cols % g == 0]
    return max(dividing) if dividing else None


@pytest.mark.parametrize("cols", [96, 160, 384, 512, 768, 48, 80])
def test_int4_group_for_one_group_per_row(cols: int) -> None:
    """``group_size == cols``: the row runs as the largest kernel group dividing it."""
    expected = largest_kernel_group_dividing(cols)
    assert kernels.int4_group_for(32, cols, cols) == expected
    if expected is not None:
        assert cols % expected == 0 and expected in kernels.INT4_KERNEL_GROUPS


@pytest.mark.parametrize(("cols", "group"), [(64, 16), (96, 48), (128, 8), (64, 128)])
def test_int4_group_for_refuses_other_groups(cols: int, group: int) -> None:
    assert kernels.int4_group_for(32, cols, group) is None


def test_int4_layout_ok_rules() -> None:
    assert kernels.int4_layout_ok(16, 64, 32)
    assert not kernels.int4_layout_ok(8, 64, 32)  # rows
    assert not kernels.int4_layout_ok(16, 96, 64)  # cols not a multiple of the group
    assert not kernels.int4_layout_ok(16, 64, 16)  # group not a kernel group


# --- the policy ------------------------------------------------------------------------------


def test_set_kernel_policy_changes_only_what_is_given(policy: kernels.KernelPolicy) -> None:
    before = dataclasses.replace(kernels.POLICY)
    result = kernels.set_kernel_policy(int8_max_tokens=3)
    assert result is kernels.POLICY
    assert kernels.POLICY.int8_max_tokens == 3
    assert kernels.POLICY.int4_max_tokens == before.int4_max_tokens
    assert kernels.POLICY.enabled == before.enabled
    kernels.set_kernel_policy(enabled=False)
    assert kernels.POLICY.enabled is False
    assert kernels.POLICY.int8_max_tokens == 3


def test_kernel_usable_follows_the_policy(policy: kernels.KernelPolicy) -> None:
    cpu = torch.device("cpu")
    kernels.set_kernel_policy(int8_max_tokens=4, int4_max_tokens=2)
    assert kernels.int8_kernel_usable(cpu, 4, 64)
    assert not kernels.int8_kernel_usable(cpu, 5, 64)
    assert not kernels.int8_kernel_usable(cpu, 4, 60)  # width not a multiple of 8
    assert kernels.int4_kernel_usable(cpu, 2, 16, 64, 32)
    assert not kernels.int4_kernel_usable(cpu, 3, 16, 64, 32)
    assert not kernels.int4_kernel_usable(cpu, 1, 8, 64, 32)  # layout
    assert not kernels.int8_kernel_usable(torch.device("meta"), 1, 64)
    kernels.set_kernel_policy(enabled=False)
    assert not kernels.int8_kernel_usable(cpu, 1, 64)
    assert not kernels.int4_kernel_usable(cpu, 1, 16, 64, 32)


def convert(bits: int, group: int | None, symmetric: bool, seed: int = 0) -> QuantizedLinear:
    torch.manual_seed(seed)
    layer = nn.Linear(64, 48)
    module = get_method("rtn").convert(layer, QuantOption(bits, group, symmetric))
    assert isinstance(module, QuantizedLinear)
    return module


def dequantized_reference(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    assert module.bias is not None
    return F.linear(x, module.dequantize()) + module.bias


def spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls: list[int] = []
    real: Callable[..., torch.Tensor] = getattr(kernels, name)

    def wrapped(*args: Any) -> torch.Tensor:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(kernels, name, wrapped)
    return calls


def test_asymmetric_int8_never_takes_the_kernel(
    policy: kernels.KernelPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its offset term would cancel against the kernel output only to bf16 precision."""
    module = convert(8, None, False)
    calls = spy(monkeypatch, "int8_matmul")
    x = torch.randn(2, 64)
    assert torch.equal(module(x), dequantized_reference(module, x))
    assert calls == []


@pytest.mark.parametrize(
    ("bits", "group", "symmetric", "kernel"),
    [
        (8, None, True, "int8_matmul"),
        (4, 32, True, "int4_matmul"),
        (4, 32, False, "int4_matmul"),
        (4, None, True, "int4_matmul"),
        (4, None, False, "int4_matmul"),
    ],
)
def test_policy_switches_the_path_of_quantized_linear(
    bits: int,
    group: int | None,
    symmetric: bool,
    kernel: str,
    policy: kernels.KernelPolicy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = convert(bits, group, symmetric)
    calls = spy(monkeypatch, kernel)
    torch.manual_seed(1)
    x = torch.randn(4, 64)
    reference = dequantized_reference(module, x)

    with_kernel = module(x)
    assert len(calls) == 1
    # bf16 activations: close to the dequantised result, but not the same numbers.
    assert not torch.equal(with_kernel, reference)
    assert relative_error(with_kernel, reference) < 1e-2

    kernels.set_kernel_policy(enabled=False)
    assert torch.equal(module(x), reference)
    assert len(calls) == 1

    kernels.set_kernel_policy(enabled=True, int8_max_tokens=3, int4_max_tokens=3)
    assert torch.equal(module(x), reference)  # 4 tokens: over the cut-over
    assert len(calls) == 1
    module(x[:3])
    assert len(calls) == 2


# torch's CPU int8 kernel reads the activations in vectors of 8 along the input: with an input
# width that is not a multiple of 8 and more than one token it returns garbage or crashes the
# process (seen on an AVX2 CPU with torch 2.13), so the check runs in a child process.
INT8_ODD_WIDTH_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    import torch.nn.functional as F
    from methods import kernels
    from methods.registry import get_method
    from methods.rtn import QuantOption

    kernels.set_kernel_policy(enabled=True, int8_max_tokens=16)
    torch.manual_seed(0)
    layer = torch.nn.Linear(36, 16)
    module = get_method("rtn").convert(layer, QuantOption(8, None, True))
    errors = []
    for tokens in (3, 5, 2):
        x = torch.randn(tokens, 36)
        reference = F.linear(x, module.dequantize()) + module.bias
        errors.append(float((module(x) - reference).norm() / reference.norm()))
    print(json.dumps(errors))
    """
)


def test_int8_kernel_path_is_right_for_an_input_width_not_a_multiple_of_8() -> None:
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", INT8_ODD_WIDTH_SCRIPT],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"child process died: {result.returncode} {result.stderr[-500:]}"
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert max(errors) < 1e-2, errors
