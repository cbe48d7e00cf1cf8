"""The options offered per layer: calibrated options need enough calibration tokens."""

from __future__ import annotations

import torch

from autotune.layers import compressible_layers
from autotune.space import drop_undercalibrated, layer_options
from profilers.observe import collect_observers
from tests.conftest import make_tiny_bert


def test_calibrated_options_of_layers_that_saw_too_few_tokens_are_left_out() -> None:
    """The pooler sees one token per sequence: with 8 sequences its 64-wide ``X^T X`` has
    rank 8, so GPTQ and whitened SVD would fit those tokens and nothing else."""
    model = make_tiny_bert()
    layers = compressible_layers(model)
    options = layer_options(layers, ["rtn", "gptq", "whitened_svd"])
    before = {name: list(opts) for name, opts in options.items()}
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 30522, (4, 16), generator=generator)}] * 2
    observers = collect_observers(model, options, batches)
    dropped = drop_undercalibrated(layers, options, observers)
    assert set(dropped) == {"pooler.dense"}  # the others saw 128 tokens >= 64 or 128 inputs
    pooler = options["pooler.dense"]
    assert all(o.method in ("none", "rtn") for o in pooler)
    assert dropped["pooler.dense"] == len(before["pooler.dense"]) - len(pooler)
    assert not any(layer == "pooler.dense" for layer, _ in observers)
    query = "encoder.layer.0.attention.self.query"
    assert options[query] == before[query]
