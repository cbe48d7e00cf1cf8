"""The settings of a tune, grouped: calibration data, search, and the run itself."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from profilers.hardware import HardwareSpec


@dataclass(frozen=True)
class CalibrationConfig:
    """Where the text comes from and how many windows each split gets.

    ``calibration`` is a list of texts, a text file or a list of input batches (default:
    standard library docstrings); ``heldout`` likewise, read only to measure."""

    calibration: Any = None
    heldout: Any = None
    seq_len: int = 128
    calibration_windows: int = 32
    sensitivity_windows: int = 4
    selection_windows: int = 8
    heldout_windows: int = 16


@dataclass(frozen=True)
class SearchConfig:
    """What is searched and how: methods and option labels offered, the sensitivity
    estimator (:mod:`autotune.estimators`), the engine (:mod:`autotune.engines`) and its
    effort, an Optuna study to record it, structured pruning first, the sensitivity
    cache (``True``: ``$AUTOTUNE_CACHE`` or ``~/.cache/autotune``; a folder; ``False``), and
    how much slower than the runtime's reference a memory budget's plan may generate."""

    methods: Sequence[str] | None = None
    option_labels: Sequence[str] | None = None
    sensitivity: str | None = None  # None: the executor's default
    search: str = "auto"
    max_evals: float | None = None
    timeout: float | None = None
    storage: str | None = None
    study_name: str | None = None
    structured: Mapping[str, float] | None = None
    cache: bool | str | Path = True
    seed: int = 0
    # a memory budget's plan generates at most this much slower than the runtime's reference
    # file of its size (autotune.decode_guard): "runtime" for the runtime's own, None: off
    decode_slack: float | str | None = "runtime"

    def __post_init__(self) -> None:
        from autotune.decode_guard import checked_slack

        object.__setattr__(self, "decode_slack", checked_slack(self.decode_slack))


@dataclass(frozen=True)
class TuneConfig:
    """A whole tune's settings besides the model and the budget: ``executor`` runs the
    model (in memory, or block by block from its safetensors files, which needs
    ``save_to``); ``save_to`` is where the compressed model is written (optional in
    memory)."""

    target: str | HardwareSpec = "local"
    target_files: Iterable[str | Path] = ()
    runtime: str = "torch"
    batch_size: int | None = None
    latency_seq_len: int | None = None
    inplace: bool = False
    progress: bool = True
    measure: bool = True
    trust_remote_code: bool = False
    executor: str = "in-memory"  # or "block-by-block": see autotune.executors
    save_to: str | Path | None = None  # where the compressed model is written
    # a file in the runtime's format whose time the budget's multiples are of (else the
    # original's): see autotune.reference_file
    relative_to: str | Path | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    @classmethod
    def from_kwargs(cls, target: str | HardwareSpec = "local", **kwargs: Any) -> TuneConfig:
        """The configuration ``autotune(model, budget, target, **kwargs)`` describes; a
        keyword that none of the groups has is refused as Python refuses it."""
        groups: dict[str, dict[str, Any]] = {"calibration": {}, "search": {}, "run": {}}
        owners = {
            "calibration": _fields(CalibrationConfig),
            "search": _fields(SearchConfig),
            "run": _fields(cls) - {"calibration", "search", "target"},
        }
        for key, value in kwargs.items():
            owner = next((g for g, names in owners.items() if key in names), None)
            if owner is None:
                raise TypeError(f"autotune() got an unexpected keyword argument {key!r}")
            groups[owner][key] = value
        return cls(
            target=target,
            calibration=CalibrationConfig(**groups["calibration"]),
            search=SearchConfig(**groups["search"]),
            **groups["run"],
        )


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}
