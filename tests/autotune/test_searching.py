"""Search engines inside a tune: never worse than the allocator or uniform plans, Pareto fronts,
studies that resume after SIGKILL and that two processes share."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from autotune.cli import main
from autotune.errors import AutotuneError
from autotune.tuner import autotune
from profilers.measure import model_bytes
from tests.conftest import make_tiny_bert

SMALL = {"seq_len": 32, "calibration_windows": 8, "sensitivity_windows": 2, "heldout_windows": 4}
ROOT = Path(__file__).resolve().parents[2]


def _tune(tokenizer, budget="30%", **kwargs):
    model = make_tiny_bert()
    result = autotune(
        model, budget, "cpu", tokenizer=tokenizer, progress=False, measure=False, **SMALL, **kwargs
    )
    return model, result


@pytest.mark.parametrize("engine", ["evolution", "tpe", "nsga2"])
def test_each_engine_starts_from_the_allocator_and_keeps_the_budget(tokenizer, engine) -> None:
    model, result = _tune(tokenizer, search=engine, max_evals=12)
    search = result.plan.search
    run = search["engine_run"]
    assert search["engine"] == engine
    assert run["best_error"] <= run["allocator_error"]
    assert result.plan.predicted["bytes"] <= 0.30 * model_bytes(model)
    assert model_bytes(result.model) == result.plan.predicted["bytes"]
    names = [c["name"] for c in search["candidates"]]
    assert "allocator" in names
    if run["best_error"] < run["allocator_error"]:
        assert names[0] == engine  # the engine's own plan is a candidate when it differs
    if engine == "evolution":
        # cheap screening: more evaluations on the profiling batches than on the full set
        calls = search["evaluations_by_fidelity"]["calls"]
        assert calls[0] > calls[1]
        if run["stopped"] == "max_evals":
            assert run["full_evaluations"] >= 12
        else:  # its stall rule on the selection split ended it first, after a generation
            assert run["stopped"].startswith("stalled") and run["iterations"] >= 1
        # the stall is judged on the selection split: the parent's error there, per
        # generation, from the allocator's plan on (the final choice judges its plan again)
        judged = run["selection_errors"]
        assert len(judged) == run["iterations"] + 1
        selection = search["selection"]
        if selection["front_runner"] == engine:
            assert judged[-1] == pytest.approx(selection["errors"][engine], rel=1e-6)
        else:  # the engine found nothing better than its start
            assert judged[-1] == pytest.approx(judged[0])


def test_nsga2_records_a_pareto_front_within_the_budget(tokenizer) -> None:
    model, result = _tune(tokenizer, search="nsga2", max_evals=30)
    front = result.plan.search["pareto"]
    assert len(front) >= 2
    limit = 0.30 * model_bytes(model)
    layers = set(result.plan.layers) - {"_default"}
    for point in front:
        assert point["bytes"] <= limit
        assert set(point["layers"]) == layers
    keys = ("error", "bytes", "latency_ms")
    for a in front:
        dominated = any(
            all(b[k] <= a[k] for k in keys) and any(b[k] < a[k] for k in keys) for b in front
        )
        assert not dominated


def test_auto_uses_the_allocator_when_nothing_is_lost(tokenizer) -> None:
    _, result = _tune(tokenizer, budget="100%", max_evals=5)
    assert result.plan.search["engine"] == "allocator"
    assert "engine_run" not in result.plan.search


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"search": "grid"}, "unknown search 'grid'; allowed: auto, allocator"),
        ({"max_evals": 0}, "max_evals must be a positive number"),
        ({"timeout": -1}, "timeout must be a positive number"),
    ],
)
def test_bad_search_settings_fail_before_any_work(tokenizer, kwargs, message) -> None:
    with pytest.raises(AutotuneError, match=message):
        _tune(tokenizer, **kwargs)


def test_a_bad_storage_url_is_one_line_and_exit_2(tiny_bert_dir, tmp_path, capsys) -> None:
    argv = ["tune", str(tiny_bert_dir), "--budget", "30%", "--target", "cpu", "--quiet"]
    code = main([*argv, "--no-measure", "--storage", "nosuchdb://x", "-o", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "cannot open study storage" in err
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------- studies


def _cli(model_dir: Path, storage: str, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "autotune.cli",
        "tune",
        str(model_dir),
        "--budget",
        "30%",
        "--target",
        "cpu",
        "--no-measure",
        "--quiet",
        "--search",
        "evolution",
        "--storage",
        storage,
        "--study",
        "shared",
        "-o",
        str(out),
        *extra,
    ]


def _trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name="shared", storage=storage).get_trials(deepcopy=False)
    except KeyError:  # the study is not created yet
        return []


def _killable(trials: list[optuna.trial.FrozenTrial]) -> bool:
    """Once one evaluation is recorded: the earliest kill that leaves something to resume
    from. Waiting for more let a fast machine finish the whole search (it ends when it
    stalls or finds no new plan) between two polls, and write its plan."""
    return any(t.values for t in trials)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_a_search_killed_with_sigkill_resumes_without_losing_evaluations(
    tiny_bert_dir, tmp_path
) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = subprocess.Popen(
        _cli(tiny_bert_dir, storage, tmp_path / "first.json", "--max-evals", "100000"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    # killed as soon as the start plan's evaluation is recorded, polled often: well before it
    # could stall and finish (at least four generations of 17 trials)
    while not _killable(_trials(storage)):
        assert first.poll() is None, first.stderr.read().decode()
        assert time.monotonic() < deadline, "the search recorded no evaluation"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (tmp_path / "first.json").exists()  # killed before it could write a plan
    before = _trials(storage)
    best_before = min(t.values[0] for t in before if t.values)

    out = tmp_path / "second.json"
    second = subprocess.run(
        _cli(tiny_bert_dir, storage, out, "--max-evals", "10"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0, second.stderr
    plan = json.loads(out.read_text())
    assert plan["search"]["study"]["trials_before"] == len(before)
    assert plan["search"]["engine_run"]["best_error"] <= best_before
    after = _trials(storage)
    assert len(after) > len(before)
    plans = [tuple(sorted(t.params.items())) for t in after]
    assert len(plans) == len(set(plans)), "a finished evaluation was repeated"


STALL_S = 600.0  # a worker that shows no progress for this long is taken to hang


def _wait_while_progressing(workers: list[subprocess.Popen], storage: str) -> None:
    """Wait for every worker, however slow the machine: fail only when for ``STALL_S``
    seconds the study gains no trial and no worker finishes."""
    seen: tuple[int, int] | None = None
    changed = time.monotonic()
    while any(w.poll() is None for w in workers):
        try:
            trials = len(_trials(storage))
        except Exception:  # the database is busy with a worker's write: look again later
            trials = seen[0] if seen else 0
        state = (trials, sum(w.poll() is not None for w in workers))
        if state != seen:
            seen, changed = state, time.monotonic()
        stalled = time.monotonic() - changed
        assert stalled < STALL_S, f"no trial and no finished worker for {stalled:.0f} s"
        time.sleep(1.0)


def test_two_processes_share_one_study(tiny_bert_dir, tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    # the study exists before both start, as after `optuna create-study`
    optuna.create_study(storage=storage, study_name="shared")
    logs = [tmp_path / f"worker{seed}.log" for seed in (1, 2)]
    workers = []
    for seed, log in zip((1, 2), logs, strict=True):
        with open(log, "wb") as errors:  # a file, not a pipe: it never fills and blocks
            workers.append(
                subprocess.Popen(
                    _cli(
                        tiny_bert_dir,
                        storage,
                        tmp_path / f"plan{seed}.json",
                        "--max-evals",
                        "25",
                        "--seed",
                        str(seed),
                    ),
                    env=_env(),
                    stdout=subprocess.DEVNULL,
                    stderr=errors,
                )
            )
    try:
        _wait_while_progressing(workers, storage)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for worker, log in zip(workers, logs, strict=True):
        assert worker.returncode == 0, log.read_text(errors="replace")
    trials = _trials(storage)
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    counts = collections.Counter(tuple(sorted(t.params.items())) for t in trials)
    assert sum(n - 1 for n in counts.values()) < len(trials) / 4  # little work is repeated
    best = min(t.values[0] for t in trials if t.values)
    studies = [json.loads((tmp_path / f"plan{seed}.json").read_text())["search"] for seed in (1, 2)]
    assert max(s["study"]["trials_from_other_processes"] for s in studies) > 0
    # whoever finished last saw the other's evaluations: its plan is the study's best
    assert min(s["engine_run"]["best_error"] for s in studies) == pytest.approx(best)
