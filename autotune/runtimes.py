"""Runtimes a plan can be tuned for: what runs the compressed model once it is exported.

``torch`` is autotune's own modules (every option). ``vllm`` serves a compressed-tensors
export with its Marlin weight-only kernels (integer and FP8) and its FP8 W8A8 matmul on GPUs;
``onnxruntime`` runs an ONNX export on CPUs. A tune for a runtime offers each layer only the
options that runtime's export holds and its kernels run (:meth:`Runtime.refusal`), in the
forms they run (:meth:`Runtime.forms`), prices latency with the kernels that runtime runs
(:data:`profilers.kernel_support.RUNTIME_KERNELS`, through the target spec's ``runtime``) and
bytes as its export stores them (:meth:`Runtime.byte_prices`), so the plan it returns exports
without a refused layer and within its budget.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from autotune.errors import AutotuneError
from autotune.layers import LayerRef
from methods.base import LayerShape, Option
from methods.fp8 import Fp8Option
from methods.keep import KeepOption
from methods.smoothquant import W8A8Option
from profilers.hardware import HardwareSpec
from profilers.kernel_support import FP8_KERNELS

ORT_ACTIVATION_BITS = 8  # DynamicQuantizeLinear's range


@dataclass(frozen=True)
class BytePrices:
    """Stored bytes as a runtime's export holds them: per layer, one per offered option (in
    order); ``fixed``: the rest of the model; ``original``: the export of the float model."""

    per_layer: dict[str, list[int]]
    fixed: int
    original: int


class RuntimeChoiceError(AutotuneError, ValueError):
    """A runtime that is unknown or cannot run on the chosen target."""


# the layers vLLM loads as one fused matrix (its models' ``packed_modules_mapping``, by the
# fused matrix's name): every member of a group needs the same scheme, or vLLM refuses the
# checkpoint
VLLM_FUSED_NAMES = {
    ("q_proj", "k_proj", "v_proj"): "qkv_proj",
    ("query", "key", "value"): "qkv_proj",
    ("gate_proj", "up_proj"): "gate_up_proj",
}
VLLM_FUSED = tuple(VLLM_FUSED_NAMES)


def fused_groups(
    names: Sequence[str], families: Sequence[tuple[str, ...]]
) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """The groups of ``names`` that are siblings of one family (the last part of a name),
    each with its family (the group is whole where it has every member)."""
    found: dict[tuple[str, int], list[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        for k, family in enumerate(families):
            if leaf in family:
                found.setdefault((parent, k), []).append(name)
    return [(tuple(members), families[k]) for (_, k), members in found.items()]


class Runtime(ABC):
    """One runtime: its name (``--runtime``), the kinds of device it runs on, the export
    format it loads, and which options it holds."""

    name: ClassVar[str]
    device_kinds: ClassVar[tuple[str, ...]]
    export_format: ClassVar[str | None] = None
    description: ClassVar[str] = ""
    timed_locally: ClassVar[bool] = False  # ``local`` times options in this runtime here
    # a named target may hold figures of this runtime's own (fitted by :meth:`fit_prices`)
    fits_prices: ClassVar[bool] = False
    # families of sibling layers (by the last part of their names) it runs as one matrix
    fused: ClassVar[tuple[tuple[str, ...], ...]] = ()
    # a memory budget's plan generates at most this much slower than the largest of
    # :meth:`reference_plans` that fits (autotune.decode_guard); ``None``: speed left free
    decode_slack: ClassVar[float | None] = None
    # the files a budget's multiples can be taken of (``--relative-to``, by suffix), and the
    # phases this runtime times such a file in; ``None``: none (autotune.reference_file)
    reference_suffix: ClassVar[str | None] = None
    reference_phases: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def refusal(self, layer: str, shape: LayerShape, option: Option) -> str | None:
        """Why this runtime cannot run ``option`` on ``layer``; ``None`` when it can."""

    def check_target(self, spec: HardwareSpec, target: str) -> None:
        """Refuse a target this runtime does not run on, or ``local`` where it cannot be timed
        in this runtime here."""
        if target == "local" and not self.timed_locally:
            raise RuntimeChoiceError(
                f"--runtime {self.name} with --target local would time autotune's torch "
                f"modules, not {self.name}: use a named target (e.g. --target "
                f"{'cpu' if 'cpu' in self.device_kinds else 'a100'}), whose roofline prices "
                f"{self.name}'s kernels"
            )
        if spec.kind not in self.device_kinds:
            raise RuntimeChoiceError(
                f"--runtime {self.name} runs on {' or '.join(self.device_kinds)} targets; "
                f"{spec.name} is a {spec.kind}"
            )

    def for_target(self, spec: HardwareSpec) -> Runtime:
        """This runtime as it runs on ``spec`` (itself, unless its kernels differ there)."""
        return self

    def spec_for(self, spec: HardwareSpec) -> HardwareSpec:
        """``spec`` priced with this runtime's kernels, and its figures for this runtime where
        the target has them (:meth:`HardwareSpec.for_runtime`)."""
        return spec.for_runtime(self.name)

    def fit_prices(
        self,
        model: nn.Module,
        spec: HardwareSpec,
        shapes: Mapping[str, Mapping[str, Any]],
        tokenizer: Any = None,
    ) -> Any:
        """A :class:`profilers.roofline_fit.Fit` of ``spec`` (a named target) with figures of
        this runtime's own, fitted to the model timed in it at ``shapes``; only where
        :attr:`fits_prices` (else its plans are priced with the device's own figures)."""
        raise NotImplementedError(f"{self.name} has no figures of its own to fit")

    def check_reference(self, path: Path) -> None:  # noqa: B027 (a suffix is enough by default)
        """Refuse in one line a reference file (``--relative-to``) this runtime cannot load."""

    def reference_plans(self, options: Mapping[str, Sequence[Option]]) -> dict[str, dict[str, str]]:
        """Plans a memory budget's generation speed is held to (name -> layer -> option
        label), from the layers' ``options``; none by default."""
        return {}

    def forms(self, option: Option) -> list[Option]:
        """The forms of ``option`` this runtime's kernels run (the option itself by default;
        e.g. ONNX Runtime's fused dynamic int8 matmul quantises activations to 8 bits, with
        weight scales per channel or per tensor)."""
        return [option]

    def restrict(
        self, layers: Sequence[LayerRef], options: Mapping[str, list[Option]]
    ) -> dict[str, list[Option]]:
        """Each layer's options in the forms this runtime runs (:meth:`forms`, once each),
        without those it refuses (keep always stays); a fused group with a member that is
        not tuned keeps its other members in float too (the runtime needs one format)."""
        shapes = {ref.name: ref.shape for ref in layers}
        restricted: dict[str, list[Option]] = {}
        for name, offered in options.items():
            kept: dict[str, Option] = {}
            for option in (form for o in offered for form in self.forms(o)):
                refused = not isinstance(option, KeepOption) and self.refusal(
                    name, shapes[name], option
                )
                if not refused:
                    kept.setdefault(option.label, option)
            restricted[name] = list(kept.values())
        for group, family in fused_groups(list(restricted), self.fused):
            if len(group) == len(family):
                continue
            for name in group:  # a member is not tuned (kept in float): the others stay too
                restricted[name] = [o for o in restricted[name] if isinstance(o, KeepOption)]
        return restricted

    def tied_layers(self, names: Sequence[str]) -> list[tuple[str, ...]]:
        """Groups of ``names`` this runtime runs as one fused matrix (siblings of one of its
        :attr:`fused` families, all tuned), which must take one option."""
        return [group for group, _ in self.fused_matrices(names)]

    def fused_matrices(self, names: Sequence[str]) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        """The groups of :meth:`tied_layers`, each with its family."""
        groups = fused_groups(names, self.fused)
        return [(group, family) for group, family in groups if len(group) == len(family)]

    def tie_refusal(self, options: Mapping[str, Option]) -> str | None:
        """Why a plan (``options`` by layer; a layer left out is kept in float) cannot run
        here because the layers of a fused group differ, else ``None``."""
        keep = KeepOption()
        for group, family in fused_groups(list(options), self.fused):
            parent = group[0].rpartition(".")[0]
            names = [f"{parent}.{leaf}" if parent else leaf for leaf in family]
            labels = {name: options.get(name, keep).label for name in names}
            if len(set(labels.values())) > 1:
                given = ", ".join(f"{name} {label}" for name, label in labels.items())
                return (
                    f"{self.name} runs {', '.join(names)} as one fused matrix, so they need "
                    f"one option; the plan gives {given}"
                )
        return None

    def describe_export(
        self, compressed: nn.Module, options: Mapping[str, Option]
    ) -> dict[str, Any]:
        """The plan's ``export`` section: how this runtime's export holds ``compressed``
        (compressed with ``options``, by layer); empty where there is nothing to add."""
        return {}

    def check_model(self, model: nn.Module) -> None:  # noqa: B027 (most runtimes take any)
        """Refuse, before any work, a model this runtime's export cannot hold."""

    def methods(self, spec: HardwareSpec) -> tuple[str, ...] | None:
        """The methods a tune for this runtime searches by default (``None``: those the
        target's kernels favour, :func:`autotune.costs.default_methods`)."""
        return None

    def byte_prices(
        self,
        model: nn.Module,
        layers: Sequence[LayerRef],
        options: Mapping[str, list[Option]],
        tokenizer: Any = None,
    ) -> BytePrices | None:
        """The bytes this runtime's export stores for each (layer, option) and for the rest
        of the model (with ``tokenizer`` where the export holds it), where they differ from
        autotune's own storage; ``None``: they do not."""
        return None

    def stored_bytes(
        self, compressed: nn.Module, plan: Any, tokenizer: Any = None
    ) -> dict[str, int] | None:
        """``bytes`` (tensors) and ``file_bytes`` of the export of ``compressed`` (built,
        not written), where :meth:`byte_prices` prices them; ``None`` otherwise."""
        return None

    def measure_export(
        self,
        compressed: nn.Module,
        plan: Any,
        tokenizer: Any,
        batches: list,
        reference: list,
        metric: str,
        original: nn.Module | None = None,
    ) -> dict[str, Any] | None:
        """Held-out error (and perplexity) of ``compressed``'s export computed by this
        runtime itself, and its speed there beside ``original``'s where given; ``None``
        where it is not (the tune's own figures are autotune's)."""
        return None


class TorchRuntime(Runtime):
    name = "torch"
    device_kinds = ("cpu", "gpu")
    timed_locally = True
    description = "autotune's own modules (apply, load_compressed): every option"

    def refusal(self, layer: str, shape: LayerShape, option: Option) -> str | None:
        return None


class _ExportedRuntime(Runtime):
    """A runtime that loads an export: it holds what the exporter holds, and more rules."""

    def refusal(self, layer: str, shape: LayerShape, option: Option) -> str | None:
        from autotune.export import get_exporter

        assert self.export_format is not None
        why = get_exporter(self.export_format).refusal(layer, shape, option)
        return why if why is not None else self.kernel_refusal(shape, option)

    def kernel_refusal(self, shape: LayerShape, option: Option) -> str | None:
        return None


# Marlin, vLLM's weight-only kernel for compressed-tensors W4A16/W8A16 checkpoints
MARLIN_GROUPS = (None, 32, 64, 128)
MARLIN_TILE_ROWS, MARLIN_TILE_COLS = 64, 128


# FP8 GEMMs: vLLM's CUTLASS kernels want both dimensions a multiple of 16
FP8_DYNAMIC_MULTIPLE = 16
VLLM_FP8_KERNELS = frozenset(FP8_KERNELS)


def vllm_kernel(option: Option) -> str:
    """The kernel vLLM multiplies a layer of ``option`` with (options it runs only)."""
    if isinstance(option, Fp8Option):
        if option.activations:
            return "CUTLASS FP8 W8A8, per-channel weights, dynamic per-token activations"
        return "Marlin FP8 W8A16, per channel"
    bits = getattr(option, "bits", None)
    if isinstance(option, KeepOption) or bits is None:
        return "unquantized (16-bit float)"
    group = getattr(option, "group_size", None)
    return f"Marlin W{bits}A16, " + (f"groups of {group}" if group else "per channel")


class VLLMRuntime(_ExportedRuntime):
    name = "vllm"
    device_kinds = ("gpu",)
    export_format = "compressed-tensors"
    description = (
        "vLLM serving a compressed-tensors export with Marlin kernels: symmetric int4 and "
        "int8, per channel or in groups of 32, 64 or 128, FP8 per channel (Ampere and "
        "later); FP8 with dynamic FP8 activations on Ada and Hopper; the layers it fuses "
        "(query, key and value; gate and up) take one option"
    )

    fused = VLLM_FUSED

    def __init__(self, fp8_kernels: frozenset[str] = VLLM_FP8_KERNELS) -> None:
        self.fp8_kernels = fp8_kernels  # the FP8 kernels the target's GPU has

    def for_target(self, spec: HardwareSpec) -> Runtime:
        """vLLM's FP8 kernels run where the GPU has them (the target lists them): Marlin's
        FP8 weight-only kernel from Ampere on, FP8 activations on Ada and Hopper only."""
        kernels = frozenset(k for k in VLLM_FP8_KERNELS if k in spec.kernels)
        return self if kernels == self.fp8_kernels else VLLMRuntime(kernels)

    def describe_export(self, compressed, options):
        """Each matrix vLLM loads (a fused one under its own name, with the layers it is
        made of), its option and the kernel that multiplies by it."""
        matrices: dict[str, dict[str, Any]] = {}
        fused = {name: pair for pair in self.fused_matrices(list(options)) for name in pair[0]}
        for name, option in options.items():
            group, family = fused.get(name, ((name,), None))
            if name != group[0]:
                continue
            entry = {"option": option.label, "kernel": vllm_kernel(option)}
            if family is None:
                matrices[name] = entry
            else:
                matrix = f"{name.rpartition('.')[0]}.{VLLM_FUSED_NAMES[family]}"
                matrices[matrix] = {"layers": list(group), **entry}
        return {"format": self.export_format, "matrices": matrices}

    def kernel_refusal(self, shape: LayerShape, option: Option) -> str | None:
        if isinstance(option, Fp8Option):
            return self._fp8_refusal(shape, option)
        bits = getattr(option, "bits", None)
        group = getattr(option, "group_size", None)
        symmetric = getattr(option, "symmetric", None)
        if bits is None:
            return None
        if bits not in (4, 8) or not symmetric:
            return (
                "vLLM's Marlin kernels take symmetric int4 and int8 (an asymmetric layer is "
                "exported with one more bit and no zero point, which they do not run)"
            )
        if group not in MARLIN_GROUPS:
            return "vLLM's Marlin kernels take per-channel scales or groups of 32, 64 or 128"
        return self._tile_refusal(shape)

    def _fp8_refusal(self, shape: LayerShape, option: Fp8Option) -> str | None:
        if option.activations:
            if "fp8_dynamic" not in self.fp8_kernels:
                return (
                    "vLLM multiplies FP8 activations only on GPUs with FP8 tensor cores (Ada, "
                    "Hopper: targets listing fp8_dynamic); allowed here: fp8-ch"
                )
            if shape.rows % FP8_DYNAMIC_MULTIPLE or shape.cols % FP8_DYNAMIC_MULTIPLE:
                return (
                    f"vLLM's FP8 matmul needs dimensions that are multiples of "
                    f"{FP8_DYNAMIC_MULTIPLE}; the layer is {shape.rows} x {shape.cols}"
                )
            return None
        if "fp8_weight_only" not in self.fp8_kernels:
            return "vLLM's FP8 weight-only kernel (Marlin) needs an Ampere or later GPU"
        return self._tile_refusal(shape)

    @staticmethod
    def _tile_refusal(shape: LayerShape) -> str | None:
        if shape.rows % MARLIN_TILE_ROWS or shape.cols % MARLIN_TILE_COLS:
            return (
                f"vLLM's Marlin kernels need {MARLIN_TILE_ROWS}-row and {MARLIN_TILE_COLS}-"
                f"column tiles; the layer is {shape.rows} x {shape.cols}"
            )
        return None


class OnnxRuntimeRuntime(_ExportedRuntime):
    name = "onnxruntime"
    device_kinds = ("cpu",)
    timed_locally = True  # autotune.export.ort_latency times each option in ORT sessions
    export_format = "onnx"
    description = (
        "ONNX Runtime on CPUs running an ONNX export (MatMulNBits for 2- to 8-bit blocks, "
        "DynamicQuantizeMatMul for w8a8); budgets count the export's own tensor bytes"
    )

    reference_suffix = ".onnx"
    reference_phases = ("latency",)

    def __init__(self, pair_safe: bool = False) -> None:
        self.pair_safe = pair_safe  # w8a8 codes: pair-safe where int8 pair sums saturate

    def check_reference(self, path: Path) -> None:
        import onnx

        try:
            onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # onnx raises several kinds on a file that is not a model
            raise RuntimeChoiceError(
                f"reference file {path.name!r} is not an ONNX model ONNX Runtime loads: {exc}"
            ) from None

    def for_target(self, spec: HardwareSpec) -> Runtime:
        """On CPUs whose 8-bit dot products saturate pair sums (x86 without VNNI), ONNX
        Runtime's fused int8 matmul is exact only on pair-safe codes."""
        safe = spec.int8_pairs_saturate
        return self if safe == self.pair_safe else OnnxRuntimeRuntime(safe)

    def forms(self, option: Option) -> list[Option]:
        """W8A8 with 8-bit activations (pair-safe codes where :attr:`pair_safe`); weight
        scales per channel and per tensor, smoothed as asked and not at all (unsmoothed
        layers reading one input share its quantisation in ONNX Runtime, and skip the
        division)."""
        if not isinstance(option, W8A8Option):
            return [option]
        fused = dataclasses.replace(
            option,
            activation_bits=ORT_ACTIVATION_BITS,
            pair_safe=option.pair_safe or self.pair_safe,
        )
        alphas = dict.fromkeys([fused.alpha, 0.0])
        scales = [fused.weight_scales] if fused.per_tensor else ["channel", "tensor"]
        return [
            dataclasses.replace(fused, alpha=alpha, weight_scales=scale)
            for alpha in alphas
            for scale in scales
        ]

    def kernel_refusal(self, shape: LayerShape, option: Option) -> str | None:
        if isinstance(option, W8A8Option) and option.activation_bits != ORT_ACTIVATION_BITS:
            return (
                f"{option.label}: ONNX Runtime's fused dynamic int8 matmul quantises "
                f"activations to {ORT_ACTIVATION_BITS} bits (activation_bits "
                f"{ORT_ACTIVATION_BITS}); {option.activation_bits}-bit ones run as unfused "
                "standard ops"
            )
        if isinstance(option, W8A8Option) and self.pair_safe and not option.pair_safe:
            return (
                f"{option.label}: on CPUs without VNNI ONNX Runtime's int8 matmul adds pairs "
                "of 8-bit products in 16 bits, which full-range codes saturate; allowed "
                "there: pair_safe true"
            )
        return None

    def byte_prices(self, model, layers, options, tokenizer=None):
        from autotune.export.onnx_bytes import onnx_byte_prices

        return onnx_byte_prices(model, layers, options)

    def stored_bytes(self, compressed, plan, tokenizer=None):
        from autotune.export.onnx_bytes import onnx_stored_bytes

        return onnx_stored_bytes(compressed, plan)


class LlamaCppRuntime(_ExportedRuntime):
    name = "llama.cpp"
    device_kinds = ("cpu", "gpu")
    export_format = "gguf"
    timed_locally = True  # autotune.export.llama_latency times each type in llama.cpp
    fits_prices = True  # autotune.export.llama_fit: one graph node per operation
    decode_slack = 0.05
    # the base types of llama.cpp's mixes (Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K) and F16
    REFERENCE_TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")
    reference_suffix = ".gguf"
    reference_phases = ("latency", "decode")
    description = (
        "llama.cpp running a GGUF export: each tensor one of llama.cpp's types (Q8_0, Q6_K, "
        "Q4_K, IQ4_XS, ...); budgets count the GGUF file's bytes"
    )

    def check_model(self, model: nn.Module) -> None:
        from autotune.export.gguf_families import family_of

        family_of(model)

    def check_reference(self, path: Path) -> None:
        import gguf

        try:
            gguf.GGUFReader(path)
        except Exception as exc:  # the reader raises several kinds on a file that is not one
            raise RuntimeChoiceError(
                f"reference file {path.name!r} is not a GGUF file llama.cpp loads: {exc}"
            ) from None

    def describe_export(self, compressed, options):
        from autotune.export.gguf import describe

        return describe(compressed, list(options.values()))

    def methods(self, spec: HardwareSpec) -> tuple[str, ...]:
        return ("gguf",)

    def reference_plans(self, options):
        """The files ``llama-quantize --pure TYPE`` writes, for each of the mixes' base types:
        every tensor in that type, or in llama.cpp's fallback where its rows cannot take it."""
        from methods.gguf import GGUFOption
        from methods.gguf_types import TYPE_FALLBACKS

        plans = {}
        for base in self.REFERENCE_TYPES:
            plan = {}
            for layer, offered in options.items():
                labels = {o.label for o in offered}
                kind: str | None = base
                while kind is not None and GGUFOption(kind).label not in labels:
                    kind = TYPE_FALLBACKS[kind]
                if kind is None:
                    break
                plan[layer] = GGUFOption(kind).label
            else:
                plans[f"llama-quantize --pure {base}"] = plan
        return plans

    def fit_prices(self, model, spec, shapes, tokenizer=None):
        from autotune.export.llama_cpp import available
        from autotune.export.llama_fit import fit_llama_cpp
        from methods.ggml_quantizer import INSTALL_HINT

        if not available():
            raise RuntimeChoiceError(f"fitting llama.cpp's figures needs llama.cpp: {INSTALL_HINT}")
        return fit_llama_cpp(model, spec, shapes, tokenizer)

    def byte_prices(self, model, layers, options, tokenizer=None):
        from autotune.export.gguf import gguf_byte_prices

        return gguf_byte_prices(model, layers, options, tokenizer)

    def stored_bytes(self, compressed, plan, tokenizer=None):
        from autotune.export.gguf import gguf_stored_bytes

        return gguf_stored_bytes(compressed, plan, tokenizer)

    def measure_export(
        self, compressed, plan, tokenizer, batches, reference, metric, original=None
    ):
        """The GGUF file written to a temporary folder and run in llama.cpp: held-out error
        and perplexity, then prompt and generation speed beside the float model's file."""
        import tempfile
        from pathlib import Path

        from autotune.export import get_exporter
        from autotune.export.llama_cpp import (
            available,
            quality_in_llama_cpp,
            speeds_in_llama_cpp,
        )
        from methods.ggml_quantizer import INSTALL_HINT

        if not available():
            return {"runtime": self.name, "skipped": f"llama.cpp is not installed: {INSTALL_HINT}"}
        exporter = get_exporter("gguf")
        with tempfile.TemporaryDirectory() as folder:
            paths = {"model": Path(folder) / "model.gguf"}
            exporter.write(compressed, plan, paths["model"], tokenizer)
            figures: dict[str, Any] = {"runtime": self.name, "metric": metric}
            figures.update(quality_in_llama_cpp(paths["model"], batches, reference, metric))
            if original is not None:
                paths["baseline"] = Path(folder) / "float.gguf"
                exporter.write(original, None, paths["baseline"], tokenizer)
            prompt = [int(t) for t in batches[0]["input_ids"][0].tolist()]
            for name, speed in speeds_in_llama_cpp(paths, prompt).items():
                prefix = "" if name == "model" else "baseline_"
                figures[f"{prefix}prompt_tokens_per_s"] = round(speed.prompt_tokens_per_s, 1)
                figures[f"{prefix}generate_tokens_per_s"] = round(speed.generate_tokens_per_s, 1)
        return figures


RUNTIMES: dict[str, Runtime] = {}


def register_runtime(runtime: Runtime) -> Runtime:
    RUNTIMES[runtime.name] = runtime
    return runtime


for _runtime in (TorchRuntime(), VLLMRuntime(), OnnxRuntimeRuntime(), LlamaCppRuntime()):
    register_runtime(_runtime)


def get_runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise RuntimeChoiceError(f"unknown runtime {name!r}; allowed: {', '.join(RUNTIMES)}")
    return RUNTIMES[name]
