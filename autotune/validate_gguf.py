"""``autotune validate PLAN MODEL --compressed model.gguf``: a GGUF file checked against its
plan by reading the file and running it in llama.cpp, never by reading the plan's figures.

The file must carry this plan's fingerprint (a file written for another plan or model is
refused in one line). Then: its size against the budget and the predicted bytes, each
layer's tensor type against the plan's option, and the held-out error computed from
llama.cpp's logits against the error llama.cpp gave when the plan was tuned.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

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
):
    """The checks of a GGUF file against ``plan`` (see the module's docstring)."""
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
    now = Measured(
        bytes=size,
        state_bytes=size,
        avg_bits=8.0 * layer_bytes / weights if weights else 0.0,
        latency=None,
        heldout_error=figures.get("heldout_error"),
        perplexity=figures.get("perplexity"),
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
    return ValidationResult(checks, measured)
