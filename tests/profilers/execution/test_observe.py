"""Phase one of calibrated methods: observers fed by forward hooks (profilers.execution.observe)."""

from __future__ import annotations

import torch
from torch import nn

from methods.gptq import GPTQOption
from methods.keep import KeepOption
from methods.observers import HessianObserver
from methods.rtn import QuantOption
from methods.smoothquant import ActivationObserver, W8A8Option
from profilers.execution.observe import collect_observers, needs_statistics
from tests.profilers.profiler_helpers import Batch, make_bert

LAYERS = ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"]


def test_observers_exist_only_for_options_that_need_statistics(batches: list[Batch]) -> None:
    model = make_bert()
    options = {name: [KeepOption(), QuantOption(4, 32, False), W8A8Option(0.6)] for name in LAYERS}
    assert needs_statistics(options)
    assert not needs_statistics({name: [QuantOption(8, None, True)] for name in LAYERS})
    observers = collect_observers(model, options, batches)
    assert set(observers) == {(name, "w8a8-sq0.6") for name in LAYERS}
    assert all(isinstance(o, ActivationObserver) for o in observers.values())


def test_observed_maxima_match_the_layer_inputs(batches: list[Batch]) -> None:
    model = make_bert()
    seen: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: object) -> None:
            peak = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0)
            seen[name] = peak if name not in seen else torch.maximum(seen[name], peak)

        return hook

    handles = [model.get_submodule(n).register_forward_hook(record(n)) for n in LAYERS]
    with torch.inference_mode():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    observers = collect_observers(model, {n: [W8A8Option(0.75)] for n in LAYERS}, batches)
    for name in LAYERS:
        observer = observers[(name, "w8a8-sq0.75")]
        assert observer.calls == len(batches)
        assert torch.equal(observer.absmax, seen[name])


def test_a_shared_observer_is_hooked_and_fed_once(batches: list[Batch]) -> None:
    """GPTQ options of one layer share one Hessian observer: one ``cols x cols`` matrix per
    layer, fed each input once (not once per option)."""
    model = make_bert()
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in LAYERS}

    def record(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: object) -> None:
            inputs[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())

        return hook

    handles = [model.get_submodule(n).register_forward_hook(record(n)) for n in LAYERS]
    with torch.inference_mode():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()

    gptq = [GPTQOption(4, None, True), GPTQOption(3, None, False), GPTQOption(2, None, True)]
    options = {name: [*gptq, W8A8Option(0.6)] for name in LAYERS}
    observers = collect_observers(model, options, batches)
    assert set(observers) == {(n, o.label) for n in LAYERS for o in options[n]}
    for name in LAYERS:
        shared = observers[(name, gptq[0].label)]
        assert isinstance(shared, HessianObserver)
        assert all(observers[(name, o.label)] is shared for o in gptq)
        assert shared.calls == len(batches)
        x = torch.cat(inputs[name]).double()
        assert shared.tokens == x.shape[0]
        torch.testing.assert_close(
            shared.hessian(), 2 * x.t() @ x / x.shape[0], rtol=1e-5, atol=1e-6
        )
        assert observers[(name, "w8a8-sq0.6")].calls == len(batches)
    other = observers[(LAYERS[1], gptq[0].label)]
    assert other is not observers[(LAYERS[0], gptq[0].label)]
    assert all(not m._forward_hooks for m in model.modules())


def test_the_model_is_left_without_hooks(batches: list[Batch]) -> None:
    model = make_bert()
    collect_observers(model, {n: [W8A8Option(0.75)] for n in LAYERS}, batches)
    assert all(not m._forward_hooks for m in model.modules())


def test_nothing_to_observe_runs_nothing(call_counter) -> None:
    model = make_bert()
    calls = call_counter(model)
    assert collect_observers(model, {LAYERS[0]: [KeepOption()]}, [{"input_ids": None}]) == {}
    assert calls == [0]


def test_observers_asking_for_fisher_information_get_the_weight_diagonal(
    batches: list[Batch],
) -> None:
    """After the forward pass, observers with ``needs_fisher`` receive the diagonal Fisher /
    Gauss-Newton information of their layer's weight, as the Fisher proxy computes it."""
    from methods.lowrank import FisherSVDOption
    from profilers.execution.observe import FISHER_SAMPLES
    from profilers.fisher import fisher_diagonals

    model = make_bert()
    options = {name: [FisherSVDOption(fraction=0.25), QuantOption(4, 32, False)] for name in LAYERS}
    observers = collect_observers(model, options, batches)
    assert set(observers) == {(name, "fisher_svd-r25%") for name in LAYERS}
    expected, _, _ = fisher_diagonals(model, sorted(LAYERS), batches, FISHER_SAMPLES, seed=0)
    for name in LAYERS:
        fisher = observers[(name, "fisher_svd-r25%")].fisher
        assert fisher is not None and fisher.shape == model.get_submodule(name).weight.shape
        assert torch.equal(fisher, expected[name]) and float(fisher.sum()) > 0
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_methods_needing_the_same_statistic_share_one_observer(batches: list[Batch]) -> None:
    """GPTQ, SparseGPT and whitened SVD all need ``X^T X``: one Hessian per layer, hooked once."""
    from methods.lowrank import WhitenedSVDOption
    from methods.pruning import SparseGPTOption, WandaOption

    model = make_bert()
    options = {
        name: [GPTQOption(4, 32), SparseGPTOption(), WhitenedSVDOption(fraction=0.5), WandaOption()]
        for name in LAYERS
    }
    observers = collect_observers(model, options, batches)
    for name in LAYERS:
        hessians = {
            id(o)
            for (layer, label), o in observers.items()
            if layer == name and not label.startswith("wanda")
        }
        assert len(hessians) == 1
        assert isinstance(observers[(name, GPTQOption(4, 32).label)], HessianObserver)
