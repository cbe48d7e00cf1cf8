"""W8A8 options: 7- or 8-bit dynamic activations, weight scales per channel or per tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from methods.base import LayerShape
from methods.errors import OptionError
from methods.pair_safe import pair_sums_fit
from methods.registry import option_from_dict
from methods.smoothquant import (
    SmoothQuantW8A8,
    W8A8Linear,
    W8A8Option,
    _fbgemm_ready,
    dynamic_quantize,
    has_vnni,
)

METHOD = SmoothQuantW8A8()


def layer(rows: int = 48, cols: int = 64, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(cols, rows)


def activations(rows: int = 20, cols: int = 64, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=generator) * 2
    x[:, 3] *= 15  # an outlier channel sets the range
    return x


@pytest.mark.parametrize(
    ("option", "label"),
    [
        (W8A8Option(0), "w8a8"),
        (W8A8Option(0.6), "w8a8-sq0.6"),
        (W8A8Option(0.6, activation_bits=8), "w8a8-a8-sq0.6"),
        (W8A8Option(0, activation_bits=8, weight_scales="tensor"), "w8a8-a8-tensor"),
        (W8A8Option(0.6, activation_bits=8, pair_safe=True), "w8a8-a8-pairsafe-sq0.6"),
        (
            W8A8Option(0, activation_bits=8, weight_scales="tensor", pair_safe=True),
            "w8a8-a8-pairsafe-tensor",
        ),
    ],
)
def test_labels_name_each_variant_and_round_trip(option: W8A8Option, label: str) -> None:
    assert option.label == label
    assert option_from_dict(option.to_dict()) == option


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"activation_bits": 6}, "activation_bits 6 is not allowed; allowed: 7 or 8"),
        ({"weight_scales": "group"}, "weight_scales 'group' is not allowed; allowed: channel"),
        ({"pair_safe": 1}, "pair_safe must be true or false, got 1"),
    ],
)
def test_bad_fields_are_refused_naming_what_is_allowed(fields: dict, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        METHOD.check(LayerShape.of(layer()), W8A8Option(0, **fields), "fc")


@pytest.mark.parametrize("per_tensor", [False, True])
def test_stored_bytes_are_the_priced_bytes(per_tensor: bool) -> None:
    option = W8A8Option(0, activation_bits=8, weight_scales="tensor" if per_tensor else "channel")
    source = layer()
    module = METHOD.convert(source, option)
    assert module.scales.numel() == (1 if per_tensor else 48)
    shape = LayerShape.of(source)
    assert module.stored_weight_bytes() == METHOD.cost(shape, option).weight_bytes
    assert METHOD.cost(shape, option).bytes < METHOD.cost(shape, W8A8Option(0)).bytes or (
        not per_tensor
    )


def test_per_tensor_weights_share_one_scale_and_are_coarser() -> None:
    """Rows of unequal size: one scale for all of them loses the small rows' precision."""
    source = layer()
    with torch.no_grad():
        source.weight[::4] *= 20
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = source(x)

    def error(option: W8A8Option) -> float:
        with torch.no_grad():
            out = METHOD.convert(source, option)(x)
        return float((out - exact).norm() / exact.norm())

    channel = error(W8A8Option(0, activation_bits=8))
    tensor = error(W8A8Option(0, activation_bits=8, weight_scales="tensor"))
    assert 0 < channel < tensor < 0.05


def test_eight_bit_activations_halve_the_step() -> None:
    x = activations()
    seven = (dynamic_quantize(x, 7) - x).abs().max()
    eight = (dynamic_quantize(x, 8) - x).abs().max()
    span = float(x.max() - x.min())
    assert seven <= span / 127 / 2 + 1e-6
    assert eight <= span / 255 / 2 + 1e-6
    assert eight < seven


def test_eight_bit_activations_are_onnx_runtimes_dynamic_quantize_linear() -> None:
    """The reference quantises exactly as ONNX Runtime's DynamicQuantizeLinear (same codes)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "scale", "zero"])
    graph = helper.make_graph(
        [node],
        "dql",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [
            helper.make_tensor_value_info("q", TensorProto.UINT8, [None, 64]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("zero", TensorProto.UINT8, []),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for seed in range(4):
        x = activations(seed=seed)
        codes, scale, zero = session.run(None, {"x": x.numpy()})
        ours = dynamic_quantize(x, 8).numpy()
        recovered = np.round(ours / np.float32(scale)) + np.float32(zero)
        np.testing.assert_array_equal(recovered, codes.astype(np.float32))
        decoded = (codes.astype(np.float32) - np.float32(zero)) * np.float32(scale)
        np.testing.assert_allclose(ours, decoded, rtol=1e-6, atol=0)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_the_kernel_path_computes_the_reference(per_tensor: bool) -> None:
    """fbgemm (with VNNI for 8-bit activations) gives the float reference's output."""
    option = W8A8Option(0, activation_bits=8, weight_scales="tensor" if per_tensor else "channel")
    module = METHOD.convert(layer(), option)
    assert isinstance(module, W8A8Linear)
    x = activations()
    if not _fbgemm_ready(x, 8):
        assert not has_vnni() or "fbgemm" not in torch.backends.quantized.supported_engines
        pytest.skip("no VNNI fbgemm here: 8-bit activations run the reference itself")
    reference = module.reference(x)
    kernel = module(x)
    assert float((kernel - reference).norm() / reference.norm()) < 1e-4


@pytest.mark.parametrize("per_tensor", [False, True])
def test_pair_safe_codes_keep_8_bit_resolution_and_run_fbgemm_on_any_cpu(
    per_tensor: bool,
) -> None:
    """Pair-safe codes keep every adjacent column pair within 128, cost what full-range
    codes cost, lose little to them (1.0-1.4x their weight error on the demo's layers,
    where 7-bit codes lose 2x), and with 8-bit activations run fbgemm exactly with or
    without VNNI."""
    scales = "tensor" if per_tensor else "channel"
    safe = W8A8Option(0, activation_bits=8, weight_scales=scales, pair_safe=True)
    full = W8A8Option(0, activation_bits=8, weight_scales=scales)
    source = layer(rows=64, cols=96)
    with torch.no_grad():  # trained weights are near Gaussian, not uniform as at init
        source.weight.copy_(torch.randn(64, 96, generator=torch.Generator().manual_seed(2)))
    module = METHOD.convert(source, safe)
    assert pair_sums_fit(module.portable_codes())
    shape = LayerShape.of(source)
    assert METHOD.cost(shape, safe) == METHOD.cost(shape, full)
    weight = source.weight.detach()

    def weight_error(codes: torch.Tensor, scales: torch.Tensor) -> float:
        return float((codes.float() * scales.float()[:, None] - weight).norm())

    wide = METHOD.convert(source, full)
    absmax = weight.abs().amax() if per_tensor else weight.abs().amax(dim=1, keepdim=True)
    seven = torch.round(weight / (absmax / 63)).clamp(-63, 63) * (absmax / 63)  # [-63, 63]
    error_safe = weight_error(module.portable_codes(), module.scales)
    error_full = weight_error(wide.portable_codes(), wide.scales)
    error_seven = float((seven - weight).norm())
    assert error_safe < 1.5 * error_full and error_safe < 0.75 * error_seven
    x = activations(cols=96)
    if not _fbgemm_ready(x, 8, pair_safe=True):
        assert "fbgemm" not in torch.backends.quantized.supported_engines
        pytest.skip("no fbgemm here")
    reference = module.reference(x)
    assert float((module(x) - reference).norm() / reference.norm()) < 1e-4
    empty = METHOD.empty(shape, safe)
    empty.load_state_dict(module.state_dict())
    torch.testing.assert_close(empty(x), module(x))


def test_saved_per_tensor_layers_load_back() -> None:
    option = W8A8Option(0.5, activation_bits=8, weight_scales="tensor")
    source = layer()
    observer = METHOD.observer(source, option)
    assert observer is not None
    observer.observe(source, (activations(),), None)
    module = METHOD.convert(source, option, observer)
    x = activations(seed=3)
    expected = module(x)
    empty = METHOD.empty(LayerShape.of(source), option)
    empty.load_state_dict(module.state_dict())
    torch.testing.assert_close(empty(x), expected)
