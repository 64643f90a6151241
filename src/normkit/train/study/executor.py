"""Where a study's runs execute: an :class:`Executor` takes jobs and a picklable job function and reports each
run record as it finishes.

Two local executors: :class:`InProcess` (``--jobs 1``: one run after another in this process) and
:class:`LocalProcesses` (``--jobs N``: N worker processes). Other launchers (a cluster scheduler)
implement the same interface.

Ctrl-C ends a study at once and cleanly. The workers ignore the terminal's SIGINT: the parent alone decides.
On Ctrl-C it sends each worker SIGTERM, which the worker turns into ``KeyboardInterrupt`` inside the run — a
safe point at any moment, since every run file is written atomically and a run resumes from its last
checkpoint — waits for them to exit (SIGKILL after ``grace`` seconds), and raises :class:`StudyInterrupted`.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from normkit.train.study.suite import Job

__all__ = ["Executor", "InProcess", "LocalProcesses", "StudyInterrupted", "WorkerDied", "local_executor"]

JobFunction = Callable[[Job, int], dict[str, Any]]
OnResult = Callable[[dict[str, Any]], None]

RESUME_HINT = "run the same command again to continue"


class StudyInterrupted(KeyboardInterrupt):
    """Ctrl-C ended the study; every process it started has exited. The message says how to resume."""


class WorkerDied(RuntimeError):
    """A ``--jobs`` worker process ended abruptly (signal, out of memory)."""


def interrupted_message(finished: int, total: int) -> str:
    return (
        f"interrupted: {finished} of {total} runs finished (kept), an interrupted run resumes from its last "
        f"epoch; {RESUME_HINT}"
    )


class Executor(Protocol):
    """Runs ``fn(job, threads)`` for every job and calls ``on_result`` with each record in this process.

    Raises :class:`StudyInterrupted` on Ctrl-C (after stopping every run it started) and passes on the first
    exception a run raises (after stopping the others at a safe point).
    """

    def run(self, fn: JobFunction, jobs: Sequence[Job], threads: int, on_result: OnResult) -> None: ...

    @property
    def workers(self) -> int: ...


class InProcess:
    """One run after another in this process."""

    workers = 1

    def run(self, fn: JobFunction, jobs: Sequence[Job], threads: int, on_result: OnResult) -> None:
        finished = 0
        try:
            for job in jobs:
                on_result(fn(job, threads))
                finished += 1
        except KeyboardInterrupt:
            raise StudyInterrupted(interrupted_message(finished, len(jobs))) from None


def _stop_request(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _worker(conn: Connection, fn: JobFunction, threads: int) -> None:
    """A worker's loop: receive a job, run it, reply ("ok", record) | ("error", exc) | ("interrupted",)."""
    signal.signal(signal.SIGTERM, _stop_request)  # the parent's stop request (SIGINT stays ignored)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        while True:
            job = conn.recv()
            if job is None:
                return
            try:
                reply: tuple[Any, ...] = ("ok", fn(job, threads))
            except KeyboardInterrupt:
                conn.send(("interrupted",))
                return
            except Exception as exc:
                reply = ("error", _picklable(exc))
            conn.send(reply)
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        return


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


@dataclass
class _Worker:
    process: Any
    conn: Connection
    job: Job | None = None


class LocalProcesses:
    """``workers`` processes (spawned, so CUDA and threads start clean), each running one job at a time."""

    def __init__(self, workers: int, *, grace: float = 60.0) -> None:
        self._workers = workers
        self.grace = grace  # seconds a worker gets to stop at a safe point before SIGKILL

    @property
    def workers(self) -> int:
        return self._workers

    def run(self, fn: JobFunction, jobs: Sequence[Job], threads: int, on_result: OnResult) -> None:
        if not jobs:
            return
        queue = deque(jobs)
        finished = 0
        workers: list[_Worker] = []
        try:
            self._start(fn, threads, min(self._workers, len(jobs)), workers)
            for w in workers:
                self._assign(w, queue)
            while any(w.job is not None for w in workers):
                busy = [w for w in workers if w.job is not None]
                ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
                for w in busy:
                    if w.conn in ready or w.conn.poll():
                        try:
                            reply = w.conn.recv()
                        except EOFError:
                            reply = ("died",)
                    elif w.process.sentinel in ready:
                        reply = ("died",)
                    else:
                        continue
                    if reply[0] == "ok":
                        w.job = None
                        on_result(reply[1])
                        finished += 1
                        self._assign(w, queue)
                    elif reply[0] == "error":
                        raise reply[1]
                    elif reply[0] == "interrupted":  # a worker stopped by someone else's signal
                        raise KeyboardInterrupt
                    else:
                        raise WorkerDied(
                            f"a worker process died (killed, or out of memory?) while running {w.job.arm} "  # type: ignore[union-attr]
                            f"seed {w.job.seed}; finished runs are kept and an interrupted one resumes from "  # type: ignore[union-attr]
                            f"its last epoch: {RESUME_HINT}"
                        )
        except KeyboardInterrupt:
            self._stop(workers, interrupt=True)
            raise StudyInterrupted(interrupted_message(finished, len(jobs))) from None
        except BaseException:
            self._stop(workers, interrupt=True)
            raise
        self._stop(workers, interrupt=False)

    def _start(self, fn: JobFunction, threads: int, n: int, workers: list[_Worker]) -> None:
        ctx = multiprocessing.get_context("spawn")
        # The children inherit "SIGINT ignored": a Ctrl-C at the terminal reaches the whole process group, and
        # only this process may decide what happens. SIGINT is blocked meanwhile so that one arriving now is
        # not lost but delivered to us once the workers are started.
        main = threading.current_thread() is threading.main_thread()
        if main:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for _ in range(n):
                parent, child = ctx.Pipe()
                process = ctx.Process(target=_worker, args=(child, fn, threads), daemon=True)
                process.start()
                child.close()
                workers.append(_Worker(process, parent))
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a Ctrl-C meanwhile lands here

    @staticmethod
    def _assign(w: _Worker, queue: deque[Job]) -> None:
        w.job = queue.popleft() if queue else None
        try:
            w.conn.send(w.job)  # None: no more work, the worker exits
        except (BrokenPipeError, OSError):
            if w.job is not None:
                raise WorkerDied(
                    f"a worker process died before it could run {w.job.arm} seed {w.job.seed}"
                ) from None

    def _stop(self, workers: list[_Worker], *, interrupt: bool) -> None:
        """Wait for every worker to exit — after asking it to stop at a safe point when ``interrupt`` — and
        SIGKILL one that does not within ``grace`` seconds: nothing this study started keeps running."""
        main = threading.current_thread() is threading.main_thread()
        if main:  # a second Ctrl-C must not cut this short
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for w in workers:
                if interrupt and w.process.is_alive():
                    try:
                        os.kill(w.process.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + self.grace
            for w in workers:
                w.process.join(max(0.0, deadline - time.monotonic()))
                if w.process.is_alive():
                    w.process.kill()
                    w.process.join()
                w.conn.close()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)


def local_executor(jobs: int) -> Executor:
    """``--jobs N`` on this machine: in this process for 1, else N worker processes."""
    return InProcess() if jobs == 1 else LocalProcesses(jobs)
