"""``autotune validate PLAN MODEL --compressed model.gguf``: a GGUF file checked against its
plan by reading the file and running it in llama.cpp, never by reading the plan's figures.

The file must carry this plan's fingerprint (a file written for another plan or model is
refused in one line). Then: its size against the budget and the predicted bytes, each
layer's tensor type against the plan's option, the held-out error computed from llama.cpp's
logits against the error llama.cpp gave when the plan was tuned, and, for a plan tuned for
this machine (``local``) with a latency or decode budget, the file's time in llama.cpp:
beside the original's F32 file for a multiple of the original, beside the reference file for
a multiple of one (:mod:`autotune.reference_file`), on its own for a limit in ms.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from autotune.budget import Budget
from autotune.errors import PlanError
from autotune.layers import weight_numel
from autotune.measured_figures import Measured, device_description
from autotune.plan import Plan
from methods.gguf import GGUFOption
from methods.keep import KeepOption


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` is a file that starts as a GGUF file does."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(4) == b"GGUF"


def _field(reader: Any, key: str) -> str | None:
    found = reader.fields.get(key)
    return None if found is None else str(found.contents())


def check_fingerprints(reader: Any, plan: Plan, path: Path) -> None:
    """Refuse a file written for another plan or model."""
    from autotune.export.gguf import MODEL_KEY, PLAN_KEY, plan_fingerprints

    want_plan, want_model = plan_fingerprints(plan)
    if _field(reader, PLAN_KEY) != want_plan:
        raise PlanError(
            f"{path} was not written from this plan (its plan fingerprint differs): export it "
            "again with autotune export PLAN MODEL --format gguf"
        )
    if _field(reader, MODEL_KEY) != want_model:
        raise PlanError(f"{path} was written for another model than this plan's")


def layer_types(reader: Any, model: nn.Module, plan: Plan, strict: bool) -> list[Any]:
    """One check per layer: its tensor type in the file against the plan's option."""
    import gguf

    from autotune.export.base import shaped_layer_options
    from autotune.export.gguf_families import family_of, gguf_arch
    from autotune.validate import Check

    names = gguf.get_tensor_name_map(gguf_arch(family_of(model)), model.config.num_hidden_layers)
    in_file = {t.name: t.tensor_type.name for t in reader.tensors}
    wrong = []
    for ref, option in shaped_layer_options(plan, model, strict).items():
        name = names.get_name(f"{ref.name}.weight", try_suffixes=(".weight",))
        if isinstance(option, KeepOption):
            want = "F32"
        elif isinstance(option, GGUFOption):
            want = option.type
        else:
            want = option.label
        got = in_file.get(name or "")
        if got != want:
            wrong.append(f"{ref.name}: {got} (plan: {want})")
    return [
        Check(
            "tensor types",
            "each layer's type as the plan says",
            "all as planned" if not wrong else "; ".join(wrong[:3]),
            not wrong,
        )
    ]


def validate_gguf(
    plan: Plan,
    model: nn.Module,
    path: str | Path,
    *,
    batches: list | None,
    reference: list | None,
    tolerance: float,
    strict: bool,
    measure_latency: bool = True,
    relative_to: str | Path | None = None,
):
    """The checks of a GGUF file against ``plan`` (see the module's docstring); its time is
    measured unless ``measure_latency`` is false, beside ``relative_to`` where the plan's
    budget multiples are of a reference file."""
    import gguf

    from autotune.export.llama_cpp import available, quality_in_llama_cpp
    from autotune.validate import ValidationResult, plan_checks

    path = Path(path)
    reader = gguf.GGUFReader(path)
    check_fingerprints(reader, plan, path)
    size = path.stat().st_size
    weights = weight_numel(model)
    layer_bytes = sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) == 2)
    recorded = plan.measured or {}
    in_runtime = recorded.get("in_runtime") or {}
    figures: dict[str, Any] = {}
    if batches and reference is not None and available():
        metric = in_runtime.get("metric") or recorded.get("metric", "kl")
        figures = quality_in_llama_cpp(path, batches, reference, metric)
    timed: dict[str, tuple[Any, Any]] = {}
    budget = Budget.parse(plan.budget) if plan.budget else None
    local = plan.target.get("name") == "local"
    if budget is not None and local and measure_latency and available():
        timed = file_timings(plan, model, path, budget, relative_to)
    latency, baseline_latency = timed.get("latency", (None, None))
    decode, baseline_decode = timed.get("decode", (None, None))
    now = Measured(
        bytes=size,
        state_bytes=size,
        avg_bits=8.0 * layer_bytes / weights if weights else 0.0,
        latency=latency,
        heldout_error=figures.get("heldout_error"),
        perplexity=figures.get("perplexity"),
        baseline_latency=baseline_latency,
        decode=decode,
        baseline_decode=baseline_decode,
    )
    judged = copy.copy(plan)
    judged.measured = {k: v for k, v in recorded.items() if k != "heldout_error"}
    if "heldout_error" in in_runtime:  # llama.cpp's error then, against llama.cpp's now
        judged.measured["heldout_error"] = in_runtime["heldout_error"]
    checks = plan_checks(judged, now, tolerance) + layer_types(reader, model, plan, strict)
    measured = {
        "bytes": size,
        "file_bytes": size,
        "bytes_counted_in": "gguf",
        "heldout_error": now.heldout_error,
        "perplexity": now.perplexity,
        "measured_in": "llama.cpp" if figures else None,
        "device": device_description(),
    }
    for phase, (stats, beside) in timed.items():
        measured[phase] = stats.to_dict()
        if beside is not None:
            measured[f"baseline_{phase}"] = beside.to_dict()
    return ValidationResult(checks, measured)


def file_timings(
    plan: Plan, model: nn.Module, path: Path, budget: Budget, relative_to: str | Path | None
) -> dict[str, tuple[Any, Any]]:
    """The GGUF file's time in llama.cpp for each phase ``budget`` limits (the prompt at the
    budget's shape; a decode step after its context), and beside it, where the limit is a
    multiple, the reference file the plan was tuned against (``relative_to``, checked) or
    the original's F32 file, timed in the same rounds until the verdict is settled."""
    from autotune.export.gguf import GGUFExporter
    from autotune.export.llama_latency import measure_files, shaped_inputs
    from autotune.reference_file import given_reference, recorded_multiples

    recorded = (plan.search or {}).get("relative_to")
    reference = given_reference(recorded, relative_to)
    of_file = recorded_multiples(plan.search)
    shapes = {
        "latency": shaped_inputs(budget.batch_size, budget.seq_len),
        "decode": shaped_inputs(budget.batch_size, 1, budget.decode_context),
    }
    bounded = {"latency": budget.bounds_latency, "decode": budget.bounds_decode}
    out: dict[str, tuple[Any, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="autotune-validate-") as folder:
        original = Path(folder) / "float.gguf"
        for phase, inputs in shapes.items():
            if not bounded[phase]:
                continue
            paths = {"model": path}
            if budget.phase_ratio(phase) is not None:
                if reference is not None and phase in of_file:
                    paths["baseline"] = reference.path
                else:
                    if not original.exists():
                        GGUFExporter().write(model, None, original)
                    paths["baseline"] = original
            limit = budget.timing_limit(phase, "baseline" in paths)
            stats = measure_files(paths, inputs, limit=limit)
            out[phase] = (stats["model"], stats.get("baseline"))
    return out
