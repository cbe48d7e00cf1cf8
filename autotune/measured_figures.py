"""What a compressed model measures on this machine: bytes, bits, latency and error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autotune.layers import weight_numel
from profilers.measure import (
    LatencyStats,
    measure_against,
    model_bytes,
    state_dict_bytes,
    weight_storage_bytes,
)
from profilers.memory import activation_peak
from profilers.memory import scratch_in_use as workspace_buffers
from profilers.paired_timing import Limit, paired
from profilers.probe import machine_facts
from profilers.quality import NextTokenLoss, is_causal_lm, output_error, perplexity


def device_description() -> str:
    facts = machine_facts()
    if facts["gpu"] is not None:
        return f"cuda: {facts['gpu']['name']}"
    return f"cpu: {facts['cpu']}, {facts['torch_threads']} threads ({facts['isa']})"


@dataclass
class Measured:
    bytes: int
    state_bytes: int
    avg_bits: float
    latency: LatencyStats | None
    heldout_error: float | None
    baseline_latency: LatencyStats | None = None
    peak_memory: int | None = None
    perplexity: float | None = None
    baseline_perplexity: float | None = None
    decode: LatencyStats | None = None
    baseline_decode: LatencyStats | None = None
    decode_shape: list[int] | None = None

    def latency_figures(self, baseline: bool = False) -> dict[str, float]:
        """p50 and p90 of the forward pass and, if timed, of a decode step (of the baseline
        timed beside the model with ``baseline``)."""
        stats = {
            "latency": self.baseline_latency if baseline else self.latency,
            "decode": self.baseline_decode if baseline else self.decode,
        }
        out: dict[str, float] = {}
        for name, stat in stats.items():
            if stat is not None:
                out[f"{name}_p50_ms"] = round(stat.p50_ms, 4)
                out[f"{name}_p90_ms"] = round(stat.p90_ms, 4)
        return out

    def to_dict(self, latency_shape: list[int], metric: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bytes": self.bytes,
            "state_dict_bytes": self.state_bytes,
            "avg_bits": round(self.avg_bits, 6),
        }
        if self.latency is not None:
            out.update(self.latency_figures())
            out["latency_repeats"] = self.latency.repeats
            out["latency_shape"] = latency_shape
            if self.decode is not None:
                out["decode_shape"] = self.decode_shape
            out["device"] = device_description()
        if self.peak_memory is not None:
            out["peak_memory_bytes"] = self.peak_memory
        if self.heldout_error is not None:
            out["heldout_error"] = self.heldout_error
            out["metric"] = metric
        if self.perplexity is not None:
            out["perplexity"] = round(self.perplexity, 4)
            out["baseline_perplexity"] = round(self.baseline_perplexity or float("nan"), 4)
        if self.baseline_latency is not None:
            out["baseline"] = {
                **self.latency_figures(baseline=True),
                **self.multiples(),
                "timed": "interleaved with the compressed model",
            }
        return out

    def multiples(self) -> dict[str, Any]:
        """The model's time as a multiple of the baseline's timed in the same rounds
        (``latency_ratio``, ``decode_ratio``): the median of the per-round ratios with its
        confidence interval (:mod:`profilers.paired_timing`)."""
        pairs = {
            "latency": (self.latency, self.baseline_latency),
            "decode": (self.decode, self.baseline_decode),
        }
        out: dict[str, Any] = {}
        for name, (model, baseline) in pairs.items():
            if model is not None and baseline is not None:
                found = paired(model.samples_ms, baseline.samples_ms)
                if found is not None:
                    out[f"{name}_ratio"] = found.to_dict()
        return out


def measure_model(
    model: nn.Module,
    *,
    total_weights: int | None = None,
    latency_inputs: dict[str, torch.Tensor] | None = None,
    decode_inputs: dict[str, Any] | None = None,
    heldout: tuple[list[dict], list[dict]] | None = None,
    metric: str = "nmse",
    baseline: nn.Module | None = None,
    limits: dict[str, Limit | None] | None = None,
) -> Measured:
    """Measure ``model``: bytes of parameters and buffers, state bytes, average stored bits
    per weight, latency of a forward pass on ``latency_inputs`` and of a decode step on
    ``decode_inputs`` (see :func:`profilers.execution.decode.decode_inputs`) when given, interleaved
    with ``baseline``'s (whose figures land in ``baseline_latency`` and ``baseline_decode``),
    timed until the verdict of ``limits[phase]`` (``latency``, ``decode``) is settled where
    given, and held-out error (against reference)."""
    limits = limits or {}
    weights = total_weights or weight_numel(model)
    latency = baseline_latency = peak = decode = baseline_decode = decode_shape = None
    if latency_inputs is not None:
        traced = activation_peak(model, latency_inputs)
        in_use = sum(b.numel() * b.element_size() for b in workspace_buffers())
        peak = model_bytes(model) + traced.peak_bytes + in_use
        models = {"model": model} if baseline is None else {"model": model, "baseline": baseline}
        stats = measure_against(models, latency_inputs, limits.get("latency"))
        latency, baseline_latency = stats["model"], stats.get("baseline")
        if decode_inputs is not None:
            stats = measure_against(models, decode_inputs, limits.get("decode"))
            decode, baseline_decode = stats["model"], stats.get("baseline")
            cache = next(v for k, v in decode_inputs.items() if k != "input_ids")
            decode_shape = [decode_inputs["input_ids"].shape[0], cache.get_seq_length() + 1]
    error = ppl = baseline_ppl = None
    if heldout is not None:
        loss = NextTokenLoss() if metric == "kl" and is_causal_lm(model) else None
        error = output_error(model, heldout[0], heldout[1], metric, loss)
        if loss is not None:
            ppl = loss.perplexity()
            baseline_ppl = perplexity(None, heldout[0], logits=heldout[1])
    return Measured(
        bytes=model_bytes(model),
        state_bytes=state_dict_bytes(model),
        avg_bits=8 * weight_storage_bytes(model) / weights,
        latency=latency,
        heldout_error=error,
        baseline_latency=baseline_latency,
        peak_memory=peak,
        perplexity=ppl,
        baseline_perplexity=baseline_ppl,
        decode=decode,
        baseline_decode=baseline_decode,
        decode_shape=decode_shape,
    )
