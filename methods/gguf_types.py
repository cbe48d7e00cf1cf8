"""llama.cpp's tensor types (GGML types in a GGUF file): their block layout, exact row bytes,
the widths they take, and what llama.cpp does with a tensor that cannot take one.

Sizes come from the ``gguf`` package (``GGML_QUANT_SIZES``: elements per block and bytes per
block), so a row of ``cols`` weights of type ``T`` stores ``cols / block * type_bytes`` bytes,
exactly as llama.cpp's ``ggml_row_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# The types a plan may give a tensor, from widest to narrowest, with llama.cpp's fallback for
# a tensor whose width is not a multiple of the type's block (``llama-quant.cpp`` converts
# such a tensor to the fallback instead). ``None``: no fallback needed (32-wide blocks).
TYPE_FALLBACKS: dict[str, str | None] = {
    "F32": None,
    "F16": None,
    "BF16": None,
    "Q8_0": None,
    "Q6_K": "Q8_0",
    "Q5_K": "Q5_1",
    "Q5_1": None,
    "Q5_0": None,
    "Q4_K": "Q5_0",
    "Q4_1": None,
    "Q4_0": None,
    "IQ4_NL": None,
    "IQ4_XS": "IQ4_NL",
    "Q3_K": "Q4_0",
    "IQ3_S": "IQ4_NL",
    "IQ3_XXS": "IQ4_NL",
    "Q2_K": "Q4_0",
    "IQ2_S": "IQ4_NL",
    "IQ2_XS": "IQ4_NL",
    "IQ2_XXS": "IQ4_NL",
}

# Types llama.cpp's quantizer refuses without an importance matrix
# (``ggml_quantize_requires_imatrix``).
NEEDS_IMATRIX = frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"})

# Types whose encoder ``gguf`` implements in NumPy (bit-exact with llama.cpp's reference
# encoder when no importance matrix is given); every other type needs llama.cpp's quantizer.
NUMPY_ENCODERS = frozenset({"F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"})


@dataclass(frozen=True)
class TensorType:
    """One GGML type: ``block`` weights stored in ``block_bytes`` bytes."""

    name: str
    block: int
    block_bytes: int

    @property
    def ggml(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.name]

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block

    @property
    def is_float(self) -> bool:
        return self.name in ("F32", "F16", "BF16")

    def fits(self, cols: int) -> bool:
        """Whether a row of ``cols`` weights is a whole number of blocks."""
        return cols % self.block == 0

    def row_bytes(self, cols: int) -> int:
        """Bytes of one row of ``cols`` weights (``ggml_row_size``)."""
        if not self.fits(cols):
            raise ValueError(f"{self.name} stores rows of a multiple of {self.block} weights")
        return cols // self.block * self.block_bytes

    @property
    def fallback(self) -> str | None:
        return TYPE_FALLBACKS.get(self.name)


def tensor_type(name: str) -> TensorType:
    """The type named ``name`` (case-insensitive); ``KeyError`` for an unknown one."""
    key = name.upper()
    if key not in TYPE_FALLBACKS:
        raise KeyError(name)
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[key]]
    return TensorType(key, block, block_bytes)


def allowed_types() -> list[str]:
    return list(TYPE_FALLBACKS)
