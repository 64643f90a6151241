"""``normkit compare --launcher submitit``: one scheduler job per run, found again after the client dies.

Run with submitit's local cluster (real processes, the Slurm API): the client is SIGKILLed while jobs run and
started again; every run must be reported once and no job submitted twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("submitit")
pytest.importorskip("sklearn")

from normkit.train.study.cluster import ClusterOptions

ARGS = ["--methods", "bn-sgd,brn-sgd", "--seeds", "2", "--epochs", "1", "--launcher", "submitit"]
ARGS += ["--cluster", "local", "--jobs", "2"]


def _compare(out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "normkit", "compare", *ARGS, "--out", str(out), *extra]
    # A session of its own, as a terminal's foreground job is: Ctrl-C reaches the whole process group.
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _wait_for(predicate, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.2)


def _registry(out: Path) -> dict[str, str]:
    try:
        return json.loads((out / ".submitit" / "jobs.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/cmdline").exists() and b"submitit" in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_killed_client_finds_its_jobs_again_and_reports_each_run_once(tmp_path: Path) -> None:
    out = tmp_path / "study"
    first = _compare(out)
    _wait_for(lambda: len(_registry(out)) == 2, 120)
    first.kill()  # SIGKILL: no cleanup at all
    first.wait()
    before = _registry(out)
    # The jobs outlive their client (a scheduler's jobs do).
    assert any(_alive(int(pid)) for pid in before.values())

    second = _compare(out)
    text, _ = second.communicate(timeout=600)
    assert second.returncode == 0, text
    after = _registry(out)
    assert len(after) == 4
    for run, job_id in before.items():  # found again, not submitted a second time
        assert after[run] == job_id
    submitted = [p for p in (out / ".submitit").iterdir() if p.name.isdigit()]
    assert len(submitted) == 4
    rows = (out / "results.csv").read_text().splitlines()
    runs = [r for r in rows[1:] if r.strip()]
    assert len(runs) == 4, rows
    assert all(not _alive(int(pid)) for pid in after.values())


def test_ctrl_c_cancels_local_jobs_and_exits_130(tmp_path: Path) -> None:
    out = tmp_path / "study"
    proc = _compare(out)
    _wait_for(lambda: len(_registry(out)) == 2, 120)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C at a terminal does
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, text
    assert "run the same command again" in text
    assert "Traceback" not in text
    _wait_for(lambda: all(not _alive(int(pid)) for pid in _registry(out).values()), 60)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cluster": "pbs"}, "cluster must be one of"),
        ({"time_min": 0}, "time_min"),
        ({"gpus_per_job": -1}, "gpus_per_job"),
        ({"max_running": 0}, "max_running"),
    ],
)
def test_cluster_options_are_checked(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClusterOptions(**kwargs)  # type: ignore[arg-type]


def test_cluster_flags_without_the_launcher_are_refused(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "normkit", "compare", "--partition", "gpu", "--out", str(tmp_path / "x")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--partition" in done.stderr and "--launcher submitit" in done.stderr
    assert not (tmp_path / "x").exists()


def test_methods_naming_recipes_run_the_papers_settings(tmp_path: Path) -> None:
    """The README's paper-scale Slurm study: a method file whose methods name recipes."""
    from normkit.train.runner import get_recipe
    from normkit.train.study import SUITES, load_method_file, plan

    path = tmp_path / "wrn.json"
    path.write_text(
        json.dumps(
            {
                "wrn-sgd": {"description": "WRN-28-10 SGD", "recipe": "rbn-wrn28-10-cifar10-sgd"},
                "wrn-sgdg": {"description": "WRN-28-10 SGD-G", "recipe": "rbn-wrn28-10-cifar10-sgdg"},
            }
        )
    )
    _, jobs = plan(
        SUITES["default"], methods=["wrn-sgd", "wrn-sgdg"], extra_methods=load_method_file(path), seeds=2
    )
    assert len(jobs) == 4
    for job in jobs:
        recipe = get_recipe(job.config["recipe"]).config
        assert {k: job.config[k] for k in recipe} == recipe  # the suite's digits MLP does not leak in
