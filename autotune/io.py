"""Atomic file writes: a file is either the old one or the whole new one, never half.

Work in progress lives beside its target as ``.NAME.PID.*`` (a hidden file or folder named
after the writing process). A process killed outright leaves it behind; the next write of
the same target removes every such leftover whose process no longer runs.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike[str], writer: Callable[[str], None]) -> None:
    """Call ``writer(temporary_path)``, then move the result onto ``path`` in one step."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh staging folder; on success it replaces ``path`` whole, else vanishes."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    staging = Path(tempfile.mkdtemp(prefix=_prefix(target), dir=target.parent))
    try:
        yield staging
        mask = _umask()
        os.chmod(staging, 0o777 & ~mask)
        for item in staging.rglob("*"):
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=_prefix(target, "old."), dir=target.parent))
            backup.rmdir()
            os.replace(target, backup)
            os.replace(staging, target)
            _remove_tree(backup)
        else:
            os.replace(staging, target)
    except BaseException:
        _remove_tree(staging)
        raise


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _prefix(target: Path, kind: str = "") -> str:
    return f".{target.name}.{kind}{os.getpid()}."


_LEFTOVER = re.compile(r"(?:old\.)?(\d+)\.")


def remove_stale(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the work in progress of ``target`` left by processes that no longer run."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    head = f".{target.name}."
    for entry in target.parent.iterdir():
        if not entry.name.startswith(head):
            continue
        match = _LEFTOVER.match(entry.name[len(head) :])
        if match is None or _running(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            _remove_tree(entry)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or a number that is no pid: leave it
    return True
