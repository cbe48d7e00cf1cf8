"""Measured figures of a model: stored bytes and latency on this machine."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from methods.base import is_weight_layer, storage_key
from profilers.paired_timing import MIN_ROUNDS, ROUNDS_TO_SETTLE, Limit

# rounds of :func:`measure_latencies`, and the seconds after which it stops early
ROUNDS, MAX_SECONDS = 40, 30.0
# rounds of :func:`measure_against` without a limit: the figures only report (nothing is
# decided on them); twice the fewest rounds a limit's verdict may rest on
REPORT_ROUNDS = 2 * MIN_ROUNDS


def _unique_tensors(tensors):
    seen: set[tuple[int, int]] = set()
    for tensor in tensors:
        if tensor is None:
            continue
        key = (storage_key(tensor), tensor.numel() * tensor.element_size(), tensor.dtype)
        if key in seen:
            continue
        seen.add(key)
        yield tensor


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each shared tensor counted once, plus what
    modules hold outside tensors (``opaque_bytes()``: e.g. a kernel's packed weight)."""
    tensors = list(model.parameters()) + list(model.buffers())
    total = sum(t.numel() * t.element_size() for t in _unique_tensors(tensors))
    return total + sum(int(m.opaque_bytes()) for m in model.modules() if hasattr(m, "opaque_bytes"))


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the tensors ``state_dict()`` holds, shared tensors counted once."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model.state_dict().values()))


def weight_storage_bytes(model: nn.Module) -> int:
    """Bytes standing for the weights of linear and embedding layers, compressed or not
    (modules of compression methods report theirs through ``stored_weight_bytes()``)."""
    total = 0
    seen: set[int] = set()
    for module in model.modules():
        if hasattr(module, "stored_weight_bytes"):
            total += int(module.stored_weight_bytes())
        elif is_weight_layer(module):
            key = storage_key(module.weight)
            if key not in seen:
                seen.add(key)
                total += module.weight.numel() * module.weight.element_size()
    return total


def timed_call(fn, cuda: bool = False) -> float:
    """Seconds one call of ``fn()`` takes (the GPU synchronised around it on CUDA)."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p90_ms: float
    mean_ms: float
    repeats: int
    # every timing in ms, in the order taken (one per round when timed in rounds)
    samples_ms: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def to_dict(self) -> dict[str, float]:
        return {
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "mean_ms": self.mean_ms,
            "repeats": self.repeats,
        }


def measure_latency(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    *,
    warmup: int = 5,
    repeats: int = 30,
    max_seconds: float = 20.0,
) -> LatencyStats:
    """Wall time of ``model(**inputs)`` after warm-up: p50, p90 and mean over repeats."""
    cuda = any(t.is_cuda for t in inputs.values() if isinstance(t, torch.Tensor))
    with torch.inference_mode():
        for _ in range(warmup):
            model(**inputs)
        times: list[float] = []
        deadline = time.perf_counter() + max_seconds
        while len(times) < repeats and (len(times) < 3 or time.perf_counter() < deadline):
            times.append(timed_call(lambda: model(**inputs), cuda))
    return latency_stats(times)


def measure_latencies(
    models: dict[str, nn.Module],
    inputs: dict[str, torch.Tensor],
    *,
    warmup: int = 5,
    rounds: int = ROUNDS,
    max_seconds: float = MAX_SECONDS,
    limit: Limit | None = None,
) -> dict[str, LatencyStats]:
    """Latency of several models on the same inputs, timed interleaved (one call of each per
    round, the order reversed every other round) so that bursts of load on a shared machine
    and the position in a round affect them alike. With a ``limit`` on ``"model"`` (against
    ``"baseline"``), timing stops as soon as its verdict is settled
    (:mod:`profilers.paired_timing`)."""
    cuda = any(t.is_cuda for t in inputs.values() if isinstance(t, torch.Tensor))
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(warmup):
                model(**inputs)
        deadline = time.perf_counter() + max_seconds
        order = list(models.items())
        for done in range(rounds):
            if done >= 3 and time.perf_counter() > deadline:
                break
            for name, model in order if done % 2 == 0 else reversed(order):
                times[name].append(timed_call(lambda m=model: m(**inputs), cuda))
            if limit is not None and limit.settles(times):
                break
    return {name: latency_stats(values) for name, values in times.items()}


def measure_against(
    models: dict[str, nn.Module], inputs: dict[str, torch.Tensor], limit: Limit | None
) -> dict[str, LatencyStats]:
    """:func:`measure_latencies` of ``"model"`` (and ``"baseline"``), for up to
    :data:`~profilers.paired_timing.ROUNDS_TO_SETTLE` times its usual rounds and seconds
    until ``limit``'s verdict is settled (no limit: :data:`REPORT_ROUNDS`)."""
    if limit is None:
        return measure_latencies(models, inputs, rounds=REPORT_ROUNDS)
    return measure_latencies(
        models,
        inputs,
        rounds=limit.rounds(ROUNDS),
        max_seconds=MAX_SECONDS * ROUNDS_TO_SETTLE,  # the rounds' time grows alike
        limit=limit,
    )


def latency_stats(times: list[float]) -> LatencyStats:
    """p50, p90 and mean (in ms) of wall times in seconds."""
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return LatencyStats(
        1e3 * statistics.median(ordered),
        1e3 * p90,
        1e3 * statistics.fmean(ordered),
        len(ordered),
        tuple(1e3 * t for t in times),
    )
