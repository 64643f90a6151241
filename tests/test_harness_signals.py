"""Ctrl-C ends a study at once and cleanly, with ``--jobs 2`` too — checked with real signals on a real
``normkit compare`` process: exit status 130, one line saying how to resume, no process left behind, and
the same command again continues (finished runs reused, the interrupted ones resumed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc for the worker processes")


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _none_alive(pids: set[int]) -> bool:
    # the workers are gone when the parent exits; multiprocessing's resource tracker (also a child) follows
    # within moments, when it reads the end of its pipe
    _wait_for(lambda: not any(_alive(p) for p in pids), 10, f"processes {pids} to exit")
    return True


def _wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _start(out: Path) -> subprocess.Popen[str]:
    command = [
        sys.executable, "-m", "normkit", "compare", "--methods", "bn-sgd", "--seeds", "3", "--epochs", "10",
        "--jobs", "2", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a session of its own: the test can signal the whole group, as a terminal's Ctrl-C does
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )


def _finished(out: Path) -> list[Path]:
    return sorted(out.glob("runs/bn-sgd/seed*/summary.json"))


def _interrupt(proc: subprocess.Popen[str], group: bool) -> tuple[int, str, set[int], float]:
    workers = _children(proc.pid)
    start = time.monotonic()
    if group:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C at a terminal: every process of the group
    else:
        os.kill(proc.pid, signal.SIGINT)  # the parent alone
    try:
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err, workers, time.monotonic() - start


def test_ctrl_c_stops_a_study_with_two_workers_and_it_resumes(tmp_path: Path) -> None:
    out = tmp_path / "study"
    # 1. Ctrl-C at the terminal once one run has finished and another is training
    proc = _start(out)

    def one_finished_one_checkpointed() -> bool:
        runs = list(out.glob("runs/bn-sgd/seed*"))
        unfinished = [r for r in runs if (r / "checkpoint.pt").exists() and not (r / "summary.json").exists()]
        return len(_finished(out)) >= 1 and len(unfinished) >= 1

    _wait_for(one_finished_one_checkpointed, 500, "a finished run and an unfinished one with a checkpoint")
    _wait_for(lambda: len(_children(proc.pid)) >= 2, 60, "two worker processes")
    code, err, workers, took = _interrupt(proc, group=True)
    assert code == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "run the same command again to continue" in lines[0], err
    assert "Traceback" not in err
    assert len(workers) >= 2 and _none_alive(workers)  # nothing left running
    assert took < 60
    finished = len(_finished(out))
    assert 1 <= finished < 3
    assert not list(out.rglob(".*.tmp"))  # stopped at a safe point: no torn temporary files

    # 2. the same command again, interrupted by a SIGINT to the parent alone once it has resumed
    proc = _start(out)
    _wait_for(lambda: len(_children(proc.pid)) >= 1, 60, "a worker process")
    time.sleep(3)
    code, err, workers, took = _interrupt(proc, group=False)
    assert code == 130 and "run the same command again to continue" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert workers and _none_alive(workers)
    assert took < 60

    # 3. and again, to the end: finished runs are reused, an interrupted one resumes from its checkpoint
    proc = _start(out)
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    reused = int(stdout.split("runs (")[1].split(" already finished")[0])
    assert reused >= finished
    assert len(_finished(out)) == 3
    logs = [p.read_text() for p in out.glob("runs/bn-sgd/seed*/log.txt")]
    assert any("resumed from epoch" in log for log in logs), logs
    for summary in _finished(out):
        record = json.loads(summary.read_text())
        metrics = [json.loads(line) for line in (summary.parent / "metrics.jsonl").read_text().splitlines()]
        assert record["epochs_done"] == 10 and [m["epoch"] for m in metrics] == list(range(1, 11))
    assert (out / "report.md").is_file()


def test_ctrl_c_stops_a_study_running_in_process(tmp_path: Path) -> None:
    out = tmp_path / "study"
    command = [
        sys.executable, "-m", "normkit", "compare", "--methods", "bn-sgd", "--seeds", "2", "--epochs", "10",
        "--no-progress", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
    )  # fmt: skip
    _wait_for(lambda: (out / "runs/bn-sgd/seed0/checkpoint.pt").exists(), 300, "a first checkpoint")
    code, err, _, took = _interrupt(proc, group=True)
    assert code == 130 and "Traceback" not in err and took < 60, err
    assert err.strip().splitlines() == [
        "normkit compare: interrupted: 0 of 2 runs finished (kept), an interrupted run resumes from its last "
        "epoch; run the same command again to continue"
    ]
    assert load_epoch(out / "runs/bn-sgd/seed0") >= 1  # the checkpoint it resumes from


def load_epoch(run_dir: Path) -> int:
    from normkit.train.runner import load_checkpoint

    return int(load_checkpoint(run_dir)["epoch"])
