"""Ratio measurements: a candidate against a reference in the same process, interleaved, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Ratio:
    name: str  # what is measured, e.g. "BatchRenorm2d train fwd+bwd (128, 64, 32, 32)"
    reference: str  # what it is measured against, e.g. "nn.BatchNorm2d"
    candidate_ms: float  # median milliseconds per call
    reference_ms: float
    target: float | None = None  # the target for candidate / reference, if any

    @property
    def ratio(self) -> float:
        return self.candidate_ms / self.reference_ms

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        return "meets target" if self.ratio <= self.target else "misses target"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_once(fn: Callable[[], object], inner: int) -> float:
    _sync()
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync()
    return (time.perf_counter() - start) * 1000.0 / inner


def measure_ratio(
    name: str,
    candidate: Callable[[], object],
    reference_name: str,
    reference: Callable[[], object],
    *,
    repeats: int = 15,
    inner: int = 3,
    warmup: int = 3,
    target: float | None = None,
) -> Ratio:
    """Time ``candidate`` and ``reference`` alternately (ABAB...), so drifts in machine load hit both alike;
    report the median time per call of each."""
    for _ in range(warmup):
        candidate()
        reference()
    cand, ref = [], []
    for i in range(repeats):
        # Alternate which goes first, so neither always runs on a warm cache left by the other.
        if i % 2 == 0:
            cand.append(_time_once(candidate, inner))
            ref.append(_time_once(reference, inner))
        else:
            ref.append(_time_once(reference, inner))
            cand.append(_time_once(candidate, inner))
    return Ratio(name, reference_name, statistics.median(cand), statistics.median(ref), target)
