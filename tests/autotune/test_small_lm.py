"""The bundled ``small-lm``: every weight row a multiple of 256 (so every llama.cpp K-quant
applies), stored in float16 and computed in float32, loaded offline by name, and trained."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from autotune.calibration import batch_windows, stdlib_texts, token_windows
from autotune.layers import compressible_layers
from autotune.loading import BUNDLED_LMS, load_model, load_skeleton
from methods.gguf import GGUFOption, GGUFTypes
from profilers.quality import perplexity

FOLDER = BUNDLED_LMS["small-lm"]


@pytest.fixture(scope="module")
def loaded():
    return load_model("small-lm")


def test_folder_holds_model_tokenizer_and_record() -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "TRAINING.json"):
        assert (FOLDER / name).is_file(), name
    record = json.loads((FOLDER / "TRAINING.json").read_text())
    assert record["model"] == "small-lm" and record["stored_dtype"] == "float16"


def test_stored_in_float16_and_computed_in_float32(loaded) -> None:
    params = sum(p.numel() for p in loaded.model.parameters())
    stored = (FOLDER / "model.safetensors").stat().st_size
    assert 2 * params <= stored < 2 * params + 100_000
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert loaded.source == "small-lm" and loaded.path == FOLDER
    # block by block too: the skeleton the blocks are streamed into is float32
    skeleton = load_skeleton("small-lm").model
    assert {p.dtype for p in skeleton.parameters()} == {torch.float32}


def test_every_layer_takes_every_k_quant(loaded) -> None:
    method = GGUFTypes()
    layers = compressible_layers(loaded.model)
    assert len(layers) == 4 * 7 + 2
    for ref in layers:
        assert ref.shape.cols % 256 == 0, ref.name
        labels = {o.label for o in method.grid(ref.shape)}
        for kind in ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_XS"):
            assert GGUFOption(kind).label in labels, (ref.name, kind)


def test_it_has_learned_held_out_text(loaded) -> None:
    model, tokenizer = loaded.model, loaded.tokenizer
    windows = token_windows(stdlib_texts("heldout"), tokenizer, 128, 8)
    batches = batch_windows(windows, 4, {"input_ids"})
    trained = perplexity(model, batches)
    torch.manual_seed(0)
    untrained = perplexity(transformers.LlamaForCausalLM(model.config).eval(), batches)
    assert trained < untrained / 8
