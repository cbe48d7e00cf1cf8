"""The option types of the pruning methods, their patterns and their validation."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

from methods.base import LayerShape, Option
from methods.errors import OptionError
from methods.sparse import FLOAT_BITS

ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8, FLOAT_BITS)
MAX_M = 8  # N:M patterns up to M = 8 (C(8, 4) = 70 kept sets: 7-bit indices)
_PATTERN = re.compile(r"^([1-9][0-9]*):([1-9][0-9]*)$")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; ``None`` -> ``None``; ``ValueError`` when malformed."""
    if pattern is None:
        return None
    match = _PATTERN.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(f"malformed pattern {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m <= MAX_M:
        raise ValueError(f"pattern {pattern!r} needs 1 <= N < M <= {MAX_M}")
    return n, m


@dataclass(frozen=True)
class PruneOption(Option):
    """``sparsity``: fraction of each block pruned (unstructured); ``pattern``: ``"N:M"`` or
    ``None``; ``block``: columns per block (mask counts, scales, SparseGPT's mask selection);
    ``bits``: 16 keeps float16 values, 2..8 quantises them (``symmetric`` or not)."""

    method: ClassVar[str] = ""
    prefix: ClassVar[str] = ""
    sparsity: float = 0.5
    pattern: str | None = None
    block: int = 64
    bits: int = FLOAT_BITS
    symmetric: bool = False

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def keep(self) -> int:
        """Weights each row keeps of each block."""
        nm = self.nm
        if nm is not None:
            return self.block // nm[1] * nm[0]
        return self.block - round(self.sparsity * self.block)

    @property
    def quantized(self) -> bool:
        return self.bits != FLOAT_BITS

    @property
    def label(self) -> str:
        kind = self.pattern if self.pattern is not None else f"s{self.sparsity * 100:.10g}"
        label = f"{self.prefix}-{kind}-b{self.block}"
        if self.quantized:
            label += f"-int{self.bits}-{'sym' if self.symmetric else 'asym'}"
        return label


@dataclass(frozen=True)
class MagnitudeOption(PruneOption):
    method: ClassVar[str] = "magnitude"
    prefix: ClassVar[str] = "mag"


@dataclass(frozen=True)
class WandaOption(PruneOption):
    method: ClassVar[str] = "wanda"
    prefix: ClassVar[str] = "wanda"


@dataclass(frozen=True)
class SparseGPTOption(PruneOption):
    method: ClassVar[str] = "sparsegpt"
    prefix: ClassVar[str] = "sgpt"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _valid_patterns(cols: int) -> list[str]:
    return [f"{n}:{m}" for m in range(2, MAX_M + 1) if cols % m == 0 for n in range(1, m)]


def check_prune_option(shape: LayerShape, option: PruneOption, layer: str) -> None:
    """Raise :class:`OptionError` naming the layer, the value at fault and what is allowed."""
    name = option.method
    if shape.kind != "linear":
        raise OptionError(f"{layer}: {name} prunes linear layers only, not {shape.kind}")
    if not _is_int(option.bits) or option.bits not in ALLOWED_BITS:
        raise OptionError(
            f"{layer}: {option.bits} bits is not allowed for {name}; "
            f"allowed: {list(ALLOWED_BITS)} (16: float16 values)"
        )
    if not isinstance(option.symmetric, bool) or (option.symmetric and not option.quantized):
        raise OptionError(
            f"{layer}: {name} symmetric={option.symmetric!r} with {option.bits} bits; allowed: "
            "true or false for quantised values (bits 2..8), false for float16 values"
        )
    try:
        nm = option.nm
    except ValueError:
        nm = (0, 0)
    if nm is not None and (nm == (0, 0) or shape.cols % nm[1]):
        raise OptionError(
            f"{layer}: {name} pattern {option.pattern!r} is not allowed for a layer of width "
            f"{shape.cols}; allowed: null (unstructured) or 'N:M' with 1 <= N < M <= {MAX_M} "
            f"and M dividing {shape.cols}: {', '.join(_valid_patterns(shape.cols))}"
        )
    m = nm[1] if nm else 1
    block = option.block
    if not _is_int(block) or block <= 0 or shape.cols % block or block % m:
        good = [b for b in range(m, shape.cols + 1) if shape.cols % b == 0 and b % m == 0]
        raise OptionError(
            f"{layer}: {name} block {block!r} must divide the layer width {shape.cols}"
            + (f" and be a multiple of M={m}" if nm else "")
            + "; allowed: "
            + ", ".join(str(b) for b in good[:12])
            + (", ..." if len(good) > 12 else "")
        )
    sparsity = option.sparsity
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool):
        sparsity = math.nan
    if nm is not None:
        wanted = 1 - nm[0] / nm[1]
        if not abs(sparsity - wanted) < 1e-9:
            raise OptionError(
                f"{layer}: {name} sparsity {option.sparsity!r} does not match pattern "
                f"{option.pattern}; allowed: {wanted:g} (1 - N/M)"
            )
    elif not (0 < sparsity < 1 and round(sparsity * block) < block):
        most = (block - 0.5) / block
        raise OptionError(
            f"{layer}: {name} sparsity {option.sparsity!r} is out of range; allowed: a number "
            f"in (0, 1) that keeps at least one weight of each block of {block}, i.e. below "
            f"{most:g}"
        )
