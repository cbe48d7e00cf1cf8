"""The rounding-noise ratios of a layer's inputs, and the output error they predict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from methods.base import InputRounding
from methods.ggml_activations import ROUNDINGS
from profilers.input_rounding import rounding_error, rounding_noise

Q8_0 = InputRounding("Q8_0", ROUNDINGS["Q8_0"])
F16 = InputRounding("F16", ROUNDINGS["F16"])
Q8_K = InputRounding("Q8_K", ROUNDINGS["Q8_K"])


class Net(nn.Module):
    def __init__(self, cols: int = 64, rows: int = 48) -> None:
        super().__init__()
        self.fc = nn.Linear(cols, rows, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def inputs(tokens: int = 512, cols: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-2, 1, cols)  # columns of very different magnitudes
    x = torch.randn(2, tokens // 2, cols, generator=generator) * spread
    x[..., 5] = 0.0  # a column never non-zero
    return x


def test_each_columns_noise_is_its_rounding_error_over_its_power() -> None:
    x = inputs()
    found = rounding_noise(Net(), {"fc": [Q8_0, F16]}, [{"x": x[:1]}, {"x": x[1:]}])["fc"]
    flat = x.reshape(-1, x.shape[-1])
    for rounding in (Q8_0, F16):
        noise = (rounding.apply(flat) - flat).pow(2).sum(0)
        power = flat.pow(2).sum(0)
        expected = torch.where(power > 0, noise / power.clamp(min=1e-30), torch.zeros_like(power))
        assert torch.allclose(found[rounding.name], expected, rtol=1e-5, atol=0.0)
    assert found["Q8_0"][5] == 0.0 and found["F16"][5] == 0.0
    # 8-bit blocks of 32 are far coarser than float16, and coarsest for the small columns
    # that share a block with large ones
    assert bool((found["Q8_0"] >= found["F16"]).all())
    assert found["Q8_0"][0] > 100 * found["Q8_0"][31]


def test_a_rounding_the_width_cannot_take_is_left_out() -> None:
    found = rounding_noise(Net(), {"fc": [Q8_K, Q8_0]}, [{"x": inputs()}])["fc"]
    assert set(found) == {"Q8_0"}  # Q8_K needs rows of 256


def test_the_predicted_error_matches_the_real_output_change() -> None:
    """With every output weighted alike, F_ij is input column j's power: the estimate is then
    the expected squared change of the output, which the rounding really causes."""
    torch.manual_seed(0)
    net = Net()
    x = inputs(tokens=2048).reshape(-1, 64)
    ratio = rounding_noise(net, {"fc": [Q8_0]}, [{"x": x}])["fc"]["Q8_0"]
    weight = net.fc.weight.detach()
    diagonal = x.pow(2).sum(0)[None, :].expand_as(weight)
    predicted = rounding_error(diagonal, weight, ratio)
    actual = float((Q8_0.apply(x) - x).matmul(weight.t()).pow(2).sum())
    assert predicted == pytest.approx(actual, rel=0.1)
