"""Core types shared by every compression method.

A method is registered by name and has two duties: a pure ``cost(shape, option)`` that
returns the exact bytes and FLOPs of the compressed layer, and a two-phase apply:
``observer()`` collects statistics through forward hooks (``None`` when the method needs
none), then ``convert()`` builds a module with real compressed storage.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from methods.errors import OptionError
from methods.option_fields import checked_fields

LayerKind = Literal["linear", "embedding"]

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a floating dtype, e.g. ``"float32"``."""
    if dtype not in _DTYPE_NAMES:
        raise OptionError(
            f"unsupported weight dtype {dtype}; allowed: {sorted(_DTYPE_NAMES.values())}"
        )
    return _DTYPE_NAMES[dtype]


def dtype_from_name(name: str) -> torch.dtype:
    for dtype, dname in _DTYPE_NAMES.items():
        if dname == name:
            return dtype
    raise OptionError(f"unknown dtype {name!r}; allowed: {sorted(_DTYPE_NAMES.values())}")


def is_conv1d(module: nn.Module) -> bool:
    """A transformers ``Conv1D``: a linear layer whose weight is stored ``[in, out]``."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and hasattr(module, "nf")
    )


def is_weight_layer(module: nn.Module) -> bool:
    """Linear, Conv1D and embedding layers: the layers compression methods act on."""
    return isinstance(module, (nn.Linear, nn.Embedding)) or is_conv1d(module)


def storage_key(tensor: torch.Tensor) -> int:
    """What identifies a tensor's memory, to count tensors shared by several modules once: its
    data pointer, or the tensor object itself where it has none (the ``meta`` device, where
    every pointer is 0, and empty tensors)."""
    return tensor.data_ptr() or id(tensor)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (``Conv1D`` stores it transposed); rows for embeddings."""
    weight = module.weight.detach()
    return weight.t() if is_conv1d(module) else weight


def finite_weight(module: nn.Module, label: str) -> torch.Tensor:
    """:func:`linear_weight`, refused (naming the option ``label``) if it holds NaN or inf.
    The sum is checked first: one reduction instead of a full boolean mask when all is well."""
    weight = linear_weight(module)
    if not torch.isfinite(weight.sum()) and not torch.isfinite(weight).all():
        raise OptionError(f"{label}: the layer's weight holds NaN or inf values")
    return weight


@dataclass(frozen=True)
class LayerShape:
    """What a method needs to know of a layer to price an option, without the layer itself.

    For a linear layer ``rows`` is ``out_features`` and ``cols`` is ``in_features``; for an
    embedding ``rows`` is the vocabulary size and ``cols`` the embedding width.
    """

    kind: LayerKind
    rows: int
    cols: int
    has_bias: bool = False
    dtype: str = "float32"

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=dtype_from_name(self.dtype)).element_size()

    @property
    def bias_bytes(self) -> int:
        return self.rows * self.element_size if self.has_bias else 0

    @staticmethod
    def of(module: nn.Module) -> LayerShape:
        """The shape of an ``nn.Linear``, a GPT-2 style ``Conv1D`` or an ``nn.Embedding``."""
        if is_conv1d(module):
            return LayerShape(
                "linear",
                module.weight.shape[1],
                module.weight.shape[0],
                getattr(module, "bias", None) is not None,
                dtype_name(module.weight.dtype),
            )
        if isinstance(module, nn.Linear):
            return LayerShape(
                "linear",
                module.out_features,
                module.in_features,
                module.bias is not None,
                dtype_name(module.weight.dtype),
            )
        if isinstance(module, nn.Embedding):
            return LayerShape(
                "embedding",
                module.num_embeddings,
                module.embedding_dim,
                False,
                dtype_name(module.weight.dtype),
            )
        raise OptionError(f"{type(module).__name__} is not a compressible layer type")


@dataclass(frozen=True)
class InputRounding:
    """How a layer rounds its inputs before multiplying them (an activation format):
    ``apply`` maps ``[tokens, cols]`` inputs to the values the product reads; options whose
    roundings share a ``name`` round alike."""

    name: str
    apply: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Cost:
    """Exact storage and arithmetic of one layer under one option.

    ``weight_bytes`` covers everything that stands for the weight (codes, scales, offsets,
    indices, factors); ``other_bytes`` the rest the module stores (the bias).
    ``flops_per_token`` counts multiply-adds as two FLOPs for one input row.
    """

    weight_bytes: int
    other_bytes: int
    flops_per_token: int

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.other_bytes


@dataclass(frozen=True)
class Option:
    """Base of every method option: a small frozen dataclass, serialisable to JSON."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> Option:
        """The option with these fields, each of its declared type: ``int`` an integer (not a
        bool, not ``4.0``), ``bool`` true or false, ``float`` a finite number (integers are
        made floats), ``str`` a string, ``X | None`` also null; else :class:`OptionError`.
        Ranges are the method's :meth:`Method.check`."""
        return cls(**checked_fields(cls, data))

    @property
    def label(self) -> str:
        """A short human label, unique within a method, e.g. ``int4-g128-asym``."""
        return self.method


class Observer(ABC):
    """Collects a layer's statistics from forward hooks during calibration.

    An observer with ``needs_fisher`` also wants the diagonal Fisher information of the
    layer's weight (``[rows, cols]``, as :func:`linear_weight` orients it): whoever runs the
    calibration computes it by backward passes and hands it to :meth:`observe_fisher`.
    """

    needs_fisher: ClassVar[bool] = False

    @abstractmethod
    def observe(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        """Called as a forward hook."""

    def observe_fisher(self, fisher: torch.Tensor) -> None:
        """Receives the weight's diagonal Fisher information (only if ``needs_fisher``)."""
        raise NotImplementedError(f"{type(self).__name__} takes no Fisher information")


class Method(ABC):
    """A registered compression method."""

    name: ClassVar[str]
    option_type: ClassVar[type[Option]]
    version: ClassVar[str] = "1"  # bump when conversion changes: it keys cached tables
    # its statistics need backward passes through the whole model (not one block at a time)
    needs_whole_model: ClassVar[bool] = False

    @abstractmethod
    def supports(self, shape: LayerShape) -> bool:
        """Whether this method can compress a layer of this kind at all."""

    @abstractmethod
    def check(self, shape: LayerShape, option: Option, layer: str = "layer") -> None:
        """Raise :class:`OptionError` naming the layer, the option and what is allowed."""

    @abstractmethod
    def cost(self, shape: LayerShape, option: Option) -> Cost:
        """Exact bytes of the converted module's state and its FLOPs per token (pure)."""

    @abstractmethod
    def grid(self, shape: LayerShape) -> list[Option]:
        """The default options offered to the search for a layer of this shape."""

    def needs_calibration(self, option: Option) -> bool:
        return False

    def simulated_weight(
        self,
        module: nn.Module,
        option: Option,
        observer: Observer | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The float weight the module :meth:`convert` builds computes with (only the
        ``rows`` indexed, when given), found without building it (no packing), or ``None``
        where only converting tells. Estimators that need the weight alone use it."""
        return None

    def input_rounding(self, option: Option) -> InputRounding | None:
        """How the linear module :meth:`convert` builds rounds its inputs (``None``: it
        multiplies them as they are). Weight-space estimates add the error it causes."""
        return None

    def stand_in(self, option: Option) -> Option | None:
        """An uncalibrated option stored alike whose weight-space estimate may stand in for
        this one's, scaled by measurements (``None``: estimate it from its own weight). A
        calibrated method moves its weight error where the inputs do not reach, so its own
        weight error says little, and converting every option just to estimate it costs
        what the calibration costs."""
        return None

    def error_bound(self, shape: LayerShape, option: Option) -> float:
        """The largest relative output error expected on a layer with i.i.d. Gaussian weights
        and inputs; the conformance suite holds every option to it, and a conversion at one
        bit fewer, or one that drops the weight, has to break it.

        Options with ``bits`` and ``group_size`` fields (integer and codebook formats) are
        held to :func:`quantizer_error_bound`. Otherwise a uniform quantiser's rule of thumb:
        ``3 * 2**-bits`` (1% at least), where ``bits`` is the option's ``effective_bits`` or
        ``bits`` field, else the stored bits per weight. Methods that remove information in
        another way (pruning, low rank) override it with their own expectation.
        """
        bits = getattr(option, "effective_bits", None) or getattr(option, "bits", None)
        if bits is not None and hasattr(option, "group_size") and bits < 16:
            group = getattr(option, "group_size", None) or shape.cols
            return quantizer_error_bound(bits, group, bool(getattr(option, "symmetric", False)))
        if bits is None:
            bits = bits_per_weight(self.cost(shape, option), shape)
        return max(3.0 * 2.0**-bits, 0.01)

    def observer(self, module: nn.Module, option: Option) -> Observer | None:
        """Statistics collector for phase one; ``None`` when the method needs none."""
        return None

    @abstractmethod
    def convert(
        self, module: nn.Module, option: Option, observer: Observer | None = None
    ) -> nn.Module:
        """Phase two: a new module with real compressed storage (``module`` is not changed)."""

    def convert_many(
        self,
        module: nn.Module,
        options: Sequence[Option],
        observer_of: Callable[[Option], Observer | None],
    ) -> Iterator[tuple[Option, nn.Module | OptionError]]:
        """Each option's :meth:`convert` of ``module`` in order, or the :class:`OptionError`
        that refused it. Methods whose options share work on a layer (a factorisation, a
        sweep) override it to do that work once."""
        for option in options:
            try:
                yield option, self.convert(module, option, observer_of(option))
            except OptionError as exc:
                yield option, exc

    @abstractmethod
    def empty(self, shape: LayerShape, option: Option, like: nn.Module | None = None) -> nn.Module:
        """A module of the converted layout with uninitialised storage, to load a state into."""

    def rebuilt_numel(self, shape: LayerShape, option: Option) -> int:
        """Float weights the ``"dequantize"`` path rebuilds on each call (what a cost model
        charges for it): the whole ``rows x cols`` weight unless the method stores factors."""
        return shape.numel

    def runtime_format(self, shape: LayerShape, option: Option) -> str:
        """How the converted linear layer computes: ``"dense"``, a kernel name such as
        ``"int8_weight_only"`` (a key of a hardware spec's ``kernels``), or ``"dequantize"``
        (the float weight is rebuilt on each call)."""
        return "dequantize"


class KeepsStoredFormat(nn.Module):
    """Mixin for modules with real compressed storage: ``.to(device)`` moves the buffers named
    in ``stored_buffers``, while dtype casts (``.half()``, ``.to(torch.float32)``) leave them
    in their stored format (so their bytes stay what ``cost()`` says)."""

    stored_buffers: ClassVar[tuple[str, ...]] = ()

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        stored = {k: self._buffers[k] for k in self.stored_buffers}
        for key in stored:
            self._buffers[key] = None
        try:
            super()._apply(fn, recurse)
        finally:
            present = [t for t in stored.values() if t is not None]
            device = fn(torch.empty(0, device=present[0].device)).device if present else None
            for key, tensor in stored.items():
                self._buffers[key] = None if tensor is None else tensor.to(device)
        return self


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def bits_per_weight(cost: Cost, shape: LayerShape) -> float:
    return 8.0 * cost.weight_bytes / shape.numel if shape.numel else math.nan


# The bound over the expected error of a uniform quantiser (see quantizer_error_bound): its
# step model is within 0.99-1.1 of RTN's errors measured over the conformance grid; codebooks
# (NF4, FP4, Lloyd) reach 1.25 of it, GPTQ on inputs other than its calibration set 1.2, and
# a few tokens' sampling noise adds about 5%. A conversion at one bit fewer more than doubles
# the expected error, so it lands above 1.5 times this bound.
QUANT_BOUND_MARGIN = 1.4


@functools.cache
def gaussian_range_rms(group: int, symmetric: bool) -> float:
    """Root mean square, in standard deviations, of the range a group of ``group`` i.i.d.
    Gaussian weights spans: ``2 * max|w|`` when symmetric, ``max w - min w`` otherwise (its
    square's mean taken as ``2 E[M^2] + 2 E[M]^2`` for the largest value ``M``: the largest and
    smallest of a group are nearly independent)."""
    from scipy import integrate, stats

    if symmetric:  # the largest |w|: density g * 2 phi(x) * (2 Phi(x) - 1)**(g - 1) on x > 0

        def density(x: float) -> float:
            return group * 2 * stats.norm.pdf(x) * (2 * stats.norm.cdf(x) - 1) ** (group - 1)

        low = 0.0
    else:  # the largest w: density g * phi(x) * Phi(x)**(g - 1)

        def density(x: float) -> float:
            return group * stats.norm.pdf(x) * stats.norm.cdf(x) ** (group - 1)

        low = -math.inf
    first = integrate.quad(lambda x: x * density(x), low, math.inf)[0]
    second = integrate.quad(lambda x: x * x * density(x), low, math.inf)[0]
    return math.sqrt(4 * second if symmetric else 2 * second + 2 * first * first)


def quantizer_error(bits: int, group: int, symmetric: bool) -> float:
    """Expected relative error of a ``bits``-bit uniform quantiser of i.i.d. Gaussian weights
    whose ``2**bits`` levels span each group's range (the affine format): rounding to a step
    ``d = range / (2**bits - 1)`` leaves an error of variance ``d**2 / 12`` per weight. For
    i.i.d. Gaussian inputs the relative output error is the relative weight error."""
    return gaussian_range_rms(group, symmetric) / ((2**bits - 1) * math.sqrt(12.0))


def quantizer_error_bound(bits: int, group: int, symmetric: bool) -> float:
    """:func:`quantizer_error` with :data:`QUANT_BOUND_MARGIN`."""
    return QUANT_BOUND_MARGIN * quantizer_error(bits, group, symmetric)
