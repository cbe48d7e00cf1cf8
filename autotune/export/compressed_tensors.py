"""Export to a compressed-tensors checkpoint: a Hugging Face model folder (``config.json``
with a ``quantization_config``, ``model.safetensors``, the tokenizer, autotune's ``plan.json``)
that transformers loads with the ``compressed-tensors`` package installed.

Every quantised linear layer is written from autotune's stored codes, scales and zero points
(never re-quantised). compressed-tensors decodes ``w = (q - zp) * s`` with signed codes ``q``:

* symmetric ``b``-bit codes ``u``: ``pack-quantized``, ``q = u - 2**(b-1)`` packed densely into
  int32 by the library's packer (``weight_packed``, ``weight_scale``, ``weight_shape``); the
  decoded weights are autotune's exactly.
* asymmetric codes: the whole zero point ``z`` of each group is recovered from the float16
  offset ``m = -z * s`` (and checked), and the weights decode as ``s * (u - z)``, which
  differs from autotune's ``s * u + m`` only by the float16 rounding of ``m``. Packed zero
  points (``pack-quantized``'s asymmetric form) do not load in transformers with
  compressed-tensors 0.20 (the model it builds expects them unpacked), so:

  * below 8 bits, ``q = u - z`` is written symmetric with one bit more (``q`` lies in
    ``[-(2**b - 1), 2**b - 1]``), ``pack-quantized``: int4 asymmetric becomes int5 symmetric,
    with no zero point to store;
  * at 8 bits, ``int-quantized``: int8 ``weight = u - 128`` and int8
    ``weight_zero_point = z - 128`` per group, one byte each.

Scales stay float16: ``[rows, groups]``, or ``[rows, 1]`` per channel.

FP8 layers (:mod:`methods.fp8`) are ``float-quantized``: the E4M3 codes as ``weight``
(``float8_e4m3fn``) and the float32 scales as ``weight_scale`` ``[rows, 1]``, decoded exactly
as autotune decodes them; with FP8 activations the group also carries dynamic per-token FP8
``input_activations``, which compressed-tensors applies as autotune's module does.

One config group is written per distinct written scheme, targeting the exact module names that
use it; every other linear layer is listed in ``ignore``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autotune.export.base import Exporter, ExportError, ExportResult, register_exporter
from autotune.io import atomic_directory
from autotune.layers import compressible_layers
from autotune.plan import Plan
from methods import affine
from methods.base import KeepsStoredFormat, LayerShape, Option
from methods.fp8 import Fp8Linear
from methods.quantized import QuantizedLinear, RowLookup
from methods.tied import TiedHead

PACKED = "pack-quantized"
UNPACKED = "int-quantized"
FLOAT = "float-quantized"
PLAN_FILE = "plan.json"
_PACK_CHUNK = 1 << 22  # codes packed at once
HELD = (
    "allowed: rtn or gptq on linear layers (2 to 8 bits, per channel or in groups), fp8 on "
    "linear layers, or keep"
)
QUANTISED = ("rtn", "gptq")
NO_SPARSE = (
    "compressed-tensors (0.20) has no compressor for sparse weights, and vLLM no longer loads "
    "2:4 checkpoints"
)
REFUSED = {
    "codebook": "codebook (NF4/FP4/Lloyd) tables have no compressed-tensors integer form",
    "outliers": "float16 outlier columns beside the codes have no compressed-tensors form",
    "magnitude": NO_SPARSE,
    "wanda": NO_SPARSE,
    "sparsegpt": NO_SPARSE,
    "svd": "low-rank factor pairs have no compressed-tensors form",
    "whitened_svd": "low-rank factor pairs have no compressed-tensors form",
    "fisher_svd": "low-rank factor pairs have no compressed-tensors form",
    "gguf": "llama.cpp's block types have no compressed-tensors form (use --format gguf)",
    "w8a8": (
        "its smoothing vector scales the layer's input, which a weight-only checkpoint cannot "
        "hold (use rtn with 8 bits)"
    ),
}


Written = QuantizedLinear | Fp8Linear  # the layers the format holds


@dataclass(frozen=True)
class Scheme:
    """How one layer is written: bits, group size (``None`` per channel), symmetry, the
    compressed-tensors format, the weights' number type (``int`` or ``float``) and whether
    inputs are quantised too (dynamic per token, FP8 only)."""

    bits: int
    group_size: int | None
    symmetric: bool
    format: str = PACKED
    type: str = "int"
    activations: bool = False

    @property
    def label(self) -> str:
        group = "ch" if self.group_size is None else f"g{self.group_size}"
        if self.type == "float":
            return f"fp{self.bits}-{group}" + ("-a8" if self.activations else "")
        return f"int{self.bits}-{group}-{'sym' if self.symmetric else 'asym'}"

    @classmethod
    def of(cls, module: Written) -> Scheme:
        """The scheme ``module``'s stored codes are written in (see the module docstring)."""
        if isinstance(module, Fp8Linear):
            return cls(8, None, True, FLOAT, "float", module.activations)
        group = None if module.group_size == module.cols else module.group_size
        if module.symmetric:
            return cls(module.bits, group, True)
        if module.bits < 8:
            return cls(module.bits + 1, group, True)
        return cls(module.bits, group, False, UNPACKED)

    def args(self) -> Any:
        """compressed-tensors' ``QuantizationArgs`` of the weights."""
        from compressed_tensors.quantization import QuantizationArgs

        return QuantizationArgs(
            num_bits=self.bits,
            type=self.type,
            symmetric=self.symmetric,
            strategy="channel" if self.group_size is None else "group",
            group_size=self.group_size,
        )

    def input_args(self) -> Any:
        """compressed-tensors' ``QuantizationArgs`` of the inputs (``None``: not quantised)."""
        from compressed_tensors.quantization import QuantizationArgs

        if not self.activations:
            return None
        return QuantizationArgs(
            num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True
        )


class CompressedTensorsExporter(Exporter):
    """A Hugging Face model folder in compressed-tensors format (see the module docstring)."""

    name = "compressed-tensors"
    requires = ("compressed_tensors", "transformers")
    install = '"autotune[export]"'
    writes = "folder"
    description = (
        "Hugging Face model folder in compressed-tensors format (pack-quantized integer "
        "weights, float-quantized FP8), loaded by transformers with compressed-tensors installed"
    )

    def refusal(self, layer: str, shape: LayerShape, option: Option) -> str | None:
        method = option.method
        if method == "none":
            return None
        if method in QUANTISED:
            if shape.kind != "linear":
                return "keep embeddings in float for compressed-tensors; " + HELD
            if not 1 <= int(getattr(option, "bits", 0)) <= 8:
                return f"{option.label}: pack-quantized holds 1 to 8 bits; " + HELD
            return None
        if method == "fp8":
            return None if shape.kind == "linear" else f"{option.label}: {HELD}"
        why = REFUSED.get(method, f"{method} has no compressed-tensors form")
        return f"{option.label}: {why}; {HELD}"

    def write(
        self, compressed: nn.Module, plan: Plan, out: Path, tokenizer: Any = None
    ) -> ExportResult:
        quantized = _quantized_layers(compressed)
        _check_model(compressed, plan, quantized)
        skeleton = _skeleton(compressed)
        _check_targets(skeleton, quantized)
        config = _quantization_config(skeleton, quantized)
        state = _checkpoint_state(compressed, quantized)
        with atomic_directory(out) as staging:
            compressed.save_pretrained(staging, state_dict=state)
            _write_config(staging, config)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            (staging / PLAN_FILE).write_text(plan.to_json(), encoding="utf-8")
            written = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
        return ExportResult(self.name, Path(out), written, _layer_labels(compressed, quantized))


def _quantized_layers(model: nn.Module) -> dict[str, Written]:
    """The quantised linear layers of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, Fp8Linear))}


def _check_model(model: nn.Module, plan: Plan, quantized: Mapping[str, Written]) -> None:
    """Refuse what only the compressed model shows: a pruned structure (the config's shapes no
    longer hold), a quantised tied table, or compressed storage of another kind."""
    if plan.kept_units():
        raise ExportError(
            "--format compressed-tensors cannot hold a plan with structured pruning: the "
            "model's config no longer describes the pruned layers' shapes"
        )
    for name, module in model.named_modules():
        if name in quantized or isinstance(module, TiedHead):
            continue  # a tied head's table is checked where it sits
        if isinstance(module, RowLookup):
            raise ExportError(
                f"--format compressed-tensors cannot hold layer {name!r}: keep embeddings in "
                f"float for compressed-tensors; {HELD}"
            )
        if isinstance(module, KeepsStoredFormat) or type(module).__module__.startswith("methods."):
            raise ExportError(
                f"--format compressed-tensors cannot hold layer {name!r}: "
                f"{type(module).__name__} storage has no compressed-tensors form; {HELD}"
            )


def _skeleton(model: nn.Module) -> nn.Module:
    """The uncompressed architecture of ``model`` on the meta device (no memory), as
    transformers will build it when loading the export."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "save_pretrained"):
        raise ExportError(
            "--format compressed-tensors needs a transformers model (with a config), got "
            f"{type(model).__name__}"
        )
    try:
        with torch.device("meta"):
            return type(model)(copy.deepcopy(config))
    except Exception as exc:
        raise ExportError(
            f"--format compressed-tensors cannot rebuild {type(model).__name__} from its "
            f"config ({exc})"
        ) from None


def _check_targets(skeleton: nn.Module, quantized: Mapping[str, Written]) -> None:
    """Every quantised layer must be an ``nn.Linear`` of the original architecture with the
    same shape (compressed-tensors quantises ``nn.Linear``; GPT-2's ``Conv1D`` is not one)."""
    for name, module in quantized.items():
        try:
            original = skeleton.get_submodule(name)
        except AttributeError:
            raise ExportError(f"layer {name!r} is not in the model's architecture") from None
        if not isinstance(original, nn.Linear):
            raise ExportError(
                f"--format compressed-tensors cannot hold layer {name!r}: it is a "
                f"{type(original).__name__}, and compressed-tensors quantises nn.Linear only; "
                "keep it in float"
            )
        if tuple(original.weight.shape) != (module.rows, module.cols):
            raise ExportError(f"layer {name!r} no longer has its architecture's shape")


def _quantization_config(skeleton: nn.Module, quantized: Mapping[str, Written]) -> Any:
    """compressed-tensors' ``QuantizationConfig``: one group per scheme, float linears ignored."""
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    targets: dict[Scheme, list[str]] = {}
    for name, module in quantized.items():
        targets.setdefault(Scheme.of(module), []).append(name)
    groups = {
        scheme.label: QuantizationScheme(
            targets=names,
            weights=scheme.args(),
            input_activations=scheme.input_args(),
            format=scheme.format,
        )
        for scheme, names in targets.items()
    }
    formats = {scheme.format for scheme in targets} or {CompressionFormat.dense.value}
    ignore = [
        name
        for name, module in skeleton.named_modules()
        if isinstance(module, nn.Linear) and name not in quantized
    ]
    return QuantizationConfig(
        config_groups=groups,
        format=formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision.value,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )


def _write_config(folder: Path, config: Any) -> None:
    """Add the quantisation config to ``config.json`` the way compressed-tensors does."""
    from compressed_tensors.compressors import ModelCompressor

    ModelCompressor(quantization_config=config).update_config(str(folder))


def _checkpoint_state(
    model: nn.Module, quantized: Mapping[str, Written]
) -> dict[str, torch.Tensor]:
    """``model``'s state dict with each quantised layer's stored buffers replaced by the
    tensors its compressed-tensors format loads."""
    stored = {
        f"{name}.{buffer}" for name, module in quantized.items() for buffer in module.stored_buffers
    }
    state = {key: value for key, value in model.state_dict().items() if key not in stored}
    for name, module in quantized.items():
        state.update({f"{name}.{key}": value for key, value in layer_tensors(module, name).items()})
    return state


def layer_tensors(module: Written, name: str = "layer") -> dict[str, torch.Tensor]:
    """The tensors of one quantised linear layer in its compressed-tensors format, made from
    its stored codes, scales and zero points (checked against the names the library's
    compressor for that format reads)."""
    scheme = Scheme.of(module)
    if isinstance(module, Fp8Linear):
        tensors = {
            "weight": module.codes.detach().cpu().contiguous(),
            "weight_scale": module.scales.detach().cpu().float().reshape(-1, 1).contiguous(),
        }
        return _checked(tensors, scheme, name)
    zero = None if module.symmetric else zero_points(module, name)
    scales = module.scales.detach().cpu().to(torch.float16).contiguous()
    if scheme.format == PACKED:
        tensors = {
            "weight_packed": _packed_codes(module, scheme.bits, zero),
            "weight_scale": scales,
            "weight_shape": torch.tensor([module.rows, module.cols], dtype=torch.int64),
        }
    else:  # 8-bit asymmetric: signed codes and zero points, one byte each
        assert zero is not None
        tensors = {
            "weight": (module.unsigned_codes().cpu().to(torch.int16) - 128).to(torch.int8),
            "weight_scale": scales,
            "weight_zero_point": (zero.to(torch.int16) - 128).to(torch.int8),
        }
    return _checked(tensors, scheme, name)


def _checked(
    tensors: dict[str, torch.Tensor], scheme: Scheme, name: str
) -> dict[str, torch.Tensor]:
    """``tensors``, refused unless they are the names the format's compressor reads."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    weights = QuantizationScheme(targets=[name], weights=scheme.args(), format=scheme.format)
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    expected = set(compressor.compression_param_names(weights))
    if set(tensors) != expected:
        raise ExportError(f"layer {name!r}: {sorted(tensors)} written, {sorted(expected)} read")
    return tensors


def _packed_codes(module: QuantizedLinear, bits: int, zero: torch.Tensor | None) -> torch.Tensor:
    """``weight_packed``: the signed codes ``u - 2**(b-1)`` (symmetric) or ``u - z`` (written
    symmetric with ``bits``, one more than stored), packed by the library, a few rows at a
    time (its packer widens every code to int32)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = module.unsigned_codes().cpu()
    step = max(1, _PACK_CHUNK // max(module.cols, 1))
    parts = []
    for start in range(0, module.rows, step):
        chunk = codes[start : start + step].to(torch.int16)
        if zero is None:
            chunk -= 1 << (module.bits - 1)
        else:
            chunk -= (
                zero[start : start + step]
                .to(torch.int16)
                .repeat_interleave(module.group_size, dim=1)
            )
        parts.append(pack_to_int32(chunk.to(torch.int8), bits))
    return torch.cat(parts).contiguous()


def zero_points(module: QuantizedLinear, name: str = "layer") -> torch.Tensor:
    """The whole zero point ``z`` of each group: the one whose ``-z * scale``, rounded to
    float16, is the stored offset (``round(-offset / scale)`` or a neighbour, where float16
    rounding of a tiny offset blurs it). Offsets that are no such value are refused."""
    zero = affine.whole_zero_points(module.scales, module.offsets, module.bits)
    if zero is None:
        raise ExportError(
            f"--format compressed-tensors cannot hold layer {name!r}: its asymmetric offsets "
            f"are not whole zero points (-z * scale, z in 0..{(1 << module.bits) - 1})"
        )
    return zero


def _layer_labels(model: nn.Module, quantized: Mapping[str, Written]) -> dict[str, str]:
    """The scheme each layer got: its stored format, or ``float`` for the linear and embedding
    layers kept as they were."""
    labels = {name: Scheme.of(module).label for name, module in quantized.items()}
    for ref in compressible_layers(model, min_numel=0):
        labels.setdefault(ref.name, "float")
    return labels


register_exporter(CompressedTensorsExporter())
