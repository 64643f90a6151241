"""Statistics of a comparison over seeds: pure functions on plain numbers (no torch, no files).

A treatment arm and its baseline are run with the same seeds, so they are compared *paired*: the difference
of the two final accuracies for each seed. Its median gets an exact distribution-free interval from the sign
test (order statistics of the differences; no normality assumption, which five seeds could not check), and
the verdict is read off that interval: *better* when it lies above zero, *worse* when below, *within noise*
otherwise — or when there are too few seeds for the interval to reach the asked confidence.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "CONFIDENCE",
    "PairedComparison",
    "binomial_cdf",
    "paired_comparison",
    "sign_test_interval",
    "sign_test_p",
    "summary",
]

CONFIDENCE = 0.9
METHOD = "exact sign-test interval for the median paired difference"


def binomial_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exactly (as a float)."""
    if k < 0:
        return 0.0
    return sum(math.comb(n, i) for i in range(min(k, n) + 1)) / 2**n


def sign_test_interval(
    differences: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """(low, high, coverage): the narrowest interval [d_(k), d_(n+1-k)] of the sorted differences whose exact
    coverage of the median difference, 1 − 2·P(Bin(n, ½) ≤ k − 1), is at least ``confidence``.

    With too few differences for that (n < 5 at 90 %), the widest interval [min, max] is returned with its
    coverage (below ``confidence``); callers must not call such an interval significant.
    """
    d = sorted(differences)
    n = len(d)
    if n == 0:
        return math.nan, math.nan, 0.0
    best = 1
    for k in range(1, n // 2 + 1):
        if 1 - 2 * binomial_cdf(k - 1, n) >= confidence:
            best = k
        else:
            break
    return d[best - 1], d[n - best], 1 - 2 * binomial_cdf(best - 1, n)


def sign_test_p(differences: Sequence[float]) -> float:
    """Two-sided exact sign-test p-value of "median difference = 0" (zero differences dropped)."""
    pos = sum(x > 0 for x in differences)
    neg = sum(x < 0 for x in differences)
    n = pos + neg
    if n == 0:
        return 1.0
    return min(1.0, 2 * binomial_cdf(min(pos, neg), n))


@dataclass(frozen=True)
class PairedComparison:
    """A treatment against its baseline over the seeds both have (differences in the values' units)."""

    n: int
    median_difference: float
    low: float
    high: float
    coverage: float
    p_value: float
    verdict: str  # "better" | "worse" | "within noise"
    confidence: float = CONFIDENCE

    @property
    def enough_seeds(self) -> bool:
        return self.coverage >= self.confidence


def paired_comparison(
    baseline: Mapping[int, float],
    treatment: Mapping[int, float],
    *,
    confidence: float = CONFIDENCE,
    higher_is_better: bool = True,
) -> PairedComparison:
    """Compare ``treatment`` with ``baseline`` (values keyed by seed) on the seeds they share."""
    seeds = sorted(set(baseline) & set(treatment))
    diffs = [treatment[s] - baseline[s] for s in seeds]
    if not diffs:
        return PairedComparison(0, math.nan, math.nan, math.nan, 0.0, 1.0, "within noise", confidence)
    low, high, coverage = sign_test_interval(diffs, confidence)
    verdict = "within noise"
    if coverage >= confidence and (low > 0 or high < 0):
        verdict = "better" if (low > 0) == higher_is_better else "worse"
    return PairedComparison(
        len(diffs), statistics.median(diffs), low, high, coverage, sign_test_p(diffs), verdict, confidence
    )


def summary(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of ``values`` (NaN for none)."""
    if not values:
        return math.nan, math.nan, math.nan
    return statistics.median(values), min(values), max(values)
