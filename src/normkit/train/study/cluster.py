"""Runs of a study as jobs of a cluster scheduler, through submitit (``normkit compare --launcher submitit``).

Each run (arm × seed) is one job: on Slurm (``cluster="slurm"``) with the resources given, or as a local
process with the same API (``cluster="local"``). The client survives being killed and restarted: a run whose
completion record exists is never resubmitted (the study skips it before it reaches an executor), a job still
queued or running is found again from ``OUT/.submitit/jobs.json`` and waited for, and only runs with no live
job are submitted. A run that was stopped halfway resumes from its last checkpoint in its new job.

Ctrl-C cancels the local jobs this client knows of (nothing is left running on this machine) and leaves Slurm
jobs queued: rerunning the same command collects them, ``scancel`` removes them.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normkit.train.study.executor import RESUME_HINT, JobFunction, OnResult, StudyInterrupted
from normkit.train.study.suite import Job

__all__ = ["ClusterOptions", "SubmititExecutor"]

CLUSTERS = ("slurm", "local")
# Slurm states in which a job will still produce its result without being submitted again.
_SLURM_ALIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}


@dataclass(frozen=True)
class ClusterOptions:
    """Resources of every job. ``time_min``: wall-clock limit per run (Slurm's ``--time``)."""

    cluster: str = "slurm"
    partition: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int = 2
    time_min: int = 60
    max_running: int | None = None  # jobs in flight at once (None: all; the local cluster defaults to 1)

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise ValueError(f"cluster must be one of {', '.join(CLUSTERS)}, got {self.cluster!r}")
        for name in ("gpus_per_job", "cpus_per_job", "time_min"):
            value = getattr(self, name)
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or value < (0 if name == "gpus_per_job" else 1)
            ):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_running is not None and self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")


def _require_submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ImportError(
            "--launcher submitit needs the submitit package: pip install 'normkit[cluster]'"
        ) from None
    return submitit


def job_key(job: Job) -> str:
    """The identity of a run across client restarts: its run directory."""
    return str(Path(job.out_dir).resolve())


class _Registry:
    """``jobs.json``: run directory → scheduler job id, rewritten atomically after every submission."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.ids: dict[str, str] = json.loads(path.read_text())
        except FileNotFoundError:
            self.ids = {}
        except (OSError, ValueError):
            self.ids = {}  # unreadable: at worst a job still running is submitted again and resumes

    def set(self, key: str, job_id: str) -> None:
        self.ids[key] = job_id
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.ids, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


class SubmititExecutor:
    """The :class:`~normkit.train.study.executor.Executor` of ``--launcher submitit``."""

    def __init__(self, folder: str | Path, options: ClusterOptions, *, poll: float = 2.0) -> None:
        self.submitit = _require_submitit()
        self.folder = Path(folder)
        self.options = options
        self.poll = poll

    @property
    def workers(self) -> int:
        # Each job gets its own machine share: threads per run come from cpus_per_job, not from this host.
        return max(1, (os.cpu_count() or 1) // self.options.cpus_per_job)

    def _executor(self) -> Any:
        o = self.options
        ex = self.submitit.AutoExecutor(folder=self.folder / "%j", cluster=o.cluster)
        params: dict[str, Any] = {
            "timeout_min": o.time_min,
            "cpus_per_task": o.cpus_per_job,
            "gpus_per_node": o.gpus_per_job,
        }
        if o.cluster == "slurm" and o.partition:
            params["slurm_partition"] = o.partition
        ex.update_parameters(**params)
        return ex

    def _find(self, job_id: str) -> Any | None:
        """A job submitted by an earlier client that will still deliver a result, or None."""
        folder = self.folder / "%j"
        if self.options.cluster == "local":
            job = self.submitit.local.local.LocalJob(folder=folder, job_id=job_id)
            if job.paths.result_pickle.exists() or _local_alive(job_id):
                return _Orphan(job, job_id)
            return None
        job = self.submitit.SlurmJob(folder=folder, job_id=job_id)
        if job.paths.result_pickle.exists() or job.state.split(" ")[0] in _SLURM_ALIVE:
            return job
        return None

    def run(self, fn: JobFunction, jobs: Sequence[Job], threads: int, on_result: OnResult) -> None:
        if not jobs:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        registry = _Registry(self.folder / "jobs.json")
        executor = self._executor()
        cap = self.options.max_running or (1 if self.options.cluster == "local" else len(jobs))
        waiting = list(jobs)
        running: dict[str, tuple[Job, Any]] = {}
        finished = 0
        try:
            # Found again first: they hold no place a new submission could take.
            for job in list(waiting):
                job_id = registry.ids.get(job_key(job))
                handle = self._find(job_id) if job_id else None
                if handle is not None:
                    running[job_key(job)] = (job, handle)
                    waiting.remove(job)
            while waiting or running:
                while waiting and len(running) < cap:
                    job = waiting.pop(0)
                    handle = self._submit(executor, fn, job)
                    registry.set(job_key(job), handle.job_id)
                    running[job_key(job)] = (job, handle)
                for key, (job, handle) in list(running.items()):
                    if not handle.done():
                        continue
                    del running[key]
                    if isinstance(handle, _Orphan) and not handle.job.paths.result_pickle.exists():
                        waiting.append(job)  # its process died with the old client: submit it again
                        continue
                    on_result(handle.result())  # a failed run raises here, with the job's error
                    finished += 1
                if running:
                    time.sleep(self.poll)
        except KeyboardInterrupt:
            self._stop(running)
            raise StudyInterrupted(self._interrupted(finished, len(jobs), running)) from None

    def _submit(self, executor: Any, fn: JobFunction, job: Job) -> Any:
        if self.options.cluster != "local":
            return executor.submit(fn, job, self.options.cpus_per_job)
        # A local job is a child process in this terminal's process group: it inherits "SIGINT ignored", so a
        # Ctrl-C reaches this client alone, which then stops the jobs itself (SIGTERM, see _stop).
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            return executor.submit(fn, job, self.options.cpus_per_job)
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)

    def _stop(self, running: dict[str, tuple[Job, Any]]) -> None:
        if self.options.cluster != "local":
            return
        for _, handle in running.values():
            # The controller forwards SIGTERM to the run, which dies at once: every run file is written
            # atomically and the run resumes from its last checkpoint, so any moment is a safe point.
            _terminate(handle.job_id)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(not h.done() for _, h in running.values()):
            time.sleep(0.2)

    def _interrupted(self, finished: int, total: int, running: dict[str, tuple[Job, Any]]) -> str:
        line = f"interrupted: {finished} of {total} runs finished (kept); {RESUME_HINT}"
        if self.options.cluster == "slurm" and running:
            ids = " ".join(h.job_id for _, h in running.values())
            line += f" (the queued jobs keep going and are collected then; scancel {ids} removes them)"
        return line


def _local_alive(job_id: str) -> bool:
    """The local controller process of this job still runs (and is one: a pid may be reused)."""
    try:
        cmdline = Path(f"/proc/{int(job_id)}/cmdline").read_bytes()
    except (OSError, ValueError):
        try:
            os.kill(int(job_id), 0)
        except (OSError, ValueError):
            return False
        return True
    return b"submitit.local._local" in cmdline


class _Orphan:
    """A local job of an earlier client: no process handle, so done means a result file or a dead process."""

    def __init__(self, job: Any, job_id: str) -> None:
        self.job, self.job_id = job, job_id

    def done(self) -> bool:
        return self.job.paths.result_pickle.exists() or not _local_alive(self.job_id)

    def result(self) -> Any:
        return self.job.result()


def _terminate(job_id: str) -> None:
    if _local_alive(job_id):
        try:
            os.kill(int(job_id), signal.SIGTERM)
        except OSError:
            pass
