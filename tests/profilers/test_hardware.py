"""Hardware specs as data (profilers.hardware)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profilers.hardware import HardwareSpec, KernelSpec, RuntimePrices


def example_spec() -> HardwareSpec:
    return HardwareSpec(
        name="box",
        kind="gpu",
        description="a made-up accelerator",
        memory_bytes=80 * 2**30,
        bandwidth=3.0e12,
        peak_flops={"float16": 9.0e14, "bfloat16": 9.0e14, "float32": 6.0e13},
        dense_dtype="float16",
        efficiency=0.7,
        op_overhead_s=8e-6,
        kernels={
            "int8_weight_only": KernelSpec("bfloat16", 16, 0.4, "datasheet"),
            "int4_weight_only": KernelSpec("float16", None, 0.3, "guess"),
        },
        sources={"bandwidth": "datasheet", "peak_flops": "datasheet"},
        probed={"gpu": {"name": "box", "capability": "9.0"}, "cores": 132},
    )


def test_to_dict_is_plain_data() -> None:
    data = example_spec().to_dict()
    assert data["kernels"]["int8_weight_only"] == {
        "compute_dtype": "bfloat16",
        "max_tokens": 16,
        "efficiency": 0.4,
        "source": "datasheet",
    }
    json.dumps(data)  # nothing but JSON types


def test_round_trip_keeps_everything_including_kernels() -> None:
    spec = example_spec()
    back = HardwareSpec.from_dict(spec.to_dict())
    assert back == spec
    assert all(isinstance(k, KernelSpec) for k in back.kernels.values())
    assert back.kernels["int4_weight_only"].max_tokens is None


def test_round_trip_through_json() -> None:
    spec = example_spec()
    assert HardwareSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_from_dict_does_not_change_its_argument() -> None:
    data = example_spec().to_dict()
    before = copy.deepcopy(data)
    HardwareSpec.from_dict(data)
    assert data == before


def test_from_dict_fills_defaults_and_makes_peaks_floats() -> None:
    spec = HardwareSpec.from_dict(
        {
            "name": "minimal",
            "kind": "cpu",
            "description": "",
            "memory_bytes": 1024,
            "bandwidth": 1e10,
            "peak_flops": {"float32": 10**11},
        }
    )
    assert spec.kernels == {}
    assert spec.dense_dtype == "float32"
    assert isinstance(spec.peak_flops["float32"], float)
    assert spec.peak("float32") == 1e11


def test_from_dict_rejects_unknown_fields() -> None:
    data = example_spec().to_dict()
    data["clock_hz"] = 1e9
    with pytest.raises(TypeError):
        HardwareSpec.from_dict(data)


def test_peak_of_a_listed_dtype() -> None:
    spec = example_spec()
    assert spec.peak("float32") == 6.0e13
    assert spec.peak("bfloat16") == 9.0e14


@pytest.mark.parametrize("dtype", ["float64", "int8", "float8_e4m3fn"])
def test_peak_of_an_unlisted_dtype_falls_back_to_the_dense_dtype(dtype: str) -> None:
    spec = example_spec()
    assert spec.dense_dtype == "float16"
    assert spec.peak(dtype) == spec.peak_flops["float16"]


def test_specs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        example_spec().bandwidth = 1.0  # type: ignore[misc]


names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
positive = st.floats(1e-9, 1e18, allow_nan=False, allow_infinity=False)
kernel_specs = st.builds(
    KernelSpec,
    compute_dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
    max_tokens=st.none() | st.integers(1, 4096),
    efficiency=st.floats(0.01, 1.0),
    source=names,
)
hardware_specs = st.builds(
    HardwareSpec,
    name=names,
    kind=st.sampled_from(["cpu", "gpu"]),
    description=names,
    memory_bytes=st.integers(1, 2**50),
    bandwidth=positive,
    peak_flops=st.dictionaries(
        st.sampled_from(["float32", "bfloat16", "float16"]), positive, min_size=1
    ),
    efficiency=st.floats(0.01, 1.0),
    op_overhead_s=st.floats(0.0, 1e-3),
    kernels=st.dictionaries(
        st.sampled_from(["int8_weight_only", "int4_weight_only"]), kernel_specs
    ),
    sources=st.dictionaries(names, names, max_size=3),
    probed=st.dictionaries(names, st.integers() | names | st.none(), max_size=3),
).map(lambda spec: dataclasses.replace(spec, dense_dtype=next(iter(spec.peak_flops))))


@settings(max_examples=40, deadline=None)
@given(spec=hardware_specs)
def test_any_spec_survives_a_json_round_trip(spec: HardwareSpec) -> None:
    assert HardwareSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_a_runtime_is_priced_with_its_own_figures_over_the_devices() -> None:
    own = RuntimePrices(
        op_overhead_s=1e-6,
        peak_flops={"int8": 2e14},
        kernels={"int4_weight_only": KernelSpec("int8", None, 0.9, "fitted")},
        sources={"op_overhead_s": "fitted in that runtime"},
    )
    spec = dataclasses.replace(example_spec(), runtimes={"llama.cpp": own})
    priced = spec.for_runtime("llama.cpp")
    assert priced.runtime == "llama.cpp" and priced.runtimes == {}
    assert priced.op_overhead_s == 1e-6 and priced.efficiency == spec.efficiency
    assert priced.peak("int8") == 2e14 and priced.peak("float16") == spec.peak("float16")
    assert priced.kernels["int4_weight_only"].efficiency == 0.9
    assert priced.kernels["int8_weight_only"] == spec.kernels["int8_weight_only"]
    assert priced.sources["op_overhead_s"] == "fitted in that runtime"
    assert priced.sources["bandwidth"] == "datasheet"
    other = spec.for_runtime("onnxruntime")  # no figures of its own: the device's
    assert other == dataclasses.replace(spec, runtime="onnxruntime", runtimes={})


def test_runtime_figures_round_trip_through_plain_data() -> None:
    own = RuntimePrices(efficiency=0.5, kernels={"gguf_block": KernelSpec("int8", None, 0.7)})
    spec = dataclasses.replace(example_spec(), runtimes={"llama.cpp": own})
    data = json.loads(json.dumps(spec.to_dict()))
    assert data["runtimes"] == {
        "llama.cpp": {
            "efficiency": 0.5,
            "kernels": {
                "gguf_block": {
                    "compute_dtype": "int8",
                    "max_tokens": None,
                    "efficiency": 0.7,
                    "source": "",
                }
            },
        }
    }
    assert HardwareSpec.from_dict(data) == spec
    assert "runtimes" not in example_spec().to_dict()


def test_a_runtimes_block_rates_survive_a_round_trip_and_join_the_spec_it_prices() -> None:
    prices = RuntimePrices(op_overhead_s=1e-6, block_rates={"IQ3_S": 0.25, "Q4_0": 1.0})
    spec = dataclasses.replace(example_spec(), runtimes={"llama.cpp": prices})
    again = HardwareSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and "block_rates" not in spec.to_dict()  # only the runtime's
    assert again.for_runtime("llama.cpp").block_rates == {"IQ3_S": 0.25, "Q4_0": 1.0}
    assert again.for_runtime("torch").block_rates == {}
