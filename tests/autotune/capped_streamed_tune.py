"""Run as a script by tests/autotune/test_streamed.py: tune (or load whole) a model with the
process's address space capped at what it uses once warmed up plus a third of the model's
size, and print what happened as one line of JSON.

Usage: python capped_streamed_tune.py MODEL_DIR OUT_DIR stream|load

The warm-up first runs the same work on a small model of the same architecture, so that the
cap measures what the large model needs, not the imports and thread pools of the process.
Run it with ``MALLOC_MMAP_THRESHOLD_`` set, so that freed buffers are given back to the
system and the cap bounds the memory in use, not address space glibc keeps.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from autotune.loading import load_model
from autotune.streamed import checkpoint_bytes, tune_streamed

LABELS = ["int8-ch-sym", "int4-g64-asym", "int4-g32-asym"]


def address_space() -> int:
    return int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def status(field: str) -> int:
    """A figure of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def run(model: str, out: str, whole: bool, batches: list, heldout: list) -> None:
    if whole:
        load_model(model)
    else:
        tune_streamed(
            model,
            "30%",
            "cpu",
            save_to=out,
            calibration=batches,
            heldout=heldout,
            seq_len=16,
            option_labels=LABELS,
            progress=False,
        )


def main() -> None:
    folder, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(folder)
    vocab = config.vocab_size
    batches = [{"input_ids": torch.randint(3, vocab, (2, 16), generator=generator)} for _ in "abc"]
    heldout = [{"input_ids": torch.randint(3, vocab, (2, 16), generator=generator)}]
    small = type(config).from_dict(
        {
            **config.to_dict(),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
        }
    )
    with tempfile.TemporaryDirectory() as warm:
        transformers.AutoModelForCausalLM.from_config(small).save_pretrained(warm)
        run(warm, f"{warm}/out", mode == "load", batches, heldout)
        run(warm, f"{warm}/out", mode != "load", batches, heldout)
    size = checkpoint_bytes(folder)
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident memory starts anew
    resident = status("VmRSS")
    baseline = address_space()
    cap = baseline + size // 3
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    start = time.perf_counter()
    result: dict = {"model_bytes": size, "cap_bytes": size // 3}
    try:
        run(folder, out, mode == "load", batches, heldout)
        result["ok"] = True
    except Exception as exc:  # the cap shows as MemoryError or an allocator's RuntimeError
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    result["seconds"] = time.perf_counter() - start
    result["resident_rise_bytes"] = status("VmHWM") - resident
    print(json.dumps(result))


if __name__ == "__main__":
    main()
