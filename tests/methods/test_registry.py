"""Tests of methods/registry.py and the option (de)serialisation of methods/base.py."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import pytest
from torch import nn

import methods  # noqa: F401  (its __init__ registers the built-in methods)
from methods import registry
from methods.base import Cost, LayerShape, Method, Observer, Option
from methods.errors import OptionError
from methods.registry import (
    get_method,
    method_of,
    option_from_dict,
    register,
    registered_methods,
)

SHAPES = [
    LayerShape("linear", 48, 64, True),
    LayerShape("linear", 1536, 384, False),
    LayerShape("embedding", 300, 64),
]

GRID_OPTIONS = [
    pytest.param(option, id=f"{name}-{shape.kind}{shape.rows}x{shape.cols}-{option.label}")
    for name, method in sorted(registered_methods().items())
    for shape in SHAPES
    if method.supports(shape)
    for option in method.grid(shape)
]


def test_builtin_methods_are_registered() -> None:
    assert {"rtn", "none"} <= set(registered_methods())


@pytest.mark.parametrize("option", GRID_OPTIONS)
def test_option_round_trips_through_its_dict(option: Option) -> None:
    data = option.to_dict()
    assert data["method"] == option.method
    assert option_from_dict(data) == option
    # and through JSON, as plans store it
    assert option_from_dict(json.loads(json.dumps(data))) == option
    assert method_of(option).option_type is type(option)


def test_option_from_dict_does_not_change_its_argument() -> None:
    data = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}
    copy = dict(data)
    option_from_dict(data)
    assert data == copy


@pytest.mark.parametrize("name", sorted(registered_methods()))
def test_grid_labels_are_unique_within_a_method(name: str) -> None:
    method = get_method(name)
    for shape in SHAPES:
        if method.supports(shape):
            labels = [option.label for option in method.grid(shape)]
            assert len(labels) == len(set(labels))


def test_unknown_method_lists_the_registered_ones() -> None:
    with pytest.raises(OptionError) as info:
        option_from_dict({"method": "no-such-method", "bits": 4})
    message = str(info.value)
    assert "no-such-method" in message
    for name in registered_methods():
        assert repr(name) in message
    with pytest.raises(OptionError, match="no-such-method"):
        get_method("no-such-method")


@pytest.mark.parametrize("name", sorted(registered_methods()))
def test_unknown_fields_list_the_allowed_ones(name: str) -> None:
    option_type = get_method(name).option_type
    with pytest.raises(OptionError) as info:
        option_from_dict({"method": name, "colour": "blue", "zzz": 1})
    message = str(info.value)
    assert "colour" in message and "zzz" in message
    allowed = message.split("allowed:", 1)[1]
    for field in dataclasses.fields(option_type):
        assert repr(field.name) in allowed


@pytest.mark.parametrize("data", [None, 4, "rtn", ["rtn"], {"bits": 4}])
def test_option_without_a_method_is_refused(data: Any) -> None:
    with pytest.raises(OptionError, match="'method' field"):
        option_from_dict(data)


# --- registration ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ToyOption(Option):
    method: ClassVar[str] = "toy"
    level: int = 1


class _Toy(Method):
    name: ClassVar[str] = "toy"
    option_type: ClassVar[type[Option]] = _ToyOption

    def supports(self, shape: LayerShape) -> bool:
        return shape.kind == "linear"

    def check(self, shape: LayerShape, option: Option, layer: str = "layer") -> None:
        return None

    def cost(self, shape: LayerShape, option: Option) -> Cost:
        return Cost(0, 0, 0)

    def grid(self, shape: LayerShape) -> list[Option]:
        return [_ToyOption(1), _ToyOption(2)]

    def convert(
        self, module: nn.Module, option: Option, observer: Observer | None = None
    ) -> nn.Module:
        return module

    def empty(self, shape: LayerShape, option: Option, like: nn.Module | None = None) -> nn.Module:
        return nn.Identity()


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations in the test are undone afterwards."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))


def test_register_makes_a_method_and_its_options_available(scratch_registry: None) -> None:
    toy = register(_Toy())
    assert get_method("toy") is toy
    assert "toy" in registered_methods()
    assert option_from_dict({"method": "toy", "level": 3}) == _ToyOption(3)
    assert method_of(_ToyOption(2)) is toy
    again = register(_Toy())  # re-registration replaces
    assert get_method("toy") is again


def test_registration_does_not_leak_between_tests() -> None:
    assert "toy" not in registered_methods()


def test_registered_methods_is_a_copy(scratch_registry: None) -> None:
    snapshot = registered_methods()
    snapshot["fake"] = snapshot["rtn"]
    assert "fake" not in registered_methods()


def test_a_method_needs_a_name(scratch_registry: None) -> None:
    nameless = _Toy()
    nameless.name = ""  # type: ignore[misc]
    with pytest.raises(ValueError, match="name"):
        register(nameless)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"method": "rtn", "bits": 4.0}, "rtn option field 'bits' must be an integer, got 4.0"),
        ({"method": "rtn", "bits": True}, "'bits' must be an integer, got True"),
        ({"method": "rtn", "symmetric": "no"}, "'symmetric' must be true or false, got 'no'"),
        ({"method": "rtn", "symmetric": 0}, "'symmetric' must be true or false"),
        ({"method": "rtn", "group_size": True}, "'group_size' must be an integer or null"),
        ({"method": "rtn", "group_size": 32.0}, "'group_size' must be an integer or null"),
        ({"method": "gptq", "damp": float("nan")}, "'damp' must be a finite number"),
        ({"method": "gptq", "damp": 10**400}, "'damp' must be a finite number"),
        ({"method": "gptq", "damp": "0.01"}, "'damp' must be a finite number"),
        ({"method": "svd", "fraction": [0.5]}, "'fraction' must be a finite number or null"),
        ({"method": "magnitude", "pattern": 24}, "'pattern' must be a string or null"),
        ({"method": "codebook", "format": None}, "'format' must be a string"),
        ({"method": ["rtn"]}, "an option's method must be a string"),
        ({"method": "rtn", 1: 2}, "unknown field(s) [1]"),
    ],
)
def test_option_fields_have_their_declared_types(data: dict, fragment: str) -> None:
    with pytest.raises(OptionError) as info:
        option_from_dict(data)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_integers_for_float_fields_become_floats() -> None:
    option = option_from_dict({"method": "gptq", "damp": 1})
    assert option.damp == 1.0 and isinstance(option.damp, float)
    assert option_from_dict({"method": "svd", "rank": 8, "fraction": None}).rank == 8


@pytest.mark.parametrize("name", sorted(registered_methods()))
def test_every_grid_option_passes_its_own_field_types(name: str) -> None:
    method = get_method(name)
    for shape in SHAPES:
        if method.supports(shape):
            for option in method.grid(shape):
                assert option_from_dict(json.loads(json.dumps(option.to_dict()))) == option
