"""The vocabulary of a comparison — methods, arms, suites, a finished study — shared by ``compare`` (which
runs them) and ``report`` (which writes them up). Plain data, no behaviour: neither module imports the other's
internals through it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Arm", "CompareResult", "Method", "Suite"]


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
    kind: str = "train"  # "rl": base and arm overrides are CrossQConfig options, run by train/crossq.py


@dataclass
class CompareResult:
    """A finished study: one dict per run (arm, method, seed, config, metrics, summary) in plan order."""

    suite: Suite
    runs: list[dict[str, Any]]
    out_dir: Path
    reused: int  # runs that were already finished
    report: Path | None = None
    methods: dict[str, Method] = field(default_factory=dict)  # every method the arms name
