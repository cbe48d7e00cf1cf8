"""The shared conformance suite: every registered method x every grid option x a few layers.

Nothing here names a method: a newly registered method (imported by ``methods/__init__.py``)
is picked up at collection time and has to pass the same checks. Errors are held to each
method's ``error_bound``; mutants (a conversion at one bit fewer, or of a dropped weight) prove
that check able to fail. Calibrated methods see 4x the layer's width in tokens and must do no
worse than the uncalibrated method that stores the same bytes in the same format.
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


def runtime_forms(option: Option) -> list[Option]:
    """The forms every registered runtime gives ``option`` on a CPU target whose int8 pair
    sums saturate and on one whose do not (e.g. ONNX Runtime's 8-bit activations, weight
    scales per tensor, pair-safe codes), other than ``option`` itself."""
    from autotune.runtimes import RUNTIMES
    from autotune.targets import get_target

    cpu = get_target("cpu")
    forms: dict[str, Option] = {}
    for runtime in RUNTIMES.values():
        for saturate in (False, True):
            spec = dataclasses.replace(cpu, int8_pairs_saturate=saturate)
            for form in runtime.for_target(spec).forms(option):
                forms.setdefault(form.label, form)
    forms.pop(option.label, None)
    return list(forms.values())


def conformance_cases() -> list[Any]:
    """Every method's grid on every layer it supports, and the runtimes' forms of its first
    grid option."""
    cases = []
    for name, method in sorted(registered_methods().items()):
        for layer, shape in SHAPES.items():
            if not method.supports(shape):
                continue
            grid = method.grid(shape)
            for option in [*grid, *runtime_forms(grid[0])]:
                cases.append(pytest.param(name, layer, option, id=f"{name}-{layer}-{option.label}"))
    return cases


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


CALIBRATION_TOKENS_PER_INPUT = 4  # calibration tokens per input feature, at least


def calibration_inputs(shape: LayerShape, seed: int = 11) -> list[torch.Tensor]:
    """Gaussian activations, ``4 x cols`` tokens and more in batches of 64 (so that the
    calibration Hessian of every layer is well conditioned); for an embedding, lookups of
    every row."""
    if shape.kind == "embedding":
        return [torch.arange(shape.rows)]
    generator = torch.Generator().manual_seed(seed)
    tokens = CALIBRATION_TOKENS_PER_INPUT * shape.cols + 64
    return list(torch.randn(tokens, shape.cols, generator=generator).split(64))


def convert(
    method: Method,
    module: nn.Module,
    option: Option,
    calibration: list[torch.Tensor] | None = None,
    importance: torch.Tensor | None = None,
) -> nn.Module:
    """Both phases: methods that need statistics first observe ``calibration`` (by default
    :func:`calibration_inputs`) through a forward hook, and the Fisher information for an
    output metric weighted by ``importance`` (per output feature; by default equal)."""
    observer = None
    if method.needs_calibration(option):
        shape = LayerShape.of(module)
        batches = calibration_inputs(shape) if calibration is None else calibration
        observer = method.observer(module, option)
        assert observer is not None
        handle = module.register_forward_hook(observer.observe)
        with torch.no_grad():
            for x in batches:
                module(x)
        handle.remove()
        if observer.needs_fisher:
            observer.observe_fisher(gauss_newton_diagonal(module, batches, importance))
    return method.convert(module, option, observer)


def test_calibration_covers_four_tokens_per_input_feature() -> None:
    for shape in SHAPES.values():
        tokens = sum(x.shape[0] for x in calibration_inputs(shape))
        assert tokens >= (shape.rows if shape.kind == "embedding" else 4 * shape.cols)


def gauss_newton_diagonal(
    module: nn.Module,
    batches: list[torch.Tensor],
    importance: torch.Tensor | None = None,
    samples: int = 4,
) -> torch.Tensor:
    """The weight's diagonal Gauss-Newton (Fisher) information for the output metric
    ``diag(importance**2)`` (the unit metric by default): the mean of ``grad^2`` of ``v . y``
    over Gaussian ``v`` of that covariance, on the calibration batches."""
    generator = torch.Generator().manual_seed(21)
    total = torch.zeros_like(module.weight, dtype=torch.float32)
    weight = module.weight
    flag = weight.requires_grad
    weight.requires_grad_(True)
    try:
        for x in batches:
            y = module(x)
            for _ in range(samples):
                v = torch.randn(y.shape, generator=generator)
                if importance is not None:
                    v = v * importance
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
    """The method's own bound for Gaussian layers (see ``Method.error_bound``): for integer
    and codebook formats, 1.4 times the expected error of a uniform quantiser with the
    option's bits, group and symmetry; measured errors are 0.7 to 0.88 of it."""
    return method.error_bound(shape, option)


def assert_error_within_bound(
    method: Method, layer: str, option: Option, converted: nn.Module, original: nn.Module
) -> None:
    """The suite's error check: on every input of :func:`make_inputs`, the relative error of
    ``converted``'s output against ``original``'s is below the method's bound for ``option``."""
    shape = SHAPES[layer]
    tolerance = error_tolerance(method, shape, option)
    with torch.no_grad():
        for name, x in make_inputs(shape).items():
            error = relative_error(converted(x), original(x))
            assert error < tolerance, f"{name}: {error:.4f} >= {tolerance:.4f}"


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
def test_a_simulated_weight_is_the_converted_modules_weight(
    method_name: str, layer: str, option: Option
) -> None:
    """Where a method finds an option's float weight without converting, it is exactly the
    weight the converted module computes with."""
    from profilers.proxies import effective_weight

    method = get_method(method_name)
    simulated = method.simulated_weight(make_layer(layer), option)
    if simulated is None:
        return
    expected = effective_weight(converted_layer(method_name, layer, option))
    assert simulated.dtype == expected.dtype and torch.equal(simulated, expected)
    rows = torch.tensor([expected.shape[0] - 1, 0, 2])
    some = method.simulated_weight(make_layer(layer), option, rows=rows)
    assert some is not None and torch.equal(some, expected[rows])


@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_a_stand_in_is_uncalibrated_and_stored_alike(
    method_name: str, layer: str, option: Option
) -> None:
    method = get_method(method_name)
    stand_in = method.stand_in(option)
    if stand_in is None:
        return
    other, shape = get_method(stand_in.method), SHAPES[layer]
    assert not other.needs_calibration(stand_in)
    assert other.cost(shape, stand_in).bytes == method.cost(shape, option).bytes
    assert other.runtime_format(shape, stand_in) == method.runtime_format(shape, option)


@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_a_declared_input_rounding_is_what_the_module_computes(
    method_name: str, layer: str, option: Option
) -> None:
    """Where a method declares how its linear module rounds inputs, the module's output is
    its float weight times the rounded inputs (what weight-space estimates assume)."""
    from profilers.proxies import effective_weight

    rounding = get_method(method_name).input_rounding(option)
    if rounding is None or SHAPES[layer].kind != "linear":
        return
    module = converted_layer(method_name, layer, option)
    weight, bias = effective_weight(module), getattr(module, "bias", None)
    for x in make_inputs(SHAPES[layer]).values():
        flat = x.reshape(-1, x.shape[-1])
        expected = torch.nn.functional.linear(rounding.apply(flat), weight, bias)
        with torch.no_grad():
            got = module(x).reshape(expected.shape)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
        plain = torch.nn.functional.linear(flat, weight, bias)
        if rounding.name != "F16":  # 8-bit blocks change the product measurably
            assert not torch.allclose(got, plain, rtol=1e-5, atol=1e-6)


def test_some_methods_simulate_weights_and_name_stand_ins() -> None:
    cases = [case.values for case in CASES]
    assert any(
        get_method(n).simulated_weight(make_layer(layer), o) is not None for n, layer, o in cases
    )
    assert any(get_method(n).stand_in(o) is not None for n, _, o in cases)
    assert any(get_method(n).input_rounding(o) is not None for n, _, o in cases)


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
    outlier does not spoil the other rows (unless the option has one scale for the whole
    weight, which the outlier sets by design)."""
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
        if getattr(option, "per_tensor", False):
            continue
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
    converted = converted_layer(method_name, layer, option)
    assert_error_within_bound(get_method(method_name), layer, option, converted, make_layer(layer))


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


# --- mutants the suite's error check must reject ------------------------------------------

MUTANT_LAYERS = ("linear64to48", "embedding300x64")
DROPPED_WEIGHT_ERROR = 0.99  # the relative error of a zero weight (at least, with the bias)


def one_bit_fewer(method: Method, shape: LayerShape, option: Option) -> Option | None:
    """The option at one bit fewer, where that is a valid option and the method's bound says
    a bit matters (it grows by half at least: the quantiser, not pruning or truncation,
    makes the error); ``None`` otherwise."""
    bits = getattr(option, "bits", None)
    if not isinstance(bits, int) or bits >= 16:
        return None
    fewer = dataclasses.replace(option, bits=bits - 1)
    try:
        method.check(shape, fewer)
    except OptionError:
        return None
    if method.error_bound(shape, fewer) < 1.5 * method.error_bound(shape, option):
        return None
    return fewer


BIT_MUTANT_CASES = [
    case
    for case in CASES
    if case.values[1] in MUTANT_LAYERS
    and one_bit_fewer(get_method(case.values[0]), SHAPES[case.values[1]], case.values[2])
]
ZERO_MUTANT_CASES = [
    case
    for case in CASES
    if case.values[1] in MUTANT_LAYERS
    and get_method(case.values[0]).error_bound(SHAPES[case.values[1]], case.values[2])
    < DROPPED_WEIGHT_ERROR
]


@pytest.mark.parametrize(CASE_ARGS, BIT_MUTANT_CASES)
def test_the_error_check_rejects_a_conversion_at_one_bit_fewer(
    method_name: str, layer: str, option: Option
) -> None:
    method = get_method(method_name)
    fewer = one_bit_fewer(method, SHAPES[layer], option)
    assert fewer is not None
    mutant = convert(method, make_layer(layer), fewer)
    with pytest.raises(AssertionError):
        assert_error_within_bound(method, layer, option, mutant, make_layer(layer))


@pytest.mark.parametrize(CASE_ARGS, ZERO_MUTANT_CASES)
def test_the_error_check_rejects_a_conversion_that_drops_the_weight(
    method_name: str, layer: str, option: Option
) -> None:
    method = get_method(method_name)
    dropped = make_layer(layer)
    with torch.no_grad():
        dropped.weight.zero_()
    mutant = convert(method, dropped, option)
    with pytest.raises(AssertionError):
        assert_error_within_bound(method, layer, option, mutant, make_layer(layer))


def test_mutants_reach_every_method() -> None:
    """Every method faces the dropped weight on some option, and every method held to the
    default quantiser bound (options with ``bits`` and ``group_size``) faces one bit fewer
    on every option of more than 2 bits it offers the mutants' layers."""
    assert {case.values[0] for case in ZERO_MUTANT_CASES} == set(registered_methods())
    for name, method in registered_methods().items():
        fields = {f.name for f in dataclasses.fields(method.option_type)}
        if (
            type(method).error_bound is not Method.error_bound
            or not {
                "bits",
                "group_size",
            }
            <= fields
        ):
            continue
        for layer in MUTANT_LAYERS:
            shape = SHAPES[layer]
            if not method.supports(shape):
                continue
            for option in method.grid(shape):
                fewer_valid = True
                try:
                    method.check(shape, dataclasses.replace(option, bits=option.bits - 1))
                except OptionError:
                    fewer_valid = False
                if option.bits > 2 and fewer_valid:
                    assert one_bit_fewer(method, shape, option) is not None, (name, option)


# --- calibrated methods against their uncalibrated twins ----------------------------------


def state_layout(module: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(k, tuple(v.shape), v.dtype) for k, v in module.state_dict().items()]


def uncalibrated_twin(method: Method, shape: LayerShape, option: Option) -> Option | None:
    """An uncalibrated option that stores the same thing: one of the method's own grid (the
    closest first), or
    one of another method built from the values of the fields both option types have; valid,
    with equal bytes and runtime format,
    the same module type and state layout (names, shapes, dtypes). ``None`` when no
    registered method has one."""
    values = {f.name: getattr(option, f.name) for f in dataclasses.fields(option)}
    stored = method.empty(shape, option)
    own = [o for o in method.grid(shape) if not method.needs_calibration(o)]
    differing = lambda o: sum(getattr(o, k) != v for k, v in values.items())  # noqa: E731
    candidates: list[tuple[Method, Option]] = [(method, o) for o in sorted(own, key=differing)]
    for _, other in sorted(registered_methods().items()):
        if other is method or not other.supports(shape):
            continue
        names = {f.name for f in dataclasses.fields(other.option_type)}
        try:
            twin = other.option_type(**{k: v for k, v in values.items() if k in names})
            other.check(shape, twin)
        except (OptionError, TypeError):
            continue
        candidates.append((other, twin))
    for other, twin in candidates:
        if (
            not other.needs_calibration(twin)
            and other.cost(shape, twin) == method.cost(shape, option)
            and other.runtime_format(shape, twin) == method.runtime_format(shape, option)
            and type(other.empty(shape, twin)) is type(stored)
            and state_layout(other.empty(shape, twin)) == state_layout(stored)
        ):
            return twin
    return None


def twin_cases() -> list[Any]:
    """Calibrated cases with a twin: every option on the small linear layer, the first on
    the others (they take seconds each)."""
    cases, seen = [], set()
    for case in CASES:
        name, layer, option = case.values
        method = get_method(name)
        if not method.needs_calibration(option):
            continue
        if layer != "linear64to48" and (name, layer) in seen:
            continue
        if uncalibrated_twin(method, SHAPES[layer], option) is not None:
            cases.append(case)
            seen.add((name, layer))
    return cases


TWIN_CASES = twin_cases()


@functools.cache
def correlated_mixing(cols: int) -> torch.Tensor:
    """Activations as a layer sees them: features of unequal scale (log-uniform over 20x,
    in random order) and correlated (a random mixing)."""
    generator = torch.Generator().manual_seed(7)
    mixing = torch.eye(cols) + torch.randn(cols, cols, generator=generator) / cols**0.5
    scales = torch.logspace(0.0, 1.3, cols)[torch.randperm(cols, generator=generator)]
    return mixing * scales


@functools.cache
def output_importance(rows: int) -> torch.Tensor:
    """Unequal weights of the output features in the error (log-uniform over 10x), as the
    rest of a network gives them; the Fisher information sees them."""
    generator = torch.Generator().manual_seed(8)
    return torch.logspace(0.0, 1.0, rows)[torch.randperm(rows, generator=generator)]


def correlated_inputs(cols: int, tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, cols, generator=generator) @ correlated_mixing(cols)


@pytest.mark.parametrize(CASE_ARGS, TWIN_CASES)
def test_a_calibrated_method_beats_its_uncalibrated_twin(
    method_name: str, layer: str, option: Option
) -> None:
    """On correlated activations, calibrated on 4x the layer's width in tokens and judged on
    other tokens (output features weighted by their importance), a calibrated method's
    output error is no larger than that of the uncalibrated method storing the same bytes
    in the same format."""
    method = get_method(method_name)
    shape = SHAPES[layer]
    twin = uncalibrated_twin(method, shape, option)
    assert twin is not None
    assert method.cost(shape, option).bytes == get_method(twin.method).cost(shape, twin).bytes
    calibration = list(correlated_inputs(shape.cols, 4 * shape.cols, seed=31).split(64))
    held_out = correlated_inputs(shape.cols, 256, seed=32)
    importance = output_importance(shape.rows)
    original = make_layer(layer)
    calibrated = convert(method, original, option, calibration, importance)
    plain = convert(get_method(twin.method), original, twin)
    with torch.no_grad():
        reference = original(held_out) * importance
        error = relative_error(calibrated(held_out) * importance, reference)
        twin_error = relative_error(plain(held_out) * importance, reference)
    assert error <= twin_error, f"{option.label} {error:.4f} > {twin.label} {twin_error:.4f}"


def test_calibrated_methods_have_twins() -> None:
    """Every calibrated method but those storing something no uncalibrated method stores
    (outlier columns, int8 activations) is compared with a twin."""
    calibrated = {
        name
        for name, method in registered_methods().items()
        if any(
            method.needs_calibration(o)
            for s in SHAPES.values()
            for o in method.grid(s)
            if method.supports(s)
        )
    }
    twinned = {case.values[0] for case in TWIN_CASES}
    assert twinned <= calibrated
    assert len(twinned) >= len(calibrated) - 2, sorted(calibrated - twinned)
