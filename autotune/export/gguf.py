"""Export to GGUF, the file llama.cpp loads: metadata, tokenizer and every tensor.

Layers compressed with the ``gguf`` method are written as the blocks autotune stores (never
re-quantised); kept layers, norms and biases as F32. Tensor names come from ``gguf``'s name
map for the architecture; Llama-style families have their query and key rows reordered for
llama.cpp's rotary layout (rows are independent in every GGML type, so reordering the stored
blocks row by row is what converting the float rows first would give).

The file size is known before the file exists: a header, the key-value and tensor-info
sections (sizes that depend on names and shapes, not on types), padded to 32 bytes, then each
tensor padded to 32 bytes. :func:`gguf_byte_prices` prices every (layer, option) that way and
:func:`gguf_stored_bytes` recounts a built model. The plan is not embedded (its length would
vary with the plan); its fingerprint and the model's are, as fixed-length keys.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from autotune.export.base import Exporter, ExportError, ExportResult, register_exporter
from autotune.export.gguf_families import Family, family_of, gguf_arch, is_position_table
from autotune.export.gguf_vocab import write_vocabulary
from autotune.io import write_atomic
from autotune.layers import LayerRef
from autotune.plan import Plan
from methods.base import LayerShape, Option, is_conv1d, is_weight_layer
from methods.gguf import GGUFOption, GGUFStorage
from methods.keep import KeepOption
from methods.registry import method_of
from methods.tied import TiedHead

ALIGNMENT = 32  # GGUF's default data alignment
PLAN_KEY = "autotune.plan_fingerprint"
MODEL_KEY = "autotune.model_fingerprint"
EMPTY_FINGERPRINT = "0" * 64
HELD = "allowed: method gguf (llama.cpp's tensor types) or keep"


def pad(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


@dataclass
class Tensor:
    """One tensor of the file: its GGUF name, data (``None`` when only priced), GGML type,
    its shape in bytes along the last axis, and its bytes."""

    name: str
    data: np.ndarray | None
    ggml: Any
    byte_shape: tuple[int, ...]
    nbytes: int
    source: str = ""  # the model's name for it (``weight`` for stored blocks)


def tensors(model: nn.Module, family: Family, priced_only: bool = False) -> list[Tensor]:
    """Every tensor of ``model`` (compressed or not) as the file holds it, in state order."""
    import gguf

    config = model.config
    arch = gguf_arch(family)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    state = model.state_dict(keep_vars=True)
    out: list[Tensor] = []
    for module_name, module in model.named_modules():
        if isinstance(module, TiedHead):
            continue  # no output tensor: llama.cpp reads the token embedding instead
        prefix = f"{module_name}." if module_name else ""
        found = [
            (local, value)
            for local, value in module.named_buffers(recurse=False, prefix="")
            if value is not None and prefix + local in state  # not the rotary tables
        ]
        found += list(module.named_parameters(recurse=False, prefix=""))
        for local, value in found:
            out.append(_tensor(names, prefix, local, value, module, family, config, priced_only))
    return out


def _tensor(names, prefix, local, value, module, family, config, priced_only) -> Tensor:
    """One tensor as the file holds it; ``priced_only``: its shape and bytes, no data."""
    import gguf

    blocks = isinstance(module, GGUFStorage) and local == "blocks"
    key = prefix + ("weight" if blocks else local)
    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ExportError(f"--format gguf has no llama.cpp name for tensor {key!r}")
    ggml = module.kind.ggml if blocks else gguf.GGMLQuantizationType.F32
    size = 1 if blocks else 4  # bytes per stored element: raw blocks, or float32
    transposed = local == "weight" and is_conv1d(module)  # stored [in, out]: write [out, in]
    shape = tuple(reversed(value.shape)) if transposed else tuple(value.shape)
    byte_shape = (*shape[:-1], shape[-1] * size)
    if priced_only:  # rows are reordered, not resized: nothing to convert
        return Tensor(name, None, ggml, byte_shape, value.numel() * size, key)
    data = value.detach().cpu()
    array = data.numpy() if blocks else data.float().numpy()
    if transposed:
        array = array.T
    array = family.arrange(name, array, config)
    return Tensor(name, np.ascontiguousarray(array), ggml, byte_shape, int(array.nbytes), key)


def _metadata(
    writer: Any, model: nn.Module, family: Family, tokenizer: Any, fingerprints: tuple[str, str]
):
    import gguf

    config = model.config
    # the class, not the folder it was read from: the file's size must not depend on a path
    writer.add_name(str((getattr(config, "architectures", None) or [config.model_type])[0]))
    family.hyperparameters(writer, config)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.GUESSED)
    write_vocabulary(writer, tokenizer, config.vocab_size)
    writer.add_string(PLAN_KEY, fingerprints[0])
    writer.add_string(MODEL_KEY, fingerprints[1])


def _writer(path: str, model: nn.Module, family: Family, tokenizer: Any, fingerprints, parts):
    import gguf

    writer = gguf.GGUFWriter(path, family.arch)
    _metadata(writer, model, family, tokenizer, fingerprints)
    for t in parts:
        if t.data is None:
            writer.add_tensor_info(t.name, t.byte_shape, np.dtype(np.uint8), t.nbytes, t.ggml)
        elif t.data.dtype == np.uint8:
            writer.add_tensor(t.name, t.data, raw_dtype=t.ggml)
        else:
            writer.add_tensor(t.name, t.data)
    return writer


def prefix_bytes(
    model: nn.Module, tokenizer: Any, parts: Sequence[Tensor], family: Family | None = None
) -> int:
    """Bytes before the first tensor: header, key-values and tensor infos, padded."""
    family = family or family_of(model)
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "head.gguf")
        # types do not change the tensor infos' sizes
        shells = [Tensor(t.name, None, t.ggml, t.byte_shape, t.nbytes) for t in parts]
        writer = _writer(path, model, family, tokenizer, (EMPTY_FINGERPRINT,) * 2, shells)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        return pad(Path(path).stat().st_size)


def file_bytes(prefix: int, parts: Sequence[Tensor]) -> int:
    return prefix + sum(pad(t.nbytes) for t in parts)


def plan_fingerprints(plan: Plan | None) -> tuple[str, str]:
    """SHA-256 of what decides the file's tensors (the plan's layers and structure) and of
    the model fingerprint the plan was made for: fixed-length keys, so the file's size does
    not depend on them."""
    if plan is None:
        return EMPTY_FINGERPRINT, EMPTY_FINGERPRINT
    decides = json.dumps({"layers": plan.layers, "structure": plan.structure}, sort_keys=True)
    model = str(plan.model.get("fingerprint") or "")
    return (
        hashlib.sha256(decides.encode()).hexdigest(),
        hashlib.sha256(model.encode()).hexdigest(),
    )


def layer_weights(model: nn.Module) -> set[str]:
    """The state names of the weights of ``model``'s layers, compressed or not."""
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, GGUFStorage) or is_weight_layer(module)
    }


class GGUFExporter(Exporter):
    name = "gguf"
    requires = ("gguf",)
    install = "gguf"
    writes = "file"
    description = "a GGUF file llama.cpp loads (llama, mistral, qwen2, qwen3 and gpt2 families)"

    def refusal(self, layer: str, shape: LayerShape, option: Option) -> str | None:
        if isinstance(option, KeepOption):
            return None
        if not isinstance(option, GGUFOption):
            return f"{option.label} has no llama.cpp tensor type; {HELD}"
        if shape.kind == "embedding" and is_position_table(layer):
            return (
                f"{option.label}: llama.cpp keeps position embeddings in float (llama-quantize "
                "never quantises them); allowed: keep"
            )
        return None

    def write(
        self, compressed: nn.Module, plan: Plan, out: Path, tokenizer: Any = None
    ) -> ExportResult:
        family = family_of(compressed)
        parts = tensors(compressed, family)
        fingerprints = plan_fingerprints(plan)

        def write(tmp: str) -> None:
            writer = _writer(tmp, compressed, family, tokenizer, fingerprints, parts)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()

        out = Path(out)
        write_atomic(out, write)
        layers = layer_weights(compressed)
        labels = {
            t.source.removesuffix(".weight"): "float" if t.ggml.name == "F32" else t.ggml.name
            for t in parts
            if t.source in layers
        }
        return ExportResult(self.name, out, out.stat().st_size, labels)


def gguf_byte_prices(
    model: nn.Module,
    layers: Sequence[LayerRef],
    options: Mapping[str, list[Option]],
    tokenizer: Any = None,
):
    """Each (layer, option)'s bytes in the GGUF file (weight and bias tensors, each padded),
    the rest of the file, and the float model's file."""
    from autotune.runtimes import BytePrices

    family = family_of(model)
    parts = tensors(model, family, priced_only=True)
    prefix = prefix_bytes(model, tokenizer, parts, family)
    owned = {f"{ref.name}.{suffix}" for ref in layers for suffix in ("weight", "bias")}
    fixed = prefix + sum(pad(t.nbytes) for t in parts if t.source not in owned)
    per_layer: dict[str, list[int]] = {}
    for ref in layers:
        bias = pad(ref.shape.bias_bytes) if ref.shape.has_bias else 0
        per_layer[ref.name] = [
            pad(method_of(o).cost(ref.shape, o).weight_bytes) + bias for o in options[ref.name]
        ]
    return BytePrices(per_layer, fixed, file_bytes(prefix, parts))


def gguf_stored_bytes(compressed: nn.Module, plan: Any, tokenizer: Any = None) -> dict[str, int]:
    """The GGUF file's bytes for ``compressed``: the file written to a temporary folder and
    measured on disk (not the layout arithmetic that priced it)."""
    with tempfile.TemporaryDirectory(prefix="autotune-gguf-") as folder:
        path = Path(folder) / "model.gguf"
        size = GGUFExporter().write(compressed, plan, path, tokenizer).bytes
    return {"bytes": size, "file_bytes": size}


register_exporter(GGUFExporter())


def describe(compressed: nn.Module, options: Sequence[Option]) -> dict[str, Any]:
    """The plan's ``export`` section for llama.cpp: each layer tensor's type in the file and
    the ``llama-quantize`` line that writes the same file's tensors from an F32 GGUF of the
    model (with ``--imatrix``, the file :func:`autotune.export.imatrix.write_imatrix` writes,
    where the plan uses an importance matrix)."""
    import re

    family = family_of(compressed)
    layers = layer_weights(compressed)
    types = {t.name: t.ggml.name for t in tensors(compressed, family, True) if t.source in layers}
    command = ["llama-quantize"]
    for name, kind in types.items():
        if name == "token_embd.weight":
            command += ["--token-embedding-type", kind.lower()]
        elif name == "output.weight":
            command += ["--output-tensor-type", kind.lower()]
        else:
            command += ["--tensor-type", f"'{re.escape(name)}={kind.lower()}'"]
    if any(getattr(o, "imatrix", False) for o in options):
        command += ["--imatrix", "imatrix.gguf"]
    # the base type only has to be a quantised one (llama-quantize applies --tensor-type only
    # then); every layer tensor is named, so it decides nothing
    command += ["model-f32.gguf", "model.gguf", "Q8_0"]
    return {"format": "gguf", "tensor_types": types, "llama_quantize": " ".join(command)}
