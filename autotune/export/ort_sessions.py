"""ONNX Runtime CPU sessions of an ONNX model, and their wall times.

Session options (threads, profiling), what a session loads for a ``ModelProto`` (its bytes,
or above protobuf's limit a file with the tensors beside it), the inputs it is fed, and wall
times: of one run, of one model (:func:`time_onnx`), and of several sessions visited in
turn (:func:`run_rounds`), which :mod:`autotune.export.ort_latency` and the ONNX Runtime
latency model time options with.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autotune.export.onnx import PROTO_LIMIT, _save

WARMUP = 2  # unrecorded runs of every session before the rounds
# unrecorded runs before the recorded one at each visit of a session: the first runs after
# other sessions ran are slower (measured up to a quarter for a float BERT), a steady run of
# one model (what :func:`time_onnx` times) is not
SETTLE = 3


def session_options(threads: int | None = None, folder: Path | None = None) -> Any:
    """CPU session options: ``threads`` intra-op threads (default: torch's), idle threads
    not spinning; with ``folder``, profiling into it and the optimised graph written there."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if folder is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(folder / "profile")
        options.optimized_model_filepath = str(folder / "optimized.onnx")
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "optimized.data"
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
    return options


def model_source(model: Any, folder: Path, consume: bool = False) -> bytes | str:
    """What a session loads for a ``ModelProto``, bytes or a path: the proto's bytes, or
    above protobuf's limit a file written in ``folder`` with the tensors beside it (writing
    empties the proto's tensors: a copy is written unless ``consume``)."""
    import onnx

    if isinstance(model, (bytes, str)):
        return model
    if isinstance(model, Path):
        return str(model)
    if sum(len(t.raw_data) for t in model.graph.initializer) <= PROTO_LIMIT:
        return model.SerializeToString()
    if not consume:
        model, proto = onnx.ModelProto(), model
        model.CopyFrom(proto)
    path = Path(tempfile.mkdtemp(dir=folder)) / "model.onnx"
    _save(model, path)
    return str(path)


def open_session(source: bytes | str, options: Any) -> Any:
    """An ``InferenceSession`` on CPU of a :func:`model_source`."""
    import onnxruntime as ort

    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def feed_for(session: Any, inputs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The session's inputs from ``inputs``; a missing attention mask is all ones, missing
    token type ids all zeros."""
    ids = inputs["input_ids"]
    defaults = {"attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    feed = {}
    for arg in session.get_inputs():
        value = inputs.get(arg.name, defaults.get(arg.name))
        if value is None:
            raise ValueError(f"the ONNX model takes {arg.name!r}, which the inputs lack")
        feed[arg.name] = np.ascontiguousarray(value.detach().cpu().numpy())
    return feed


def timed_run(session: Any, feed: Mapping[str, np.ndarray]) -> float:
    """Wall seconds of one run."""
    start = time.perf_counter()
    session.run(None, dict(feed))
    return time.perf_counter() - start


def time_onnx(
    model_or_path: Any,
    inputs: Mapping[str, torch.Tensor],
    rounds: int = 20,
    *,
    threads: int | None = None,
) -> tuple[float, float]:
    """Median and 90th percentile wall seconds of an ONNX model (``ModelProto``, bytes or a
    path) run by ONNX Runtime on CPU on ``inputs``, after warm-up runs."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    with tempfile.TemporaryDirectory(prefix="autotune-ort-") as folder:
        source = model_source(model_or_path, Path(folder))
        session = open_session(source, session_options(threads))
        feed = feed_for(session, inputs)
        for _ in range(WARMUP):
            session.run(None, feed)
        times = [timed_run(session, feed) for _ in range(rounds)]
    return statistics.median(times), float(np.percentile(times, 90))


def run_rounds(
    sessions: Sequence[Any],
    inputs: Mapping[str, torch.Tensor],
    rounds: int,
    settle: int,
    enough: Callable[[list[list[float]]], bool] | None = None,
) -> list[list[float]]:
    """Warm-up runs, then ``rounds`` rounds visiting every session, the order reversed every
    other round: ``settle`` runs and one recorded run per visit (fewer rounds when
    ``enough`` says, after a round, that the walls so far suffice). Wall seconds per
    session."""
    order = [(index, session, feed_for(session, inputs)) for index, session in enumerate(sessions)]
    for _, session, feed in order:
        for _ in range(WARMUP):
            session.run(None, feed)
    walls: list[list[float]] = [[] for _ in sessions]
    for round_index in range(rounds):
        for index, session, feed in order if round_index % 2 else reversed(order):
            for _ in range(settle):
                session.run(None, feed)
            walls[index].append(timed_run(session, feed))
        if enough is not None and enough(walls):
            break
    return walls
