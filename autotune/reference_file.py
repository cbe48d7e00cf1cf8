"""A budget's relative terms as multiples of a file's time in the runtime, not the original's.

A user who must be "no slower than llama.cpp's Q4_K_M file" or "as fast as ONNX Runtime's
``quantize_dynamic`` export" has that file. With ``relative_to``, the budget's ``x`` terms
(``1x``, ``decode=0.9x``) are multiples of that file's time: the search plans under the
file's time as measured beside the original before the search (:func:`reference_multiples`),
and every check that times the plan (the tune's latency checks, the final measurement,
``validate``) times it beside the file in the same rounds, so no third model's timing, which
drifts between runs, stands between the plan and the file it is held to.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autotune.budget import Budget
from autotune.errors import AutotuneError
from profilers.paired_timing import paired

if TYPE_CHECKING:
    from autotune.runtimes import Runtime

_HASH_CHUNK = 1 << 20


class ReferenceFileError(AutotuneError, ValueError):
    """A reference file that cannot stand beside the plan."""


@dataclass(frozen=True)
class ReferenceFile:
    """The file a budget's relative terms are multiples of: where it is, its bytes and
    its SHA-256 (a plan records them, and ``validate`` refuses another file)."""

    path: Path
    bytes: int
    sha256: str

    @classmethod
    def of(cls, path: str | Path) -> ReferenceFile:
        file = Path(path)
        if not file.is_file():
            raise ReferenceFileError(f"reference file {str(file)!r} does not exist")
        return cls(file, file.stat().st_size, file_sha256(file))

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.path.name, "bytes": self.bytes, "sha256": self.sha256}

    def matches(self, recorded: Mapping[str, Any]) -> bool:
        return recorded.get("sha256") == self.sha256


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def open_reference(
    path: str | Path, runtime: Runtime, budget: Budget, target: str
) -> ReferenceFile:
    """``path`` as the reference of ``budget``'s relative terms in ``runtime`` on ``target``;
    refused in one line where the runtime cannot time such a file on this machine, the file
    is not one it loads, or the budget has no relative term it times."""
    allowed = runtime.reference_suffix
    if allowed is None:
        raise ReferenceFileError(
            f"--relative-to times a file in the runtime that loads it; runtime {runtime.name} "
            "loads none: use --runtime llama.cpp (a .gguf) or --runtime onnxruntime (an .onnx)"
        )
    if target != "local":
        raise ReferenceFileError(
            f"--relative-to times the file beside the plan on this machine; target {target!r} "
            "is priced, not timed: use --target local"
        )
    file = Path(path)
    if not file.is_file():
        raise ReferenceFileError(f"reference file {str(file)!r} does not exist")
    if file.suffix.lower() != allowed:
        raise ReferenceFileError(
            f"reference file {file.name!r} is not a {allowed} file; runtime {runtime.name} "
            f"loads {allowed} files"
        )
    phases = [p for p in ("latency", "decode") if budget.phase_ratio(p) is not None]
    if not phases:
        raise ReferenceFileError(
            f"--relative-to sets what the budget's multiples ('1x', 'decode=0.9x') are of; "
            f"budget {budget.spec} has none"
        )
    untimed = [p for p in phases if p not in runtime.reference_phases]
    if untimed:
        raise ReferenceFileError(
            f"runtime {runtime.name} times a reference file for "
            f"{' and '.join(runtime.reference_phases)} terms only; budget {budget.spec} has a "
            f"{untimed[0]} multiple"
        )
    runtime.check_reference(file)
    return ReferenceFile.of(file)


def recorded_multiples(search: Mapping[str, Any] | None) -> dict[str, float]:
    """The phases whose budget multiple a plan's search record (``search.relative_to``) says
    were of a reference file, with that file's multiple of the original's time."""
    recorded = (search or {}).get("relative_to") or {}
    return {k: float(v) for k, v in (recorded.get("multiple_of_original") or {}).items()}


def multiples_of(search: Mapping[str, Any] | None, phase: str | None = None) -> str:
    """Whose time a plan's budget multiple (on ``phase``; any phase if ``None``) is of, in
    words: ``"reference file q4.gguf's"`` or ``"the original's"``."""
    recorded = (search or {}).get("relative_to")
    if recorded and (phase is None or phase in recorded_multiples(search)):
        return f"reference file {recorded['file']}'s"
    return "the original's"


def given_reference(
    recorded: Mapping[str, Any] | None, given: str | Path | None
) -> ReferenceFile | None:
    """The file a plan tuned against the reference ``recorded`` (its ``search.relative_to``;
    ``None``: none) is timed beside: ``given``, refused in one line where it is missing or
    not that file."""
    from autotune.errors import PlanError

    if not recorded:
        return None
    if given is None:
        raise PlanError(
            f"the plan's budget multiples are of reference file {recorded['file']!r}: pass it "
            "(--relative-to) to time the plan beside it"
        )
    file = ReferenceFile.of(given)
    if not file.matches(recorded):
        raise PlanError(
            f"reference file {file.path.name!r} is not the one the plan was tuned against "
            f"({recorded['file']!r}, SHA-256 {recorded['sha256'][:16]}...)"
        )
    return file


def reference_multiples(
    measure: Callable[..., Any],
    original: Any,
    inputs: Mapping[str, Any],
    budget: Budget,
    reference: ReferenceFile,
) -> dict[str, float]:
    """The reference file's time as a multiple of the original's, for each phase ``budget``
    holds to a multiple: both timed in the runtime in the same rounds (``measure``, a latency
    model's :meth:`~autotune.latency_models.LatencyModel.measure`), the median of the
    per-round ratios. ``inputs``: each phase's inputs."""
    from autotune.plan import Plan
    from methods.keep import KeepOption

    kept = Plan(layers={"_default": KeepOption().to_dict()})
    multiples = {}
    for phase, phase_inputs in inputs.items():
        if budget.phase_ratio(phase) is None or phase_inputs is None:
            continue
        timed = measure(original, kept, reference.path, phase_inputs)
        found = paired(timed["baseline"].samples_ms, timed["model"].samples_ms)
        if found is None:
            raise ReferenceFileError(
                f"the reference file {reference.path.name!r} could not be timed beside the model"
            )
        multiples[phase] = found.median
    return multiples


def in_terms_of_reference(
    message: str,
    budget: Budget,
    planned: Budget,
    reference: ReferenceFile,
    multiples: Mapping[str, float],
) -> str:
    """``message`` about the ``planned`` budget (multiples of the original's time) told in
    the terms of the user's ``budget``: its own text, and the reference file's multiple of
    the original's time that the plan's multiples were taken through."""
    timed = ", ".join(
        f"{'decode step' if phase == 'decode' else 'latency'} {multiple:.4g}x the original's"
        for phase, multiple in multiples.items()
    )
    told = f"budget {budget.spec} (reference file {reference.path.name}: {timed} here)"
    return message.replace(f"budget {planned.spec}", told, 1)


def planning_budget(budget: Budget, multiples: Mapping[str, float]) -> Budget:
    """``budget`` with each relative term a multiple of the original's time: the term times
    the reference's own multiple of it (the search's predictions are on the original's
    scale)."""
    from dataclasses import replace

    scaled = {}
    for phase, field in (("latency", "latency_ratio"), ("decode", "decode_ratio")):
        ratio = budget.phase_ratio(phase)
        if ratio is not None and phase in multiples:
            scaled[field] = ratio * multiples[phase]
    return replace(budget, **scaled)
