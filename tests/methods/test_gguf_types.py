"""llama.cpp's tensor types as a method: exact block bytes, llama.cpp's own codes, decoding as
llama.cpp decodes, the importance matrix, and refusals that say what is allowed.

The conformance suite covers the 32-wide types on its layers; the K- and i-quants need rows
of a multiple of 256 and are covered here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from methods import ggml_quantizer
from methods.base import LayerShape
from methods.errors import OptionError
from methods.ggml_activations import round_activations
from methods.gguf import IMATRIX_GRID, PLAIN_GRID, GGUFOption, GGUFTypes
from methods.gguf_types import NUMPY_ENCODERS, allowed_types, tensor_type
from methods.observers import ChannelObserver

METHOD = GGUFTypes()
needs_llama = pytest.mark.skipif(
    not ggml_quantizer.available(), reason="llama.cpp (llama-cpp-python) is not installed"
)


def layer(cols: int = 512, rows: int = 64, seed: int = 0, bias: bool = False) -> nn.Linear:
    torch.manual_seed(seed)
    module = nn.Linear(cols, rows, bias=bias)
    with torch.no_grad():
        module.weight.normal_(0.0, 0.02)
    return module


def observed(module: nn.Linear, inputs: torch.Tensor) -> ChannelObserver:
    observer = ChannelObserver(module.in_features)
    observer.observe(module, (inputs,), None)
    return observer


def test_row_bytes_are_ggmls_for_every_type() -> None:
    for name in allowed_types():
        kind = tensor_type(name)
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
        assert kind.row_bytes(block * 3) == 3 * block_bytes
        if ggml_quantizer.available():
            assert kind.row_bytes(768) == ggml_quantizer.row_size(kind.ggml.value, 768)


@needs_llama
@pytest.mark.parametrize("name", sorted(NUMPY_ENCODERS))
def test_llama_cpps_codes_equal_gguf_numpy_encoders(name: str) -> None:
    """Where both exist, llama.cpp's quantizer and gguf's NumPy port write the same bytes."""
    weight = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    ours = ggml_quantizer.quantize(weight, GGMLQuantizationType[name].value)
    theirs = quants.quantize(weight, GGMLQuantizationType[name])
    assert np.array_equal(ours, theirs.view(np.uint8).reshape(ours.shape))


@needs_llama
@pytest.mark.parametrize("name", sorted(set(allowed_types()) - {"F32"}))
def test_llama_cpps_decoders_give_gguf_numpy_decoders_floats(name: str) -> None:
    """Every type decodes to the same float32 values in llama.cpp's ``to_float`` as in
    gguf's NumPy port (which decodes where llama.cpp is not installed, and F32, which
    llama.cpp has no decoder for)."""
    assert ggml_quantizer.dequantize(np.zeros((1, 4), np.uint8), 0, 1) is None  # F32
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((24, 512)).astype(np.float32)
    kind = GGMLQuantizationType[name]
    importance = rng.uniform(0.1, 2.0, 512).astype(np.float32)
    imatrix = importance if ggml_quantizer.requires_imatrix(kind.value) else None
    blocks = ggml_quantizer.quantize(weight, kind.value, imatrix)
    ours = ggml_quantizer.dequantize(blocks, kind.value, 512)
    theirs = quants.dequantize(blocks, kind).astype(np.float32)
    assert ours is not None and ours.dtype == np.float32 and ours.shape == (24, 512)
    assert np.array_equal(ours, theirs)


@needs_llama
@pytest.mark.parametrize("name", ["Q4_0", "Q3_K", "IQ2_XS", "IQ4_XS"])
@pytest.mark.parametrize("threads", [2, 3, 7])
def test_rows_split_among_threads_give_the_same_bytes(
    name: str, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows quantised in several calls at once (uneven spans) are the bytes of one call,
    with and without an importance matrix."""
    library = ggml_quantizer._library()
    calls: list[int] = []

    class Counting:  # llama.cpp's library, counting the rows of each call
        def __getattr__(self, attribute: str):
            return getattr(library, attribute)

        def ggml_quantize_chunk(self, *args):
            calls.append(args[4])
            return library.ggml_quantize_chunk(*args)

    monkeypatch.setattr(ggml_quantizer, "_library", Counting)
    monkeypatch.setattr(ggml_quantizer, "MIN_CHUNK", 1)
    rng = np.random.default_rng(threads)
    weight = rng.standard_normal((37, 512)).astype(np.float32)
    importance = rng.uniform(0.1, 2.0, 512).astype(np.float32)
    kind = GGMLQuantizationType[name].value
    for imatrix in (importance, None if name.startswith("Q") else importance):
        whole = ggml_quantizer.quantize(weight, kind, imatrix, threads=1)
        assert calls == [37]
        split = ggml_quantizer.quantize(weight, kind, imatrix, threads=threads)
        assert sorted(calls[1:]) == sorted(np.diff(np.linspace(0, 37, threads + 1).astype(int)))
        assert np.array_equal(whole, split)
        calls.clear()


@needs_llama
@pytest.mark.parametrize("name", [t for t in PLAIN_GRID if t not in NUMPY_ENCODERS])
def test_block_types_store_their_bytes_and_decode_as_llama_cpp(name: str) -> None:
    module = layer(bias=True)
    option = GGUFOption(name)
    converted = METHOD.convert(module, option)
    shape = LayerShape.of(module)
    state = converted.state_dict()
    stored = sum(t.numel() * t.element_size() for t in state.values())
    assert METHOD.cost(shape, option).bytes == stored
    decoded = quants.dequantize(converted.blocks.numpy(), GGMLQuantizationType[name])
    x = torch.randn(5, 512)
    rounded = round_activations(x, name)
    expected = rounded @ torch.from_numpy(decoded).T + module.bias.detach()
    assert torch.allclose(converted(x), expected, atol=1e-5)
    relative = (converted(x) - module(x)).norm() / module(x).norm()
    assert relative < METHOD.error_bound(shape, option)
    restored = METHOD.empty(shape, option)
    restored.load_state_dict(load_safetensors(save_safetensors(state)))
    assert torch.equal(restored(x), converted(x))


def test_an_embedding_decodes_only_the_rows_it_reads() -> None:
    table = nn.Embedding(300, 64)
    option = GGUFOption("Q8_0")
    converted = METHOD.convert(table, option)
    ids = torch.tensor([[0, 299, 5], [7, 7, 1]])
    full = torch.from_numpy(quants.dequantize(converted.blocks.numpy(), option.tensor_type.ggml))
    assert torch.equal(converted(ids), full[ids])
    assert converted(ids).shape == (2, 3, 64)


@needs_llama
@pytest.mark.parametrize("name", ["Q4_K", "Q3_K", "IQ4_XS", "Q2_K"])
def test_the_importance_matrix_lowers_the_error_where_inputs_are_unequal(name: str) -> None:
    """Columns whose inputs are large weigh more: on such inputs, calibrated on some tokens
    and judged on others, the weighted encoder's output error is lower."""
    generator = torch.Generator().manual_seed(3)
    scales = torch.logspace(0.0, 1.5, 512)[torch.randperm(512, generator=generator)]
    calibration = torch.randn(2048, 512, generator=generator) * scales
    held_out = torch.randn(256, 512, generator=generator) * scales
    module = layer()
    plain = METHOD.convert(module, GGUFOption(name))
    weighted_option = GGUFOption(name, imatrix=True)
    weighted = METHOD.convert(module, weighted_option, observed(module, calibration))
    assert not torch.equal(plain.blocks, weighted.blocks)
    reference = module(held_out)
    error = (weighted(held_out) - reference).norm()
    assert error < (plain(held_out) - reference).norm()


@needs_llama
def test_the_importance_matrix_is_what_llama_cpp_is_given() -> None:
    """The mean square of each input column, passed to llama.cpp's quantizer as is."""
    module = layer()
    inputs = torch.randn(300, 512)
    converted = METHOD.convert(module, GGUFOption("Q4_K", True), observed(module, inputs))
    sums = inputs.double().pow(2).sum(0).numpy().astype(np.float32)
    importance = sums / np.float32(300)
    direct = ggml_quantizer.quantize(
        module.weight.detach().numpy(), GGMLQuantizationType.Q4_K.value, importance
    )
    assert np.array_equal(converted.blocks.numpy(), direct)


def test_an_importance_option_without_calibration_is_refused() -> None:
    with pytest.raises(OptionError, match="calibration"):
        METHOD.convert(layer(cols=256), GGUFOption("Q4_0", True), None)


@pytest.mark.parametrize(
    ("cols", "option", "says"),
    [
        (640, GGUFOption("Q4_K"), "blocks of 256"),
        (640, GGUFOption("Q4_K"), "Q5_0"),
        (512, GGUFOption("q4_k"), "capitals"),
        (512, GGUFOption("Q4_X"), "allowed: F32"),
        (512, GGUFOption("IQ2_XXS"), "importance matrix"),
        (512, GGUFOption("F16", True), "quantised types only"),
    ],
)
def test_check_refuses_what_llama_cpp_cannot_take(cols: int, option, says: str) -> None:
    with pytest.raises(OptionError, match=says) as info:
        METHOD.check(LayerShape("linear", 64, cols), option, "blk.ffn_down")
    assert "blk.ffn_down" in str(info.value)


def test_grid_offers_only_types_whose_blocks_fit() -> None:
    narrow = METHOD.grid(LayerShape("linear", 64, 640))
    assert narrow and all(o.tensor_type.fits(640) for o in narrow)
    assert not any(o.type.endswith("_K") for o in narrow)
    embedding = METHOD.grid(LayerShape("embedding", 300, 256))
    assert not any(o.imatrix for o in embedding)
    if ggml_quantizer.available():
        wide = {o.label for o in METHOD.grid(LayerShape("linear", 64, 512))}
        assert {GGUFOption(t).label for t in PLAIN_GRID} <= wide
        assert {GGUFOption(t, True).label for t in IMATRIX_GRID} <= wide


def test_without_llama_cpp_the_numpy_types_remain_and_the_others_say_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ggml_quantizer, "_library", lambda: None)
    grid = METHOD.grid(LayerShape("linear", 64, 512))
    assert grid and {o.type for o in grid} <= NUMPY_ENCODERS
    assert not any(o.imatrix for o in grid)
    converted = METHOD.convert(layer(), GGUFOption("Q4_0"))
    assert converted.blocks.shape == (64, 512 // 32 * 18)
    with pytest.raises(OptionError, match="llama-cpp-python"):
        METHOD.convert(layer(), GGUFOption("Q4_K"))
