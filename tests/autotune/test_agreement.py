from __future__ import annotations

import pytest
import torch
from torch import nn

from autotune.agreement import Agreement, agreements, drop_disagreeing, honest_errors
from autotune.costs import layer_options
from autotune.layers import compressible_layers
from methods.registry import method_of
from profilers.converted import ConvertedModules
from profilers.execution.observe import collect_observers

COLS = 64


class TwoLayers(nn.Module):
    """Two linear layers side by side, each fed its own input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(COLS, 96)
        self.second = nn.Linear(COLS, 96)

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.first(first), self.second(second)], dim=-1)


def correlated(tokens: int, seed: int, rank: int = COLS) -> torch.Tensor:
    """Inputs with unequal, correlated channels (where GPTQ gains), spanning ``rank``
    directions of one fixed basis."""
    basis = torch.randn(COLS, COLS, generator=torch.Generator().manual_seed(1))
    basis = basis * torch.logspace(0, -1.5, COLS)[:, None]
    z = torch.randn(tokens, rank, generator=torch.Generator().manual_seed(seed))
    return z @ basis[:rank]


def batches(seed: int, second_rank: int | None, count: int = 4) -> list[dict[str, torch.Tensor]]:
    """``second_rank`` directions for the second layer, or every direction alike (``None``)."""
    found = []
    for i in range(count):
        generator = torch.Generator().manual_seed(seed * 100 + 50 + i)
        second = (
            torch.randn(256, COLS, generator=generator)
            if second_rank is None
            else correlated(256, seed * 100 + 50 + i, second_rank)
        )
        found.append({"first": correlated(256, seed * 100 + i), "second": second})
    return found


@pytest.fixture(scope="module")
def probed():
    """The second layer's calibration inputs span 3 of its 64 directions (a few repeated
    phrases), its selection inputs every direction alike; the first layer sees inputs drawn
    alike in both."""
    model = TwoLayers()
    layers = compressible_layers(model)
    options = layer_options(layers, ("rtn", "gptq"), None)
    calibration = batches(seed=0, second_rank=3)
    selection = batches(seed=1, second_rank=None, count=2)
    observers = collect_observers(model, options, calibration)
    keep = ConvertedModules(1 << 30)
    judged = agreements(model, layers, options, observers, selection, keep)
    return model, options, observers, calibration, selection, judged, keep


def test_every_layer_with_gptq_options_is_probed_with_its_smallest_option(probed) -> None:
    model, options, _, _, _, judged, keep = probed
    assert [a.layer for a in judged] == ["first", "second"]
    for agreement in judged:
        gptq = [o for o in options[agreement.layer] if o.method == "gptq"]
        shape = next(r.shape for r in compressible_layers(model) if r.name == agreement.layer)
        smallest = min(method_of(o).cost(shape, o).bytes for o in gptq)
        probe = next(o for o in gptq if o.label == agreement.probe)
        assert method_of(probe).cost(shape, probe).bytes == smallest
        assert agreement.stand_in == probe.storage().label
        kept = keep.get(agreement.layer, agreement.probe)
        assert (kept is not None) == agreement.holds  # kept for the tune where offered


def _direct_ratio(model, layer, agreement, observers, split) -> float:
    """The probe's output error over its stand-in's, from the layer's outputs on ``split``."""
    module = model.get_submodule(layer)
    probe = next(o for o in layer_options_of(model)[layer] if o.label == agreement.probe)
    fitted = method_of(probe).convert(module, probe, observers[(layer, probe.label)])
    plain = method_of(probe.storage()).convert(module, probe.storage())
    errors = [0.0, 0.0]
    for batch in split:
        x = batch[layer]
        with torch.no_grad():
            reference = module(x)
            for i, converted in enumerate((fitted, plain)):
                errors[i] += (converted(x) - reference).pow(2).sum().item()
    return errors[0] / errors[1]


def layer_options_of(model):
    return layer_options(compressible_layers(model), ("rtn", "gptq"), None)


def test_the_ratios_are_the_layers_output_errors_on_each_split(probed) -> None:
    model, _, observers, calibration, selection, judged, _ = probed
    for agreement in judged:
        for split, ratio in (
            (calibration, agreement.calibration),
            (selection, agreement.selection),
        ):
            direct = _direct_ratio(model, agreement.layer, agreement, observers, split)
            assert ratio == pytest.approx(direct, rel=1e-3)


def test_a_fit_to_few_directions_disagrees_and_alike_inputs_agree(probed) -> None:
    _, _, _, _, _, judged, _ = probed
    first, second = judged
    assert first.calibration < 1 and first.selection < 1 and first.holds
    assert second.calibration < 0.5  # on its own inputs the fit looks far better than RTN
    assert second.selection >= 1 and not second.holds  # on others it is worse
    assert first.optimism < second.selection / second.calibration


def test_disagreeing_methods_leave_only_their_layer(probed) -> None:
    _, options, observers, _, _, judged, _ = probed
    options = {name: list(opts) for name, opts in options.items()}
    observers = dict(observers)
    dropped = drop_disagreeing(options, observers, judged)
    assert [a.layer for a in dropped] == ["second"]
    assert options["second"] and all(o.method != "gptq" for o in options["second"])
    assert not [key for key in observers if key[0] == "second"]
    assert any(o.method == "gptq" for o in options["first"])
    assert any(key[0] == "first" for key in observers)


def test_honest_errors_scale_a_kept_method_on_its_layer_only() -> None:
    model = TwoLayers()
    options = layer_options_of(model)
    gptq = next(o.label for o in options["first"] if o.method == "gptq")
    rtn = next(o.label for o in options["first"] if o.method == "rtn")
    errors = {name: {gptq: 0.1, rtn: 0.2} for name in ("first", "second")}
    judged = [
        Agreement("first", "gptq", gptq, rtn, calibration=0.2, selection=0.5),
        Agreement("second", "gptq", gptq, rtn, calibration=0.2, selection=1.5),  # left out
    ]
    scaled = honest_errors(errors, options, judged)
    assert scaled["first"] == {gptq: pytest.approx(0.25), rtn: 0.2}
    assert scaled["second"] == errors["second"]
    assert errors["first"][gptq] == 0.1  # the table given is not changed


def test_calibration_understating_a_gain_never_scales_errors_down() -> None:
    assert Agreement("l", "gptq", "p", "s", calibration=0.5, selection=0.3).optimism == 1.0
    assert Agreement("l", "gptq", "p", "s", calibration=0.0, selection=0.3).optimism == 1.0


def test_agreements_remembered_in_a_cache_are_read_back_without_judging(probed, tmp_path) -> None:
    from autotune.agreement import remembered
    from profilers.cache import SensitivityCache

    model, options, observers, _, selection, judged, _ = probed
    layers = compressible_layers(model)
    calls = []

    def judge() -> list[Agreement]:
        calls.append(1)
        return agreements(model, layers, options, observers, selection)

    first = remembered(layers, options, observers, SensitivityCache(tmp_path, "k"), judge)
    again = remembered(layers, options, observers, SensitivityCache(tmp_path, "k"), judge)
    assert len(calls) == 1
    assert first == again == judged  # the ratios survive the JSON file exactly
    other = remembered(layers, options, observers, SensitivityCache(tmp_path, "other"), judge)
    assert len(calls) == 2 and other == judged
    remembered(layers, options, observers, None, judge)
    assert len(calls) == 3  # without a cache, judged every time


def test_a_refused_probe_is_remembered_as_not_judged(probed, tmp_path) -> None:
    from autotune.agreement import remembered
    from profilers.cache import SensitivityCache

    model, options, observers, _, _, judged, _ = probed
    layers = compressible_layers(model)
    only_second = [a for a in judged if a.layer == "second"]
    first = remembered(
        layers, options, observers, SensitivityCache(tmp_path, "k"), lambda: only_second
    )
    again = remembered(
        layers, options, observers, SensitivityCache(tmp_path, "k"), lambda: pytest.fail("judged")
    )
    assert first == again == only_second
