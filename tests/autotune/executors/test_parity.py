"""One pipeline, two executors: a model tuned in memory and the same model streamed block by
block from its safetensors files, with the same settings, get the same plan."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from autotune.errors import AutotuneError
from autotune.executors import EXECUTORS, BlockByBlock, InMemory, get_executor
from autotune.saved import load_compressed
from autotune.tuner import autotune

VOCAB = 256
LABELS = ["int8-ch-sym", "int4-g64-asym", "int4-g32-asym", "int3-g32-asym"]


def token_batches(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(0, VOCAB, (2, 24), generator=generator)} for _ in range(count)
    ]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("parity") / "model"
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path, max_shard_size="100KB")
    return path


SETTINGS = {
    "calibration": token_batches(4, 1),
    "heldout": token_batches(2, 2),
    "seq_len": 24,
    "calibration_windows": 8,
    "selection_windows": 4,
    "sensitivity_windows": 2,
    "option_labels": LABELS,
    "sensitivity": "block-output",
    "max_evals": 6,
    "progress": False,
    "cache": False,
}


@pytest.mark.parametrize("search", ["allocator", "evolution"])
def test_both_executors_give_the_same_plan(folder: Path, tmp_path: Path, search: str) -> None:
    whole = autotune(folder, "40%", "cpu", search=search, **SETTINGS)
    streamed = autotune(
        folder,
        "40%",
        "cpu",
        search=search,
        executor=BlockByBlock.name,
        save_to=tmp_path / "out",
        **SETTINGS,
    )
    assert streamed.plan.layers == whole.plan.layers
    assert streamed.plan.search["engine"] == whole.plan.search["engine"] == search
    for key in ("chosen", "sensitivity"):
        assert streamed.plan.search[key] == whole.plan.search[key]
    selections = [r.plan.search["selection"] for r in (whole, streamed)]
    assert selections[1]["errors"] == pytest.approx(selections[0]["errors"], rel=1e-5)
    scores = [r.sensitivity.errors for r in (whole, streamed)]
    assert scores[1].keys() == scores[0].keys()
    for layer, errors in scores[0].items():
        assert scores[1][layer] == pytest.approx(errors, rel=1e-5)
    if search == "evolution":  # the engine saw the same errors and took the same path
        runs = [r.plan.search["engine_run"] for r in (whole, streamed)]
        assert runs[0]["iterations"] == runs[1]["iterations"] > 0
        assert runs[1]["best_error"] == pytest.approx(runs[0]["best_error"], rel=1e-5)
    assert streamed.plan.predicted["bytes"] == whole.plan.predicted["bytes"]
    assert streamed.plan.measured["bytes"] == whole.plan.measured["bytes"]
    assert streamed.plan.measured["heldout_error"] == pytest.approx(
        whole.plan.measured["heldout_error"], rel=1e-4
    )
    stages = [
        "prepare",
        "calibrate",
        "price",
        "score",
        "search",
        "select",
        "confirm",
        "apply",
        "write",
    ]
    for result in (whole, streamed):  # every stage timed, in order, within the whole tune
        timed = result.plan.search["stage_seconds"]
        assert list(timed) == [*stages, "measure"]
        assert sum(timed.values()) <= result.plan.search["seconds"] + 0.02  # rounding
    written = load_compressed(streamed.saved)
    batch = SETTINGS["heldout"][0]
    with torch.inference_mode():
        assert torch.equal(written(**batch).logits, whole.model(**batch).logits)


def test_executors_are_registered_by_name() -> None:
    assert {InMemory.name: InMemory, BlockByBlock.name: BlockByBlock} == EXECUTORS
    assert isinstance(get_executor("in-memory"), InMemory)
    with pytest.raises(AutotuneError, match="allowed: block-by-block, in-memory"):
        get_executor("gpu")


def test_block_by_block_reads_a_folder_and_writes_one(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(AutotuneError, match="give a folder to write it to"):
        autotune(folder, "40%", "cpu", executor=BlockByBlock.name, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(AutotuneError, match=r"not from an nn\.Module in memory"):
        autotune(model, "40%", "cpu", executor=BlockByBlock.name, save_to=tmp_path, progress=False)
