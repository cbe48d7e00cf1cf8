"""Sensitivity tables cached on disk.

A table is keyed by what determines it: the model (its fingerprint), the calibration batches
(a hash of their tensors), the metric, and the version of each method's implementation. Its
entries are ``{layer: {option label: error}}`` in one JSON file per key, rewritten atomically
after every layer, so an interrupted profile resumes where it stopped and a full hit needs no
forward pass at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from methods.registry import registered_methods

CACHE_ENV = "AUTOTUNE_CACHE"


def default_cache_dir() -> Path:
    """``$AUTOTUNE_CACHE``, else ``$XDG_CACHE_HOME/autotune``, else ``~/.cache/autotune``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "autotune"


def cache_folder(setting: bool | str | Path) -> Path:
    """The folder a tune's cache setting names (``True``: :func:`default_cache_dir`)."""
    return default_cache_dir() if setting is True else Path(setting)


def batches_digest(batches: Iterable[Mapping[str, torch.Tensor]]) -> str:
    """SHA-256 of the calibration batches: keys, shapes, dtypes and values."""
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            tensor = batch[key]
            digest.update(key.encode())
            if isinstance(tensor, torch.Tensor):
                data = tensor.detach().to("cpu").contiguous()
                digest.update(f"{list(data.shape)}{data.dtype}".encode())
                digest.update(data.reshape(-1).view(torch.uint8).numpy())
            else:
                digest.update(repr(tensor).encode())
    return digest.hexdigest()


def table_key(model_fingerprint: Mapping[str, Any], calibration_digest: str, kind: str) -> str:
    """The cache key of one table: model, calibration, kind of table, method versions."""
    versions = {
        name: getattr(m, "version", "1") for name, m in sorted(registered_methods().items())
    }
    payload = {
        "model": [model_fingerprint.get("structure"), model_fingerprint.get("weights")],
        "calibration": calibration_digest,
        "kind": kind,
        "methods": versions,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


class SensitivityCache:
    """One cached table: ``get``/``put`` entries, ``save`` writes the file atomically."""

    def __init__(self, directory: str | Path, key: str) -> None:
        self.directory, self.key = Path(directory), key
        self.path = self.directory / "sensitivity" / f"{key}.json"
        self.entries: dict[str, dict[str, float | None]] = {}
        self.metric: str | None = None
        self.hits = 0
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self.entries = {k: dict(v) for k, v in data.get("entries", {}).items()}
                self.metric = data.get("metric")
            except (OSError, ValueError, AttributeError):
                self.entries = {}  # a damaged cache file is ignored and rewritten

    def get(self, layer: str, label: str) -> float | None:
        """The cached error, or ``None`` for an option the layer could not take."""
        self.hits += 1
        return self.entries[layer][label]

    def companion(self, kind: str) -> SensitivityCache:
        """The cached table of another ``kind`` on the same model and calibration (e.g. the
        estimates an estimator refines)."""
        key = hashlib.sha256(f"{self.key}:{kind}".encode()).hexdigest()[:32]
        return SensitivityCache(self.directory, key)

    def has(self, layer: str, labels: Iterable[str]) -> bool:
        known = self.entries.get(layer, {})
        return all(label in known for label in labels)

    def put(self, layer: str, label: str, value: float | None) -> None:
        """Store an error (``None``: the option was refused for this layer)."""
        self.entries.setdefault(layer, {})[label] = None if value is None else float(value)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".sens.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump({"metric": self.metric, "entries": self.entries}, handle)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
