"""Peak memory of inference: traced activations, scratch buffers, measured RSS
(profilers.memory)."""

from __future__ import annotations

import time
import weakref

import pytest
import torch
from profiler_helpers import make_batch, make_bert
from torch import nn
from torch.utils._python_dispatch import (
    _get_current_dispatch_mode,
    _get_current_dispatch_mode_stack,
)

from methods import kernels, workspace
from methods.quantized import QuantizedEmbedding, QuantizedLinear
from methods.registry import get_method
from methods.rtn import QuantOption
from profilers.measure import model_bytes
from profilers.memory import (
    ActivationPeak,
    MeasuredPeak,
    PeakPrediction,
    activation_peak,
    measure_peak,
    predict_peak,
    scratch_bytes,
)

FLOAT = 4  # bytes of a float32
MiB = 2**20


class RepeatThenDouble(nn.Module):
    """``a = x.repeat(4, 1)``; ``b = a * 2``; ``a`` freed; returns ``b.sum()``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.repeat(4, 1)
        b = a * 2
        del a
        return b.sum()


class ManyViews(nn.Module):
    """One fresh tensor, several views of it and an in-place write into it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.repeat(4, 1)
        flat = a.view(-1)
        a.t()
        a.mul_(2)
        return flat[8:].sum()


class BigWeights(nn.Module):
    """16 MiB of weights, a few KiB of activations."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2048, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class ViewsOfState(nn.Module):
    """Returns views of its input and of its parameter only: allocates nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(64, 64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.view(-1), self.weight.t()


class Fails(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        raise RuntimeError(f"failed after {y.numel()} elements")


def quantize_linears(model: nn.Module, option: QuantOption) -> nn.Module:
    """Replace every nn.Linear of ``model`` by its RTN-quantised module, in place."""
    method = get_method("rtn")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, method.convert(child, option))
    return model


def scratch_now() -> int:
    """Bytes of this thread's scratch buffers at the moment."""
    buffers = getattr(workspace._LOCAL, "buffers", None) or {}
    return sum(b.numel() * b.element_size() for b in buffers.values())


@pytest.fixture
def no_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quantised layers dequantise into the scratch buffers on every call."""
    monkeypatch.setattr(kernels.POLICY, "enabled", False)


# ---------------------------------------------------------------------- activation_peak
def test_peak_of_known_tensors_is_exact() -> None:
    x = torch.randn(16, 32)
    repeated = 4 * x.numel() * FLOAT
    peak = activation_peak(RepeatThenDouble(), {"x": x})
    assert isinstance(peak, ActivationPeak)
    assert peak.peak_bytes == 2 * repeated  # a and b live together, then a is freed
    assert peak.allocated_bytes == 2 * repeated + FLOAT  # a, b and the sum
    assert peak.ops == 3
    assert peak.retained_bytes == 0


def test_views_and_in_place_writes_are_counted_once() -> None:
    x = torch.randn(16, 32)
    repeated = 4 * x.numel() * FLOAT
    peak = activation_peak(ManyViews(), {"x": x})
    assert peak.peak_bytes == repeated + FLOAT
    assert peak.allocated_bytes == repeated + FLOAT


def test_parameters_and_inputs_are_not_counted() -> None:
    model = BigWeights().eval()
    peak = activation_peak(model, {"x": torch.randn(1, 2048)})
    assert model_bytes(model) > 16 * MiB
    assert peak.peak_bytes == 2048 * FLOAT  # the output alone
    nothing = activation_peak(ViewsOfState(), {"x": torch.randn(8, 8)})
    assert nothing.peak_bytes == nothing.allocated_bytes == 0


def test_peak_grows_with_batch_size(bert: nn.Module) -> None:
    peaks = [activation_peak(bert, make_batch(batch, 16)).peak_bytes for batch in (1, 2, 4)]
    assert peaks[0] > 0
    assert peaks[0] < peaks[1] < peaks[2]
    assert peaks[2] > 3 * peaks[0]
    again = activation_peak(bert, make_batch(2, 16))
    assert again.peak_bytes == peaks[1]
    assert again.allocated_bytes > again.peak_bytes
    assert again.ops > 50


def test_nothing_stays_active_afterwards(bert: nn.Module) -> None:
    modules = list(bert.modules())
    finalizers = len(weakref.finalize._registry)  # type: ignore[attr-defined]
    activation_peak(bert, make_batch(2, 8))
    with pytest.raises(RuntimeError, match="failed after"):
        activation_peak(Fails(), {"x": torch.ones(3)})
    assert _get_current_dispatch_mode() is None
    assert _get_current_dispatch_mode_stack() == []
    assert not torch.is_inference_mode_enabled()
    assert len(weakref.finalize._registry) == finalizers  # type: ignore[attr-defined]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)
    result = bert(**make_batch(1, 4)).last_hidden_state
    assert result.requires_grad  # autograd works as before


def test_scratch_buffers_are_left_out(no_kernels: None) -> None:
    model = quantize_linears(make_bert(), QuantOption(4, 32, False))
    batch = make_batch(2, 16)
    workspace.release()
    try:
        first = activation_peak(model, batch)  # creates the scratch buffers
        second = activation_peak(model, batch)  # reuses them
    finally:
        workspace.release()
    assert first.retained_bytes >= scratch_bytes(model) > 0
    assert second.retained_bytes == 0
    assert first.peak_bytes == second.peak_bytes > 0


# ---------------------------------------------------------------------- scratch_bytes
def test_scratch_is_zero_without_quantised_layers(bert: nn.Module) -> None:
    assert scratch_bytes(bert) == 0
    assert scratch_bytes(nn.Linear(8, 8)) == 0


def test_scratch_is_the_largest_layer_buffers(no_kernels: None) -> None:
    model = quantize_linears(
        nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 40)), QuantOption(4, 32, False)
    )
    assert [(m.rows, m.cols) for m in model if isinstance(m, QuantizedLinear)] == [
        (96, 64),
        (40, 96),
    ]
    expected = 96 * 64 * FLOAT + 96 * 64  # float weight + uint8 codes of the first layer
    assert scratch_bytes(model) == expected
    workspace.release()
    try:
        with torch.inference_mode():
            model(torch.randn(32, 64))
        assert scratch_now() == expected
    finally:
        workspace.release()


def test_scratch_takes_each_kind_from_its_largest_layer(no_kernels: None) -> None:
    rtn = get_method("rtn")
    wide = rtn.convert(nn.Linear(128, 64), QuantOption(8, 32, False))  # no codes buffer
    narrow = rtn.convert(nn.Linear(36, 48), QuantOption(3, None, True))  # 36 -> 40 columns
    table = rtn.convert(nn.Embedding(1000, 64), QuantOption(4, 32, False))
    assert isinstance(table, QuantizedEmbedding)  # decodes rows into fresh tensors: no scratch
    model = nn.Sequential(wide, nn.Linear(64, 36), narrow)
    expected = 64 * 128 * FLOAT + 48 * 40
    assert scratch_bytes(model) == expected
    assert scratch_bytes(nn.ModuleList([model, table])) == expected
    assert scratch_bytes(model, torch.float16) == 64 * 128 * 2 + 48 * 40
    workspace.release()
    try:
        with torch.inference_mode():
            model(torch.randn(32, 128))
        assert scratch_now() == expected
    finally:
        workspace.release()


# ---------------------------------------------------------------------- measure_peak
def test_measured_peak_sees_a_large_allocation() -> None:
    size = 64 * MiB

    def allocate() -> None:
        x = torch.ones(size // FLOAT)
        x.add_(1)
        time.sleep(0.005)

    measured = measure_peak(allocate)
    assert isinstance(measured, MeasuredPeak)
    assert measured.method == "rss-sampling"
    assert measured.baseline_bytes > 0
    assert 0.8 * size <= measured.peak_increase_bytes <= 1.5 * size


def test_measured_peak_of_a_trivial_call_is_small() -> None:
    measured = measure_peak(lambda: None)
    assert 0 <= measured.peak_increase_bytes < 8 * MiB
    assert measured.method == "rss-sampling"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without a GPU")
def test_cuda_flag_without_a_gpu_samples_rss() -> None:
    measured = measure_peak(lambda: None, cuda=True)
    assert measured.method == "rss-sampling"
    assert set(measured.to_dict()) == {"peak_increase_bytes", "baseline_bytes", "method"}


# ---------------------------------------------------------------------- predict_peak
def test_prediction_sums_its_parts() -> None:
    activations = ActivationPeak(peak_bytes=300, allocated_bytes=900, ops=7)
    assert predict_peak(1000, 300, 20) == 1320
    assert predict_peak(1000, activations, 20) == 1320
    prediction = PeakPrediction.of(1000, activations, 20)
    assert prediction == PeakPrediction(weights=1000, activations=300, scratch=20, total=1320)
    assert prediction.to_dict() == {
        "weights": 1000,
        "activations": 300,
        "scratch": 20,
        "total": 1320,
    }


def test_kv_cache_counts_key_and_value_widths_of_every_block() -> None:
    """Llama with 4 query and 2 key/value heads of 16: 2 x 32 values per token and block."""
    import transformers

    from profilers.memory import kv_cache_bytes

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config)
    assert kv_cache_bytes(model, 2, 100, 2) == 3 * 2 * 100 * (32 + 32) * 2
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4)
    )
    assert kv_cache_bytes(gpt2, 1, 10, 4) == 2 * 10 * (32 + 32) * 4
