"""llama.cpp's tensor types as a method: each weight stored as the GGUF blocks llama.cpp loads.

An option names a GGML type (``Q4_K``, ``IQ4_XS``, ``Q8_0``, ...) and whether an importance
matrix weighs the encoder's error (``imatrix``: the mean square of each input column over
the calibration tokens, as ``llama-imatrix`` computes it). The module stores the rows as raw
blocks, byte for byte what the GGUF file holds, and decodes them with ``gguf``'s NumPy
decoders on each call; a linear layer rounds its inputs as llama.cpp's kernels do before
their dot products (:mod:`methods.ggml_activations`), so its error is the error in
llama.cpp. Encoding runs llama.cpp's own quantizer (:mod:`methods.ggml_quantizer`) where it
is installed, and ``gguf``'s NumPy encoders for the legacy 32-wide types otherwise
(bit-exact with llama.cpp's reference encoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from gguf import quants
from torch import nn

from methods import ggml_quantizer
from methods.base import (
    Cost,
    InputRounding,
    KeepsStoredFormat,
    LayerShape,
    Method,
    Observer,
    Option,
    dtype_from_name,
    finite_weight,
)
from methods.errors import OptionError
from methods.ggml_activations import ROUNDINGS, round_activations, vec_dot_type
from methods.gguf_types import NEEDS_IMATRIX, NUMPY_ENCODERS, TensorType, tensor_type
from methods.observers import SHARED, ChannelObserver
from methods.registry import register
from methods.weight_only import WeightOnlyLinear

# The default search: every type llama.cpp runs well on CPUs and GPUs, plain and (4 bits and
# fewer, where it pays most) with an importance matrix. F32 is "keep"; BF16 is offered by hand.
PLAIN_GRID = (
    "F16",
    "Q8_0",
    "Q6_K",
    "Q5_K",
    "Q5_1",
    "Q5_0",
    "Q4_K",
    "Q4_1",
    "Q4_0",
    "IQ4_NL",
    "IQ4_XS",
    "Q3_K",
    "IQ3_S",
    "Q2_K",
)
IMATRIX_GRID = (
    "Q4_K",
    "Q4_1",
    "Q4_0",
    "IQ4_NL",
    "IQ4_XS",
    "Q3_K",
    "IQ3_S",
    "IQ3_XXS",
    "Q2_K",
    "IQ2_S",
    "IQ2_XS",
    "IQ2_XXS",
)


@dataclass(frozen=True)
class GGUFOption(Option):
    """A GGML tensor type, its encoder weighted by an importance matrix or not."""

    method: ClassVar[str] = "gguf"
    type: str = "Q4_K"
    imatrix: bool = False

    @property
    def label(self) -> str:
        return f"gguf-{self.type.lower()}" + ("-imat" if self.imatrix else "")

    @property
    def tensor_type(self) -> TensorType:
        return tensor_type(self.type)


class GGUFStorage(KeepsStoredFormat):
    """``blocks``: a ``rows x cols`` weight as ``[rows, row_bytes]`` bytes of GGML ``type``."""

    stored_buffers = ("blocks",)

    def __init__(self, rows: int, cols: int, kind: TensorType, device=None) -> None:
        super().__init__()
        self.rows, self.cols, self.kind = rows, cols, kind
        blocks = torch.zeros(rows, kind.row_bytes(cols), dtype=torch.uint8, device=device)
        self.register_buffer("blocks", blocks)

    def store(self, blocks: np.ndarray) -> None:
        self.blocks = torch.from_numpy(np.ascontiguousarray(blocks)).to(self.blocks.device)

    def decode(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weight (or the rows ``rows``), decoded as llama.cpp decodes it."""
        raw = (self.blocks if rows is None else self.blocks[rows.reshape(-1)]).cpu().numpy()
        decoded = ggml_quantizer.dequantize(raw, self.kind.ggml.value, self.cols)
        if decoded is None:  # without llama.cpp: gguf's NumPy decoders, the same floats
            decoded = quants.dequantize(raw, self.kind.ggml)
        return torch.from_numpy(np.ascontiguousarray(decoded, dtype=np.float32)).to(
            self.blocks.device
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole weight in ``dtype`` (a tied output layer reads the table this way)."""
        return self.decode().to(dtype)

    def stored_weight_bytes(self) -> int:
        return self.blocks.numel()

    def extra_repr(self) -> str:
        return f"type={self.kind.name}"


class GGUFLinear(WeightOnlyLinear, GGUFStorage):
    """A linear layer whose weight is GGUF blocks, decoded on each call, multiplied by its
    inputs rounded as llama.cpp rounds them for the weight's type."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kind: TensorType,
        bias: bool = False,
        bias_dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        GGUFStorage.__init__(self, out_features, in_features, kind, device)
        self._set_linear(in_features, out_features, bias, bias_dtype, device)

    def forward_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.dequantize(dtype)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return F.linear(round_activations(x2, self.kind.name), self.forward_weight(x2.dtype))


class GGUFEmbedding(GGUFStorage):
    """An embedding table stored as GGUF blocks; a lookup decodes only the rows it reads."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        kind: TensorType,
        padding_idx: int | None = None,
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, kind, device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.dtype = padding_idx, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decode(ids).reshape(*ids.shape, self.embedding_dim).to(self.dtype)


class GGUFTypes(Method):
    name: ClassVar[str] = "gguf"
    option_type: ClassVar[type[Option]] = GGUFOption
    version: ClassVar[str] = "2"  # 2: Fisher estimates include the activation rounding

    def supports(self, shape: LayerShape) -> bool:
        return shape.kind in ("linear", "embedding")

    def check(self, shape: LayerShape, option: Option, layer: str = "layer") -> None:
        assert isinstance(option, GGUFOption)
        try:
            kind = option.tensor_type
        except KeyError:
            from methods.gguf_types import allowed_types

            raise OptionError(
                f"{layer}: {option.type!r} is not a llama.cpp tensor type autotune writes; "
                f"allowed: {', '.join(allowed_types())}"
            ) from None
        if option.type != kind.name:
            raise OptionError(f"{layer}: write the type in capitals, {kind.name!r}")
        if not kind.fits(shape.cols):
            fallback = f"; llama.cpp itself would store it as {kind.fallback}" * bool(kind.fallback)
            raise OptionError(
                f"{layer}: {kind.name} stores rows in blocks of {kind.block} and the layer is "
                f"{shape.cols} wide{fallback}; allowed: types whose block divides {shape.cols}"
            )
        if option.imatrix and (kind.is_float or shape.kind == "embedding"):
            raise OptionError(
                f"{layer}: {option.label}: an importance matrix weighs a linear layer's "
                "quantised types only"
            )
        if kind.name in NEEDS_IMATRIX and not option.imatrix:
            raise OptionError(
                f"{layer}: llama.cpp quantises {kind.name} only with an importance matrix; "
                "set imatrix: true"
            )

    def cost(self, shape: LayerShape, option: Option) -> Cost:
        assert isinstance(option, GGUFOption)
        weight = shape.rows * option.tensor_type.row_bytes(shape.cols)
        flops = 2 * shape.rows * shape.cols if shape.kind == "linear" else 0
        return Cost(weight, shape.bias_bytes, flops)

    def grid(self, shape: LayerShape) -> list[Option]:
        exact = ggml_quantizer.available()
        plain = [GGUFOption(t) for t in PLAIN_GRID if exact or t in NUMPY_ENCODERS]
        weighted = [GGUFOption(t, True) for t in IMATRIX_GRID] if exact else []
        options = plain + (weighted if shape.kind == "linear" else [])
        return [o for o in options if o.tensor_type.fits(shape.cols)]

    def needs_calibration(self, option: Option) -> bool:
        assert isinstance(option, GGUFOption)
        return option.imatrix

    def input_rounding(self, option: Option) -> InputRounding | None:
        """The activation type llama.cpp's kernels convert inputs to for this weight type
        (none for F32)."""
        assert isinstance(option, GGUFOption)
        kind = vec_dot_type(option.tensor_type.name)
        return None if kind == "F32" else InputRounding(kind, ROUNDINGS[kind])

    def observer(self, module: nn.Module, option: Option) -> Observer | None:
        assert isinstance(option, GGUFOption)
        if not option.imatrix:
            return None
        cols = LayerShape.of(module).cols
        return SHARED.get(module, ChannelObserver, lambda: ChannelObserver(cols))

    def convert(
        self, module: nn.Module, option: Option, observer: Observer | None = None
    ) -> nn.Module:
        assert isinstance(option, GGUFOption)
        shape = LayerShape.of(module)
        self.check(shape, option)
        importance = None
        if option.imatrix:
            if not isinstance(observer, ChannelObserver) or not observer.tokens:
                raise OptionError(
                    f"{option.label} needs calibration data for its importance matrix"
                )
            importance = imatrix_values(observer)
        weight = finite_weight(module, option.label).float().cpu().numpy()
        out = self.empty(shape, option, like=module)
        out.store(encode(weight, option.tensor_type, importance, option.label))
        if isinstance(out, GGUFLinear) and out.bias is not None:
            out.bias.copy_(module.bias.detach())
        return out

    def empty(self, shape: LayerShape, option: Option, like: nn.Module | None = None) -> nn.Module:
        assert isinstance(option, GGUFOption)
        device = like.weight.device if like is not None else None
        dtype = dtype_from_name(shape.dtype)
        if shape.kind == "linear":
            return GGUFLinear(
                shape.cols, shape.rows, option.tensor_type, shape.has_bias, dtype, device
            )
        padding_idx = getattr(like, "padding_idx", None)
        return GGUFEmbedding(shape.rows, shape.cols, option.tensor_type, padding_idx, dtype, device)


def imatrix_values(observer: ChannelObserver) -> np.ndarray:
    """Each input column's mean square, computed as llama-quantize computes it from an
    imatrix file: the float32 sum over the float32 token count, in float32."""
    sums = observer.sumsq.numpy().astype(np.float32)
    return sums / np.float32(observer.tokens)


def encode(
    weight: np.ndarray, kind: TensorType, importance: np.ndarray | None, label: str
) -> np.ndarray:
    """``weight`` (``[rows, cols]`` float32) as GGML ``kind`` blocks, ``[rows, row_bytes]``:
    llama.cpp's quantizer where installed, else ``gguf``'s NumPy encoder (plain legacy types
    only)."""
    if ggml_quantizer.available():
        return ggml_quantizer.quantize(weight, kind.ggml.value, importance, what=label)
    if importance is not None or kind.name not in NUMPY_ENCODERS:
        ggml_quantizer.quantize(weight, kind.ggml.value, importance, what=label)  # raises
    encoded = quants.quantize(weight, kind.ggml)
    return encoded.view(np.uint8).reshape(weight.shape[0], -1)


register(GGUFTypes())
