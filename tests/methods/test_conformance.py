"""The shared conformance suite: every registered method x every grid option x a few layers.

Nothing here names a method: a newly registered method (imported by ``methods/__init__.py``)
is picked up at collection time and has to pass the same checks. Bounds that depend on the
option read its ``bits`` field when it has one, else the bits per weight of its cost.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

import methods  # noqa: F401  (its __init__ registers the built-in methods)
from methods import kernels, workspace
from methods.base import LayerShape, Method, Option
from methods.errors import OptionError
from methods.registry import get_method, registered_methods

LAYER_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "linear64to48": lambda **kw: nn.Linear(64, 48, bias=True, **kw),
    "linear384to1536": lambda **kw: nn.Linear(384, 1536, bias=False, **kw),
    "embedding300x64": lambda **kw: nn.Embedding(300, 64, **kw),
}
SHAPES = {name: LayerShape.of(make(device="meta")) for name, make in LAYER_FACTORIES.items()}
LAYER_NAME = "encoder.layer.7.attention.query"


def conformance_cases() -> list[Any]:
    return [
        pytest.param(name, layer, option, id=f"{name}-{layer}-{option.label}")
        for name, method in sorted(registered_methods().items())
        for layer, shape in SHAPES.items()
        if method.supports(shape)
        for option in method.grid(shape)
    ]


CASES = conformance_cases()
CASE_ARGS = ("method_name", "layer", "option")


@pytest.fixture(autouse=True)
def kernels_on(policy: kernels.KernelPolicy) -> None:
    """Every case runs with the kernels on and a cut-over of 16 tokens (see conftest.py)."""


def make_layer(layer: str, seed: int = 0) -> nn.Module:
    """The layer with Gaussian weights (and bias)."""
    torch.manual_seed(seed)
    module = LAYER_FACTORIES[layer]()
    with torch.no_grad():
        module.weight.normal_(0.0, 0.02)
        bias = getattr(module, "bias", None)
        if bias is not None:
            bias.normal_(0.0, 0.02)
    return module


def make_inputs(shape: LayerShape, seed: int = 1) -> dict[str, torch.Tensor]:
    """A few tokens (the kernels' path) and many (the float path); for an embedding, index
    batches that include the first rows and one that reads the whole table."""
    generator = torch.Generator().manual_seed(seed)
    if shape.kind == "embedding":
        some = torch.randint(0, shape.rows, (4, 6), generator=generator)
        some[0, :3] = torch.tensor([0, 1, shape.rows - 1])
        return {"some": some, "all": torch.arange(shape.rows)}
    return {
        "few": torch.randn(2, 3, shape.cols, generator=generator),
        "many": torch.randn(24, shape.cols, generator=generator),
    }


def convert(method: Method, module: nn.Module, option: Option) -> nn.Module:
    """Both phases: methods that need statistics first observe calibration inputs (Gaussian
    activations, or lookups of every row) through a forward hook."""
    observer = None
    if method.needs_calibration(option):
        observer = method.observer(module, option)
        assert observer is not None
        handle = module.register_forward_hook(observer.observe)
        shape = LayerShape.of(module)
        with torch.no_grad():
            for seed in (11, 12, 13):
                for x in make_inputs(shape, seed=seed).values():
                    module(x)
        handle.remove()
        if observer.needs_fisher:
            observer.observe_fisher(gauss_newton_diagonal(module, shape))
    return method.convert(module, option, observer)


def gauss_newton_diagonal(module: nn.Module, shape: LayerShape, samples: int = 4) -> torch.Tensor:
    """The weight's diagonal Gauss-Newton (Fisher) information for a unit output metric:
    the mean of ``grad^2`` of ``v . y`` over Gaussian ``v``, on the calibration inputs."""
    generator = torch.Generator().manual_seed(21)
    total = torch.zeros_like(module.weight, dtype=torch.float32)
    weight = module.weight
    flag = weight.requires_grad
    weight.requires_grad_(True)
    try:
        for seed in (11, 12, 13):
            for x in make_inputs(shape, seed=seed).values():
                y = module(x)
                for _ in range(samples):
                    v = torch.randn(y.shape, generator=generator)
                    (grad,) = torch.autograd.grad((v * y).sum(), weight, retain_graph=True)
                    total += grad.float().pow(2)
    finally:
        weight.requires_grad_(flag)
    return (total / samples).detach()


@functools.cache
def converted_layer(method_name: str, layer: str, option: Option) -> nn.Module:
    """The converted Gaussian layer, shared by the tests that only read it (calls may switch
    its in-memory layout, which no test may notice)."""
    return convert(get_method(method_name), make_layer(layer), option)


@functools.cache
def reference_outputs(layer: str) -> dict[str, torch.Tensor]:
    original = make_layer(layer)
    with torch.no_grad():
        return {name: original(x) for name, x in make_inputs(SHAPES[layer]).items()}


def state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    actual, reference = actual.detach().double(), reference.detach().double()
    return float((actual - reference).norm() / reference.norm())


def error_tolerance(method: Method, shape: LayerShape, option: Option) -> float:
    """The method's own bound for Gaussian layers (see ``Method.error_bound``). For uniform
    quantisers the worst errors measured over the grid are about two thirds of it: 0.008 at
    8 bits, 0.12 at 4, 0.24 at 3 and 0.53 at 2 (symmetric codes, groups of 64)."""
    return method.error_bound(shape, option)


@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_output_shape_and_dtype(method_name: str, layer: str, option: Option) -> None:
    converted = converted_layer(method_name, layer, option)
    expected = reference_outputs(layer)
    for name, x in make_inputs(SHAPES[layer]).items():
        actual = converted(x)
        assert actual.shape == expected[name].shape
        assert actual.dtype == expected[name].dtype


@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_conversion_is_deterministic_and_leaves_the_layer_alone(
    method_name: str, layer: str, option: Option
) -> None:
    method = get_method(method_name)
    original = make_layer(layer)
    before = {k: v.clone() for k, v in original.state_dict().items()}
    fresh = convert(method, original, option).state_dict()
    assert_states_equal(original.state_dict(), before)
    # An independent conversion of an equal layer (which may have been called since).
    assert_states_equal(fresh, converted_layer(method_name, layer, option).state_dict())
    method.check(SHAPES[layer], option, LAYER_NAME)  # grid options are valid options


@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_cost_is_the_bytes_of_the_state(method_name: str, layer: str, option: Option) -> None:
    method = get_method(method_name)
    shape = SHAPES[layer]
    cost = method.cost(shape, option)
    converted = converted_layer(method_name, layer, option)
    assert cost.bytes == state_bytes(converted)
    stored = getattr(converted, "stored_weight_bytes", None)
    if stored is not None:
        assert cost.weight_bytes == stored()
    for x in make_inputs(shape).values():  # a call may change the in-memory layout
        converted(x)
        assert cost.bytes == state_bytes(converted)
        if stored is not None:
            assert cost.weight_bytes == stored()


@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_scratch_used_is_what_the_module_declares(
    method_name: str, layer: str, option: Option
) -> None:
    """The dequantisation scratch a call grows (which the memory prediction counts) is at
    most what the module's parts declare through ``scratch_needs``."""
    converted = converted_layer(method_name, layer, option)
    declared: dict[str, int] = {}
    for module in converted.modules():
        needs = getattr(module, "scratch_needs", None)
        for slot, nbytes in (needs(torch.float32) if callable(needs) else {}).items():
            declared[slot] = max(declared.get(slot, 0), nbytes)
    workspace.release()
    for x in make_inputs(SHAPES[layer]).values():
        converted(x)
    assert workspace.held_bytes() <= sum(declared.values())


@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_safetensors_round_trip_is_exact(method_name: str, layer: str, option: Option) -> None:
    method = get_method(method_name)
    shape = SHAPES[layer]
    inputs = make_inputs(shape)
    converted = converted_layer(method_name, layer, option)
    outputs = {name: converted(x) for name, x in inputs.items()}

    blob = save_safetensors(converted.state_dict())
    restored = method.empty(shape, option)
    restored.load_state_dict(load_safetensors(blob), strict=True)
    assert save_safetensors(restored.state_dict()) == blob  # bit-exact
    for name, x in inputs.items():
        assert torch.equal(restored(x), outputs[name]), name
    assert save_safetensors(restored.state_dict()) == blob  # still, after the calls


@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_outlier_row_and_zero_row(method_name: str, layer: str, option: Option) -> None:
    """Row 0 of the weight is scaled by 1000 and row 1 is zero: no NaN/inf anywhere, and the
    outlier does not spoil the other rows."""
    method = get_method(method_name)
    shape = SHAPES[layer]
    original = make_layer(layer)
    with torch.no_grad():
        original.weight[0] *= 1000.0
        original.weight[1] = 0.0
    converted = convert(method, original, option)
    tolerance = error_tolerance(method, shape, option)
    for x in make_inputs(shape).values():
        actual, expected = converted(x), original(x)
        assert torch.all(torch.isfinite(actual))
        if shape.kind == "linear":  # weight rows are output features
            others = actual[..., 2:], expected[..., 2:]
        else:  # weight rows are looked up
            plain = x > 1
            others = actual[plain], expected[plain]
        assert relative_error(*others) < tolerance


@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_relative_error_within_bit_width_tolerance(
    method_name: str, layer: str, option: Option
) -> None:
    method = get_method(method_name)
    shape = SHAPES[layer]
    converted = converted_layer(method_name, layer, option)
    tolerance = error_tolerance(method, shape, option)
    expected = reference_outputs(layer)
    for name, x in make_inputs(shape).items():
        error = relative_error(converted(x), expected[name])
        assert error < tolerance, f"{name}: {error:.4f} >= {tolerance:.4f}"


KERNEL_OF_FORMAT = {"int8_weight_only": "int8_matmul", "int4_weight_only": "int4_matmul"}


@pytest.mark.parametrize(
    CASE_ARGS, [case for case in CASES if SHAPES[case.values[1]].kind == "linear"]
)
def test_runtime_format_is_the_path_taken(
    method_name: str, layer: str, option: Option, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The format the cost model prices is the one the converted layer runs: a kernel for a
    few tokens when it names one, never a kernel when it says dense or dequantize."""
    method = get_method(method_name)
    shape = SHAPES[layer]
    converted = converted_layer(method_name, layer, option)
    called: list[str] = []
    for kernel in KERNEL_OF_FORMAT.values():
        real = getattr(kernels, kernel)
        monkeypatch.setattr(
            kernels, kernel, lambda *args, _k=kernel, _f=real: called.append(_k) or _f(*args)
        )
    inputs = make_inputs(shape)
    converted(inputs["many"])
    assert called == []  # many tokens: the float path whatever the format
    converted(inputs["few"])
    fmt = method.runtime_format(shape, option)
    expected = [KERNEL_OF_FORMAT[fmt]] if fmt in KERNEL_OF_FORMAT else []
    assert called == expected, fmt


# --- refusals with a helpful message -----------------------------------------------------


def integer_methods() -> list[str]:
    """Methods whose options have ``bits`` and ``group_size`` fields."""
    return [
        name
        for name, method in sorted(registered_methods().items())
        if {"bits", "group_size"} <= {f.name for f in dataclasses.fields(method.option_type)}
    ]


def base_option(method: Method, shape: LayerShape) -> Option:
    return method.grid(shape)[0]


def allowed_numbers(message: str) -> list[int]:
    assert "allowed" in message, message
    return [int(n) for n in re.findall(r"-?\d+", message.split("allowed", 1)[1])]


def bad_group_for(cols: int) -> int:
    return next(g for g in (24, 48, 96, 100, 7) if cols % g)


@pytest.mark.parametrize("layer", list(SHAPES))
@pytest.mark.parametrize("method_name", integer_methods())
def test_check_refuses_a_group_size_that_does_not_divide_the_width(
    method_name: str, layer: str
) -> None:
    method = get_method(method_name)
    shape = SHAPES[layer]
    if not method.supports(shape):
        pytest.skip(f"{method_name} does not take {shape.kind} layers")
    base = base_option(method, shape)
    bad = dataclasses.replace(base, group_size=bad_group_for(shape.cols))
    with pytest.raises(OptionError) as info:
        method.check(shape, bad, LAYER_NAME)
    message = str(info.value)
    assert LAYER_NAME in message
    assert str(bad.group_size) in message
    allowed = allowed_numbers(message)
    assert bad.group_size not in allowed
    assert allowed, message
    for group in allowed:
        method.check(shape, dataclasses.replace(base, group_size=group), LAYER_NAME)


@pytest.mark.parametrize("bits", [0, 9])
@pytest.mark.parametrize("layer", list(SHAPES))
@pytest.mark.parametrize("method_name", integer_methods())
def test_check_refuses_a_bit_width_outside_the_allowed_list(
    method_name: str, layer: str, bits: int
) -> None:
    method = get_method(method_name)
    shape = SHAPES[layer]
    if not method.supports(shape):
        pytest.skip(f"{method_name} does not take {shape.kind} layers")
    base = base_option(method, shape)
    with pytest.raises(OptionError) as info:
        method.check(shape, dataclasses.replace(base, bits=bits), LAYER_NAME)
    message = str(info.value)
    assert LAYER_NAME in message
    allowed = allowed_numbers(message)
    assert allowed, message
    assert bits not in allowed
    for good in allowed:
        method.check(shape, dataclasses.replace(base, bits=good), LAYER_NAME)


@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_calibration_is_demanded_when_needed(method_name: str, layer: str, option: Option) -> None:
    """A method that needs statistics refuses to convert without them, naming the option."""
    method = get_method(method_name)
    if not method.needs_calibration(option):
        assert method.observer(make_layer(layer), option) is None
        return
    with pytest.raises(OptionError) as info:
        method.convert(make_layer(layer), option, None)
    assert option.label in str(info.value) and "calibration" in str(info.value)


def test_every_registered_method_is_in_the_suite() -> None:
    """Each method takes at least one of the layers and offers it at least one option."""
    names = {case.values[0] for case in CASES}
    assert names == set(registered_methods())
    assert {"rtn", "none"} <= names
