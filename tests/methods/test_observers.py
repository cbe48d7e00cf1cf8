from __future__ import annotations

import pytest
import torch

from methods.observers import HessianObserver


def test_output_error_is_the_mean_squared_change_of_the_layer_output() -> None:
    torch.manual_seed(0)
    observer = HessianObserver(16)
    batches = [torch.randn(3, 7, 16), torch.randn(5, 16)]
    for x in batches:
        observer.observe(torch.nn.Identity(), (x,), None)
    delta = torch.randn(8, 16)
    inputs = torch.cat([x.reshape(-1, 16) for x in batches])
    direct = (inputs @ delta.T).pow(2).sum().item() / inputs.shape[0]
    assert observer.output_error(delta) == pytest.approx(direct, rel=1e-5)
    assert observer.output_error(torch.zeros(8, 16)) == 0.0


def test_output_error_needs_inputs() -> None:
    with pytest.raises(ValueError, match="no inputs"):
        HessianObserver(4).output_error(torch.ones(2, 4))
