"""Calibration and held-out data: token windows from text, batched for the model.

Three disjoint splits, each with one job:

- calibration: profiling and search (the sensitivity windows are its first windows);
- selection: the final choice between the search's plans and the best uniform plans that fit;
- held-out: measurement only, read after the plan is fixed, never to choose anything.

Without user data, text comes from the docstrings of the Python standard library on this
machine (English prose, no download); its source files are dealt to the three splits.
"""

from __future__ import annotations

import ast
import inspect
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autotune.errors import CalibrationError

STDLIB_SOURCE = "python-stdlib-docstrings"
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_MIN_WORDS = 12
SPLITS = ("calibration", "selection", "heldout")
# a text's split by its index modulo 4: the held-out split is the same as before the
# selection split existed, so plans validated on it stay comparable
_SPLIT_OF_RESIDUE = {0: "calibration", 1: "selection", 2: "calibration", 3: "heldout"}
MIN_TEXTS = 4  # user texts for three splits, each one text at least


@dataclass
class CalibrationSet:
    """Batches for search (``calibration``), per-layer profiling (``sensitivity``, a subset of
    calibration), the final choice between plans (``selection``) and measurement only
    (``heldout``)."""

    calibration: list[dict[str, torch.Tensor]]
    sensitivity: list[dict[str, torch.Tensor]]
    heldout: list[dict[str, torch.Tensor]]
    description: dict[str, Any] = field(default_factory=dict)
    selection: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def latency_inputs(self, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        """One input of ``batch_size`` x ``seq_len`` tokens, tiled from held-out data."""
        source = self.heldout[0]
        out = {}
        for key, value in source.items():
            row = value[0]
            reps = -(-seq_len // row.shape[0])
            tiled = row.repeat(reps)[:seq_len] if row.dim() == 1 else row
            out[key] = tiled.unsqueeze(0).expand(batch_size, *tiled.shape).contiguous()
        return out


@cache
def stdlib_files() -> tuple[Path, ...]:
    """Python source files of the standard library (top level and one package level down)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = list(root.glob("*.py"))
    for package in root.iterdir():
        if package.is_dir() and package.name not in _SKIP_DIRS:
            files.extend(package.glob("*.py"))
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return
    nodes = [tree, *ast.walk(tree)]
    seen: set[int] = set()
    for node in nodes:
        if id(node) in seen or not isinstance(
            node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        ):
            continue
        seen.add(id(node))
        doc = ast.get_docstring(node)
        if doc and len(doc.split()) >= _MIN_WORDS:
            yield " ".join(doc.split())


def split_of(index: int) -> str:
    """The split of the ``index``-th text or source file: of every four, two calibrate, one
    selects and one is held out."""
    return _SPLIT_OF_RESIDUE[index % 4]


def stdlib_texts(split: str) -> Iterator[str]:
    """Docstrings of the standard library; ``split`` is one of :data:`SPLITS` (source files
    are dealt to the splits by :func:`split_of`)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    seen: set[str] = set()  # a docstring found in several files belongs to the first one's split
    for index, path in enumerate(stdlib_files()):
        texts = [t for t in _file_docstrings(path) if t not in seen]
        seen.update(texts)
        if split_of(index) == split:
            yield from texts


@cache
def _file_docstrings(path: Path) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_docstrings(path)))


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a text (e.g. ``[CLS]`` and ``[SEP]``)."""
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain) :])
    return [], []


def token_windows(
    texts: Iterator[str] | Sequence[str], tokenizer: Any, seq_len: int, count: int
) -> list[list[int]]:
    """``count`` windows of exactly ``seq_len`` tokens (special tokens included) cut from the
    concatenated texts; fewer if the texts run out."""
    prefix, suffix = special_tokens(tokenizer)
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise CalibrationError(f"sequence length {seq_len} leaves no room for text tokens")
    stream: list[int] = []
    windows: list[list[int]] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        while len(stream) >= body and len(windows) < count:
            windows.append(prefix + stream[:body] + suffix)
            del stream[:body]
        if len(windows) >= count:
            break
    return windows


def accepted_inputs(model: nn.Module) -> set[str]:
    """The inputs that batches for ``model`` carry: those its ``forward`` takes, less
    ``token_type_ids`` where its config has no segment table (GPT-2 takes them but looks them
    up in its token table, so zeros would add token 0's embedding to every position)."""
    try:
        params = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {"input_ids"}
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "type_vocab_size", None) is None:
        params.discard("token_type_ids")
    return params


def batch_windows(
    windows: list[list[int]], batch_size: int, accepted: set[str]
) -> list[dict[str, torch.Tensor]]:
    batches = []
    for start in range(0, len(windows), batch_size):
        ids = torch.tensor(windows[start : start + batch_size], dtype=torch.long)
        batch = {"input_ids": ids}
        if "attention_mask" in accepted:
            batch["attention_mask"] = torch.ones_like(ids)
        if "token_type_ids" in accepted:
            batch["token_type_ids"] = torch.zeros_like(ids)
        batches.append(batch)
    return batches


def _read_texts(source: str | Path) -> list[str]:
    path = Path(source)
    if not path.is_file():
        raise CalibrationError(f"calibration file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    return [p for p in paragraphs if p]


def build_calibration(
    model: nn.Module,
    tokenizer: Any,
    calibration: Any = None,
    heldout: Any = None,
    *,
    seq_len: int = 128,
    calibration_windows: int = 32,
    selection_windows: int = 8,
    heldout_windows: int = 16,
    sensitivity_windows: int = 4,
    batch_size: int = 8,
) -> CalibrationSet:
    """Build the three splits from stdlib text (``None``), texts, a text file, or batches.

    User texts are dealt like stdlib files (:func:`split_of`); with ``heldout`` given, the
    calibration texts are dealt to calibration and selection only (every fourth selects)."""
    accepted = accepted_inputs(model)
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions:
        seq_len = min(seq_len, int(max_positions))
    if _is_batches(calibration):
        return _from_batches(calibration, heldout, sensitivity_windows)
    if tokenizer is None:
        raise CalibrationError(
            "no tokenizer was found beside the model's weights (tokenizer.json, "
            "tokenizer_config.json or vocabulary files), so calibration text cannot be "
            "tokenised: save the model's tokenizer into its folder (tokenizer.save_pretrained"
            "(folder)), pass tokenizer=..., or pass calibration as a list of input batches "
            "(dicts of tensors)"
        )
    if calibration is None:
        calib_texts: Any = stdlib_texts("calibration")
        select_texts: Any = stdlib_texts("selection")
        held_texts: Any = stdlib_texts("heldout") if heldout is None else _texts_of(heldout)
        source = STDLIB_SOURCE
    else:
        texts = _texts_of(calibration)
        calib_texts, select_texts, held_texts = _deal(texts, heldout)
        source = str(calibration) if isinstance(calibration, (str, Path)) else "user texts"
    calib = token_windows(calib_texts, tokenizer, seq_len, calibration_windows)
    select = token_windows(select_texts, tokenizer, seq_len, selection_windows)
    held = token_windows(held_texts, tokenizer, seq_len, heldout_windows)
    empty = [name for name, found in zip(SPLITS, (calib, select, held), strict=True) if not found]
    if empty:
        raise CalibrationError(
            f"not enough text for one window of {seq_len} tokens in the {' and '.join(empty)} "
            f"split{'s' if len(empty) > 1 else ''}: give more or longer texts, or a shorter "
            "--seq-len"
        )
    sens = calib[: max(1, min(sensitivity_windows, len(calib)))]
    description = {
        "source": source,
        "seq_len": seq_len,
        "calibration_windows": len(calib),
        "sensitivity_windows": len(sens),
        "selection_windows": len(select),
        "heldout_windows": len(held),
        "batch_size": batch_size,
    }
    return CalibrationSet(
        calibration=batch_windows(calib, batch_size, accepted),
        sensitivity=batch_windows(sens, len(sens), accepted),
        heldout=batch_windows(held, batch_size, accepted),
        selection=batch_windows(select, batch_size, accepted),
        description=description,
    )


def _texts_of(source: Any) -> list[str]:
    texts = _read_texts(source) if isinstance(source, (str, Path)) else source
    if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise CalibrationError(
            "calibration and held-out data must be a list of strings, a text file, or a list "
            "of input batches"
        )
    return list(texts)


def _deal(texts: list[str], heldout: Any) -> tuple[list[str], list[str], list[str]]:
    """User texts dealt to calibration, selection and held-out (held-out given: to the first
    two), refusing too few texts for disjoint splits."""
    if heldout is None:
        if len(texts) < MIN_TEXTS:
            raise CalibrationError(
                f"{len(texts)} calibration text(s): disjoint calibration, selection and "
                f"held-out splits need at least {MIN_TEXTS} (or 2 with --heldout)"
            )
        parts: dict[str, list[str]] = {name: [] for name in SPLITS}
        for index, text in enumerate(texts):
            parts[split_of(index)].append(text)
        return parts["calibration"], parts["selection"], parts["heldout"]
    if len(texts) < 2:
        raise CalibrationError(
            f"{len(texts)} calibration text(s): disjoint calibration and selection splits "
            "need at least 2"
        )
    calib = [t for i, t in enumerate(texts) if i % 4 != 3]
    select = [t for i, t in enumerate(texts) if i % 4 == 3] or [calib.pop()]
    return calib, select, _texts_of(heldout)


def build_heldout(
    model: nn.Module,
    tokenizer: Any,
    heldout: Any = None,
    *,
    seq_len: int = 128,
    windows: int = 16,
    batch_size: int = 8,
) -> list[dict[str, torch.Tensor]]:
    """Held-out batches alone: from stdlib text (``None``), texts, a text file, or batches."""
    if _is_batches(heldout):
        return [dict(b) for b in heldout]
    if tokenizer is None:
        raise CalibrationError(
            "no tokenizer was found beside the model's weights: save the model's tokenizer "
            "into its folder, or pass held-out input batches"
        )
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions:
        seq_len = min(seq_len, int(max_positions))
    if heldout is None:
        texts: Any = stdlib_texts("heldout")
    elif isinstance(heldout, (str, Path)):
        texts = _read_texts(heldout)
    else:
        texts = heldout
    found = token_windows(texts, tokenizer, seq_len, windows)
    if not found:
        raise CalibrationError(f"not enough held-out text for one window of {seq_len} tokens")
    return batch_windows(found, batch_size, accepted_inputs(model))


def _is_batches(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) > 0
        and all(isinstance(b, dict) for b in value)
    )


def _from_batches(calibration: Any, heldout: Any, sensitivity_windows: int) -> CalibrationSet:
    """User batches: the last quarter held out (unless ``heldout`` is given) and the quarter
    before it selects; the rest calibrates."""
    batches = [dict(b) for b in calibration]
    if heldout is not None and not _is_batches(heldout):
        raise CalibrationError("with calibration batches, heldout must be batches too")
    if heldout is None:
        if len(batches) < 3:
            raise CalibrationError(
                f"{len(batches)} calibration batch(es): disjoint calibration, selection and "
                "held-out splits need at least 3 (or 2 with held-out batches)"
            )
        cut = max(1, len(batches) // 4)
        held, batches = batches[-cut:], batches[:-cut]
    else:
        if len(batches) < 2:
            raise CalibrationError(
                f"{len(batches)} calibration batch: disjoint calibration and selection "
                "splits need at least 2"
            )
        held = [dict(b) for b in heldout]
    cut = max(1, len(batches) // 4)
    select, batches = batches[-cut:], batches[:-cut]
    return CalibrationSet(
        calibration=batches,
        sensitivity=batches[:1],
        heldout=held,
        selection=select,
        description={
            "source": "user batches",
            "calibration_batches": len(batches),
            "selection_batches": len(select),
            "heldout_batches": len(held),
        },
    )
