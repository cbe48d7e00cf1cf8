"""WeightOnlyLinear: every weight-only converted linear computes ``x W^T + bias`` through it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from methods import get_method, kernels, option_from_dict
from methods.codebook import CodebookLinear
from methods.lowrank import Float16Factor, LowRankLinear, QuantizedFactor
from methods.outliers import OutlierLinear
from methods.quantized import QuantizedEmbedding, QuantizedLinear
from methods.smoothquant import W8A8Linear
from methods.sparse import SparseLinear
from methods.weight_only import WeightOnlyLinear

COLS, ROWS = 64, 48
OPTIONS = [
    {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False},
    {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True},
    {"method": "codebook", "format": "nf", "bits": 4, "group_size": 32},
    {"method": "magnitude", "sparsity": 0.5, "pattern": None, "block": 32, "bits": 4},
    {"method": "magnitude", "sparsity": 0.5, "pattern": "2:4", "block": 32, "bits": 16},
    {"method": "svd", "rank": None, "fraction": 0.5, "bits": 16},
    {"method": "svd", "rank": None, "fraction": 0.5, "bits": 8},
]


@pytest.fixture
def dequantising(policy: kernels.KernelPolicy) -> kernels.KernelPolicy:
    """Kernels off for the test (so outputs follow the decoded weight in float32)."""
    return kernels.set_kernel_policy(enabled=False)


def make_linear(bias: bool) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(COLS, ROWS, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.02)
        if bias:
            layer.bias.normal_(0.0, 0.1)
    return layer


def effective_weight(module: nn.Module) -> torch.Tensor:
    if isinstance(module, LowRankLinear):
        second, first = module.factors()
        return second @ first
    return module.dequantize(torch.float32)


@pytest.mark.parametrize(
    "cls",
    [QuantizedLinear, CodebookLinear, SparseLinear, OutlierLinear, Float16Factor, QuantizedFactor],
)
def test_weight_only_linears_share_the_base(cls: type) -> None:
    assert issubclass(cls, WeightOnlyLinear)


@pytest.mark.parametrize("cls", [W8A8Linear, QuantizedEmbedding, LowRankLinear])
def test_other_modules_do_not(cls: type) -> None:
    assert not issubclass(cls, WeightOnlyLinear)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("data", OPTIONS, ids=lambda d: option_from_dict(d).label)
def test_forward_is_the_stored_weight_plus_bias(
    data: dict, bias: bool, dequantising: kernels.KernelPolicy
) -> None:
    """Any leading shape: ``x W^T + bias`` for the weight the storage decodes to, with the
    bias the last of the layer's own buffers."""
    layer = make_linear(bias)
    option = option_from_dict(data)
    converted = get_method(option.method).convert(layer, option)
    x = torch.randn(2, 3, COLS, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = converted(x)
    expected = x @ effective_weight(converted).t()
    if bias:
        expected = expected + layer.bias.detach()
    assert y.shape == (2, 3, ROWS)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    holder = converted.second if isinstance(converted, LowRankLinear) else converted
    assert (holder.bias is not None) == bias
    assert list(holder._buffers)[-1] == "bias"


def test_outlier_linear_adds_its_kept_columns_once(dequantising: kernels.KernelPolicy) -> None:
    layer = make_linear(bias=True)
    option = option_from_dict(
        {"method": "outliers", "bits": 4, "group_size": 32, "fraction": 0.1, "base": "rtn"}
    )
    method = get_method("outliers")
    observer = method.observer(layer, option)
    handle = layer.register_forward_hook(observer.observe)
    with torch.no_grad():
        layer(torch.randn(40, COLS, generator=torch.Generator().manual_seed(2)))
    handle.remove()
    converted = method.convert(layer, option, observer)
    x = torch.randn(5, COLS, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = converted(x)
    expected = x @ converted.dequantize().t() + layer.bias.detach()
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    assert converted.extra_repr().startswith(f"in_features={COLS}, out_features={ROWS}")


def test_extra_repr_starts_with_the_linear_head() -> None:
    module = QuantizedLinear(COLS, ROWS, 4, 32, False, bias=False)
    assert module.extra_repr() == (
        f"in_features={COLS}, out_features={ROWS}, bias=False, "
        f"rows={ROWS}, cols={COLS}, bits=4, group_size=32, asym"
    )
