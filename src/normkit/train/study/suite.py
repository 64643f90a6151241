"""The vocabulary of a comparison — methods, arms, suites, jobs, a finished study — and the interface a kind
of suite implements (:class:`SuiteKind`): the supervised suites (``compare.py``) and the
reinforcement-learning suite (:mod:`normkit.train.rl`) plug into ``compare`` through it alike. Plain data
and a protocol: no module imports another's internals through it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = ["Arm", "CompareResult", "Job", "Method", "Suite", "SuiteKind"]


@dataclass(frozen=True)
class Method:
    """A named bundle of harness options (``TrainConfig`` overrides)."""

    name: str
    description: str
    overrides: dict[str, Any]
    source: str = "built-in"  # or the method file it came from


@dataclass(frozen=True)
class Arm:
    """One line of a comparison: a method under a regime, compared with ``baseline`` (an arm label)."""

    label: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    base: dict[str, Any]
    arms: tuple[Arm, ...]
    seeds: int = 3
    claim: str = ""
    kind: str = "train"  # "rl": base and arm overrides are CrossQConfig options, run by normkit.train.rl
    runner: SuiteKind | None = field(default=None, compare=False, repr=False)  # None: the supervised kind


@dataclass(frozen=True)
class Job:
    """One run of a study: an arm's configuration for one seed, and the folder it lives in."""

    arm: str
    method: str
    seed: int
    config: dict[str, Any]
    out_dir: Path


@dataclass
class CompareResult:
    """A finished study: one dict per run (arm, method, seed, config, metrics, summary) in plan order."""

    suite: Suite
    runs: list[dict[str, Any]]
    out_dir: Path
    reused: int  # runs that were already finished
    report: Path | None = None
    methods: dict[str, Method] = field(default_factory=dict)  # every method the arms name


class SuiteKind(Protocol):
    """How a kind of suite plans, runs, recognises and reports its runs; ``compare`` does the rest (the lock,
    reuse, the executor, Ctrl-C)."""

    kind: str

    def plan(
        self,
        suite: Suite,
        *,
        methods: Sequence[str] | None,
        extra_methods: dict[str, Method] | None,
        overrides: dict[str, Any] | None,
        seeds: int | None,
        out: str | Path,
    ) -> tuple[Suite, list[Job]]:
        """The suite actually run and one job per arm × seed, every configuration validated."""
        ...

    def check(self, suite: Suite) -> None:
        """Fail before any run when something every run needs is missing (an optional package)."""
        ...

    def finished(self, job: Job) -> dict[str, Any] | None:
        """The job's run record when it is finished (with exactly its configuration), else None."""
        ...

    def conflicts(self, jobs: Sequence[Job]) -> list[tuple[Job, str]]:
        """Jobs whose folder holds results of other settings, with the difference in words."""
        ...

    def job_function(self, overwrite: bool) -> Callable[[Job, int], dict[str, Any]]:
        """A picklable ``f(job, threads) -> run record`` (it runs in worker processes)."""
        ...

    def describe(self, record: dict[str, Any]) -> str:
        """One line about a finished run (``arm seed k: test acc ...``)."""
        ...

    def report(self, result: CompareResult, *, html: bool, machine: dict[str, Any]) -> Path:
        """Write the study's files (results.csv, report.md, plots); return report.md's path."""
        ...
