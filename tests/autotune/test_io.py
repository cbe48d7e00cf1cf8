from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from autotune.io import atomic_directory, remove_stale, write_text_atomic


@pytest.fixture
def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_killed_writers_staging_folder_is_removed_by_the_next_write(tmp_path, dead_pid):
    leftover = tmp_path / f".out.{dead_pid}.abc123"
    (leftover / "weights").mkdir(parents=True)
    backup = tmp_path / f".out.old.{dead_pid}.xyz"
    backup.mkdir()
    with atomic_directory(tmp_path / "out") as staging:
        (staging / "config.json").write_text("{}")
    assert not leftover.exists() and not backup.exists()
    assert (tmp_path / "out" / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_leftover_file_of_a_dead_writer_is_removed(tmp_path, dead_pid):
    leftover = tmp_path / f".plan.json.{dead_pid}.q1w2.tmp"
    leftover.write_text("half")
    write_text_atomic(tmp_path / "plan.json", "{}")
    assert not leftover.exists()


def test_work_of_a_running_process_and_other_targets_are_left_alone(tmp_path, dead_pid):
    running = tmp_path / f".out.{os.getppid()}.abc"
    running.mkdir()
    other = tmp_path / f".other.{dead_pid}.abc"
    other.mkdir()
    unrelated = tmp_path / ".out.notes"
    unrelated.write_text("mine")
    assert remove_stale(tmp_path / "out") == []
    assert running.exists() and other.exists() and unrelated.exists()


def test_staging_names_carry_the_writing_process(tmp_path):
    with atomic_directory(tmp_path / "out") as staging:
        assert Path(staging).name.startswith(f".out.{os.getpid()}.")
