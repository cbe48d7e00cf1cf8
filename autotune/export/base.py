"""The interface every export format implements, its registry, and the one entry point.

An exporter writes a compressed model in a format another runtime loads (transformers and
vLLM through compressed-tensors, ONNX Runtime, ...). It first says, per layer, whether the
format can hold the plan's option (:meth:`Exporter.refusal`); :func:`export_plan` refuses a
plan with any such layer in one line before anything is written, applies the plan to a copy
of the model, and lets the exporter write its output atomically.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from autotune.errors import AutotuneError
from autotune.plan import Plan
from methods.base import LayerShape, Option


class ExportError(AutotuneError, ValueError):
    """A plan or model an export format cannot hold, or a missing optional dependency."""


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: its path, the bytes on disk, and the scheme each layer got."""

    format: str
    path: Path
    bytes: int
    layers: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "path": str(self.path),
            "bytes": self.bytes,
            "layers": dict(self.layers),
        }


class Exporter(ABC):
    """One export format.

    ``name`` is what ``--format`` takes; ``requires`` the modules it imports (checked
    before any work, :attr:`install` names the package extra that provides them);
    ``writes`` is ``"folder"`` or ``"file"``.
    """

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    install: ClassVar[str] = ""
    writes: ClassVar[str] = "folder"
    description: ClassVar[str] = ""

    @abstractmethod
    def refusal(self, layer: str, shape: LayerShape, option: Option) -> str | None:
        """Why the format cannot hold ``option`` on ``layer``, naming what it allows; ``None``
        when it can."""

    @abstractmethod
    def write(
        self, compressed: nn.Module, plan: Plan, out: Path, tokenizer: Any = None
    ) -> ExportResult:
        """Write ``compressed`` (the model with the plan applied by autotune) to ``out``,
        atomically (a folder or file is either whole or absent)."""

    def missing(self) -> list[str]:
        """The required modules that are not importable here."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


EXPORTERS: dict[str, Exporter] = {}


def register_exporter(exporter: Exporter) -> Exporter:
    EXPORTERS[exporter.name] = exporter
    return exporter


def get_exporter(name: str) -> Exporter:
    _load_builtin()
    if name not in EXPORTERS:
        allowed = ", ".join(sorted(EXPORTERS))
        raise ExportError(f"unknown export format {name!r}; allowed: {allowed}")
    return EXPORTERS[name]


def export_formats() -> list[str]:
    _load_builtin()
    return sorted(EXPORTERS)


def _load_builtin() -> None:
    """Import the built-in exporters (each registers itself; importing one does not import
    its runtime, which is imported only when it writes)."""
    from autotune.export import compressed_tensors, gguf, onnx  # noqa: F401


def check_plan(exporter: Exporter, model: nn.Module, plan: Plan, strict: bool = True) -> None:
    """Refuse, in one line, a plan with a layer the format cannot hold, or, tuned for a
    runtime, one that splits a group of layers that runtime fuses. Layers are those
    :func:`autotune.apply.apply_plan` compresses: after structured pruning, and with a tied
    embedding table one layer (see :meth:`Plan.shaped`)."""
    shaped = shaped_layer_options(plan, model, strict)
    for ref, option in shaped.items():
        why = exporter.refusal(ref.name, ref.shape, option)
        if why is not None:
            raise ExportError(f"--format {exporter.name} cannot hold layer {ref.name!r}: {why}")
    runtime = plan.target.get("runtime") if plan.target else None
    if runtime:  # the plan was tuned for a runtime: its fused groups must stay whole
        from autotune.runtimes import get_runtime

        why = get_runtime(runtime).tie_refusal({ref.name: o for ref, o in shaped.items()})
        if why is not None:
            raise ExportError(f"the plan cannot run in {runtime}: {why}")


def shaped_layer_options(plan: Plan, model: nn.Module, strict: bool = True) -> dict:
    """The plan's option of each layer as :func:`autotune.apply.apply_plan` compresses it:
    on a copy after structured pruning, with a tied embedding table one layer (the model is
    left as it is)."""
    from profilers.execution.adapters import adapter_for

    reshaped = plan.structure.get("kept") or adapter_for(model).tied_pairs(model)
    shaped = plan.shaped(_structure_copy(model)) if reshaped else model
    return plan.layer_options(shaped, strict=strict)


def _structure_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def export_plan(
    plan: Plan | str | Path,
    model: nn.Module,
    fmt: str,
    out: str | Path,
    *,
    tokenizer: Any = None,
    strict: bool = True,
) -> ExportResult:
    """Apply ``plan`` to a copy of ``model`` and write it in format ``fmt`` to ``out``."""
    from autotune.apply import apply_plan

    exporter = get_exporter(fmt)
    missing = exporter.missing()
    if missing:
        raise ExportError(
            f"--format {fmt} needs {', '.join(missing)}: pip install {exporter.install}"
        )
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    plan.check_model(model, strict=strict)
    check_plan(exporter, model, plan, strict=strict)
    compressed = apply_plan(model, plan, tokenizer=tokenizer, strict=strict)
    return exporter.write(compressed.eval(), plan, Path(out), tokenizer)
