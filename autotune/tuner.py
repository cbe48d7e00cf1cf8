"""``autotune()``: the tune's stages (:mod:`autotune.pipeline`) in order."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from autotune.budget import Budget
from autotune.costs import CostModel
from autotune.pipeline.choose import score, search, select_plan
from autotune.pipeline.clock import StageClock
from autotune.pipeline.config import TuneConfig
from autotune.pipeline.confirm import confirm_latency
from autotune.pipeline.prepare import calibrate, prepare
from autotune.pipeline.price import guard, price
from autotune.pipeline.record import apply_chosen, measure_result, record_plan, write_model
from autotune.plan import Plan
from autotune.report import Report
from autotune.saved import PLAN
from profilers.hardware import HardwareSpec
from profilers.sensitivity import SensitivityTable


@dataclass
class TuneResult:
    """The plan, the compressed model (block by block: the model's skeleton, its weights
    on the ``meta`` device), and the predicted-vs-measured report."""

    plan: Plan
    model: nn.Module
    report: Report
    sensitivity: SensitivityTable
    costs: CostModel
    saved: Path | None = None  # where the compressed model was written, if it was


def autotune(
    model: nn.Module | str | Path,
    budget: Budget | str | dict,
    target: str | HardwareSpec | None = None,
    *,
    tokenizer: Any = None,
    config: TuneConfig | None = None,
    **settings: Any,
) -> TuneResult:
    """Find the best per-layer compression plan for ``model`` under ``budget`` on ``target``,
    apply it, and measure predicted against measured figures.

    ``model`` is an ``nn.Module``, a local model folder, ``"demo"``, ``"tiny-lm"`` or
    ``"small-lm"``; the user's model is not modified unless ``inplace=True``. ``target``
    defaults to ``local`` (this machine, timed). The settings are a
    :class:`~autotune.pipeline.config.TuneConfig` (``config``) or its fields as keywords:

    * run: ``executor`` (``"in-memory"``, or ``"block-by-block"`` to stream a model folder
      from its safetensors files one block at a time; see :mod:`autotune.executors`),
      ``save_to`` (a folder the compressed model is written to; needed block by block),
      ``target_files``, ``runtime`` (``"torch"``, ``"vllm"``, ``"onnxruntime"``: only
      options that runtime's export holds, priced with its kernels; see
      :mod:`autotune.runtimes`), ``relative_to`` (a file in that runtime's format, e.g.
      llama.cpp's Q4_K_M GGUF: the budget's multiples, ``"decode=1x"``, are of its time,
      timed beside the plan; see :mod:`autotune.reference_file`), ``batch_size``,
      ``latency_seq_len``, ``inplace``, ``progress``, ``measure``, ``trust_remote_code``;
    * calibration (:class:`~autotune.pipeline.config.CalibrationConfig`): ``calibration``,
      ``heldout`` (texts, a text file or input batches; default standard library
      docstrings), ``seq_len`` and the windows of each split. The calibration split picks
      the search's front runner, the selection split keeps it or the uniform plan that fits
      with the least error there, and the held-out split only measures the result;
    * search (:class:`~autotune.pipeline.config.SearchConfig`): ``methods``,
      ``option_labels`` (e.g. ``["int8-ch-sym", "int4-g64-asym"]``), ``sensitivity`` (an
      estimator of :mod:`autotune.estimators`: ``"refined"`` (default in memory: Fisher
      estimates, end-to-end errors where the allocator's plan depends on them),
      ``"end-to-end"``, ``"block-output"`` (default block by block), ``"hybrid"``,
      ``"fisher"``, ``"local"``),
      ``search`` (``"auto"`` or an engine of :mod:`autotune.engines`), ``max_evals``,
      ``timeout``, ``storage`` and ``study_name`` (an Optuna study that records the search,
      so a killed one resumes), ``structured`` (e.g. ``{"ffn": 0.25}``: prune that share of
      FFN neurons or heads first), ``cache`` and ``seed``; ``decode_slack``: where the
      runtime holds a memory budget's generation to a reference (llama.cpp, see
      :mod:`autotune.decode_guard`), how much slower the plan may decode (``"off"``: free).
    """
    started = time.perf_counter()
    if config is None:
        config = TuneConfig.from_kwargs(target or "local", **settings)
    elif target is not None or settings:
        raise TypeError("autotune() takes its settings in config or as keywords, not both")
    clock = StageClock()
    setup = clock.run("prepare", prepare, model, budget, config, tokenizer)
    data = clock.run("calibrate", calibrate, setup, config)
    priced = clock.run("price", price, setup, data, config)
    scored = clock.run("score", score, setup, data, priced, config)
    priced = guard(setup, priced, scored.table.errors)  # one MILP: not a stage of its own
    searched = clock.run("search", search, setup, data, priced, scored, config)
    selected = clock.run("select", select_plan, setup, data, scored, searched, config)
    priced, searched, selected = clock.run(
        "confirm", confirm_latency, setup, data, priced, scored, searched, selected, config
    )
    clock.run("apply", apply_chosen, setup, selected)
    plan = record_plan(setup, data, priced, scored, searched, selected, config)
    saved = clock.run("write", write_model, setup, data, plan)
    if config.measure:
        clock.run("measure", measure_result, setup, data, priced, scored, selected, plan)
    plan.search["seconds"] = round(time.perf_counter() - started, 2)
    plan.search["stage_seconds"] = clock.seconds
    if saved is not None:  # the plan beside the model, with its measured figures
        plan.save(saved / PLAN)
    return TuneResult(plan, setup.work, Report(plan), scored.table, priced.costs, saved)
