from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from autotune.errors import TargetError
from autotune.targets import aliases_by_target, get_target, list_targets, load_registry
from profilers.hardware import HardwareSpec
from profilers.kernel_support import allowed_kernel_entries

REQUIRED = ["cpu", "a100-40gb", "a100-80gb", "h100", "l4", "t4", "a10", "rtx4090"]


def test_registry_has_the_required_targets() -> None:
    names = {spec.name for spec in list_targets()}
    assert set(REQUIRED) <= names


@pytest.mark.parametrize("name", REQUIRED)
def test_every_figure_has_a_source(name: str) -> None:
    spec = get_target(name)
    for figure in ("memory_bytes", "bandwidth", "peak_flops"):
        assert spec.sources.get(figure), f"{name}: no source for {figure}"
    for kernel in spec.kernels.values():
        assert kernel.source
    if spec.int8_pairs_saturate:
        assert spec.sources.get("int8_pairs_saturate"), f"{name}: no source for saturation"
    assert spec.memory_bytes > 0 and spec.bandwidth > 0
    assert all(v > 0 for v in spec.peak_flops.values())


def test_names_are_case_insensitive_and_aliases_resolve() -> None:
    assert get_target("H100").name == "h100"
    assert get_target("a100").name in {"a100-40gb", "a100-80gb"}


def test_unknown_target_lists_known_ones() -> None:
    with pytest.raises(TargetError) as info:
        get_target("tpu-v9")
    assert "unknown target 'tpu-v9'" in str(info.value)
    assert "cpu" in str(info.value) and "local" in str(info.value)


@pytest.mark.parametrize(
    ("typed", "meant"), [("a10O", "a100"), ("h10", "h100"), ("H100-SXN", "h100-sxm")]
)
def test_a_near_miss_gets_a_suggestion(typed: str, meant: str) -> None:
    with pytest.raises(TargetError) as info:
        get_target(typed)
    message = str(info.value)
    assert message.startswith(f"unknown target {typed!r}; did you mean ")
    suggested = message.split("did you mean ", 1)[1].split("?", 1)[0]
    assert repr(meant) in suggested and "known targets: " in message


def test_a_far_miss_gets_no_suggestion() -> None:
    with pytest.raises(TargetError) as info:
        get_target("quantum-9000")
    assert "did you mean" not in str(info.value)


def test_aliases_by_target_includes_user_files(tmp_path: Path) -> None:
    file = tmp_path / "mine.json"
    file.write_text(json.dumps({"targets": [_entry("my-gpu")], "aliases": {"mine": "my-gpu"}}))
    named = aliases_by_target(*load_registry([file]))
    assert named["my-gpu"] == ["mine"]
    assert named["h100"] == ["h100-80gb", "h100-sxm"] and named["t4"] == []


def _entry(name: str) -> dict:
    return {
        "name": name,
        "kind": "gpu",
        "description": "test accelerator",
        "memory_bytes": 1 << 30,
        "bandwidth": 1e11,
        "peak_flops": {"float16": 1e13},
        "sources": {"all": "test"},
    }


def test_user_target_file_adds_and_overrides(tmp_path: Path) -> None:
    file = tmp_path / "mine.json"
    override = _entry("t4") | {"bandwidth": 2e11}
    file.write_text(json.dumps({"targets": [_entry("my-gpu"), override]}))
    specs, _ = load_registry([file])
    assert specs["my-gpu"].bandwidth == 1e11
    assert specs["t4"].bandwidth == 2e11
    assert isinstance(get_target("my-gpu", [file]), HardwareSpec)


def test_single_entry_file_is_accepted(tmp_path: Path) -> None:
    file = tmp_path / "one.json"
    file.write_text(json.dumps(_entry("solo")))
    assert get_target("solo", [file]).name == "solo"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"targets": [{"name": "x"}]}), "targets/0"),
        (json.dumps({"targets": [_entry("bad") | {"bandwidth": -1}]}), "bandwidth"),
        (json.dumps({"targets": [_entry("local")]}), "reserved"),
    ],
)
def test_bad_target_files_fail_with_one_line(tmp_path: Path, content: str, fragment: str) -> None:
    file = tmp_path / "bad.json"
    file.write_text(content)
    with pytest.raises(TargetError) as info:
        load_registry([file])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_target_file() -> None:
    with pytest.raises(TargetError, match="does not exist"):
        load_registry(["/nonexistent/targets.json"])


def test_local_probes_this_machine() -> None:
    spec = get_target("local")
    assert spec.name == "local"
    assert spec.probed["logical_cores"] >= 1
    assert spec.bandwidth > 0 and spec.peak("float32") > 0


def test_a_misspelt_kernel_name_is_refused_listing_the_allowed_ones(tmp_path: Path) -> None:
    file = tmp_path / "typo.json"
    kernel = {"compute_dtype": "bfloat16", "max_tokens": 32, "efficiency": 0.5}
    file.write_text(json.dumps(_entry("typo-gpu") | {"kernels": {"int4_weight_onyl": kernel}}))
    with pytest.raises(TargetError) as info:
        load_registry([file])
    message = str(info.value)
    assert "unknown kernel 'int4_weight_onyl'" in message and "targets/0/kernels" in message
    for allowed in allowed_kernel_entries():
        assert allowed in message
    assert "\n" not in message


def test_every_builtin_kernel_name_is_known() -> None:
    for spec in list_targets():
        assert set(spec.kernels) <= set(allowed_kernel_entries()), spec.name
        for prices in spec.runtimes.values():
            assert set(prices.kernels) <= set(allowed_kernel_entries()), spec.name


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        ({"llama.cp": {"op_overhead_s": 1e-6}}, "unknown runtime 'llama.cp'"),
        (
            {"llama.cpp": {"kernels": {"gguf_blok": {"compute_dtype": "int8", "efficiency": 1}}}},
            "targets/0/runtimes/llama.cpp/kernels: unknown kernel 'gguf_blok'",
        ),
        (
            {"llama.cpp": {"block_rates": {"IQ3_SS": 0.5}}},
            "targets/0/runtimes/llama.cpp/block_rates: unknown block type 'IQ3_SS'",
        ),
    ],
)
def test_a_misspelt_runtime_or_its_kernel_is_refused(
    tmp_path: Path, section: dict, fragment: str
) -> None:
    file = tmp_path / "typo.json"
    file.write_text(json.dumps(_entry("typo-cpu") | {"runtimes": section}))
    with pytest.raises(TargetError) as info:
        load_registry([file])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_runtimes_figures_in_a_target_file_price_its_plans(tmp_path: Path) -> None:
    from autotune.runtimes import get_runtime

    section = {"llama.cpp": {"op_overhead_s": 2e-6, "sources": {"op_overhead_s": "timed"}}}
    file = tmp_path / "box.json"
    file.write_text(json.dumps(_entry("box") | {"op_overhead_s": 3e-5, "runtimes": section}))
    spec = get_target("box", [file])
    assert get_runtime("llama.cpp").spec_for(spec).op_overhead_s == 2e-6
    assert get_runtime("torch").spec_for(spec).op_overhead_s == 3e-5
    assert get_runtime("llama.cpp").spec_for(spec).sources["op_overhead_s"] == "timed"


def test_the_cpu_targets_llama_cpp_figures_say_where_they_came_from() -> None:
    prices = get_target("cpu").runtimes["llama.cpp"]
    assert prices.op_overhead_s is not None and prices.op_overhead_s < 1e-5
    for figure in ("efficiency", "op_overhead_s"):
        assert "--runtime llama.cpp" in prices.sources[figure]
    assert "--runtime llama.cpp" in prices.kernels["gguf_block"].source


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"name": "x", "bandwidth": 1e400}', "1e400 is out of range"),
        ('{"name": "x", "bandwidth": Infinity}', "Infinity is not a JSON number"),
        ("[" * 100_000 + "]" * 100_000, "nests arrays and objects more than 64 deep"),
        (json.dumps(_entry("x") | {"bandwidth": 1e-300}), "targets/0/bandwidth: 1e-300 is less"),
        (
            json.dumps(_entry("x") | {"bandwidth": 1e15}),
            "bandwidth: 1000000000000000.0 is greater than the maximum",
        ),
        (json.dumps(_entry("x") | {"memory_bytes": 1e10}), "memory_bytes: 10000000000.0 is not"),
        (json.dumps(_entry("x") | {"memory_bytes": 10**16}), "memory_bytes"),
        (json.dumps(_entry("x") | {"peak_flops": {"float16": 1e30}}), "peak_flops/float16"),
        (json.dumps(_entry("x") | {"peak_flops": {"float16": 1.0}}), "peak_flops/float16"),
        (json.dumps(_entry("x") | {"op_overhead_s": 3600}), "op_overhead_s"),
        (json.dumps(_entry("x") | {"kernels": {"dequantize": {"x": 1}}}), "kernels/dequantize"),
        (
            json.dumps(_entry("x") | {"runtimes": {"llama.cpp": {"op_overhead_s": -1}}}),
            "runtimes/llama.cpp/op_overhead_s",
        ),
        (
            json.dumps(_entry("x") | {"runtimes": {"llama.cpp": {"efficiency": 2}}}),
            "runtimes/llama.cpp/efficiency",
        ),
        (
            json.dumps(_entry("x") | {"runtimes": {"llama.cpp": {"speed": 2}}}),
            "runtimes/llama.cpp",
        ),
    ],
)
def test_target_figures_are_bounded(tmp_path: Path, content: str, fragment: str) -> None:
    file = tmp_path / "bad.json"
    file.write_text(content)
    started = time.perf_counter()
    with pytest.raises(TargetError) as info:
        get_target("x", [file])
    assert time.perf_counter() - started < 1.0
    assert fragment in str(info.value) and str(file) in str(info.value)
    assert "\n" not in str(info.value)


def test_a_latin1_target_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "latin.json"
    entry = _entry("x") | {"description": "Gerät"}
    file.write_bytes(json.dumps(entry, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(TargetError, match=r"latin.json is not UTF-8 text \(byte \d+ is 0xe4\)"):
        load_registry([file])
