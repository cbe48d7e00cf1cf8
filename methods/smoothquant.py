"""W8A8 with SmoothQuant: int8 weights and dynamically quantised int8 activations.

Activation outliers make per-tensor activation quantisation lossy; SmoothQuant moves them into
the weights first: each input channel ``j`` is divided by ``s_j = a_j**alpha / w_j**(1-alpha)``
(``a_j`` the calibration activations' largest magnitude in that channel) and the weight column
is multiplied by it, which leaves the product unchanged. Weights are quantised per row, so
``w_j`` here is the column's largest magnitude *relative to its row's* (SmoothQuant takes the
plain largest magnitude, which one outlier row decides for every column; on the demo model the
relative form gives 0.0101 against 0.0427 held-out error at alpha 0.6). The search is offered
several strengths and picks one per layer by its measured output error (layer-local error
proved a poor guide: it always favours the strongest smoothing).

Storage: int8 codes (symmetric, one float16 scale per output channel, or one for the whole
weight with ``weight_scales="tensor"``), the float16 smoothing vector, and the bias. With
``pair_safe`` the codes of each pair of adjacent input columns sum to at most 128 in
magnitude (:mod:`methods.pair_safe`): x86 CPUs without VNNI add each pair of 8-bit products
in 16 bits with saturation, which such codes cannot reach, so the layer is computed exactly
there with 8-bit activations too, at 8-bit weight resolution.
Activations are quantised per call, per tensor, asymmetrically, to 7 bits
(``activation_bits=7``, fbgemm's default, safe on every x86 CPU) or to 8 bits
(``activation_bits=8``: ONNX Runtime's ``DynamicQuantizeLinear``, which its fused
``DynamicQuantizeMatMul`` kernel runs). On CPUs with fbgemm the layer runs torch's dynamic int8
kernel (``quantized::linear_dynamic``), which holds the same codes in its packed form; 8-bit
activations take it only on CPUs with VNNI or with pair-safe codes (elsewhere its 16-bit pair
sums can saturate);
every other case runs an exact float reference of the kernel.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from methods.base import (
    Cost,
    KeepsStoredFormat,
    LayerShape,
    Method,
    Observer,
    Option,
    dtype_from_name,
    finite_weight,
)
from methods.errors import OptionError
from methods.pair_safe import pair_safe_codes
from methods.registry import register

GRID_ALPHAS = (0.45, 0.6, 0.75)
ACTIVATION_BITS = (7, 8)
WEIGHT_SCALES = ("channel", "tensor")
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class W8A8Option(Option):
    """``alpha``: smoothing strength in [0, 1]; 0 disables smoothing. ``activation_bits``: 7
    (fbgemm's range) or 8 (ONNX Runtime's ``DynamicQuantizeLinear``). ``weight_scales``:
    one scale per output channel, or one per tensor (ONNX Runtime's fastest int8 matmul).
    ``pair_safe``: codes whose adjacent input-column pairs never saturate a 16-bit sum (exact
    on CPUs without VNNI; see :mod:`methods.pair_safe`)."""

    method: ClassVar[str] = "w8a8"
    alpha: float = 0.75
    activation_bits: int = 7
    weight_scales: str = "channel"
    pair_safe: bool = False

    @property
    def label(self) -> str:
        name = "w8a8" if self.activation_bits == 7 else f"w8a8-a{self.activation_bits}"
        name += "-pairsafe" if self.pair_safe else ""
        name += "" if self.weight_scales == "channel" else f"-{self.weight_scales}"
        return name if self.alpha == 0 else f"{name}-sq{self.alpha:g}"

    @property
    def per_tensor(self) -> bool:
        return self.weight_scales == "tensor"

    @property
    def smooths(self) -> bool:
        return self.alpha != 0

    @property
    def effective_bits(self) -> int:
        """Precision of its coarser half: activations take 7 (or 8) bits per call, per
        tensor, so the range is set by the largest one (about 4 sigma for Gaussian data) and
        typical values see about one bit less."""
        return self.activation_bits - 1


class ActivationObserver(Observer):
    """Largest magnitude of each input channel over all calibration calls."""

    def __init__(self, cols: int) -> None:
        self.cols = cols
        self.absmax = torch.zeros(cols)
        self.calls = 0

    def observe(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        x = inputs[0].detach().reshape(-1, self.cols).float().cpu()
        self.absmax = torch.maximum(self.absmax, x.abs().amax(dim=0))
        self.calls += 1


def dynamic_quantize(x: torch.Tensor, bits: int = 7) -> torch.Tensor:
    """``x`` after per-tensor dynamic quantisation to ``bits`` (float result): 7 as fbgemm
    does it; 8 as ONNX Runtime's ``DynamicQuantizeLinear`` (float32 scale and zero point,
    ties to even), which fbgemm's 8-bit range matches."""
    levels = float(2**bits - 1)
    low = min(float(x.min()), 0.0)
    high = max(float(x.max()), 0.0)
    if bits == 7:
        scale = max((high - low) / levels, 1.1920928955078125e-07)
        zero = float(min(max(-round(low / scale), 0), levels))
        q = torch.clamp(torch.round(x / scale) + zero, 0, levels)
        return (q - zero) * scale
    scale32 = torch.tensor((high - low) / levels, dtype=torch.float32)
    if float(scale32) == 0.0:
        return torch.zeros_like(x)
    zero32 = torch.clamp(torch.round(-torch.tensor(low, dtype=torch.float32) / scale32), 0, levels)
    q = torch.clamp(torch.round(x.float() / scale32) + zero32, 0, levels)
    return (q - zero32) * scale32


def smoothing(absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """Float16 per-input-channel factors ``s`` (weights are multiplied by them)."""
    if alpha == 0:
        return torch.ones(weight.shape[1], dtype=torch.float16)
    magnitude = weight.abs()
    w = (magnitude / magnitude.amax(dim=1, keepdim=True).clamp_min(1e-12)).amax(dim=0)
    w = w.clamp_min(1e-5)
    a = absmax.clamp_min(1e-5)
    s = (a**alpha / w ** (1 - alpha)).clamp(1e-4, 1e4)
    return s.to(torch.float16)


def quantize_weight(
    weight: torch.Tensor, per_tensor: bool = False, pair_safe: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes in [-127, 127] and float16 scales, one per row (or one in all);
    ``pair_safe``: within the pair limit (:func:`methods.pair_safe.pair_safe_codes`)."""
    if pair_safe:
        return pair_safe_codes(weight, per_tensor)
    absmax = weight.abs().amax().reshape(1) if per_tensor else weight.abs().amax(dim=1)
    scale = (absmax / 127).clamp(2.0**-24, _FP16_MAX).to(torch.float16)
    codes = torch.clamp(torch.round(weight / scale.float()[:, None]), -127, 127)
    return codes.to(torch.int8), scale


def _fbgemm_ready(x: torch.Tensor, activation_bits: int = 7, pair_safe: bool = False) -> bool:
    """Whether fbgemm's dynamic int8 kernel computes this layer exactly on ``x``'s device:
    7-bit activations or pair-safe codes on any CPU with fbgemm, others only with VNNI."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and "fbgemm" in torch.backends.quantized.supported_engines
        and hasattr(torch.ops.quantized, "linear_dynamic")
        and (activation_bits == 7 or pair_safe or has_vnni())
    )


def has_vnni() -> bool:
    """Whether torch reports VNNI on this CPU (8-bit dot products summed in 32 bits)."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(probe()) if probe is not None else False


class W8A8Linear(KeepsStoredFormat):
    """A linear layer stored as int8 codes, per-row (or one) scales, a smoothing vector and a
    bias."""

    stored_buffers = ("codes", "scales", "smooth")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        smooths: bool,
        bias: bool = True,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        activation_bits: int = 7,
        per_tensor: bool = False,
        pair_safe: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activation_bits = activation_bits
        self.pair_safe = pair_safe
        self.rows, self.cols = out_features, in_features
        self.register_buffer(
            "codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        scales = torch.ones(1 if per_tensor else out_features, dtype=torch.float16, device=device)
        self.register_buffer("scales", scales)
        smooth = torch.ones(in_features, dtype=torch.float16, device=device) if smooths else None
        self.register_buffer("smooth", smooth)
        bias_tensor = torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None
        self.register_buffer("bias", bias_tensor)
        self._packed: Any = None

    # ------------------------------------------------------------------ storage
    def stored_weight_bytes(self) -> int:
        smooth = 0 if self.smooth is None else self.smooth.numel() * 2
        return self.rows * self.cols + self.scales.numel() * 2 + smooth

    def opaque_bytes(self) -> int:
        """Bytes held by fbgemm's packed weight in place of the ``codes`` buffer."""
        return self.rows * self.cols if self._packed is not None else 0

    def portable_codes(self) -> torch.Tensor:
        if self._packed is None:
            return self.codes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            weight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return weight.int_repr()

    def _unpack(self) -> None:
        if self._packed is not None:
            self.codes = self.portable_codes()
            self._packed = None

    def _pack(self) -> Any:
        if self._packed is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if self.scales.numel() == 1:
                    weight = torch._make_per_tensor_quantized_tensor(
                        self.codes, float(self.scales), 0
                    )
                else:
                    zeros = torch.zeros(self.rows, dtype=torch.long)
                    weight = torch._make_per_channel_quantized_tensor(
                        self.codes, self.scales.double(), zeros, 0
                    )
                bias = None if self.bias is None else self.bias.float()
                self._packed = torch.ops.quantized.linear_prepack(weight, bias)
            self.codes = torch.zeros(0, dtype=torch.int8)  # the packed weight holds the codes
        return self._packed

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "codes"] = self.portable_codes()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        self._packed = None
        self.codes = torch.zeros(self.rows, self.cols, dtype=torch.int8, device=self.scales.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        self._unpack()
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ compute
    @torch.no_grad()
    def store(self, codes: torch.Tensor, scales: torch.Tensor, smooth: torch.Tensor | None) -> None:
        device = self.scales.device
        self._packed = None
        self.codes = codes.to(torch.int8).to(device).contiguous()
        self.scales = scales.to(torch.float16).to(device).contiguous()
        if self.smooth is not None and smooth is not None:
            self.smooth = smooth.to(torch.float16).to(device).contiguous()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight of the smoothed layer (multiply inputs by ``1/smooth`` first)."""
        return self.portable_codes().to(dtype) * self.scales.to(dtype)[:, None]

    def reference(self, x2: torch.Tensor) -> torch.Tensor:
        """Float computation equal to the kernel's: smooth, quantise ``x`` per tensor, matmul."""
        x2 = x2.float()
        if self.smooth is not None:
            x2 = x2 / self.smooth.float()
        y = dynamic_quantize(x2, self.activation_bits) @ self.dequantize(torch.float32).t()
        return y if self.bias is None else y + self.bias.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_zeros(*shape[:-1], self.out_features)
        if _fbgemm_ready(x2, self.activation_bits, self.pair_safe):
            if self.smooth is not None:
                x2 = x2 / self.smooth.to(x2.dtype)
            reduce_range = self.activation_bits == 7
            y = torch.ops.quantized.linear_dynamic(x2.contiguous(), self._pack(), reduce_range)
        else:
            y = self.reference(x2).to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, smoothed={self.smooth is not None}, "
            f"activation_bits={self.activation_bits}, pair_safe={self.pair_safe}, "
            f"per_tensor={self.scales.numel() == 1}"
        )


class SmoothQuantW8A8(Method):
    name: ClassVar[str] = "w8a8"
    version: ClassVar[str] = "2"  # 2: row-relative weight statistic
    option_type: ClassVar[type[Option]] = W8A8Option

    def supports(self, shape: LayerShape) -> bool:
        return shape.kind == "linear"

    def check(self, shape: LayerShape, option: Option, layer: str = "layer") -> None:
        assert isinstance(option, W8A8Option)
        if shape.kind != "linear":
            raise OptionError(f"{layer}: w8a8 compresses linear layers only, not {shape.kind}")
        if isinstance(option.alpha, bool) or not isinstance(option.alpha, (int, float)):
            raise OptionError(
                f"{layer}: w8a8 alpha must be a number in [0, 1], got {option.alpha!r}"
            )
        if not 0 <= option.alpha <= 1:
            raise OptionError(
                f"{layer}: w8a8 alpha {option.alpha} is out of range; allowed: a number in [0, 1]"
            )
        if option.weight_scales not in WEIGHT_SCALES:
            raise OptionError(
                f"{layer}: w8a8 weight_scales {option.weight_scales!r} is not allowed; "
                f"allowed: {', '.join(WEIGHT_SCALES)}"
            )
        if option.activation_bits not in ACTIVATION_BITS:
            raise OptionError(
                f"{layer}: w8a8 activation_bits {option.activation_bits!r} is not allowed; "
                f"allowed: {' or '.join(map(str, ACTIVATION_BITS))}"
            )
        if not isinstance(option.pair_safe, bool):
            raise OptionError(
                f"{layer}: w8a8 pair_safe must be true or false, got {option.pair_safe!r}"
            )

    def cost(self, shape: LayerShape, option: Option) -> Cost:
        assert isinstance(option, W8A8Option)
        smooth = 2 * shape.cols if option.smooths else 0
        scales = 1 if option.per_tensor else shape.rows
        weight = shape.rows * shape.cols + 2 * scales + smooth
        return Cost(weight, shape.bias_bytes, 2 * shape.rows * shape.cols)

    def grid(self, shape: LayerShape) -> list[Option]:
        return [W8A8Option(alpha) for alpha in GRID_ALPHAS]

    def runtime_format(self, shape: LayerShape, option: Option) -> str:
        return "int8_dynamic"

    def needs_calibration(self, option: Option) -> bool:
        assert isinstance(option, W8A8Option)
        return option.smooths

    def observer(self, module: nn.Module, option: Option) -> Observer | None:
        return (
            ActivationObserver(LayerShape.of(module).cols)
            if self.needs_calibration(option)
            else None
        )

    @torch.no_grad()
    def convert(
        self, module: nn.Module, option: Option, observer: Observer | None = None
    ) -> nn.Module:
        assert isinstance(option, W8A8Option)
        shape = LayerShape.of(module)
        self.check(shape, option)
        weight = finite_weight(module, option.label).float()
        smooth = None
        if option.smooths:
            if not isinstance(observer, ActivationObserver) or observer.calls == 0:
                raise OptionError(
                    f"{option.label} needs calibration activations (an observer that saw data)"
                )
            smooth = smoothing(observer.absmax, weight, option.alpha)
            weight = weight * smooth.float()[None, :]
        codes, scales = quantize_weight(weight, option.per_tensor, option.pair_safe)
        out = self.empty(shape, option, like=module)
        out.store(codes, scales, smooth)
        if out.bias is not None:
            out.bias.copy_(module.bias.detach())
        return out

    def empty(self, shape: LayerShape, option: Option, like: nn.Module | None = None) -> nn.Module:
        assert isinstance(option, W8A8Option)
        device = like.weight.device if like is not None else None
        return W8A8Linear(
            shape.cols,
            shape.rows,
            option.smooths,
            bias=shape.has_bias,
            bias_dtype=dtype_from_name(shape.dtype),
            device=device,
            activation_bits=option.activation_bits,
            per_tensor=option.per_tensor,
            pair_safe=option.pair_safe,
        )


register(SmoothQuantW8A8())
