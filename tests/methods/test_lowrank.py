"""Low-rank factorisation: optimal for its own metric, exact storage, helpful refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from transformers.pytorch_utils import Conv1D

from methods import get_method, kernels
from methods.base import LayerShape, Observer
from methods.errors import OptionError
from methods.lowrank import (
    FisherObserver,
    FisherSVDOption,
    LowRankLinear,
    LowRankOption,
    WhitenedSVDOption,
)
from methods.observers import HessianObserver

SVD = get_method("svd")
WHITENED = get_method("whitened_svd")
FISHER = get_method("fisher_svd")
COLS, ROWS = 128, 96


def make_linear(cols: int = COLS, rows: int = ROWS, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(cols, rows, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.02)
    return layer


def correlated_inputs(tokens: int, seed: int, cols: int = COLS) -> torch.Tensor:
    """``z @ M`` with a fixed mixing matrix whose singular values decay geometrically."""
    mixing = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(cols, cols, generator=mixing))
    q2, _ = torch.linalg.qr(torch.randn(cols, cols, generator=mixing))
    spectrum = 0.95 ** torch.arange(cols, dtype=torch.float32)
    z = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(seed))
    return z @ (q1 * spectrum) @ q2.t()


def observe(method, module: nn.Module, option, batches: list[torch.Tensor]) -> Observer:
    observer = method.observer(module, option)
    handle = module.register_forward_hook(observer.observe)
    with torch.no_grad():
        for x in batches:
            module(x)
    handle.remove()
    return observer


def product(converted: nn.Module) -> torch.Tensor:
    assert isinstance(converted, LowRankLinear)
    b, a = converted.factors(torch.float64)
    return b @ a


def output_error(module: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        expected = reference(x)
        return float((module(x) - expected).norm() / expected.norm())


def state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


# --- the algorithms -----------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 7, 48])
def test_svd_is_the_best_rank_r_approximation(rank: int) -> None:
    """Eckart–Young: the error is the energy of the singular values left out (up to the
    float16 rounding of the factors), and the product is the truncated SVD."""
    layer = make_linear()
    weight = layer.weight.detach().double()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    converted = SVD.convert(layer, LowRankOption(rank=rank, fraction=None))
    approx = product(converted)
    tail = float(s[rank:].pow(2).sum().sqrt())
    assert float((weight - approx).norm()) == pytest.approx(tail, rel=2e-3)
    truncated = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert float((approx - truncated).norm() / truncated.norm()) < 2e-3


def test_factors_split_the_singular_values_evenly() -> None:
    converted = SVD.convert(make_linear(), LowRankOption(rank=10, fraction=None))
    b, a = converted.factors(torch.float64)
    s = torch.linalg.svdvals(make_linear().weight.detach().double())[:10]
    torch.testing.assert_close(b.norm(dim=0), s.sqrt(), rtol=2e-3, atol=0)
    torch.testing.assert_close(a.norm(dim=1), s.sqrt(), rtol=2e-3, atol=0)


@pytest.mark.parametrize(
    "option",
    [
        LowRankOption(fraction=0.25),
        LowRankOption(fraction=0.25, bits=8),
        LowRankOption(rank=32, fraction=None, bits=4, group_size=16),
    ],
    ids=lambda o: o.label,
)
def test_output_is_the_factor_product_plus_bias(option: LowRankOption) -> None:
    layer = make_linear()
    converted = SVD.convert(layer, option)
    x = torch.randn(5, 3, COLS)
    expected = x.double() @ product(converted).t() + layer.bias.detach().double()
    torch.testing.assert_close(converted(x).double(), expected, rtol=1e-4, atol=1e-6)


def test_whitened_svd_beats_svd_on_held_out_correlated_inputs() -> None:
    layer = make_linear()
    option = WhitenedSVDOption(fraction=0.5)
    batches = [correlated_inputs(256, seed) for seed in range(4)]
    whitened = WHITENED.convert(layer, option, observe(WHITENED, layer, option, batches))
    plain = SVD.convert(layer, LowRankOption(fraction=0.5))
    held_out = correlated_inputs(1024, seed=99)
    whitened_error = output_error(whitened, layer, held_out)
    plain_error = output_error(plain, layer, held_out)
    assert whitened_error <= 0.7 * plain_error, (whitened_error, plain_error)


def test_whitened_svd_reaches_the_optimum_of_its_metric() -> None:
    """``tr(E H E^T)`` of the error ``E`` (``H`` dampened as the method does) equals the tail
    energy of ``W S`` (``S S^T = H``), and no other rank-``r`` factorisation does better."""
    layer = make_linear(cols=48, rows=40)
    option = WhitenedSVDOption(rank=12, fraction=None)
    x = correlated_inputs(200, seed=3, cols=48)
    observer = observe(WHITENED, layer, option, [x])
    converted = WHITENED.convert(layer, option, observer)
    weight = layer.weight.detach().double()
    hessian = 2 * x.double().t() @ x.double() / 200
    hessian += 0.01 * hessian.diagonal().mean() * torch.eye(48, dtype=torch.float64)
    lower = torch.linalg.cholesky(hessian)
    tail = torch.linalg.svdvals(weight @ lower)[12:].pow(2).sum()

    def metric(approx: torch.Tensor) -> float:
        error = weight - approx
        return float(torch.trace(error @ hessian @ error.t()))

    assert metric(product(converted)) == pytest.approx(float(tail), rel=5e-3)
    assert metric(product(SVD.convert(layer, LowRankOption(rank=12, fraction=None)))) > 1.2 * (
        float(tail)
    )


def importance_weighted(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Row importances spread over four orders of magnitude, and the Fisher diagonal with
    ``sum_j F_ij = I_i^2``."""
    rows, cols = layer.weight.shape
    importance = torch.logspace(-2, 2, rows)[torch.randperm(rows, generator=torch.Generator())]
    fisher = (importance**2 / cols)[:, None].expand(rows, cols).contiguous()
    return importance.double(), fisher


def fisher_converted(layer: nn.Module, option: FisherSVDOption, fisher: torch.Tensor) -> nn.Module:
    observer = observe(FISHER, layer, option, [torch.randn(4, layer.weight.shape[1])])
    observer.observe_fisher(fisher)
    return FISHER.convert(layer, option, observer)


def test_fisher_svd_minimises_the_fisher_weighted_error() -> None:
    layer = make_linear()
    importance, fisher = importance_weighted(layer)
    option = FisherSVDOption(fraction=0.25)
    weight = layer.weight.detach().double()

    def weighted(approx: torch.Tensor) -> float:
        return float((fisher.double() * (weight - approx) ** 2).sum())

    fisher_error = weighted(product(fisher_converted(layer, option, fisher)))
    plain_error = weighted(product(SVD.convert(layer, LowRankOption(fraction=0.25))))
    optimum = torch.linalg.svdvals(importance[:, None] * weight)[24:].pow(2).sum() / COLS
    assert fisher_error == pytest.approx(float(optimum), rel=5e-3)
    assert fisher_error < 0.5 * plain_error, (fisher_error, plain_error)


def test_rows_without_fisher_information_get_a_floor() -> None:
    layer = make_linear()
    _, fisher = importance_weighted(layer)
    fisher[:5] = 0.0
    converted = fisher_converted(layer, FisherSVDOption(fraction=0.5), fisher)
    b, a = converted.factors()
    assert torch.isfinite(b).all() and torch.isfinite(a).all()
    x = torch.randn(16, COLS)
    assert torch.isfinite(converted(x)).all()


def test_uniform_fisher_information_gives_the_plain_svd() -> None:
    layer = make_linear()
    fisher = torch.full((ROWS, COLS), 3.0)
    converted = fisher_converted(layer, FisherSVDOption(fraction=0.25), fisher)
    plain = SVD.convert(layer, LowRankOption(fraction=0.25))
    torch.testing.assert_close(product(converted), product(plain), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits, group", [(8, None), (4, 16)])
def test_quantised_factors_add_little_to_the_truncation_error(bits: int, group: int | None) -> None:
    layer = make_linear()
    x = torch.randn(64, COLS)
    plain = output_error(SVD.convert(layer, LowRankOption(fraction=0.5)), layer, x)
    option = LowRankOption(fraction=0.5, bits=bits, group_size=group)
    quantised = output_error(SVD.convert(layer, option), layer, x)
    # in quadrature: per factor about a uniform quantiser's error of the kept part
    assert plain <= quantised < (plain**2 + 2 * (3 * 2.0**-bits) ** 2) ** 0.5


def test_conv1d_is_factorised_like_the_equal_linear_layer() -> None:
    linear = make_linear(cols=64, rows=48)
    conv = Conv1D(48, 64)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
        conv.bias.copy_(linear.bias)
    option = WhitenedSVDOption(fraction=0.25, bits=8)
    batches = [correlated_inputs(100, seed=1, cols=64)]
    from_linear = WHITENED.convert(linear, option, observe(WHITENED, linear, option, batches))
    from_conv = WHITENED.convert(conv, option, observe(WHITENED, conv, option, batches))
    for name, value in from_linear.state_dict().items():
        assert torch.equal(value, from_conv.state_dict()[name]), name


# --- storage ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, weight_bytes",
    [
        # A [24, 128] and B [96, 24] in float16
        (LowRankOption(fraction=0.25), 2 * 24 * 128 + 2 * 96 * 24),
        # int8 codes and one float16 scale per row of each factor
        (LowRankOption(fraction=0.25, bits=8), 24 * 128 + 24 * 2 + 96 * 24 + 96 * 2),
        # 4-bit codes, a float16 scale per group of 8 along each row
        (
            LowRankOption(fraction=0.25, bits=4, group_size=8),
            24 * 64 + 24 * 16 * 2 + 96 * 12 + 96 * 3 * 2,
        ),
        (LowRankOption(rank=5, fraction=None, bits=4), 5 * 64 + 5 * 2 + 96 * 4 + 96 * 2),
    ],
    ids=lambda v: v.label if isinstance(v, LowRankOption) else str(v),
)
def test_cost_is_the_exact_bytes_of_the_factors(option: LowRankOption, weight_bytes: int) -> None:
    layer = make_linear()
    shape = LayerShape.of(layer)
    cost = SVD.cost(shape, option)
    assert (cost.weight_bytes, cost.other_bytes) == (weight_bytes, ROWS * 4)
    rank = option.rank_for(shape)
    assert cost.flops_per_token == 2 * rank * (ROWS + COLS)
    converted = SVD.convert(layer, option)
    saved = load_safetensors(save_safetensors(converted.state_dict()))
    assert sum(t.numel() * t.element_size() for t in saved.values()) == cost.bytes
    assert converted.stored_weight_bytes() == weight_bytes
    converted.half()  # factors keep their stored format, only the bias is cast
    assert converted.stored_weight_bytes() == weight_bytes
    assert state_bytes(converted) == weight_bytes + ROWS * 2


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_state_loads_into_an_empty_module_bit_exactly(bits: int) -> None:
    layer = make_linear(bias=False)
    option = LowRankOption(fraction=0.25, bits=bits)
    converted = SVD.convert(layer, option)
    blob = save_safetensors(converted.state_dict())
    restored = SVD.empty(LayerShape.of(layer), option)
    restored.load_state_dict(load_safetensors(blob), strict=True)
    assert save_safetensors(restored.state_dict()) == blob
    x = torch.randn(3, COLS)
    assert torch.equal(restored(x), converted(x))
    assert restored(x.double()).dtype == torch.float64


def test_integer_factors_never_call_a_kernel(
    policy: kernels.KernelPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The format priced is ``dequantize``: a few tokens do not switch to a kernel."""
    called: list[str] = []
    for kernel in ("int8_matmul", "int4_matmul"):
        monkeypatch.setattr(kernels, kernel, lambda *args, _k=kernel: called.append(_k))
    layer = make_linear(cols=256, rows=128)
    shape = LayerShape.of(layer)
    for option in (
        LowRankOption(fraction=0.25, bits=8),
        LowRankOption(fraction=0.5, bits=4, group_size=64),
    ):
        SVD.convert(layer, option)(torch.randn(2, 256))
        assert SVD.runtime_format(shape, option) == "dequantize"
    assert called == []
    assert SVD.runtime_format(shape, LowRankOption()) == "dense"


def test_grid_labels_and_sizes() -> None:
    shape = LayerShape("linear", 1536, 384)
    labels = [o.label for o in SVD.grid(shape)]
    assert labels == ["svd-r25%+int8", "svd-r12.5%", "svd-r25%", "svd-r50%", "svd-r50%+int4"]
    assert WHITENED.grid(shape)[0].label == "whitened_svd-r25%+int8"
    square = LayerShape("linear", 256, 256)
    for method in (SVD, WHITENED, FISHER):
        grid = method.grid(square)
        assert "r50%" not in {o.label.split("-", 1)[1] for o in grid}  # as large as dense
        assert all(method.cost(square, o).weight_bytes < 2 * square.numel for o in grid)
    assert LowRankOption(rank=64, fraction=None, bits=4, group_size=32).label == "svd-r64+int4-g32"
    assert SVD.grid(LayerShape("embedding", 300, 64)) == []


def test_error_bound_follows_the_kept_energy() -> None:
    shape = LayerShape("linear", 48, 64)
    assert SVD.error_bound(shape, LowRankOption(fraction=0.25)) == pytest.approx(0.75**0.5 + 0.01)
    quantised = SVD.error_bound(shape, LowRankOption(fraction=0.25, bits=4))
    assert quantised == pytest.approx((0.75 + 2 * (3 / 16) ** 2) ** 0.5 + 0.01)
    assert WHITENED.error_bound(shape, WhitenedSVDOption(fraction=0.5)) > SVD.error_bound(
        shape, LowRankOption(fraction=0.5)
    )


# --- observers and refusals ---------------------------------------------------------------


def test_options_of_one_layer_share_one_observer_until_it_is_fed() -> None:
    layer = make_linear()
    first = WHITENED.observer(layer, WhitenedSVDOption(fraction=0.25))
    assert isinstance(first, HessianObserver)
    assert WHITENED.observer(layer, WhitenedSVDOption(fraction=0.5, bits=8)) is first
    first.observe(layer, (torch.randn(3, COLS),), None)
    assert WHITENED.observer(layer, WhitenedSVDOption(fraction=0.25)) is not first
    fisher = FISHER.observer(layer, FisherSVDOption())
    assert isinstance(fisher, FisherObserver) and fisher.needs_fisher
    assert FISHER.observer(layer, FisherSVDOption(fraction=0.5)) is fisher


@pytest.mark.parametrize("method", [WHITENED, FISHER], ids=lambda m: m.name)
def test_convert_without_calibration_says_so(method) -> None:
    option = method.option_type(fraction=0.25)
    with pytest.raises(OptionError, match="calibration") as info:
        method.convert(make_linear(), option, None)
    assert option.label in str(info.value)


def test_fisher_svd_refuses_an_observer_without_fisher_information() -> None:
    layer = make_linear()
    option = FisherSVDOption(fraction=0.25)
    observer = observe(FISHER, layer, option, [torch.randn(8, COLS)])
    assert observer.calls == 1
    with pytest.raises(OptionError, match="calibration") as info:
        FISHER.convert(layer, option, observer)
    assert option.label in str(info.value) and "Fisher" in str(info.value)
    with pytest.raises(ValueError, match="shape"):
        observer.observe_fisher(torch.ones(COLS, ROWS))


def test_rank_above_the_smaller_side_is_refused() -> None:
    shape = LayerShape("linear", 48, 64)
    with pytest.raises(OptionError) as info:
        SVD.check(shape, LowRankOption(rank=49, fraction=None), "blocks.0.fc")
    message = str(info.value)
    assert "blocks.0.fc" in message and "rank 49" in message and "allowed: 1..48" in message
    SVD.check(shape, LowRankOption(rank=48, fraction=None), "blocks.0.fc")


@pytest.mark.parametrize(
    "option, words",
    [
        (LowRankOption(rank=8), ["rank=8", "fraction=0.25", "exactly one"]),
        (LowRankOption(fraction=None), ["rank=None", "exactly one"]),
        (LowRankOption(fraction=0.0), ["fraction 0.0", "(0, 1]"]),
        (LowRankOption(fraction=1.5), ["fraction 1.5", "(0, 1]"]),
        (LowRankOption(rank=0, fraction=None), ["rank 0", "1..48"]),
        (LowRankOption(bits=3), ["3 bits", "[16, 8, 4]"]),
        (LowRankOption(group_size=16), ["group size 16", "allowed: null"]),
        # rank 12: groups must divide 64 and 12
        (LowRankOption(bits=4, group_size=8), ["group size 8", "rank 12", "null", "4, 2, 1"]),
    ],
    ids=lambda v: v.label if isinstance(v, LowRankOption) else "",
)
def test_bad_options_are_refused_with_what_is_allowed(
    option: LowRankOption, words: list[str]
) -> None:
    with pytest.raises(OptionError) as info:
        SVD.check(LayerShape("linear", 48, 64), option, "blocks.0.fc")
    message = str(info.value)
    assert "blocks.0.fc" in message and "allowed" in message
    for word in words:
        assert word in message, (word, message)


def test_embeddings_are_not_supported() -> None:
    shape = LayerShape.of(nn.Embedding(100, 64))
    assert not SVD.supports(shape)
    with pytest.raises(OptionError, match="linear layers only"):
        SVD.check(shape, LowRankOption(), "embeddings.word")
