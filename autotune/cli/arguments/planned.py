"""The options of the commands that take a plan and its model: validate, apply, export."""

from __future__ import annotations

from typing import Any

from autotune.cli.arguments.shared import (
    PLAN_HELP,
    PLANNED_MODEL_HELP,
    add_common,
    add_low_memory,
)


def add_validate(sub: Any) -> None:
    """Add ``validate``: re-check a plan against a model."""
    validate = sub.add_parser("validate", help="re-check a plan against a model (CI)")
    validate.add_argument("plan", help=PLAN_HELP)
    validate.add_argument("model", help=PLANNED_MODEL_HELP)
    validate.add_argument(
        "--tolerance", type=float, default=0.10, help="relative error slack, at least 0"
    )
    validate.add_argument(
        "--heldout", help="held-out text file (if the plan was not tuned on stdlib text)"
    )
    validate.add_argument("--no-latency", action="store_true", help="do not time the model")
    validate.add_argument(
        "--runtime",
        metavar="RUNTIME",
        help="the runtime the plan was tuned for (checked against the plan; default: the plan's)",
    )
    validate.add_argument(
        "--relative-to",
        metavar="FILE",
        help="the reference file the plan's budget multiples are of (autotune tune "
        "--relative-to): the plan is timed beside it in its runtime",
    )
    validate.add_argument(
        "--compressed",
        metavar="PATH",
        help="check this saved compressed model (autotune apply -o) or GGUF file (autotune "
        "export --format gguf; read and run in llama.cpp)",
    )
    add_low_memory(validate)
    add_common(validate)


def add_apply(sub: Any) -> None:
    """Add ``apply``: apply a plan and save the compressed model."""
    apply = sub.add_parser("apply", help="apply a plan and save the compressed model")
    apply.add_argument("plan", help=PLAN_HELP)
    apply.add_argument("model", help=PLANNED_MODEL_HELP)
    apply.add_argument(
        "-o", "--output", required=True, metavar="DIR", help="folder the compressed model goes to"
    )
    add_low_memory(apply)
    add_common(apply)


def add_export(sub: Any) -> None:
    """Add ``export``: write a plan's compressed model for another runtime."""
    export = sub.add_parser(
        "export", help="write a plan's compressed model in a format another runtime loads"
    )
    export.add_argument("plan", help=PLAN_HELP)
    export.add_argument("model", help=PLANNED_MODEL_HELP)
    export.add_argument(
        "--format",
        required=True,
        metavar="FORMAT",
        help="compressed-tensors (a folder transformers and vLLM load), onnx (one file "
        "ONNX Runtime runs) or gguf (one file llama.cpp loads)",
    )
    export.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="PATH",
        help="where the export goes: a folder (compressed-tensors) or a file (onnx, gguf)",
    )
    export.add_argument(
        "--imatrix",
        metavar="FILE",
        help="with --format gguf: also write the importance matrix of the plan's -imat layers "
        "in llama.cpp's imatrix format (for llama-quantize --imatrix)",
    )
    add_common(export)
