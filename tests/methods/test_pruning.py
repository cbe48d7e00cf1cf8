"""Magnitude, Wanda and SparseGPT pruning: masks, the OBS sweep, errors, bytes and refusals."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from transformers.pytorch_utils import Conv1D

from methods import affine, get_method, option_from_dict
from methods.base import LayerShape, Observer
from methods.errors import OptionError
from methods.observers import ChannelObserver
from methods.pruning import (
    MagnitudeOption,
    PruneOption,
    SparseGPTOption,
    WandaOption,
    pruned_energy,
    shrink_hessian,
    shrinkage,
    sparsegpt_prune,
)
from methods.sparse import SparseLinear

MAGNITUDE, WANDA, SPARSEGPT = (get_method(n) for n in ("magnitude", "wanda", "sparsegpt"))
OPTION_TYPES = (MagnitudeOption, WandaOption, SparseGPTOption)
METHODS = {o.method: get_method(o.method) for o in OPTION_TYPES}
COLS, ROWS = 128, 64
LAYER = "decoder.layers.3.mlp.fc1"


def mixed_inputs(tokens: int, seed: int, cols: int = COLS) -> torch.Tensor:
    """Correlated inputs ``x = z @ A``: Gaussian ``z`` with a decaying spectrum, a fixed random
    mixing ``A``, and a little independent noise."""
    mix = torch.randn(cols, cols, generator=torch.Generator().manual_seed(0)) / cols**0.5
    decay = torch.exp(-torch.arange(cols) / 16.0)
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, cols, generator=generator) * decay
    return z @ mix + 0.05 * torch.randn(tokens, cols, generator=generator)


def outlier_inputs(tokens: int, seed: int, cols: int = COLS) -> torch.Tensor:
    """Independent channels, a few of them 20x wider (as activations of transformers)."""
    spread = torch.ones(cols)
    spread[torch.randperm(cols, generator=torch.Generator().manual_seed(1))[:6]] = 20.0
    return torch.randn(tokens, cols, generator=torch.Generator().manual_seed(seed)) * spread


def make_linear(seed: int = 0, cols: int = COLS, rows: int = ROWS) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(cols, rows)


def observed(module: nn.Module, option: PruneOption, batches: list[torch.Tensor]) -> Observer:
    observer = METHODS[option.method].observer(module, option)
    assert observer is not None
    handle = module.register_forward_hook(observer.observe)
    with torch.no_grad():
        for x in batches:
            module(x)
    handle.remove()
    return observer


def converted(
    module: nn.Module,
    option: PruneOption,
    inputs: Callable[[int, int, int], torch.Tensor] = mixed_inputs,
) -> SparseLinear:
    method = METHODS[option.method]
    observer = None
    if method.needs_calibration(option):
        cols = LayerShape.of(module).cols
        observer = observed(module, option, [inputs(512, seed, cols) for seed in range(4)])
    out = method.convert(module, option, observer)
    assert isinstance(out, SparseLinear)
    return out


def output_error(module: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        expected = reference(x)
        return float((module(x) - expected).norm() / expected.norm())


def brute_force_mask(scores: torch.Tensor, group: int, keep: int) -> torch.Tensor:
    """For each row and run of ``group`` columns, the kept set of largest total score among
    all ``C(group, keep)`` sets."""
    rows, cols = scores.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        for start in range(0, cols, group):
            run = scores[r, start : start + group].tolist()
            best = max(
                itertools.combinations(range(group), keep),
                key=lambda kept, run=run: sum(run[i] for i in kept),
            )
            mask[r, [start + i for i in best]] = True
    return mask


# --- masks -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "sparsity", "block", "group", "keep"),
    [(None, 0.5, 6, 6, 3), (None, 0.7, 8, 8, 2), ("2:4", 0.5, 8, 4, 2), ("1:4", 0.75, 4, 4, 1)],
)
@pytest.mark.parametrize("bits", [16, 4])
def test_magnitude_mask_is_the_brute_force_one(
    pattern: str | None, sparsity: float, block: int, group: int, keep: int, bits: int
) -> None:
    layer = make_linear(cols=24, rows=5)
    option = MagnitudeOption(sparsity, pattern, block, bits)
    out = converted(layer, option)
    expected = brute_force_mask(layer.weight.detach().abs(), group, keep)
    assert torch.equal(out.kept_mask(), expected)
    if bits == 16:
        weight = layer.weight.detach()
        assert torch.equal(out.dequantize(), torch.where(expected, weight, 0).half().float())


def test_wanda_picks_by_weight_times_input_norm_not_by_magnitude() -> None:
    layer = make_linear(cols=24, rows=6)
    scale = torch.linspace(0.1, 10.0, 24)[torch.randperm(24, generator=torch.Generator())]
    batches = [
        torch.randn(50, 24, generator=torch.Generator().manual_seed(s)) * scale for s in (1, 2)
    ]
    for option in (WandaOption(0.5, None, 8), WandaOption(0.5, "2:4", 8)):
        observer = observed(layer, option, batches)
        out = WANDA.convert(layer, option, observer)
        x = torch.cat(batches)
        norms = x.double().pow(2).sum(0).sqrt()
        scores = layer.weight.detach().double().abs() * norms
        group, keep = (4, 2) if option.pattern else (8, 4)
        expected = brute_force_mask(scores, group, keep)
        assert torch.equal(out.kept_mask(), expected)
        magnitude = brute_force_mask(layer.weight.detach().abs(), group, keep)
        assert not torch.equal(expected, magnitude)


def test_wanda_observer_sums_squares_over_all_tokens() -> None:
    layer = make_linear(cols=16, rows=4)
    batches = [torch.randn(3, 5, 16), torch.randn(7, 16)]
    observer = observed(layer, WandaOption(), batches)
    assert isinstance(observer, ChannelObserver)
    assert (observer.tokens, observer.calls) == (22, 2)
    x = torch.cat([b.reshape(-1, 16) for b in batches]).double()
    torch.testing.assert_close(observer.norms(), x.pow(2).sum(0).sqrt())


@pytest.mark.parametrize("option_type", OPTION_TYPES, ids=lambda t: t.method)
@pytest.mark.parametrize(
    ("pattern", "sparsity", "block", "bits"),
    [(None, 0.5, 32, 16), (None, 0.3, 16, 4), ("2:4", 0.5, 32, 16), ("4:8", 0.5, 16, 3)],
)
def test_every_row_and_block_keeps_the_promised_count(
    option_type: type[PruneOption], pattern: str | None, sparsity: float, block: int, bits: int
) -> None:
    layer = make_linear(cols=64, rows=16)
    option = option_type(sparsity, pattern, block, bits)
    mask = converted(layer, option).kept_mask()
    if pattern is None:
        counts = mask.reshape(16, -1, block).sum(-1)
        assert torch.all(counts == block - round(sparsity * block))
    else:
        n, m = map(int, pattern.split(":"))
        assert torch.all(mask.reshape(16, -1, m).sum(-1) == n)


# --- the SparseGPT sweep --------------------------------------------------------------------


def select(saliency: torch.Tensor, group: int, keep: int) -> torch.Tensor:
    """Keep the ``keep`` highest of each row in each run of ``group`` columns."""
    rows, cols = saliency.shape
    order = saliency.reshape(rows, -1, group).argsort(-1, descending=True)[..., :keep]
    chosen = torch.zeros(rows, cols // group, group, dtype=torch.bool)
    return chosen.scatter_(-1, order, True).reshape(rows, cols)


def obs_step(w: torch.Tensor, inverse: torch.Tensor, j: int, q: torch.Tensor) -> torch.Tensor:
    """Set column ``j`` of ``w`` to ``q``, update the later columns in place; the inverse
    Hessian without column ``j``."""
    error = (w[:, j] - q) / inverse[j, j]
    w[:, j + 1 :] -= error[:, None] * inverse[j, j + 1 :][None, :]
    return inverse - torch.outer(inverse[:, j], inverse[j, :]) / inverse[j, j]


def sequential_reference(
    weight: torch.Tensor, hessian: torch.Tensor, option: PruneOption, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook OBS sweep: one column at a time with the explicit inverse Hessian of the
    columns left (no lazy blocks, no Cholesky). The mask and the value of every weight."""
    rows, cols = weight.shape
    h = hessian + damp * hessian.diagonal().mean() * torch.eye(cols, dtype=hessian.dtype)
    # saliency denominators: [H^-1]_jj over the columns from j on
    d = torch.stack([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(cols)])
    inverse = torch.linalg.inv(h)
    w = weight.double().clone()
    nm, block, bits = option.nm, option.block, option.bits
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    values = torch.zeros(rows, cols, dtype=torch.float64)
    scale = offset = None
    for j in range(cols):
        here = slice(j, j + block)
        if j % block == 0 and nm is None:
            mask[:, here] = select(w[:, here] ** 2 / d[here], block, option.keep)
        if j % block == 0 and bits < 16:  # scales fitted after a pass that prunes only
            dry, dry_inverse = w.clone(), inverse.clone()
            for c in range(j, j + block):
                if nm is not None and c % nm[1] == 0:
                    span = slice(c, c + nm[1])
                    mask[:, span] = select(dry[:, span] ** 2 / d[span], nm[1], nm[0])
                q = torch.where(mask[:, c], dry[:, c], 0.0)
                dry_inverse = obs_step(dry, dry_inverse, c, q)
            kept = dry[:, here][mask[:, here]].reshape(rows, 1, -1)
            scale, offset = affine.fit_scales(kept, bits, option.symmetric)
        if nm is not None and j % nm[1] == 0:
            span = slice(j, j + nm[1])
            mask[:, span] = select(w[:, span] ** 2 / d[span], nm[1], nm[0])
        if bits == 16:
            q = w[:, j].half().double()
        elif option.symmetric:
            s, half = scale[:, 0].double(), 2 ** (bits - 1)
            q = ((w[:, j] / s).round() + half).clamp(0, 2 * half - 1).sub(half) * s
        else:
            s, m = scale[:, 0].double(), offset[:, 0].double()
            q = ((w[:, j] - m) / s).round().clamp(0, 2**bits - 1) * s + m
        q = torch.where(mask[:, j], q, 0.0)
        values[:, j] = q
        inverse = obs_step(w, inverse, j, q)
    return mask, values


@pytest.mark.parametrize(
    "option",
    [
        SparseGPTOption(0.5, None, 32),  # lazy blocks of 32 within mask blocks of 32
        SparseGPTOption(0.6, None, 64),  # two lazy blocks per mask block
        SparseGPTOption(0.5, None, 24),  # a mask block that is no multiple of 32
        SparseGPTOption(0.5, "2:4", 64),  # N:M sets chosen group by group
        SparseGPTOption(0.5, "4:8", 32, bits=4),  # joint: scales fitted at each block
        SparseGPTOption(0.5, None, 32, bits=3, symmetric=True),
    ],
    ids=lambda o: o.label,
)
def test_blocked_cholesky_sweep_equals_the_sequential_one(option: SparseGPTOption) -> None:
    torch.manual_seed(0)
    weight = torch.randn(12, 192, dtype=torch.float64)
    x = mixed_inputs(600, seed=3, cols=192).double()
    hessian = 2 * x.t() @ x / 600
    result = sparsegpt_prune(weight, hessian, option)
    mask, values = sequential_reference(weight, hessian, option)
    assert torch.equal(result.mask, mask)
    layer = SparseLinear(
        192, 12, option.keep, option.block, option.nm, option.bits, option.symmetric
    )
    layer.store(result.mask, result.values, result.scales, result.offsets)
    torch.testing.assert_close(layer.dequantize(torch.float64), values, rtol=1e-3, atol=1e-4)


def test_shrinkage_is_full_for_isotropic_inputs_and_small_for_correlated_ones() -> None:
    few = torch.randn(90, 384, dtype=torch.float64)
    assert shrinkage(few.t() @ few / 90, 90) > 0.95
    many = torch.randn(4096, 128, dtype=torch.float64)
    assert shrinkage(many.t() @ many / 4096, 4096) > 0.9  # the truth is the identity
    x = mixed_inputs(2048, seed=0).double()
    assert shrinkage(x.t() @ x / 2048, 2048) < 0.05
    assert shrinkage(x.t() @ x * 7.0, 2048) == pytest.approx(shrinkage(x.t() @ x, 2048))


def test_full_shrinkage_leaves_the_mean_diagonal_and_dead_inputs_dead() -> None:
    x = torch.randn(2, 8, dtype=torch.float64)  # 2 tokens: nothing to learn from
    x[:, 5] = 0.0
    hessian = x.t() @ x
    shrunk = shrink_hessian(hessian, tokens=2)
    expected = torch.eye(8, dtype=torch.float64) * hessian.diagonal().mean()
    expected[5, 5] = 0.0
    assert torch.equal(shrunk, expected)


def test_shrinkage_keeps_sparsegpt_from_fitting_few_tokens() -> None:
    """90 Gaussian tokens for 128 inputs: OBS on the raw Hessian fits the tokens rather than
    the layer and does worse than magnitude pruning on new inputs; shrunk, it does as well."""
    layer = make_linear()
    option = SparseGPTOption()
    observer = observed(layer, option, [torch.randn(90, COLS)])
    held_out = torch.randn(2048, COLS, generator=torch.Generator().manual_seed(99))
    shrunk = output_error(SPARSEGPT.convert(layer, option, observer), layer, held_out)
    raw = sparsegpt_prune(layer.weight.detach(), observer.hessian(), option)
    overfit = SPARSEGPT.empty(LayerShape.of(layer), option)
    overfit.store(raw.mask, raw.values)
    overfit.bias.copy_(layer.bias.detach())
    magnitude = output_error(MAGNITUDE.convert(layer, MagnitudeOption()), layer, held_out)
    assert shrunk < 1.03 * magnitude
    assert output_error(overfit, layer, held_out) > 1.2 * magnitude


# --- output errors --------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparsegpt_beats_magnitude_and_wanda_on_correlated_inputs(pattern: str | None) -> None:
    layer = make_linear()
    held_out = mixed_inputs(2048, seed=99)
    errors = {
        t.method: output_error(converted(layer, t(0.5, pattern)), layer, held_out)
        for t in OPTION_TYPES
    }
    assert errors["sparsegpt"] < 0.8 * errors["magnitude"], errors
    assert errors["sparsegpt"] < 0.8 * errors["wanda"], errors


def test_wanda_beats_magnitude_on_outlier_channels() -> None:
    layer = make_linear()
    held_out = outlier_inputs(2048, seed=99)
    wanda = converted(layer, WandaOption(), outlier_inputs)
    magnitude = converted(layer, MagnitudeOption())
    assert output_error(wanda, layer, held_out) < 0.5 * output_error(magnitude, layer, held_out)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_joint_sparsegpt_int4_beats_magnitude_then_rounding_at_equal_bytes(
    pattern: str | None,
) -> None:
    layer = make_linear()
    shape = LayerShape.of(layer)
    joint, plain = SparseGPTOption(0.5, pattern, bits=4), MagnitudeOption(0.5, pattern, bits=4)
    assert SPARSEGPT.cost(shape, joint) == MAGNITUDE.cost(shape, plain)
    held_out = mixed_inputs(2048, seed=99)
    joint_error = output_error(converted(layer, joint), layer, held_out)
    plain_error = output_error(converted(layer, plain), layer, held_out)
    assert joint_error < 0.7 * plain_error, (joint_error, plain_error)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_joint_sweep_beats_rounding_the_sparsegpt_result(pattern: str | None) -> None:
    """At 3 bits: quantising inside the sweep (errors spread onto the columns left) against
    rounding SparseGPT's float16 weights afterwards, with the same mask format and bytes."""
    layer = make_linear()
    held_out = mixed_inputs(2048, seed=99)
    joint = SparseGPTOption(0.5, pattern, bits=3)
    joint_error = output_error(converted(layer, joint), layer, held_out)
    pruned = converted(layer, SparseGPTOption(0.5, pattern))
    rounded = SPARSEGPT.empty(LayerShape.of(layer), joint)
    rounded.load_pruned(pruned.kept_mask(), pruned.dequantize())
    rounded.bias.copy_(layer.bias.detach())
    assert joint_error < 0.95 * output_error(rounded, layer, held_out)


def test_pruned_energy_matches_sampling_and_the_large_block_limit() -> None:
    generator = torch.Generator().manual_seed(0)
    for group, pruned in ((4, 2), (8, 4), (16, 5)):
        w2 = torch.randn(40000, group, generator=generator, dtype=torch.float64).pow(2)
        sampled = float(w2.sort(dim=1).values[:, :pruned].sum() / w2.sum())
        assert pruned_energy(group, pruned) == pytest.approx(sampled, rel=0.02)
    t = 0.6744897501960817  # median of |w|
    limit = (2 * 0.75 - 1) - 2 * t * math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    assert pruned_energy(4000, 2000) == pytest.approx(limit, rel=0.01)


def test_error_bound_orders_the_patterns_and_grows_with_fewer_bits() -> None:
    shape = LayerShape("linear", 48, 64)
    bound = lambda **kw: MAGNITUDE.error_bound(shape, MagnitudeOption(**kw))  # noqa: E731
    assert bound(pattern="2:4") > bound(pattern="4:8") > bound()
    assert bound(bits=2) > bound(bits=4) > bound()
    assert bound(sparsity=0.75) > bound()
    assert 0.40 < bound() < 0.42  # 1.5 * sqrt(0.0755)


# --- storage and bytes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cols", "rows", "option"),
    [
        (64, 48, MagnitudeOption()),
        (96, 5, MagnitudeOption(0.25, None, 48, 3)),
        (36, 7, MagnitudeOption(0.5, "3:6", 12, 16)),
        (40, 3, MagnitudeOption(0.5, "2:4", 20, 5, True)),
        (56, 9, MagnitudeOption(0.5, "4:8", 56, 2)),
        (33, 4, MagnitudeOption(0.4, None, 11, 8)),
        (30, 6, MagnitudeOption(0.6, "2:5", 10, 16)),
    ],
    ids=lambda v: getattr(v, "label", str(v)),
)
def test_cost_is_the_bytes_of_the_state(cols: int, rows: int, option: MagnitudeOption) -> None:
    for bias in (True, False):
        torch.manual_seed(0)
        layer = nn.Linear(cols, rows, bias=bias)
        shape = LayerShape.of(layer)
        out = MAGNITUDE.convert(layer, option)
        saved = load_safetensors(save_safetensors(out.state_dict()))
        cost = MAGNITUDE.cost(shape, option)
        assert cost.bytes == sum(t.numel() * t.element_size() for t in saved.values())
        assert cost.weight_bytes == out.stored_weight_bytes()
        for method, option_type in zip(METHODS.values(), OPTION_TYPES, strict=True):
            other = option_type(**dataclasses.asdict(option))
            assert method.cost(shape, other) == cost
            assert (
                sum(
                    t.numel() * t.element_size()
                    for t in method.empty(shape, other).state_dict().values()
                )
                == cost.bytes
            )


def test_sparsity_saves_what_it_promises() -> None:
    shape = LayerShape("linear", 1024, 1024, dtype="float16")
    dense = 1024 * 1024 * 2
    assert MAGNITUDE.cost(shape, MagnitudeOption()).weight_bytes == dense // 2 + dense // 16
    two_four = MAGNITUDE.cost(shape, MagnitudeOption(pattern="2:4")).weight_bytes
    assert two_four == dense // 2 + 1024 * 256 * 3 // 8
    int4 = MAGNITUDE.cost(shape, MagnitudeOption(pattern="2:4", bits=4)).weight_bytes
    assert int4 == 1024 * (512 // 2 + 96 + 16 * 4)


def test_conv1d_is_pruned_like_the_equal_linear_layer() -> None:
    linear = make_linear(cols=64, rows=48)
    conv = Conv1D(48, 64)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
        conv.bias.copy_(linear.bias)
    for option_type in OPTION_TYPES:
        option = option_type(0.5, "2:4", 32, 4)
        a, b = converted(linear, option), converted(conv, option)
        for name, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[name]), (option.method, name)


def test_conversion_is_deterministic_and_leaves_layer_and_observer_alone() -> None:
    layer = make_linear()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    option = SparseGPTOption(0.5, None, 64, 4)
    observer = observed(layer, option, [mixed_inputs(300, seed=s) for s in range(2)])
    hessian = observer.hessian()
    first = SPARSEGPT.convert(layer, option, observer).state_dict()
    second = SPARSEGPT.convert(layer, option, observer).state_dict()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert torch.equal(observer.hessian(), hessian)


def test_dead_inputs_give_finite_weights_and_are_pruned_first() -> None:
    layer = make_linear()
    dead = [3, 40, 41, 100]
    batches = []
    for seed in range(4):
        x = mixed_inputs(256, seed)
        x[:, dead] = 0.0
        batches.append(x)
    for option in (SparseGPTOption(), WandaOption()):
        out = METHODS[option.method].convert(layer, option, observed(layer, option, batches))
        assert torch.isfinite(out.dequantize()).all()
        assert not out.kept_mask()[:, dead].any()


def test_options_of_one_layer_share_one_observer_until_it_is_fed() -> None:
    layer, other = make_linear(), make_linear(seed=1)
    for method, option_type in zip(METHODS.values(), OPTION_TYPES, strict=True):
        if not method.needs_calibration(option_type()):
            assert method.observer(layer, option_type()) is None
            continue
        first = method.observer(layer, option_type())
        assert method.observer(layer, option_type(pattern="2:4")) is first
        assert method.observer(other, option_type()) is not first
        first.observe(layer, (torch.randn(4, COLS),), None)
        assert method.observer(layer, option_type()) is not first


# --- options, labels and grids ----------------------------------------------------------------


def test_labels_and_json_round_trip() -> None:
    assert SparseGPTOption().label == "sgpt-s50-b64"
    assert MagnitudeOption(0.5, "2:4", 64, 4).label == "mag-2:4-b64-int4-asym"
    assert WandaOption(0.375, None, 32, 3, True).label == "wanda-s37.5-b32-int3-sym"
    for option in (SparseGPTOption(0.5, "4:8", 32, 4, True), WandaOption(0.3)):
        data = option.to_dict()
        assert data["method"] == option.method
        assert option_from_dict(data) == option


def test_grids_are_small_valid_and_uniquely_labelled() -> None:
    for cols in (64, 384, 96, 36, 50):
        shape = LayerShape("linear", 48, cols)
        for method in METHODS.values():
            grid = method.grid(shape)
            assert len(grid) <= 5
            labels = [o.label for o in grid]
            assert len(set(labels)) == len(labels)
            for option in grid:
                method.check(shape, option, LAYER)
    shape = LayerShape("linear", 48, 384)
    labels = {o.label for o in SPARSEGPT.grid(shape)}
    assert labels == {
        "sgpt-s50-b64",
        "sgpt-2:4-b64",
        "sgpt-s50-b64-int4-asym",
        "sgpt-2:4-b64-int4-asym",
        "sgpt-4:8-b64",
    }
    assert len(MAGNITUDE.grid(shape)) == 4
    assert {o.block for o in WANDA.grid(LayerShape("linear", 48, 96))} == {48}
    assert WANDA.grid(LayerShape("embedding", 100, 64)) == []


# --- refusals -------------------------------------------------------------------------------


def refusal(option: PruneOption, cols: int = 96) -> str:
    with pytest.raises(OptionError) as info:
        METHODS[option.method].check(LayerShape("linear", 48, cols), option, LAYER)
    message = str(info.value)
    assert LAYER in message and "allowed:" in message, message
    return message


@pytest.mark.parametrize("sparsity", [0.0, 1.0, 1.5, -0.2, 0.995, "0.5", True])
def test_sparsity_out_of_range_is_refused(sparsity: object) -> None:
    message = refusal(MagnitudeOption(sparsity=sparsity, block=32))
    assert repr(sparsity) in message and "(0, 1)" in message


def test_sparsity_that_does_not_match_the_pattern_is_refused() -> None:
    message = refusal(WandaOption(0.6, "2:4", 32))
    assert "0.6" in message and "allowed: 0.5" in message
    WANDA.check(LayerShape("linear", 48, 96), WandaOption(0.75, "1:4", 32), LAYER)


@pytest.mark.parametrize("pattern", ["2-4", "4:2", "0:4", "2:9", "2:4:8", " 2:4", "", 24])
def test_malformed_pattern_is_refused(pattern: object) -> None:
    message = refusal(SparseGPTOption(pattern=pattern, block=32))
    assert repr(pattern) in message and "2:4, 3:4" in message


def test_pattern_whose_m_does_not_divide_the_width_is_refused() -> None:
    message = refusal(MagnitudeOption(pattern="4:8", block=36), cols=36)
    assert "'4:8'" in message and "36" in message
    assert "2:4" in message and "3:6" in message and "4:8" not in message.split("allowed:")[1]


@pytest.mark.parametrize(("block", "pattern"), [(40, None), (0, None), (36, "4:8"), (6, "2:4")])
def test_block_that_does_not_divide_the_width_or_fit_the_pattern_is_refused(
    block: int, pattern: str | None
) -> None:
    sparsity = 0.5
    message = refusal(MagnitudeOption(sparsity, pattern, block))
    assert f"block {block}" in message
    allowed = [
        int(b) for b in message.split("allowed:")[1].replace(",", " ").split() if b.isdigit()
    ]
    assert allowed and block not in allowed
    for good in allowed:
        MAGNITUDE.check(
            LayerShape("linear", 48, 96), MagnitudeOption(sparsity, pattern, good), LAYER
        )


@pytest.mark.parametrize("bits", [0, 1, 9, 12, 32, True])
def test_bits_outside_the_list_are_refused(bits: object) -> None:
    message = refusal(WandaOption(bits=bits, block=32))
    assert "[2, 3, 4, 5, 6, 7, 8, 16]" in message


def test_symmetric_float16_values_are_refused() -> None:
    message = refusal(MagnitudeOption(block=32, symmetric=True))
    assert "symmetric" in message and "16 bits" in message


def test_embeddings_are_not_supported() -> None:
    shape = LayerShape.of(nn.Embedding(100, 64))
    for method in METHODS.values():
        assert not method.supports(shape)
    with pytest.raises(OptionError, match="linear layers only"):
        MAGNITUDE.check(shape, MagnitudeOption(), "embeddings.word")


@pytest.mark.parametrize("option_type", [WandaOption, SparseGPTOption], ids=lambda t: t.method)
def test_convert_without_calibration_says_so(option_type: type[PruneOption]) -> None:
    option = option_type()
    method = METHODS[option.method]
    with pytest.raises(OptionError, match="calibration") as info:
        method.convert(make_linear(), option, None)
    assert option.label in str(info.value)
    unfed = method.observer(make_linear(), option)
    with pytest.raises(OptionError, match="saw no inputs"):
        method.convert(make_linear(), option, unfed)
    small = make_linear(cols=64, rows=8)
    with pytest.raises(OptionError, match="width 64"):
        method.convert(make_linear(), option, observed(small, option, [torch.randn(80, 64)]))


def test_nan_weights_are_refused() -> None:
    layer = make_linear()
    with torch.no_grad():
        layer.weight[3, 5] = math.nan
    with pytest.raises(OptionError, match="NaN"):
        MAGNITUDE.convert(layer, MagnitudeOption())
