"""Tests of methods/quantized.py: QuantizedLinear / QuantizedEmbedding storage and forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods import kernels
from methods.quantized import QuantizedEmbedding, QuantizedLinear, QuantizedStorage

FEW_TOKENS = 3  # under the kernels' cut-over
MANY_TOKENS = 40  # over it: the dequantised float path


def make_linear(
    in_features: int,
    out_features: int,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    seed: int = 0,
    bias: bool = True,
) -> QuantizedLinear:
    torch.manual_seed(seed)
    module = QuantizedLinear(
        in_features, out_features, bits, group_size or in_features, symmetric, bias=bias
    )
    module.load_weight(torch.randn(out_features, in_features) * 0.05)
    if module.bias is not None:
        module.bias.normal_()
    return module


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return float((actual.double() - reference.double()).norm() / reference.double().norm())


def reference_output(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    y = F.linear(x, module.dequantize(x.dtype))
    return y if module.bias is None else y + module.bias.to(y.dtype)


# --- the int4 kernel layout is an in-memory detail -----------------------------------------

INT4_SHAPES = [(64, 48, 32), (64, 48, None), (384, 64, 128), (128, 16, 64)]


@pytest.mark.parametrize(("cols", "rows", "group"), INT4_SHAPES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_int4_switches_to_kernel_layout_but_saves_portable(
    cols: int, rows: int, group: int | None, symmetric: bool, policy: kernels.KernelPolicy
) -> None:
    module = make_linear(cols, rows, 4, group, symmetric)
    before = clone_state(module)
    weight = module.dequantize()
    assert not module._kernel_layout

    y = module(torch.randn(FEW_TOKENS, cols))
    assert module._kernel_layout
    assert not torch.equal(module.codes, before["codes"])  # really another byte order
    assert_states_equal(clone_state(module), before)
    assert torch.equal(module.dequantize(), weight)
    assert torch.equal(module.dequantize_scratch(torch.float32), weight)
    assert y.shape == (FEW_TOKENS, rows)
    assert module.stored_weight_bytes() == sum(
        t.numel() * t.element_size() for n, t in before.items() if n != "bias"
    )


@pytest.mark.parametrize(("cols", "rows", "group"), INT4_SHAPES)
def test_kernel_output_is_close_to_the_dequantised_output(
    cols: int, rows: int, group: int | None, policy: kernels.KernelPolicy
) -> None:
    for symmetric in (True, False):
        module = make_linear(cols, rows, 4, group, symmetric, seed=cols)
        x = torch.randn(2, FEW_TOKENS, cols)
        y = module(x)
        assert module._kernel_layout
        assert y.shape == (2, FEW_TOKENS, rows)
        assert relative_error(y, reference_output(module, x)) < 1e-2


def test_load_state_dict_into_kernel_layout_gives_identical_outputs(
    policy: kernels.KernelPolicy,
) -> None:
    source = make_linear(64, 48, 4, 32, False, seed=1)
    target = make_linear(64, 48, 4, 32, False, seed=2)
    few, many = torch.randn(FEW_TOKENS, 64), torch.randn(MANY_TOKENS, 64)
    target(few)
    assert target._kernel_layout

    target.load_state_dict(source.state_dict())
    assert not target._kernel_layout
    assert_states_equal(clone_state(target), clone_state(source))
    assert torch.equal(target(few), source(few))
    assert torch.equal(target(many), source(many))
    assert target._kernel_layout and source._kernel_layout
    assert_states_equal(clone_state(target), clone_state(source))


@pytest.mark.parametrize("convert", ["to_float32", "float", "cpu"])
def test_apply_reverts_to_the_portable_layout(convert: str, policy: kernels.KernelPolicy) -> None:
    module = make_linear(64, 48, 4, 64, True)
    portable = module.codes.clone()
    x = torch.randn(FEW_TOKENS, 64)
    y = module(x)
    assert module._kernel_layout

    if convert == "to_float32":
        module.to(torch.float32)
    elif convert == "float":
        module.float()
    else:
        module.cpu()
    assert not module._kernel_layout
    assert torch.equal(module.codes, portable)
    assert torch.equal(module(x), y)  # and back to the kernel layout on the next small call
    assert module._kernel_layout


def test_store_resets_the_kernel_layout(policy: kernels.KernelPolicy) -> None:
    module = make_linear(64, 48, 4, 32, True)
    module(torch.randn(FEW_TOKENS, 64))
    assert module._kernel_layout
    fresh = make_linear(64, 48, 4, 32, True, seed=5)
    module.store(fresh.unsigned_codes(), fresh.scales, fresh.offsets)
    assert not module._kernel_layout
    assert torch.equal(module.codes, fresh.codes)
    assert torch.equal(module.dequantize(), fresh.dequantize())


# --- dequantisation ------------------------------------------------------------------------

SCRATCH_CASES = [
    (bits, cols, group, symmetric)
    for bits in (2, 3, 4, 5, 6, 7, 8)
    for cols, group in ((64, 64), (64, 32), (96, 32), (36, 12))
    for symmetric in (True, False)
]


@pytest.mark.parametrize(("bits", "cols", "group", "symmetric"), SCRATCH_CASES)
def test_dequantize_scratch_equals_dequantize(
    bits: int, cols: int, group: int, symmetric: bool
) -> None:
    torch.manual_seed(bits * cols + group)
    module = QuantizedStorage(16, cols, bits, group, symmetric)
    module.load_weight(torch.randn(16, cols))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        expected = module.dequantize(dtype)
        scratch = module.dequantize_scratch(dtype)
        assert scratch.dtype == dtype
        assert scratch.shape == (16, cols)
        assert torch.equal(scratch, expected), dtype


def test_dequantize_scratch_is_right_after_a_bigger_layer_used_the_buffer() -> None:
    big = QuantizedStorage(64, 128, 3, 32, False)
    small = QuantizedStorage(8, 40, 4, 8, True)
    torch.manual_seed(0)
    big.load_weight(torch.randn(64, 128))
    small.load_weight(torch.randn(8, 40))
    big.dequantize_scratch(torch.float32)
    assert torch.equal(small.dequantize_scratch(torch.float32), small.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_dequantize_is_close_to_the_weight(bits: int, symmetric: bool) -> None:
    torch.manual_seed(bits)
    weight = torch.randn(32, 64)
    module = QuantizedStorage(32, 64, bits, 32, symmetric)
    module.load_weight(weight)
    step = module.scales.float().repeat_interleave(32, dim=1)
    # half a step plus float16 rounding slack of scale and offset (see test_affine)
    assert torch.all((module.dequantize() - weight).abs() <= step * (0.5 + 2**bits * 2**-11) + 1e-3)


def test_dequantize_rows_selects_rows() -> None:
    module = QuantizedStorage(20, 32, 3, 16, False)
    torch.manual_seed(0)
    module.load_weight(torch.randn(20, 32))
    rows = torch.tensor([3, 0, 19, 3])
    assert torch.equal(module.dequantize(rows=rows), module.dequantize()[rows])


def test_eight_bit_codes_are_int8_offset_by_128() -> None:
    module = QuantizedStorage(4, 16, 8, 16, False)
    codes = torch.randint(0, 256, (4, 16), dtype=torch.uint8)
    module.store(codes, torch.ones(4, 1, dtype=torch.float16), torch.zeros(4, 1))
    assert module.codes.dtype == torch.int8
    assert torch.equal(module.codes.to(torch.int16) + 128, codes.to(torch.int16))
    assert torch.equal(module.unsigned_codes(), codes)


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_store_then_unsigned_codes_round_trip(bits: int) -> None:
    module = QuantizedStorage(5, 24, bits, 8, True)
    codes = torch.randint(0, 1 << bits, (5, 24), dtype=torch.uint8)
    module.store(codes, torch.ones(5, 3, dtype=torch.float16), None)
    assert torch.equal(module.unsigned_codes(), codes)
    assert torch.equal(module.unsigned_codes(torch.tensor([4, 1])), codes[[4, 1]])


def test_group_size_must_divide_the_width() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        QuantizedStorage(4, 30, 4, 8, True)


# --- forward -------------------------------------------------------------------------------

FORWARD_CASES = [
    (8, None, True),
    (8, None, False),
    (8, 32, False),
    (4, None, True),
    (4, 32, False),
    (3, 32, True),
    (2, 64, False),
]


@pytest.mark.parametrize(("bits", "group", "symmetric"), FORWARD_CASES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_many_tokens_match_linear_of_the_dequantised_weight(
    bits: int, group: int | None, symmetric: bool, bias: bool, policy: kernels.KernelPolicy
) -> None:
    module = make_linear(64, 48, bits, group, symmetric, seed=bits, bias=bias)
    x = torch.randn(4, 10, 64)  # 40 tokens
    y = module(x)
    assert y.shape == (4, 10, 48)
    expected = F.linear(x, module.dequantize(), module.bias)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("bits", "group", "symmetric"), FORWARD_CASES)
def test_few_tokens_are_close_to_the_dequantised_weight(
    bits: int, group: int | None, symmetric: bool, policy: kernels.KernelPolicy
) -> None:
    module = make_linear(64, 48, bits, group, symmetric, seed=bits)
    x = torch.randn(FEW_TOKENS, 64)
    assert relative_error(module(x), reference_output(module, x)) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [FEW_TOKENS, MANY_TOKENS])
def test_half_precision_activations(
    dtype: torch.dtype, tokens: int, policy: kernels.KernelPolicy
) -> None:
    for bits, group, symmetric in [(8, None, False), (4, 32, True), (3, 32, False)]:
        module = make_linear(64, 48, bits, group, symmetric, seed=bits)
        x = torch.randn(tokens, 64)
        y = module(x.to(dtype))
        assert y.dtype == dtype
        assert relative_error(y, reference_output(module, x)) < 2e-2


def test_zero_tokens(policy: kernels.KernelPolicy) -> None:
    for bits, group in [(8, None), (4, 32), (3, 32)]:
        module = make_linear(64, 48, bits, group, True)
        assert module(torch.zeros(0, 64)).shape == (0, 48)


# --- embeddings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "group", "symmetric"), [(8, 64, True), (4, 32, False), (3, 16, True), (2, 64, False)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_lookup_equals_indexing_the_dequantised_table(
    bits: int, group: int, symmetric: bool, dtype: torch.dtype
) -> None:
    torch.manual_seed(bits)
    module = QuantizedEmbedding(300, 64, bits, group, symmetric, dtype=dtype)
    module.load_weight(torch.randn(300, 64))
    indices = torch.randint(0, 300, (4, 7))
    indices[0, 0] = 299
    out = module(indices)
    assert out.shape == (4, 7, 64)
    assert out.dtype == dtype
    assert torch.equal(out, module.dequantize(dtype)[indices])


# --- stored bytes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "group", "symmetric"), [(8, None, True), (8, 32, False), (4, 32, True), (3, 16, False)]
)
def test_stored_weight_bytes_counts_codes_scales_and_offsets(
    bits: int, group: int | None, symmetric: bool, policy: kernels.KernelPolicy
) -> None:
    for module in (
        make_linear(64, 48, bits, group, symmetric),
        QuantizedEmbedding(30, 64, bits, group or 64, symmetric),
    ):
        state = module.state_dict()
        expected = sum(
            state[name].numel() * state[name].element_size()
            for name in ("codes", "scales", "offsets")
            if name in state
        )
        assert ("offsets" in state) is (not symmetric)
        assert module.stored_weight_bytes() == expected
        if isinstance(module, QuantizedLinear):
            module(torch.randn(FEW_TOKENS, 64))  # possibly the kernel layout now
            assert module.stored_weight_bytes() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_casts_keep_the_stored_format(dtype: torch.dtype) -> None:
    module = make_linear(64, 48, 4, 32, False)
    stored = module.stored_weight_bytes()
    weight = module.dequantize()
    module.to(dtype)
    assert module.scales.dtype == torch.float16
    assert module.offsets is not None and module.offsets.dtype == torch.float16
    assert module.stored_weight_bytes() == stored
    assert torch.equal(module.dequantize(), weight)


# --- zero and constant rows on every path -----------------------------------------------------

ROW_CASES = [
    pytest.param(
        bits,
        group,
        symmetric,
        tokens,
        id=f"int{bits}-{group or 'ch'}-{'sym' if symmetric else 'asym'}-{tokens}tok",
    )
    for bits, group in [(8, None), (4, None), (4, 32), (3, 32)]
    for symmetric in (True, False)
    for tokens in (FEW_TOKENS, MANY_TOKENS)
]


@pytest.mark.parametrize(("bits", "group", "symmetric", "tokens"), ROW_CASES)
def test_zero_and_constant_rows_on_every_path(
    bits: int, group: int | None, symmetric: bool, tokens: int, policy: kernels.KernelPolicy
) -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 64) * 0.02
    weight[1] = 0.0
    weight[2] = 0.5
    module = QuantizedLinear(64, 48, bits, group or 64, symmetric, bias=False)
    module.load_weight(weight)
    x = torch.randn(tokens, 64)
    y = module(x)
    assert torch.all(module.dequantize()[1] == 0)
    assert torch.all(y[:, 1].abs() <= 1e-6), y[:, 1]
    assert relative_error(y[:, 2], x @ module.dequantize()[2]) < 1e-2
