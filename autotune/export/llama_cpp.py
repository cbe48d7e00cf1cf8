"""Running a GGUF file in llama.cpp (through ``llama-cpp-python``) as a model that answers
batches as autotune's own models do, so quality is measured in llama.cpp with the same code
that measures it in torch (next-token KL against the uncompressed model, perplexity).

Each row of a batch is evaluated from an empty cache with every position's logits kept; rows
with padding are evaluated on their unmasked tokens only (masked positions get zeros, which
the metrics leave out).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import statistics
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autotune.export.base import ExportError
from methods.ggml_quantizer import INSTALL_HINT


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def require() -> None:
    if not available():
        raise ExportError(f"running a GGUF file needs llama.cpp: {INSTALL_HINT}")


@functools.cache
def _has_amx() -> bool:
    """Whether this CPU has AMX tiles, where llama.cpp's repacked weight buffers crash
    (seen with llama-cpp-python 0.3.36 on such machines); they are then turned off."""
    with contextlib.suppress(OSError):
        return "amx_int8" in Path("/proc/cpuinfo").read_text()
    return False


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """llama.cpp's C code logs to stderr whatever ``verbose`` says; silence it."""
    stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(stderr, 2)
        os.close(devnull)
        os.close(stderr)


class LlamaCppModel:
    """A GGUF file loaded in llama.cpp, called like a causal LM: ``model(input_ids=...,
    attention_mask=...)`` returns ``{"logits": [batch, tokens, vocab]}``. ``all_logits``
    off: only the last position's (as a server generating text), for timing."""

    def __init__(
        self,
        path: str | Path,
        n_ctx: int = 512,
        threads: int | None = None,
        all_logits: bool = True,
    ) -> None:
        require()
        import llama_cpp

        params = llama_cpp.llama_model_default_params()
        if _has_amx():
            params.use_extra_bufts = False
        self.path = Path(path)
        with _quiet(), _model_params(params):
            self.llm = llama_cpp.Llama(
                str(self.path),
                n_ctx=n_ctx,
                n_batch=n_ctx,
                logits_all=all_logits,
                verbose=False,
                n_threads=threads or os.cpu_count() or 1,
            )
        self.vocab = self.llm.n_vocab()
        # the context the file was trained for: a table of learned positions (GPT-2) has no
        # row past it, and llama.cpp aborts the process on such a lookup
        self.positions = int(self.llm._model.n_ctx_train())

    def rows(self, ids: list[int]) -> np.ndarray:
        """Logits ``[len(ids), vocab]`` of one sequence from an empty cache."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any
    ) -> dict[str, torch.Tensor]:
        batch, tokens = input_ids.shape
        logits = torch.zeros(batch, tokens, self.vocab)
        for row in range(batch):
            keep = (
                torch.ones(tokens, dtype=torch.bool)
                if attention_mask is None
                else attention_mask[row].bool()
            )
            ids = input_ids[row][keep].tolist()
            if ids:
                logits[row, keep] = torch.from_numpy(self.rows(ids))
        return {"logits": logits}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.close()


@contextlib.contextmanager
def _model_params(params: Any) -> Iterator[None]:
    """``Llama`` builds its model parameters from ``llama_model_default_params()`` and takes
    no such object itself: hand it ``params`` through that function while it loads."""
    import llama_cpp.llama as llama_module

    original = llama_module.llama_cpp.llama_model_default_params
    llama_module.llama_cpp.llama_model_default_params = lambda: params
    try:
        yield
    finally:
        llama_module.llama_cpp.llama_model_default_params = original


def quality_in_llama_cpp(
    path: str | Path,
    batches: list[Mapping[str, torch.Tensor]],
    reference: list[Mapping[str, torch.Tensor]],
    metric: str,
) -> dict[str, float]:
    """Held-out error (``metric`` against ``reference``) and perplexity of the GGUF file at
    ``path``, computed from llama.cpp's logits."""
    from profilers.quality import NextTokenLoss, OutputError

    longest = max(int(b["input_ids"].shape[1]) for b in batches)
    model = LlamaCppModel(path, n_ctx=max(longest, 32))
    try:
        error, loss = OutputError(metric), NextTokenLoss()
        for batch, ref in zip(batches, reference, strict=True):
            out = model(**batch)
            error.add(ref, out, batch.get("attention_mask"))
            loss.add(out["logits"], batch)
    finally:
        model.close()
    return {"heldout_error": error.value(), "perplexity": loss.perplexity()}


def time_tokens(model: LlamaCppModel, prompt: list[int], generate: int) -> tuple[float, float]:
    """Seconds llama.cpp takes to read ``prompt`` in one batch (prompt processing, pp) and
    per token to extend it one token at a time ``generate`` times (generation, tg)."""
    llm = model.llm
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prompt_seconds = time.perf_counter() - start
    token = prompt[-1]
    start = time.perf_counter()
    for _ in range(generate):
        llm.eval([token])
    return prompt_seconds, (time.perf_counter() - start) / max(generate, 1)


@dataclass(frozen=True)
class Speed:
    """llama.cpp's prompt processing (pp: tokens read in one batch per second) and
    generation (tg: tokens per second, one at a time) of one file."""

    prompt_tokens_per_s: float
    generate_tokens_per_s: float


def speeds_in_llama_cpp(
    paths: Mapping[str, str | Path],
    prompt: list[int],
    generate: int = 64,
    rounds: int = 5,
    threads: int | None = None,
) -> dict[str, Speed]:
    """The median pp and tg speed of each file, all loaded at once and visited in turn every
    round (so that a slower moment of the machine hits each alike)."""
    n_ctx = len(prompt) + generate + 1
    models = {
        name: LlamaCppModel(path, n_ctx=n_ctx, threads=threads, all_logits=False)
        for name, path in paths.items()
    }
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    try:
        for _ in range(rounds):
            for name, model in models.items():
                pp, _ = time_tokens(model, prompt, 0)
                start = min(16, len(prompt), model.positions // 2)
                _, tg = time_tokens(model, prompt[:start], min(generate, model.positions - start))
                samples[name].append((pp, tg))
    finally:
        for model in models.values():
            model.close()
    return {
        name: Speed(
            len(prompt) / statistics.median(s[0] for s in got),
            1.0 / statistics.median(s[1] for s in got),
        )
        for name, got in samples.items()
    }
