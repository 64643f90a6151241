"""The study layer: suites and methods → plan → execute runs (an executor: this process, worker processes,
other launchers) → statistics → report → result tables.

It talks to the run layer only through :mod:`normkit.train.runner`'s public names. Suites plug in by kind
(:class:`~normkit.train.study.suite.SuiteKind`): the supervised suites here, reinforcement learning in
:mod:`normkit.train.rl`.
"""

from normkit.train.study.api import Study, compare_methods
from normkit.train.study.comparison import METHODS, SUITES, compare, describe_methods, load_method_file, plan
from normkit.train.study.executor import (
    Executor,
    InProcess,
    LocalProcesses,
    StudyInterrupted,
    WorkerDied,
    local_executor,
)
from normkit.train.study.suite import Arm, CompareResult, Job, Method, Suite, SuiteKind

__all__ = [
    "METHODS",
    "SUITES",
    "Arm",
    "CompareResult",
    "Executor",
    "InProcess",
    "Job",
    "LocalProcesses",
    "Method",
    "Study",
    "StudyInterrupted",
    "Suite",
    "SuiteKind",
    "WorkerDied",
    "compare",
    "compare_methods",
    "describe_methods",
    "load_method_file",
    "local_executor",
    "plan",
]
