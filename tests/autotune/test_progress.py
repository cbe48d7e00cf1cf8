import io

from autotune import progress
from autotune.progress import LineProgress, Progress


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_piped_stderr_gets_lines_at_start_during_and_end(monkeypatch):
    err = _Pipe()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    with Progress(True).bar(4, "sensitivity") as bar:
        assert isinstance(bar, LineProgress)
        bar.every_s = 0.0
        for _ in range(4):
            bar.update(1)
    lines = err.getvalue().splitlines()
    assert lines[0] == "[autotune] sensitivity: 4 steps"
    assert "[autotune] sensitivity: 2/4 (50%)" in "\n".join(lines)
    assert lines[-1].startswith("[autotune] sensitivity: done, 4/4 in ")
    assert "\r" not in err.getvalue()


def test_lines_are_rate_limited(monkeypatch):
    err = _Pipe()
    monkeypatch.setattr("sys.stderr", err)
    with LineProgress(1000, "latency", every_s=3600.0) as bar:
        for _ in range(1000):
            bar.update(1)
    assert len(err.getvalue().splitlines()) == 2  # start and end only


def test_terminal_gets_a_bar_and_quiet_gets_nothing(monkeypatch):
    monkeypatch.setattr("sys.stderr", _Terminal())
    assert not isinstance(Progress(True).bar(4, "x"), LineProgress)
    err = _Pipe()
    monkeypatch.setattr("sys.stderr", err)
    with Progress(False).bar(4, "x") as bar:
        bar.update(4)
    assert err.getvalue() == ""
