"""Roofline latency of layers and of the rest of a model (profilers.roofline)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from methods.base import LayerShape, Option
from methods.errors import OptionError
from methods.keep import KeepOption
from methods.registry import method_of
from methods.rtn import QuantOption
from profilers.hardware import HardwareSpec, KernelSpec
from profilers.roofline import RestOfModel, layer_latency, priced_kernel, rest_latency

LINEAR = LayerShape("linear", rows=256, cols=512, has_bias=True)
EMBEDDING = LayerShape("embedding", rows=1000, cols=64)

KEEP = KeepOption()
INT8_CH = QuantOption(8, None, True)  # runs on an int8_weight_only kernel
INT8_CH_ASYM = QuantOption(8, None, False)
INT4_G128 = QuantOption(4, 128, False)  # runs on an int4_weight_only kernel
INT8_G32 = QuantOption(8, 32, True)  # no kernel: dequantised
INT2_G32 = QuantOption(2, 32, False)

ALL_OPTIONS: list[Option] = [KEEP] + [
    QuantOption(bits, group, symmetric)
    for bits in (2, 3, 4, 8)
    for group in (None, 32, 64, 128)
    for symmetric in (True, False)
]
TOKEN_LIMIT = 16
HUGE = 1e30


def make_spec(
    *,
    kernels: dict[str, KernelSpec] | None = None,
    bandwidth: float = 1e11,
    peak: dict[str, float] | None = None,
    efficiency: float = 0.5,
    op_overhead_s: float = 1e-6,
) -> HardwareSpec:
    return HardwareSpec(
        name="test",
        kind="cpu",
        description="made up for the tests",
        memory_bytes=2**34,
        bandwidth=bandwidth,
        peak_flops=peak or {"float32": 1e12, "bfloat16": 2e12},
        dense_dtype="float32",
        efficiency=efficiency,
        op_overhead_s=op_overhead_s,
        kernels=kernels or {},
    )


def int8_kernel(efficiency: float, max_tokens: int | None = TOKEN_LIMIT) -> dict[str, KernelSpec]:
    return {"int8_weight_only": KernelSpec("float32", max_tokens, efficiency)}


def valid(shape: LayerShape, option: Option) -> bool:
    try:
        method_of(option).check(shape, option)
    except OptionError:
        return False
    return True


def stored_bytes(shape: LayerShape, option: Option) -> int:
    return method_of(option).cost(shape, option).bytes


# --- which branch a call takes -------------------------------------------------------------


UNBOUNDED_COMPUTE = {"float32": HUGE, "bfloat16": HUGE}


@pytest.mark.parametrize("tokens", [1, 5, TOKEN_LIMIT])
def test_int8_per_channel_runs_on_the_kernel_up_to_its_token_limit(tokens: int) -> None:
    fast = make_spec(kernels=int8_kernel(0.5), op_overhead_s=0.0, peak=UNBOUNDED_COMPUTE)
    slow = make_spec(kernels=int8_kernel(0.005), op_overhead_s=0.0, peak=UNBOUNDED_COMPUTE)
    plain = make_spec(op_overhead_s=0.0, peak=UNBOUNDED_COMPUTE)
    on_fast = layer_latency(LINEAR, INT8_CH, fast, tokens)
    on_slow = layer_latency(LINEAR, INT8_CH, slow, tokens)
    # bandwidth-bound: the kernel's efficiency divides its memory time
    assert on_slow / on_fast == pytest.approx(100.0)
    assert on_fast != layer_latency(LINEAR, INT8_CH, plain, tokens)


def test_a_kernel_efficiency_divides_the_whole_roofline() -> None:
    """time = max(FLOPs / peak, bytes / bandwidth) / efficiency: compute-bound calls too."""
    fast = make_spec(kernels=int8_kernel(0.5, max_tokens=None), op_overhead_s=0.0, bandwidth=HUGE)
    slow = make_spec(kernels=int8_kernel(0.05, max_tokens=None), op_overhead_s=0.0, bandwidth=HUGE)
    tokens = 64
    on_fast = layer_latency(LINEAR, INT8_CH, fast, tokens)
    assert layer_latency(LINEAR, INT8_CH, slow, tokens) == pytest.approx(10 * on_fast)
    flops = 2 * LINEAR.rows * LINEAR.cols * tokens
    assert on_fast == pytest.approx(flops / (1e12 * 0.5))


def test_dequantising_and_lookups_take_their_own_efficiency_when_given() -> None:
    plain = make_spec(op_overhead_s=0.0)
    tuned = make_spec(
        op_overhead_s=0.0,
        kernels={
            "dequantize": KernelSpec("float32", None, 0.05),
            "lookup": KernelSpec("float32", None, 0.05),
        },
    )
    assert layer_latency(LINEAR, INT2_G32, tuned, 64) == pytest.approx(
        10 * layer_latency(LINEAR, INT2_G32, plain, 64)
    )
    assert layer_latency(EMBEDDING, INT4_G128, tuned, 64) == pytest.approx(
        10 * layer_latency(EMBEDDING, INT4_G128, plain, 64)
    )
    assert layer_latency(LINEAR, KEEP, tuned, 64) == layer_latency(LINEAR, KEEP, plain, 64)


@pytest.mark.parametrize("tokens", [TOKEN_LIMIT + 1, 64, 4096])
def test_above_the_token_limit_int8_falls_back_to_dequantising(tokens: int) -> None:
    fast = make_spec(kernels=int8_kernel(0.5))
    slow = make_spec(kernels=int8_kernel(0.005))
    plain = make_spec()
    on_fast = layer_latency(LINEAR, INT8_CH, fast, tokens)
    assert on_fast == layer_latency(LINEAR, INT8_CH, slow, tokens)
    assert on_fast == layer_latency(LINEAR, INT8_CH, plain, tokens)
    assert on_fast > layer_latency(LINEAR, KEEP, fast, tokens)  # dequantising costs more


def test_a_format_given_by_the_caller_overrides_the_methods() -> None:
    """A tied output layer runs an int4 table dequantised, though the method names a kernel."""
    with_int4 = make_spec(kernels={"int4_weight_only": KernelSpec("bfloat16", None, 0.5)})
    without = make_spec()
    forced = layer_latency(LINEAR, INT4_G128, with_int4, 4, fmt="dequantize")
    assert forced == layer_latency(LINEAR, INT4_G128, without, 4)
    assert forced != layer_latency(LINEAR, INT4_G128, with_int4, 4)
    assert layer_latency(LINEAR, INT8_CH, with_int4, 4, fmt=None) == layer_latency(
        LINEAR, INT8_CH, with_int4, 4
    )


@pytest.mark.parametrize("option", [INT8_CH, INT8_G32, INT4_G128, INT2_G32])
@pytest.mark.parametrize("tokens", [1, 16, 4096])
def test_without_a_kernel_a_quantised_layer_is_slower_than_dense(
    option: Option, tokens: int
) -> None:
    spec = make_spec()
    assert layer_latency(LINEAR, option, spec, tokens) > layer_latency(LINEAR, KEEP, spec, tokens)


@pytest.mark.parametrize("tokens", [1, 100, 10_000])
def test_a_kernel_without_token_limit_is_used_for_any_call(tokens: int) -> None:
    fast = make_spec(
        kernels=int8_kernel(0.5, max_tokens=None), op_overhead_s=0.0, peak=UNBOUNDED_COMPUTE
    )
    slow = make_spec(
        kernels=int8_kernel(0.05, max_tokens=None), op_overhead_s=0.0, peak=UNBOUNDED_COMPUTE
    )
    ratio = layer_latency(LINEAR, INT8_CH, slow, tokens) / layer_latency(
        LINEAR, INT8_CH, fast, tokens
    )
    assert ratio == pytest.approx(10.0)


@pytest.mark.parametrize("option", [INT8_G32, INT2_G32, QuantOption(4, 32, False), KEEP])
def test_a_kernel_serves_only_its_own_format(option: Option) -> None:
    fast = make_spec(kernels=int8_kernel(0.9))
    slow = make_spec(kernels=int8_kernel(0.001))
    assert layer_latency(LINEAR, option, fast, 4) == layer_latency(LINEAR, option, slow, 4)


def test_int4_layers_use_the_int4_kernel_not_the_int8_one() -> None:
    int4 = {"int4_weight_only": KernelSpec("float32", TOKEN_LIMIT, 0.5)}
    int4_slow = {"int4_weight_only": KernelSpec("float32", TOKEN_LIMIT, 0.05)}
    fast = make_spec(kernels=int4, op_overhead_s=0.0, peak=UNBOUNDED_COMPUTE)
    slow = make_spec(kernels=int4_slow, op_overhead_s=0.0, peak=UNBOUNDED_COMPUTE)
    ratio = layer_latency(LINEAR, INT4_G128, slow, 8) / layer_latency(LINEAR, INT4_G128, fast, 8)
    assert ratio == pytest.approx(10.0)
    only_int8 = make_spec(kernels=int8_kernel(0.001))
    assert layer_latency(LINEAR, INT4_G128, only_int8, 8) == layer_latency(
        LINEAR, INT4_G128, make_spec(), 8
    )


def test_the_kernel_runs_at_the_peak_of_its_compute_dtype() -> None:
    def latency(float32_peak: float, bfloat16_peak: float) -> float:
        spec = make_spec(
            kernels={"int8_weight_only": KernelSpec("bfloat16", None, 0.5)},
            bandwidth=HUGE,
            peak={"float32": float32_peak, "bfloat16": bfloat16_peak},
            op_overhead_s=0.0,
        )
        return layer_latency(LINEAR, INT8_CH, spec, 64)

    assert latency(1e12, 1e12) == pytest.approx(2 * latency(1e12, 2e12))
    assert latency(1e12, 1e12) == latency(5e12, 1e12)


@pytest.mark.parametrize(("dtype", "other"), [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_a_dense_layer_runs_at_the_peak_of_its_own_dtype(dtype: str, other: str) -> None:
    shape = LayerShape("linear", 256, 512, dtype=dtype)

    def latency(own: float, other_peak: float) -> float:
        spec = make_spec(bandwidth=HUGE, peak={dtype: own, other: other_peak}, op_overhead_s=0.0)
        return layer_latency(shape, KEEP, spec, 128)

    assert latency(1e12, 1e12) == pytest.approx(2 * latency(2e12, 1e12))
    assert latency(1e12, 1e12) == latency(1e12, 7e12)


def test_a_dtype_without_its_own_peak_uses_the_dense_peak() -> None:
    half = LayerShape("linear", 256, 512, dtype="float16")
    spec = make_spec(bandwidth=HUGE, op_overhead_s=0.0)
    faster = make_spec(bandwidth=HUGE, peak={"float32": 2e12, "bfloat16": 2e12}, op_overhead_s=0.0)
    assert layer_latency(half, KEEP, spec, 64) == pytest.approx(
        2 * layer_latency(half, KEEP, faster, 64)
    )


# --- monotonicity --------------------------------------------------------------------------

linear_shapes = st.builds(
    lambda rows, cols, bias: LayerShape("linear", 32 * rows, 32 * cols, bias),
    st.integers(1, 64),
    st.integers(1, 64),
    st.booleans(),
)
embedding_shapes = st.builds(
    lambda rows, cols: LayerShape("embedding", rows, 32 * cols),
    st.integers(2, 5000),
    st.integers(1, 32),
)
options = st.sampled_from(ALL_OPTIONS)
token_counts = st.integers(1, 8192)


@st.composite
def specs(draw: st.DrawFn, with_kernels: bool = True) -> HardwareSpec:
    kernels = {}
    if with_kernels:
        for name in ("int8_weight_only", "int4_weight_only"):
            if draw(st.booleans()):
                kernels[name] = KernelSpec(
                    draw(st.sampled_from(["float32", "bfloat16"])),
                    draw(st.none() | st.integers(1, 64)),
                    draw(st.floats(0.01, 1.0)),
                )
    return make_spec(
        kernels=kernels,
        bandwidth=draw(st.floats(1e9, 1e13)),
        peak={"float32": draw(st.floats(1e9, 1e15)), "bfloat16": draw(st.floats(1e9, 1e15))},
        efficiency=draw(st.floats(0.05, 1.0)),
        op_overhead_s=draw(st.floats(0.0, 1e-4)),
    )


def kernel_for(shape: LayerShape, option: Option, spec: HardwareSpec) -> KernelSpec | None:
    if shape.kind != "linear":
        return None
    return spec.kernels.get(method_of(option).runtime_format(shape, option))


def uses_kernel(kernel: KernelSpec | None, tokens: int) -> bool:
    return kernel is not None and (kernel.max_tokens is None or tokens <= kernel.max_tokens)


@settings(max_examples=300, deadline=None)
@given(
    shape=linear_shapes | embedding_shapes,
    option=options,
    spec=specs(),
    tokens=st.tuples(token_counts, token_counts).map(sorted),
)
def test_more_tokens_never_take_less_time_on_one_code_path(
    shape: LayerShape, option: Option, spec: HardwareSpec, tokens: list[int]
) -> None:
    assume(valid(shape, option))
    fewer, more = tokens
    kernel = kernel_for(shape, option, spec)
    assume(uses_kernel(kernel, fewer) == uses_kernel(kernel, more))
    assert layer_latency(shape, option, spec, fewer) <= layer_latency(shape, option, spec, more)


@settings(max_examples=200, deadline=None)
@given(
    shape=linear_shapes,
    option=options,
    spec=specs(),
    tokens=st.tuples(token_counts, token_counts).map(sorted),
)
def test_more_tokens_never_take_less_time_when_kernels_beat_dense(
    shape: LayerShape, option: Option, spec: HardwareSpec, tokens: list[int]
) -> None:
    """Across a kernel's token limit too, when the kernel is no worse than dense compute."""
    assume(valid(shape, option))
    kernel = kernel_for(shape, option, spec)
    assume(
        kernel is None
        or (
            kernel.efficiency >= spec.efficiency
            and spec.peak(kernel.compute_dtype) >= spec.peak(shape.dtype)
        )
    )
    fewer, more = tokens
    assert layer_latency(shape, option, spec, fewer) <= layer_latency(shape, option, spec, more)


@settings(max_examples=300, deadline=None)
@given(
    shape=linear_shapes,
    pair=st.tuples(options, options),
    spec=specs(with_kernels=False),
    tokens=token_counts,
)
def test_fewer_stored_bytes_never_take_more_time_when_bandwidth_bound(
    shape: LayerShape, pair: tuple[Option, Option], spec: HardwareSpec, tokens: int
) -> None:
    """Among layers that dequantise (no kernels on the device), bytes decide."""
    small, large = sorted(pair, key=lambda option: stored_bytes(shape, option))
    assume(KEEP not in pair and valid(shape, small) and valid(shape, large))
    spec = make_spec(
        bandwidth=spec.bandwidth,
        peak={"float32": HUGE},
        efficiency=spec.efficiency,
        op_overhead_s=spec.op_overhead_s,
    )
    assert layer_latency(shape, small, spec, tokens) <= layer_latency(shape, large, spec, tokens)


@settings(max_examples=200, deadline=None)
@given(shape=linear_shapes, spec=specs(with_kernels=False), tokens=st.integers(1, TOKEN_LIMIT))
def test_fewer_stored_bytes_never_take_more_time_on_a_fast_kernel(
    shape: LayerShape, spec: HardwareSpec, tokens: int
) -> None:
    """Bandwidth bound, a kernel as efficient as dense: int8 (kernel) beats dense."""
    spec = make_spec(
        kernels=int8_kernel(spec.efficiency),
        bandwidth=spec.bandwidth,
        peak={"float32": HUGE},
        efficiency=spec.efficiency,
        op_overhead_s=0.0,
    )
    ranked = sorted([KEEP, INT8_CH], key=lambda option: stored_bytes(shape, option))
    assert ranked == [INT8_CH, KEEP]
    times = [layer_latency(shape, option, spec, tokens) for option in ranked]
    assert times == sorted(times)
    # asymmetric int8 has no kernel (its offset term loses precision there): dequantised
    assert layer_latency(shape, INT8_CH_ASYM, spec, tokens) > times[-1]


@settings(max_examples=200, deadline=None)
@given(
    shape=embedding_shapes,
    pair=st.tuples(options, options),
    spec=specs(),
    tokens=token_counts,
)
def test_fewer_stored_bytes_never_take_more_time_for_embeddings(
    shape: LayerShape, pair: tuple[Option, Option], spec: HardwareSpec, tokens: int
) -> None:
    small, large = sorted(pair, key=lambda option: stored_bytes(shape, option))
    assume(valid(shape, small) and valid(shape, large))
    spec = make_spec(
        kernels=spec.kernels,
        bandwidth=spec.bandwidth,
        efficiency=spec.efficiency,
        op_overhead_s=0.0,
    )
    assert layer_latency(shape, small, spec, tokens) <= layer_latency(shape, large, spec, tokens)


# --- embeddings ----------------------------------------------------------------------------


@pytest.mark.parametrize("option", [KEEP, INT8_CH, INT2_G32])
def test_embedding_cost_is_proportional_to_tokens(option: Option) -> None:
    spec = make_spec(op_overhead_s=0.0)
    one = layer_latency(EMBEDDING, option, spec, 10)
    assert one > 0
    for factor in (2, 7, 100):
        assert layer_latency(EMBEDDING, option, spec, 10 * factor) == pytest.approx(factor * one)


@pytest.mark.parametrize("option", [KEEP, INT4_G128])
def test_embedding_cost_grows_linearly_above_a_fixed_overhead(option: Option) -> None:
    spec = make_spec(op_overhead_s=1e-3)
    t1, t2, t3 = (layer_latency(EMBEDDING, option, spec, n) for n in (50, 100, 150))
    assert t2 - t1 == pytest.approx(t3 - t2)
    assert t2 > t1
    without = make_spec(op_overhead_s=0.0)
    assert t1 > layer_latency(EMBEDDING, option, without, 50)


def test_embedding_lookups_ignore_compute_peaks_and_kernels() -> None:
    base = make_spec()
    other = make_spec(peak={"float32": 1.0}, kernels=int8_kernel(0.001))
    for option in (KEEP, INT8_CH, INT2_G32):
        assert layer_latency(EMBEDDING, option, base, 64) == layer_latency(
            EMBEDDING, option, other, 64
        )


# --- rest of the model ---------------------------------------------------------------------


def test_rest_latency_includes_the_overhead_of_every_op() -> None:
    spec = make_spec(op_overhead_s=3e-6)
    without_ops = rest_latency(RestOfModel(flops=1e9, ops=0, activation_bytes=1e6), spec)
    with_ops = rest_latency(RestOfModel(flops=1e9, ops=250, activation_bytes=1e6), spec)
    assert without_ops > 0
    assert with_ops - without_ops == pytest.approx(250 * 3e-6)


def test_rest_latency_with_nothing_to_compute_is_pure_overhead() -> None:
    spec = make_spec(op_overhead_s=2e-6)
    assert rest_latency(RestOfModel(0.0, 40, 0.0), spec) == pytest.approx(40 * 2e-6)


def test_rest_latency_uses_the_peak_of_its_dtype_or_the_dense_one() -> None:
    spec = make_spec(bandwidth=HUGE, peak={"float32": 1e12, "bfloat16": 4e12}, op_overhead_s=0.0)
    f32 = rest_latency(RestOfModel(1e12, 0, 0.0, "float32"), spec)
    bf16 = rest_latency(RestOfModel(1e12, 0, 0.0, "bfloat16"), spec)
    f16 = rest_latency(RestOfModel(1e12, 0, 0.0, "float16"), spec)
    assert f32 == pytest.approx(4 * bf16)
    assert f16 == f32


@settings(max_examples=100, deadline=None)
@given(
    spec=specs(with_kernels=False),
    flops=st.tuples(st.floats(0, 1e14), st.floats(0, 1e14)).map(sorted),
    moved=st.tuples(st.floats(0, 1e10), st.floats(0, 1e10)).map(sorted),
    ops=st.tuples(st.integers(0, 10_000), st.integers(0, 10_000)).map(sorted),
)
def test_rest_latency_never_drops_when_any_figure_grows(
    spec: HardwareSpec, flops: list[float], moved: list[float], ops: list[int]
) -> None:
    small = rest_latency(RestOfModel(flops[0], ops[0], moved[0]), spec)
    assert small <= rest_latency(RestOfModel(flops[1], ops[0], moved[0]), spec)
    assert small <= rest_latency(RestOfModel(flops[0], ops[1], moved[0]), spec)
    assert small <= rest_latency(RestOfModel(flops[0], ops[0], moved[1]), spec)


# --- dtypes --------------------------------------------------------------------------------


def test_a_bfloat16_layer_moves_half_the_bytes_of_a_float32_one() -> None:
    spec = make_spec(peak={"float32": HUGE, "bfloat16": HUGE}, op_overhead_s=0.0)
    f32 = LayerShape("linear", 256, 512, dtype="float32")
    bf16 = LayerShape("linear", 256, 512, dtype="bfloat16")
    assert layer_latency(f32, KEEP, spec, 64) == pytest.approx(
        2 * layer_latency(bf16, KEEP, spec, 64)
    )


def test_a_float64_layer_moves_twice_the_bytes_of_a_float32_one() -> None:
    spec = make_spec(peak={"float32": HUGE}, op_overhead_s=0.0)
    f32 = LayerShape("linear", 256, 512, dtype="float32")
    f64 = LayerShape("linear", 256, 512, dtype="float64")
    assert layer_latency(f64, KEEP, spec, 64) == pytest.approx(
        2 * layer_latency(f32, KEEP, spec, 64)
    )


def test_dequantised_factors_are_charged_for_the_factors_not_the_product() -> None:
    """A low-rank layer with int8 factors rebuilds ``rank * (rows + cols)`` float weights per
    call, not ``rows * cols``: memory-bound, it costs what moving those bytes costs."""
    from methods.lowrank import LowRankOption

    spec = make_spec(peak=UNBOUNDED_COMPUTE)
    factored = LowRankOption(fraction=0.125, bits=8)
    rank = factored.rank_for(LINEAR)
    assert method_of(factored).runtime_format(LINEAR, factored) == "dequantize"
    assert method_of(factored).rebuilt_numel(LINEAR, factored) == rank * (256 + 512)
    moved = stored_bytes(LINEAR, factored) + 2 * 4 * rank * (256 + 512) + 4 * (256 + 512)
    expected = moved / spec.bandwidth / spec.efficiency + 14 * spec.op_overhead_s
    assert layer_latency(LINEAR, factored, spec, tokens=1) == pytest.approx(expected)


# --- kernels a device has but autotune's modules do not run there --------------------------


GPU_KERNELS = {
    "int8_weight_only": KernelSpec("bfloat16", 32, 0.5),
    "int4_weight_only": KernelSpec("bfloat16", 32, 0.5),
}


@pytest.mark.parametrize("option", [INT8_CH, INT4_G128])
def test_a_gpu_kernel_no_module_runs_is_priced_as_dequantising(option: Option) -> None:
    """On CUDA every quantised layer runs the dequantising fallback: so is it priced."""
    listed = dataclasses.replace(make_spec(kernels=GPU_KERNELS), kind="gpu")
    bare = dataclasses.replace(make_spec(), kind="gpu")
    assert layer_latency(LINEAR, option, listed, 1) == layer_latency(LINEAR, option, bare, 1)
    assert priced_kernel(listed, method_of(option).runtime_format(LINEAR, option), 1) is None


@pytest.mark.parametrize("option", [INT8_CH, INT4_G128])
def test_the_same_kernel_table_is_priced_on_a_cpu(option: Option) -> None:
    listed = make_spec(kernels=GPU_KERNELS)
    fmt = method_of(option).runtime_format(LINEAR, option)
    assert priced_kernel(listed, fmt, 1) is GPU_KERNELS[fmt]
    assert layer_latency(LINEAR, option, listed, 1) != layer_latency(LINEAR, option, make_spec(), 1)


@pytest.mark.parametrize("tokens", [1, 128])
def test_a_block_rate_divides_a_gguf_layers_matrix_vector_roofline_only(tokens: int) -> None:
    from methods.gguf import GGUFOption

    kernel = KernelSpec("int8", None, 1.0, "fitted")
    spec = HardwareSpec(
        name="box", kind="cpu", description="", memory_bytes=2**34, bandwidth=4e10,
        peak_flops={"float32": 1e11, "int8": 2e11}, op_overhead_s=1e-6,
        kernels={"gguf_block": kernel}, runtime="llama.cpp",
    )  # fmt: skip
    slow = dataclasses.replace(spec, block_rates={"IQ3_S": 0.25})
    shape = LayerShape("linear", 1024, 1024)
    overhead = spec.op_overhead_s  # one graph node
    for name, rate in (("IQ3_S", 0.25), ("Q4_0", 1.0)):
        option = GGUFOption(name)
        plain = layer_latency(shape, option, spec, tokens) - overhead
        rated = layer_latency(shape, option, slow, tokens) - overhead
        expected = plain / rate if tokens == 1 else plain
        assert rated == pytest.approx(expected)
