"""The options offered per layer: calibrated options need enough calibration tokens."""

from __future__ import annotations

import torch
import transformers

from autotune.costs import drop_undercalibrated, layer_options
from autotune.layers import compressible_layers, weight_numel
from methods.tied import untie_output_embeddings
from profilers.execution.observe import collect_observers
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


def test_layers_of_a_model_on_the_meta_device() -> None:
    """Meta tensors all have data pointer 0: layers must not look shared because of it."""
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    names = [ref.name for ref in compressible_layers(model)]
    blocks = [
        f"transformer.h.{i}.{part}"
        for i in range(2)
        for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert names == ["transformer.wpe", *blocks]  # the tied table is shared: left alone
    assert weight_numel(model) == 512 * 64 + 64 * 64 + 2 * (3 + 1 + 4 + 4) * 64 * 64
    assert untie_output_embeddings(model) == {"lm_head": "transformer.wte"}
    assert [ref.name for ref in compressible_layers(model)] == ["transformer.wte", *names]
