"""GPTQ: lower output error than RTN on correlated inputs, in RTN's exact storage format."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from transformers.pytorch_utils import Conv1D

from methods import GPTQOption, QuantizedLinear, QuantOption, affine, get_method
from methods.base import LayerShape, Observer
from methods.errors import OptionError
from methods.gptq_solver import gptq_quantize
from methods.observers import HessianObserver

GPTQ = get_method("gptq")
RTN = get_method("rtn")
COLS, ROWS = 256, 96


def correlated_inputs(tokens: int, seed: int, cols: int = COLS) -> torch.Tensor:
    """Mixed Gaussian channels, a few of them with 20x the spread (as in transformers)."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=torch.Generator().manual_seed(0)) / cols**0.5
    spread = torch.ones(cols)
    spread[torch.randperm(cols, generator=torch.Generator().manual_seed(1))[:6]] = 20.0
    z = torch.randn(tokens, cols, generator=generator)
    return (z @ mix + 0.3 * torch.randn(tokens, cols, generator=generator)) * spread


def make_linear(seed: int = 0, cols: int = COLS, rows: int = ROWS) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(cols, rows)


def observe(module: nn.Module, option: GPTQOption, batches: list[torch.Tensor]) -> Observer:
    observer = GPTQ.observer(module, option)
    assert observer is not None
    handle = module.register_forward_hook(observer.observe)
    with torch.no_grad():
        for x in batches:
            module(x)
    handle.remove()
    return observer


def calibrated(module: nn.Module, option: GPTQOption, cols: int = COLS) -> nn.Module:
    batches = [correlated_inputs(256, seed, cols) for seed in range(4)]
    return GPTQ.convert(module, option, observe(module, option, batches))


def output_error(module: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        expected = reference(x)
        return float((module(x) - expected).norm() / expected.norm())


@pytest.mark.parametrize(
    "option",
    [
        GPTQOption(4, 128, symmetric=True),
        GPTQOption(4, 128, symmetric=False),
        GPTQOption(4, None, symmetric=True),
        GPTQOption(3, 64, symmetric=False),
        GPTQOption(3, 32, symmetric=True),
    ],
    ids=lambda o: o.label,
)
def test_output_error_is_well_below_rtn_on_held_out_correlated_inputs(
    option: GPTQOption,
) -> None:
    layer = make_linear()
    held_out = correlated_inputs(1024, seed=99)
    gptq_error = output_error(calibrated(layer, option), layer, held_out)
    rtn_error = output_error(RTN.convert(layer, option.storage()), layer, held_out)
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)


def sequential_reference(
    weight: torch.Tensor, hessian: torch.Tensor, option: GPTQOption
) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook sweep: one column at a time, with the explicit inverse Hessian of the
    columns left (no blocks, no Cholesky). Codes and scales, original column order."""
    cols = weight.shape[1]
    group = option.group_size or cols
    damped = hessian + option.damp * hessian.diagonal().mean() * torch.eye(cols).double()
    perm = torch.arange(cols)
    if option.act_order:
        perm = torch.argsort(hessian.diagonal(), descending=True, stable=True)
    w = weight.double()[:, perm].clone()
    inverse = torch.linalg.inv(damped[perm][:, perm])
    static = option.act_order or group == cols
    scales, offsets = affine.fit_scales(
        affine.group_view(weight.double(), group), option.bits, option.symmetric
    )
    codes = torch.empty(weight.shape, dtype=torch.uint8)
    for j in range(cols):
        g = int(perm[j]) // group
        if not static and j % group == 0:
            fitted = w[:, j : j + group].unsqueeze(1)
            s16, m16 = affine.fit_scales(fitted, option.bits, option.symmetric)
            scales[:, g] = s16[:, 0]
            if offsets is not None:
                offsets[:, g] = m16[:, 0]
        s = scales[:, g].double()
        m = None if offsets is None else offsets[:, g].double()
        top = 2**option.bits - 1
        if m is None:
            code = (torch.round(w[:, j] / s) + 2 ** (option.bits - 1)).clamp(0, top)
            value = (code - 2 ** (option.bits - 1)) * s
        else:
            code = torch.round((w[:, j] - m) / s).clamp(0, top)
            value = code * s + m
        codes[:, perm[j]] = code.to(torch.uint8)
        error = (w[:, j] - value) / inverse[j, j]
        w[:, j + 1 :] -= error[:, None] * inverse[j, j + 1 :][None, :]
        inverse = inverse - torch.outer(inverse[:, j], inverse[j, :]) / inverse[j, j]
    return codes, scales


@pytest.mark.parametrize(
    "option",
    [
        GPTQOption(3, None, True, act_order=False),
        GPTQOption(4, 40, False, act_order=True),
        GPTQOption(3, 40, True, act_order=False),
        GPTQOption(2, 100, False, act_order=False),
    ],
    ids=lambda o: o.label,
)
def test_blocked_cholesky_sweep_equals_the_sequential_update(option: GPTQOption) -> None:
    """200 columns: several blocks, groups across block borders, dynamic groups larger and
    smaller than a block and of a width that is no multiple of it (40, 100)."""
    torch.manual_seed(0)
    weight = torch.randn(16, 200, dtype=torch.float64)
    x = correlated_inputs(500, seed=3, cols=200).double()
    hessian = 2 * x.t() @ x / 500
    codes, scales, _ = gptq_quantize(weight, hessian, option)
    expected_codes, expected_scales = sequential_reference(weight, hessian, option)
    assert torch.equal(scales, expected_scales)
    assert torch.equal(codes, expected_codes)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [None, 64, 32])
def test_act_order_keeps_rtn_storage(group: int | None, symmetric: bool) -> None:
    """Codes are stored in the original column order with each group's scale fitted on its
    original columns: the scales are RTN's, the codes decode with RTN's formula, and RTN's
    module loaded with the state computes the same outputs."""
    layer = make_linear()
    option = GPTQOption(4, group, symmetric, act_order=True)
    converted = calibrated(layer, option)
    assert isinstance(converted, QuantizedLinear)
    rtn = RTN.convert(layer, option.storage())
    assert torch.equal(converted.scales, rtn.scales)
    if symmetric:
        assert converted.offsets is None
    else:
        assert torch.equal(converted.offsets, rtn.offsets)

    group_size = group or COLS
    codes = affine.group_view(converted.unsigned_codes(), group_size)
    decoded = affine.decode(codes, converted.scales, converted.offsets, 4).reshape(ROWS, COLS)
    assert torch.equal(decoded, converted.dequantize())
    assert torch.equal(converted.dequantize_scratch(torch.float32), decoded)

    loaded = RTN.empty(LayerShape.of(layer), option.storage())
    loaded.load_state_dict(load_safetensors(save_safetensors(converted.state_dict())))
    x = correlated_inputs(40, seed=5)
    assert torch.equal(loaded(x), converted(x))
    # and the codes differ from RTN's (the sweep did move them)
    assert not torch.equal(converted.unsigned_codes(), rtn.unsigned_codes())


def test_act_order_changes_the_result_and_does_not_hurt() -> None:
    layer = make_linear()
    held_out = correlated_inputs(1024, seed=99)
    ordered = calibrated(layer, GPTQOption(3, 64, False, act_order=True))
    plain = calibrated(layer, GPTQOption(3, 64, False, act_order=False))
    assert not torch.equal(ordered.unsigned_codes(), plain.unsigned_codes())
    assert output_error(ordered, layer, held_out) < 1.1 * output_error(plain, layer, held_out)


@pytest.mark.parametrize(
    "option", [GPTQOption(4, 128, False), GPTQOption(3, 32, True), GPTQOption(2, None, True)]
)
def test_cost_is_rtn_cost_and_the_saved_bytes(option: GPTQOption) -> None:
    layer = make_linear()
    shape = LayerShape.of(layer)
    cost = GPTQ.cost(shape, option)
    assert cost == RTN.cost(shape, option.storage())
    converted = calibrated(layer, option)
    saved = load_safetensors(save_safetensors(converted.state_dict()))
    assert cost.bytes == sum(t.numel() * t.element_size() for t in saved.values())
    assert cost.weight_bytes == converted.stored_weight_bytes()
    assert GPTQ.runtime_format(shape, option) == RTN.runtime_format(shape, option.storage())


def test_conversion_is_deterministic_and_leaves_layer_and_observer_alone() -> None:
    layer = make_linear()
    option = GPTQOption(4, 64, False)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    observer = observe(layer, option, [correlated_inputs(300, seed=s) for s in range(2)])
    assert isinstance(observer, HessianObserver)
    hessian = observer.hessian()
    first = GPTQ.convert(layer, option, observer).state_dict()
    second = GPTQ.convert(layer, option, observer).state_dict()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert torch.equal(observer.hessian(), hessian)


def test_hessian_is_twice_the_mean_outer_product_over_all_tokens() -> None:
    layer = make_linear(cols=16, rows=8)
    batches = [torch.randn(3, 5, 16), torch.randn(7, 16)]
    observer = observe(layer, GPTQOption(4, None, True), batches)
    assert isinstance(observer, HessianObserver)
    assert (observer.tokens, observer.calls) == (22, 2)
    x = torch.cat([b.reshape(-1, 16) for b in batches]).double()
    torch.testing.assert_close(observer.hessian(), 2 * x.t() @ x / 22, rtol=1e-5, atol=1e-6)


def test_options_of_one_layer_share_one_observer_until_it_is_fed() -> None:
    layer, other = make_linear(), make_linear(seed=1)
    first = GPTQ.observer(layer, GPTQOption(4, 128, True))
    assert GPTQ.observer(layer, GPTQOption(3, 64, False)) is first
    assert GPTQ.observer(other, GPTQOption(4, 128, True)) is not first
    observe(layer, GPTQOption(4, 128, True), [correlated_inputs(8, seed=0)])
    assert first.calls == 1  # the observer of the call above was still ``first``
    assert GPTQ.observer(layer, GPTQOption(4, 128, True)) is not first


def test_dead_inputs_get_zero_weight_and_no_nan() -> None:
    layer = make_linear()
    option = GPTQOption(4, 32, False)
    dead = [3, 40, 41, 200]
    batches = []
    for seed in range(4):
        x = correlated_inputs(256, seed)
        x[:, dead] = 0.0
        batches.append(x)
    converted = GPTQ.convert(layer, option, observe(layer, option, batches))
    weight = converted.dequantize()
    assert torch.isfinite(weight).all()
    # zero is a code: only the float16 rounding of asymmetric offsets is left
    assert float(weight[:, dead].abs().max()) <= 0.01 * float(converted.scales.float().max())
    held_out = correlated_inputs(512, seed=99)
    held_out[:, dead] = 0.0
    rtn_error = output_error(RTN.convert(layer, option.storage()), layer, held_out)
    assert output_error(converted, layer, held_out) < rtn_error


def test_singular_hessian_without_dampening_falls_back_to_more() -> None:
    """Fewer tokens than inputs and ``damp=0``: the Hessian is singular; the conversion
    dampens it more and still gives finite weights."""
    layer = make_linear(cols=64, rows=32)
    option = GPTQOption(4, 32, True, damp=0.0)
    observer = observe(layer, option, [correlated_inputs(10, seed=0, cols=64)])
    converted = GPTQ.convert(layer, option, observer)
    assert torch.isfinite(converted.dequantize()).all()
    x = correlated_inputs(64, seed=3, cols=64)
    assert output_error(converted, layer, x) < 0.5


def test_conv1d_is_quantised_like_the_equal_linear_layer() -> None:
    linear = make_linear(cols=64, rows=48)
    conv = Conv1D(48, 64)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
        conv.bias.copy_(linear.bias)
    option = GPTQOption(4, 32, False)
    from_linear = calibrated(linear, option, cols=64)
    from_conv = calibrated(conv, option, cols=64)
    for name, value in from_linear.state_dict().items():
        assert torch.equal(value, from_conv.state_dict()[name]), name


def test_grid_is_act_order_and_no_larger_than_rtn() -> None:
    shape = LayerShape("linear", 384, 1536)
    grid = GPTQ.grid(shape)
    assert all(isinstance(o, GPTQOption) and o.act_order for o in grid)
    assert len(grid) <= len(RTN.grid(shape))
    labels = [o.label for o in grid]
    assert len(set(labels)) == len(labels)
    assert "gptq4-g128-asym-ao" in labels and "gptq4-ch-sym-ao" in labels
    assert {o.bits for o in grid} == {2, 3, 4, 8}
    assert {o.storage() for o in grid} == set(RTN.grid(shape))  # every RTN format, fitted
    assert GPTQOption(3, 64, True, act_order=False).label == "gptq3-g64-sym"
    assert {o.group_size for o in GPTQ.grid(LayerShape("linear", 8, 96))} == {None, 32}


# --- refusals -----------------------------------------------------------------------------


def test_convert_without_calibration_says_so() -> None:
    option = GPTQOption(4, 128, False)
    with pytest.raises(OptionError, match="calibration") as info:
        GPTQ.convert(make_linear(), option, None)
    assert option.label in str(info.value)
    unfed = HessianObserver(COLS)
    with pytest.raises(OptionError, match="saw no inputs"):
        GPTQ.convert(make_linear(), option, unfed)


def test_observer_of_another_width_is_refused() -> None:
    small = make_linear(cols=64, rows=8)
    option = GPTQOption(4, 32, True)
    observer = observe(small, option, [torch.randn(4, 64)])
    with pytest.raises(OptionError, match="width 64"):
        GPTQ.convert(make_linear(), option, observer)


def test_group_size_that_does_not_divide_the_width_is_refused() -> None:
    with pytest.raises(OptionError) as info:
        GPTQ.check(LayerShape("linear", 48, 100), GPTQOption(4, 32, True), "blocks.0.fc")
    message = str(info.value)
    assert "blocks.0.fc" in message and "32" in message and "100" in message
    assert "allowed" in message


def test_nine_bits_is_refused() -> None:
    with pytest.raises(OptionError) as info:
        GPTQ.check(LayerShape("linear", 48, 128), GPTQOption(9, 32, True), "blocks.0.fc")
    message = str(info.value)
    assert "blocks.0.fc" in message and "9 bits" in message
    assert "[2, 3, 4, 5, 6, 7, 8]" in message


@pytest.mark.parametrize("damp", [-0.1, 2.0, "0.01"])
def test_bad_dampening_is_refused(damp: object) -> None:
    with pytest.raises(OptionError, match="damp"):
        GPTQ.check(LayerShape("linear", 48, 128), GPTQOption(4, 32, True, damp=damp), "fc")


def test_embeddings_are_not_supported() -> None:
    shape = LayerShape.of(nn.Embedding(100, 64))
    assert not GPTQ.supports(shape)
    with pytest.raises(OptionError, match="linear layers only"):
        GPTQ.check(shape, GPTQOption(4, 32, True), "embeddings.word")
    assert QuantOption(4, 32, True) == GPTQOption(4, 32, True).storage()
