"""Exports of compressed models to the formats other runtimes load."""

from autotune.export.base import (
    EXPORTERS,
    Exporter,
    ExportError,
    ExportResult,
    export_formats,
    export_plan,
    get_exporter,
    register_exporter,
)

__all__ = [
    "EXPORTERS",
    "ExportError",
    "ExportResult",
    "Exporter",
    "export_formats",
    "export_plan",
    "get_exporter",
    "register_exporter",
]
