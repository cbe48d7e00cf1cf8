"""Many GPTQ options of a layer solved together give each option the codes it gets alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from methods import GPTQOption, QuantOption, get_method
from methods.base import Observer
from methods.errors import OptionError
from methods.gptq_solver import gptq_quantize, gptq_quantize_many
from methods.observers import HessianObserver
from methods.registry import convert_each

GPTQ = get_method("gptq")
ROWS, COLS = 48, 160

MIXED = [
    GPTQOption(4, None, True),
    GPTQOption(4, 32, False),
    GPTQOption(3, 32, True),
    GPTQOption(2, 32, False),
    GPTQOption(3, 40, True, act_order=False),  # groups fitted during the sweep
    GPTQOption(4, 32, False, damp=0.05),  # another dampening: another factor
    GPTQOption(8, 160, False),
    GPTQOption(3, None, False, act_order=False),  # one group per row: static without order
]


def inputs(tokens: int = 600, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    spread = torch.linspace(0.05, 4.0, COLS)
    mix = torch.randn(COLS, COLS, generator=generator) / COLS**0.5
    return (torch.randn(tokens, COLS, generator=generator) @ mix) * spread


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 2 * x.t() @ x / x.shape[0]


@pytest.mark.parametrize("stack_rows", [ROWS, 2 * ROWS, 10_000])
def test_stacked_sweeps_give_each_option_its_own_codes(
    stack_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One option per stack, two per stack and every option in one stack."""
    monkeypatch.setattr("methods.gptq_solver.STACK_ROWS", stack_rows)
    torch.manual_seed(0)
    weight = torch.randn(ROWS, COLS)
    hessian = hessian_of(inputs())
    hessian[:, 7] = hessian[7, :] = 0.0  # a dead input
    together = list(gptq_quantize_many(weight, hessian, MIXED))
    assert len(together) == len(MIXED)
    for option, result in zip(MIXED, together, strict=True):
        alone = gptq_quantize(weight, hessian, option)
        assert torch.equal(result.codes, alone.codes), option.label
        assert torch.equal(result.scales, alone.scales), option.label
        assert (result.offsets is None) == option.symmetric
        if result.offsets is not None:
            assert torch.equal(result.offsets, alone.offsets), option.label


def test_the_numpy_sweep_gives_the_torch_sweeps_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU narrow stacks sweep in numpy: the same arithmetic, bit for bit."""
    torch.manual_seed(1)
    weight = torch.randn(ROWS, COLS)
    hessian = hessian_of(inputs(seed=5))
    static = [o for o in MIXED if o.act_order]
    in_numpy = list(gptq_quantize_many(weight, hessian, static))
    monkeypatch.setattr("methods.gptq_solver.NUMPY_ROWS", 0)
    in_torch = list(gptq_quantize_many(weight, hessian, static))
    for option, a, b in zip(static, in_numpy, in_torch, strict=True):
        assert torch.equal(a.codes, b.codes), option.label
        assert torch.equal(a.scales, b.scales), option.label


def test_the_options_differ_from_each_other() -> None:
    """The stack does not hand one option's codes to another."""
    torch.manual_seed(0)
    weight = torch.randn(ROWS, COLS)
    results = list(gptq_quantize_many(weight, hessian_of(inputs()), MIXED[:4]))
    assert len({tuple(r.codes.flatten().tolist()) for r in results}) == 4
    assert int(results[3].codes.max()) <= 3 and int(results[0].codes.max()) > 3


def observed(module: nn.Linear, x: torch.Tensor) -> HessianObserver:
    observer = HessianObserver(module.in_features)
    observer.observe(module, (x,), None)
    return observer


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_convert_many_builds_what_convert_builds_and_refuses_each_bad_option() -> None:
    torch.manual_seed(1)
    module = nn.Linear(COLS, ROWS)
    observer = observed(module, inputs())
    bad = GPTQOption(4, 48, True)  # 48 does not divide 160
    options = [MIXED[0], bad, MIXED[1], MIXED[4]]
    results = list(GPTQ.convert_many(module, options, lambda option: observer))
    assert [option for option, _ in results] == options
    refused = results[1][1]
    assert isinstance(refused, OptionError)
    with pytest.raises(OptionError) as alone:
        GPTQ.convert(module, bad, observer)
    assert str(refused) == str(alone.value)
    for option, built in (results[0], results[2], results[3]):
        assert isinstance(built, nn.Module)
        expected = GPTQ.convert(module, option, observer)
        got, want = state(built), state(expected)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), option.label


def test_convert_many_without_statistics_refuses_every_option() -> None:
    module = nn.Linear(COLS, ROWS)
    unfed: Observer = HessianObserver(COLS)
    results = list(GPTQ.convert_many(module, MIXED[:2], lambda option: unfed))
    assert all(isinstance(built, OptionError) for _, built in results)
    assert all("saw no inputs" in str(built) for _, built in results)


def test_convert_each_hands_each_method_its_options_in_order() -> None:
    torch.manual_seed(2)
    module = nn.Linear(COLS, ROWS)
    observer = observed(module, inputs())
    options = [QuantOption(4, 32, False), MIXED[0], QuantOption(8, None, True), MIXED[1]]
    results = dict(convert_each(module, options, lambda option: observer))
    assert list(results) == [options[0], options[2], options[1], options[3]]
    for option in options:
        expected = get_method(option.method).convert(module, option, observer)
        got, want = state(results[option]), state(expected)
        assert all(torch.equal(got[k], want[k]) for k in want), option.label


def counting_factor(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, bool]]:
    """Every factorisation GPTQ conversions run, by (dampening, activation order)."""
    import methods.gptq as gptq_module

    calls: list[tuple[float, bool]] = []
    real = gptq_module.factor

    def counted(weight, hessian, damp, act_order, label, *dtype):
        calls.append((damp, act_order))
        return real(weight, hessian, damp, act_order, label, *dtype)

    monkeypatch.setattr(gptq_module, "factor", counted)
    return calls


def test_a_layers_factor_is_kept_across_conversions(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_factor(monkeypatch)
    torch.manual_seed(2)
    module = nn.Linear(COLS, ROWS)
    observer = observed(module, inputs())
    first = GPTQ.convert(module, MIXED[0], observer)
    later = dict(GPTQ.convert_many(module, [MIXED[1], MIXED[0]], lambda option: observer))
    assert calls == [(0.01, True)]  # one factor for the probe and the later options
    got, want = state(later[MIXED[0]]), state(first)
    assert all(torch.equal(got[k], want[k]) for k in want)
    observer.observe(module, (inputs(seed=4),), None)  # more calibration: another Hessian
    GPTQ.convert(module, MIXED[0], observer)
    with torch.no_grad():
        module.weight.mul_(1.5)  # another weight
    GPTQ.convert(module, MIXED[0], observer)
    assert calls == [(0.01, True)] * 3


def test_factors_go_with_their_observer_and_within_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    from methods.gptq_solver import FactorCache

    cache = FactorCache(cap_bytes=1 << 30)
    monkeypatch.setattr("methods.gptq.FACTORS", cache)
    module = nn.Linear(COLS, ROWS)
    observer = observed(module, inputs())
    GPTQ.convert(module, MIXED[0], observer)
    GPTQ.convert(module, MIXED[5], observer)  # another dampening
    assert len(cache.entries) == 2 and cache.used > 0
    one = cache.used // 2
    del observer
    gc.collect()
    assert not cache.entries and cache.used == 0
    small = FactorCache(cap_bytes=one + 1)  # room for one factor
    monkeypatch.setattr("methods.gptq.FACTORS", small)
    observer = observed(module, inputs())
    GPTQ.convert(module, MIXED[0], observer)
    GPTQ.convert(module, MIXED[5], observer)
    assert [key[-2:] for key in small.entries] == [(0.05, True)]  # the older one left
    assert small.used == one


def test_gptq_factors_and_sweeps_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPTQ works in float32 whatever the device (its reference implementation does)."""
    from methods import gptq_solver

    dtypes: list[torch.dtype] = []
    real = gptq_solver.sweep_static

    def sweep(factored, options):
        dtypes.append(factored.upper.dtype)
        return real(factored, options)

    monkeypatch.setattr(gptq_solver, "sweep_static", sweep)
    torch.manual_seed(3)
    module = nn.Linear(COLS, ROWS)
    GPTQ.convert(module, MIXED[0], observed(module, inputs()))
    assert dtypes == [torch.float32]
