"""Bad command lines: one line on stderr, exit 2, nothing written; help; interrupts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from autotune import cli
from autotune.cli import main


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in an empty folder, so that anything written shows."""
    monkeypatch.chdir(tmp_path)


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The single stderr line of a command line refused with exit 2 and no stdout."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert "usage:" not in lines[0] and "Traceback" not in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "prefix", "fragment"),
    [
        (["tune", "demo", "-o", "plan.json"], "autotune tune", "required: --budget"),
        (["tune"], "autotune tune", "required: model, --budget"),
        (["tune", "demo", "--budget", "1MB", "--seed", "x"], "autotune tune", "int value: 'x'"),
        (["tune", "demo", "--budget", "--quiet"], "autotune tune", "expected one argument"),
        (["validate", "plan.json"], "autotune validate", "required: model"),
        (["apply", "plan.json", "demo"], "autotune apply", "required: -o/--output"),
        (["export", "plan.json", "demo", "-o", "out"], "autotune export", "required: --format"),
        (["report"], "autotune report", "required: plan"),
        (["diff", "a.json"], "autotune diff", "required: b"),
        (["targets", "--bogus"], "autotune targets", "unrecognized arguments: --bogus"),
        ([], "autotune", "required: COMMAND (allowed: tune, validate, apply"),
        (["tuen"], "autotune", "invalid choice: 'tuen' (allowed: tune, validate"),
    ],
)
def test_a_malformed_command_line_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    argv: list[str],
    prefix: str,
    fragment: str,
) -> None:
    err = one_line_error(capsys, argv)
    assert err.startswith(f"{prefix}: error: ") and fragment in err
    assert err.endswith(f"run '{prefix} --help' for usage")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (
            ["tune", "demo", "--budget", "1MB", "--sensitivity", "bogus"],
            "unknown sensitivity 'bogus'; allowed: end-to-end, fisher, local",
        ),
        (
            ["tune", "demo", "--budget", "1MB", "--search", "bogus"],
            "unknown search 'bogus'; allowed: auto, allocator, evolution, tpe, nsga2",
        ),
        (["profile", "demo", "--sensitivity", "x"], "unknown sensitivity 'x'; allowed:"),
    ],
)
def test_an_unregistered_engine_or_estimator_is_one_line_before_any_loading(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch, argv, fragment
) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("autotune.loading.load_model", no_loading)
    err = one_line_error(capsys, argv)
    assert err == f"autotune: error: {fragment}" or err.startswith(f"autotune: error: {fragment}")
    assert list(tmp_path.iterdir()) == []


def test_a_budget_that_starts_with_a_dash_reaches_the_budget_parser(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    err = one_line_error(capsys, ["tune", "demo", "--budget", "-15MB", "-o", "plan.json"])
    assert err.startswith("autotune: error: malformed budget term '-15MB'")
    assert list(tmp_path.iterdir()) == []


def test_any_one_value_option_takes_a_word_that_starts_with_a_dash(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = one_line_error(capsys, ["targets", "--target-file", "-mine.json"])
    assert "'-mine.json' does not exist" in err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["tune", "demo", "--budget", "15", "MB"], ("15MB", "15 MB")),
        (["tune", "--budget", "15", "MB", "demo"], ("15MB", "15 MB")),
        (["tune", "demo", "--budget=8GB,", "20ms"], ("8GB,20ms", "8GB, 20ms")),
    ],
)
def test_a_budget_in_several_words_is_told_to_be_one(
    capsys: pytest.CaptureFixture[str], argv: list[str], words: tuple[str, str]
) -> None:
    err = one_line_error(capsys, argv)
    joined, quoted = words
    assert f"a budget is one word: --budget {joined} (or quoted: --budget '{quoted}')" in err


def test_a_stray_word_after_a_budget_is_unrecognized(capsys: pytest.CaptureFixture[str]) -> None:
    err = one_line_error(capsys, ["tune", "demo", "--budget", "15MB", "extra"])
    assert "unrecognized arguments: extra" in err and "one word" not in err


@pytest.mark.parametrize(("typed", "meant"), [("a10O", "'a100'"), ("h10", "'h100'")])
def test_a_misspelt_target_gets_a_suggestion(
    capsys: pytest.CaptureFixture[str], typed: str, meant: str
) -> None:
    err = one_line_error(capsys, ["tune", "demo", "--budget", "15MB", "--target", typed])
    assert f"unknown target '{typed}'; did you mean " in err
    assert meant in err.split("did you mean ", 1)[1].split("?", 1)[0]


def test_targets_lists_aliases(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["targets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["name", "aliases"]
    h100 = next(line for line in lines if line.startswith("h100 "))
    assert "h100-80gb, h100-sxm" in h100
    assert main(["targets", "--json"]) == 0
    listed = {t["name"]: t["aliases"] for t in json.loads(capsys.readouterr().out)}
    assert listed["a100-80gb"] == ["a100"] and listed["t4"] == []


def _interrupt(_args: object) -> int:
    raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["tune", "report"])
def test_an_interrupt_exits_130_with_one_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    command: str,
) -> None:
    monkeypatch.setitem(cli.COMMANDS, command, _interrupt)
    monkeypatch.setenv("AUTOTUNE_CACHE", str(tmp_path / "cache"))
    argv = ["tune", "demo", "--budget", "15MB"] if command == "tune" else ["report", "p.json"]
    assert main(argv) == 130
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    if command == "report":
        assert lines == ["autotune: interrupted"]
    else:
        assert f"cached in {tmp_path / 'cache'}" in lines[0]
        assert "running the same command again resumes from them" in lines[0]


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--cache-dir", "mine"], ["cached in mine", "resumes from them"]),
        (["--no-cache"], ["not cached (--no-cache)"]),
        (["--sensitivity", "fisher"], ["not cached (--sensitivity fisher)"]),
        (["--storage", "sqlite:///s.db"], ["resumes from them", "sqlite:///s.db", "study resumes"]),
    ],
)
def test_an_interrupted_tune_says_what_resumes(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    fragments: list[str],
) -> None:
    monkeypatch.setitem(cli.COMMANDS, "tune", _interrupt)
    assert main(["tune", "demo", "--budget", "15MB", *extra]) == 130
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and all(f in err for f in fragments), err


@pytest.mark.parametrize("argv", [["--help"], ["tune", "--help"], ["--version"]])
def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert ("usage: autotune" in out) if "--help" in argv else out.startswith("autotune ")


def test_tune_help_names_the_bundled_models_and_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["tune", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "'demo' (the bundled all-MiniLM-L6-v2), 'tiny-lm'" in out
    assert "'autotune targets'" in out and "(default: local)" in out
    assert "(default: 0)" in out  # --seed


def test_every_argument_has_help() -> None:
    for name, command in cli.build_parser().commands.items():
        for action in command._actions:
            assert action.help, f"autotune {name} {action.dest}"


@pytest.mark.parametrize("argv", [["tune", "--help"], ["tune", "demo", "--budget", "15", "MB"]])
def test_help_and_bad_command_lines_do_not_load_torch(argv: list[str]) -> None:
    code = (
        "import sys; from autotune.cli import main; "
        f"code = main({argv!r}); assert 'torch' not in sys.modules; print(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == ("0" if "--help" in argv else "2")


@pytest.mark.parametrize(
    ("budget", "fragment"),
    [
        ("2000x", "budget latency relative to the original must be at most 1000x"),
        ("0.5x,0.6x", "constrains latency (prefill) relative to the original twice"),
        ("1MB,memory=0.5x", "only latency terms take a phase"),
    ],
)
def test_a_bad_relative_latency_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, budget: str, fragment: str
) -> None:
    err = one_line_error(capsys, ["tune", "demo", "--budget", budget, "-o", "plan.json"])
    assert err.startswith("autotune: error:") and fragment in err
    assert list(tmp_path.iterdir()) == []
