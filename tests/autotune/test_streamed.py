"""Models larger than memory: tuned, applied and validated block by block."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from autotune.apply import apply_plan
from autotune.cli import main
from autotune.errors import AutotuneError
from autotune.fingerprint import fingerprint
from autotune.plan import Plan
from autotune.saved import load_compressed
from autotune.selection import UNIFORM_FINALISTS, UNIFORM_REACH
from autotune.streamed import apply_streamed, tune_streamed, validate_streamed
from autotune.validate import validate_plan
from profilers.measure import model_bytes

VOCAB = 256
LABELS = ["int8-ch-sym", "int4-g64-asym", "int4-g32-asym", "int3-g32-asym"]


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_layer=3, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=0,
            eos_token_id=0,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=kind == "llama-tied",
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def token_batches(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(0, VOCAB, (2, 24), generator=generator)} for _ in range(count)
    ]


CALIBRATION, HELDOUT = token_batches(3, 1), token_batches(2, 2)


@pytest.fixture(scope="module", params=["llama-tied", "gpt2"])
def tuned(request, tmp_path_factory):
    model = build(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder / "model", max_shard_size="100KB")
    result = tune_streamed(
        folder / "model",
        "35%",
        "cpu",
        save_to=folder / "out",
        calibration=CALIBRATION,
        heldout=HELDOUT,
        seq_len=24,
        option_labels=LABELS,
        progress=False,
    )
    return model, folder, result


def logits(model, batches) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model(**batch).logits for batch in batches]


def test_the_plan_holds_and_its_bytes_are_exact(tuned) -> None:
    model, _, result = tuned
    plan = result.plan
    assert plan.model["fingerprint"] == fingerprint(model)
    assert plan.measured["bytes"] == plan.predicted["bytes"] <= 0.35 * model_bytes(model)
    assert result.report.holds() == {"memory": True}
    assert plan.measured["streamed"]["blocks"] == 3
    assert "worked block by block: 3 blocks" in str(result.report)
    selection = plan.search["selection"]
    candidates = {c["name"]: c for c in plan.search["candidates"]}
    finalists = {n for n, c in candidates.items() if c["calibration_error"] is not None}
    front_runner = min(finalists, key=lambda n: candidates[n]["calibration_error"])
    screened = sorted(
        (n for n in candidates if n.startswith("uniform")),
        key=lambda n: candidates[n]["screening_error"],
    )
    assert selection["front_runner"] == front_runner
    assert len(screened) == UNIFORM_FINALISTS
    # the best-screened uniform plan, and those screened near the front runner's error
    reach = UNIFORM_REACH * candidates[front_runner]["screening_error"]
    judged = screened[:1] + [n for n in screened[1:] if candidates[n]["screening_error"] <= reach]
    assert set(selection["errors"]) == set(judged) | {front_runner}
    assert selection["errors"][plan.search["chosen"]] == min(selection["errors"].values())
    assert plan.search["sensitivity"] == "block-output"


def test_the_written_model_is_the_plan_applied_in_memory(tuned) -> None:
    model, folder, result = tuned
    loaded = load_compressed(folder / "out")
    expected = apply_plan(model, result.plan)
    assert model_bytes(loaded) == result.plan.predicted["bytes"]
    for got, want in zip(logits(loaded, HELDOUT), logits(expected, HELDOUT), strict=True):
        assert torch.equal(got, want)
    assert validate_plan(result.plan, model, heldout=HELDOUT, measure_latency=False).ok


def test_apply_and_validate_block_by_block(tuned, tmp_path: Path) -> None:
    _, folder, result = tuned
    out = apply_streamed(folder / "model", result.plan, tmp_path / "again")
    first, second = load_compressed(folder / "out"), load_compressed(out)
    for a, b in zip(logits(first, HELDOUT), logits(second, HELDOUT), strict=True):
        assert torch.equal(a, b)
    checked = validate_streamed(result.plan, folder / "model", heldout=HELDOUT)
    assert checked.ok, str(checked)
    assert {c.name for c in checked.checks} >= {"memory", "predicted bytes"}
    assert checked.measured["bytes"] == result.plan.predicted["bytes"]


def test_a_plan_for_another_model_is_refused(tuned, tmp_path: Path) -> None:
    _, folder, result = tuned
    other = Plan.from_dict(result.plan.to_dict())
    other.model["fingerprint"] = {**other.model["fingerprint"], "weights": "0" * 64}
    with pytest.raises(AutotuneError, match="plan was made for model fingerprint"):
        apply_streamed(folder / "model", other, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("budget", "target", "methods", "fragment"),
    [
        ("35%", "local", None, "'local' times the whole model in memory"),
        ("35%,decode=5ms", "cpu", None, "decode and serving-memory budgets"),
        ("35%", "cpu", ["rtn", "fisher_svd"], "fisher_svd need backward passes"),
    ],
)
def test_what_needs_the_whole_model_is_refused(
    tmp_path: Path, budget: str, target: str, methods, fragment: str
) -> None:
    build("llama").save_pretrained(tmp_path / "model")
    with pytest.raises(AutotuneError, match=fragment):
        tune_streamed(tmp_path / "model", budget, target, save_to=tmp_path / "out", methods=methods)
    assert not (tmp_path / "out").exists()


def test_the_cli_needs_a_folder_to_write_to_and_refuses_whole_model_work(
    tmp_path: Path, capsys
) -> None:
    args = ["tune", "tiny-lm", "--budget", "35%", "--target", "cpu", "--low-memory"]
    assert main(args) == 2
    assert "add --save-model DIR" in capsys.readouterr().err
    args += ["--save-model", str(tmp_path / "o")]
    assert main([*args, "--prune-ffn", "0.25"]) == 2
    assert "structured pruning (FFN neurons, heads) need" in capsys.readouterr().err
    assert main([*args, "--sensitivity", "fisher"]) == 2
    err = capsys.readouterr().err
    assert "sensitivity 'fisher' needs the whole model" in err and "block-output" in err
    assert main([*args, "--runtime", "onnxruntime"]) == 2
    assert "--runtime onnxruntime need the whole model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_model_too_large_for_memory_is_tuned_block_by_block_by_itself(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import psutil

    real = psutil.virtual_memory()
    monkeypatch.setattr(
        psutil, "virtual_memory", lambda: real._replace(available=40_000_000)
    )  # tiny-lm's 19.4 MB of weights need about 3x that
    args = ["tune", "tiny-lm", "--budget", "35%", "--target", "cpu", "--options", "int8-ch-sym"]
    out = tmp_path / "out"
    assert main([*args, "--save-model", str(out), "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    plan = json.loads(captured.out)
    assert plan["measured"]["streamed"]["blocks"] == 4
    assert plan["measured"]["bytes"] == plan["predicted"]["bytes"]
    assert (out / "model.safetensors.index.json").is_file()
    assert main(["validate", str(out / "plan.json"), "tiny-lm", "--quiet"]) == 0
    assert "plan holds" in capsys.readouterr().out


# --- a model three times the memory the process may use -----------------------------------


@pytest.fixture(scope="module")
def large_model(tmp_path_factory) -> Path:
    """A 240 MB Llama (20 blocks of 11.8 MB, tied 4 MB embedding), sharded on disk."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=20,
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=128,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("large") / "model"
    transformers.LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="50MB")
    return folder


def capped(folder: Path, out: Path, mode: str) -> dict:
    script = Path(__file__).with_name("capped_streamed_tune.py")
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "262144",  # freed buffers go back to the system at once
        "MALLOC_ARENA_MAX": "1",  # no 64 MB arena reservations per thread
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    done = subprocess.run(
        [sys.executable, str(script), str(folder), str(out), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_model_three_times_the_memory_cap_is_tuned_block_by_block(
    large_model: Path, tmp_path: Path
) -> None:
    result = capped(large_model, tmp_path / "out", "stream")
    assert result["ok"], result
    assert result["model_bytes"] > 240_000_000
    assert result["resident_rise_bytes"] < result["model_bytes"] / 3
    plan = Plan.load(tmp_path / "out" / "plan.json")
    assert (
        plan.measured["bytes"] == plan.predicted["bytes"] <= 0.3 * plan.predicted["original_bytes"]
    )
    # what was written under the cap is the plan, exactly: the same model compressed in memory
    model = transformers.LlamaForCausalLM.from_pretrained(large_model).eval()
    batch = {"input_ids": torch.randint(3, 2048, (1, 16))}
    with torch.inference_mode():
        assert torch.equal(
            load_compressed(tmp_path / "out")(**batch).logits,
            apply_plan(model, plan)(**batch).logits,
        )


def test_the_cap_stops_the_model_from_being_loaded_whole(large_model: Path, tmp_path) -> None:
    result = capped(large_model, tmp_path / "out", "load")
    assert not result["ok"]
    error = result["error"].lower()  # however the allocation under the cap failed
    assert any(word in error for word in ("memory", "allocate", "mmap")), error


def test_bad_safetensors_headers_are_refused_before_streaming(tmp_path: Path) -> None:
    from autotune.errors import ModelLoadError
    from autotune.streamed import checkpoint_bytes, too_large_for_memory

    folder = tmp_path / "model"
    build("gpt2").save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ModelLoadError, match="header length 1,099,511,627,776"):
        checkpoint_bytes(folder)
    assert too_large_for_memory(folder) is None  # left to the loader, which names the file
    with pytest.raises(ModelLoadError, match="header length"):
        tune_streamed(folder, "30%", "cpu", save_to=tmp_path / "out", progress=False)
