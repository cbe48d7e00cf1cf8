"""Real low-bit matmul kernels of torch, and when to use them.

On CPU torch ships weight-only kernels: ``_weight_int8pack_mm`` (int8 codes, one scale per
output channel) and ``_weight_int4pack_mm_for_cpu`` (4-bit codes in groups of 32/64/128/256
along the input, with a scale and a zero per group). Both run with bfloat16 activations and
float32 accumulation; they pay off for a few tokens at a time (decode, short inputs), while
for many tokens a dequantised float matmul is faster. :class:`KernelPolicy` holds that
cut-over; every quantised module consults it on each call.

The int4 kernel wants its own nibble order, which depends on the CPU's vector width. Modules
store the portable layout (two codes to a byte, low nibble first) and switch to the kernel
layout in place on first use; the permutation is found by probing the conversion op itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import torch

INT4_KERNEL_GROUPS = (32, 64, 128, 256)


@dataclass
class KernelPolicy:
    """Largest number of tokens (rows of the activation) for which a kernel is used."""

    int8_max_tokens: int = 16
    int4_max_tokens: int = 16
    enabled: bool = True


def _policy_from_env() -> KernelPolicy:
    policy = KernelPolicy()
    if os.environ.get("AUTOTUNE_KERNELS", "").lower() in {"0", "off", "false", "reference"}:
        policy.enabled = False
    return policy


POLICY = _policy_from_env()


def set_kernel_policy(
    *,
    enabled: bool | None = None,
    int8_max_tokens: int | None = None,
    int4_max_tokens: int | None = None,
) -> KernelPolicy:
    """Change the process-wide kernel policy; returns the policy in force afterwards."""
    if enabled is not None:
        POLICY.enabled = enabled
    if int8_max_tokens is not None:
        POLICY.int8_max_tokens = int8_max_tokens
    if int4_max_tokens is not None:
        POLICY.int4_max_tokens = int4_max_tokens
    return POLICY


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


@cache
def int8_width_multiple() -> int:
    """Input widths the CPU int8 kernel computes correctly are multiples of this: its
    vector width in floats (16 with AVX-512, 8 below); other widths give wrong results or
    crash."""
    capability = torch.backends.cpu.get_cpu_capability()
    return 16 if capability.startswith(("AVX512", "AMX")) else 8


def int8_layout_ok(cols: int) -> bool:
    """Whether the CPU int8 kernel handles an input width of ``cols`` on this machine."""
    return cols % int8_width_multiple() == 0


def int8_kernel_usable(device: torch.device, tokens: int, cols: int) -> bool:
    return (
        POLICY.enabled
        and device.type == "cpu"
        and tokens <= POLICY.int8_max_tokens
        and int8_layout_ok(cols)
        and _has_op("_weight_int8pack_mm")
    )


def int4_layout_ok(rows: int, cols: int, group: int) -> bool:
    """Whether a ``rows x cols`` weight in groups of ``group`` fits the CPU int4 kernel."""
    return group in INT4_KERNEL_GROUPS and rows % 16 == 0 and cols % group == 0


def int4_group_for(rows: int, cols: int, group_size: int) -> int | None:
    """Group size the int4 kernel runs a weight with (``group_size == cols``: one group per
    row, run as several kernel groups sharing a scale), or ``None`` if it cannot."""
    group = group_size
    if group not in INT4_KERNEL_GROUPS:
        if group_size != cols:
            return None
        group = next((g for g in reversed(INT4_KERNEL_GROUPS) if cols % g == 0), 0)
    return group if group and int4_layout_ok(rows, cols, group) else None


def int4_kernel_usable(device: torch.device, tokens: int, rows: int, cols: int, group: int) -> bool:
    return (
        POLICY.enabled
        and device.type == "cpu"
        and tokens <= POLICY.int4_max_tokens
        and int4_layout_ok(rows, cols, group)
        and _has_op("_weight_int4pack_mm_for_cpu")
    )


def int8_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (codes * scales[:, None]).T`` with the CPU int8 kernel (bf16 activations)."""
    out = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), codes, scales.to(torch.bfloat16))
    return out.to(x.dtype)


def int4_matmul(
    x: torch.Tensor, kernel_codes: torch.Tensor, group: int, scales_and_zeros: torch.Tensor
) -> torch.Tensor:
    """``x @ W.T`` where ``W = (code - 8) * scale + zero`` per group (CPU int4 kernel)."""
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.to(torch.bfloat16), kernel_codes, group, scales_and_zeros.to(torch.bfloat16)
    )
    return out.to(x.dtype)


@cache
def _int4_permutation(rows: int, cols: int) -> torch.Tensor:
    """For each nibble slot of the kernel layout, the flat index of the code it holds."""
    index = torch.arange(rows * cols, dtype=torch.int64).reshape(rows, cols)
    source = torch.zeros(rows * cols, dtype=torch.int64)
    digits = 1
    while 16**digits < rows * cols:
        digits += 1
    for digit in range(digits):
        probe = ((index >> (4 * digit)) & 0xF).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
        nibbles = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(-1).to(torch.int64)
        source += nibbles << (4 * digit)
    return source


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


@cache
def _int4_block_layout(rows: int, cols: int) -> tuple[int, torch.Tensor] | None:
    """Describe the kernel layout as blocks: ``(B, order)`` when the packed tensor is
    ``[rows/B][cols][B/2]`` bytes whose nibbles (low, high) of byte ``j`` hold rows
    ``order[2j]`` and ``order[2j+1]`` of the block. ``None`` if it is not of that form."""
    perm = _int4_permutation(rows, cols)
    for block in (2, 4, 8, 16, 32, 64, 128, 256):
        if rows % block:
            continue
        first = perm[:block]
        order = first // cols
        if not torch.equal(first % cols, torch.zeros_like(first)):
            continue
        if not torch.equal(torch.sort(order).values, torch.arange(block)):
            continue
        slots = torch.arange(rows * cols, dtype=torch.int64)
        byte, half = slots // 2, slots % 2
        per_block = cols * (block // 2)
        blk, within = byte // per_block, byte % per_block
        k, j = within // (block // 2), within % (block // 2)
        expected = (blk * block + order[2 * j + half]) * cols + k
        if torch.equal(expected, perm):
            return block, torch.argsort(order)
    return None


def int4_codes_from_kernel_layout(kernel: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Unsigned 4-bit codes ``[rows, cols]`` (uint8) from the CPU kernel's layout."""
    layout = _int4_block_layout(rows, cols)
    if layout is None:
        slots = _unpack_nibbles(kernel.reshape(rows, -1)).reshape(-1)
        codes = torch.empty(rows * cols, dtype=torch.uint8)
        codes[_int4_permutation(rows, cols)] = slots
        return codes.reshape(rows, cols)
    block, inverse = layout
    nibbles = torch.stack((kernel & 0xF, kernel >> 4), dim=-1)
    by_slot = nibbles.reshape(rows // block, cols, block).transpose(1, 2)
    return by_slot.index_select(1, inverse).reshape(rows, cols)


def to_int4_kernel_layout(canonical: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Portable ``[rows, cols/2]`` nibbles -> the CPU kernel's packed layout."""
    codes = _unpack_nibbles(canonical).to(torch.int32)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)


def from_int4_kernel_layout(kernel: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The CPU kernel's packed layout -> portable ``[rows, cols/2]`` nibbles."""
    return _pack_nibbles(int4_codes_from_kernel_layout(kernel, rows, cols))
