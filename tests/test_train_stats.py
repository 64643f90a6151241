"""The comparison statistics against hand-computed exact values."""

from __future__ import annotations

import math

import pytest

from normkit.train.study.stats import (
    binomial_cdf,
    paired_comparison,
    sign_test_interval,
    sign_test_p,
    summary,
)


def test_binomial_cdf_by_hand() -> None:
    assert binomial_cdf(0, 5) == 1 / 32
    assert binomial_cdf(1, 5) == 6 / 32
    assert binomial_cdf(1, 8) == 9 / 256
    assert binomial_cdf(2, 8) == 37 / 256
    assert binomial_cdf(8, 8) == 1.0 and binomial_cdf(-1, 8) == 0.0


def test_sign_test_interval_picks_the_narrowest_order_statistics_with_enough_coverage() -> None:
    # n = 5: only [min, max] reaches 90 % (1 - 2/32 = 93.75 %)
    assert sign_test_interval([3, 1, 5, 2, 4]) == (1, 5, 1 - 2 / 32)
    # n = 8: k = 2 gives 1 - 2*9/256 = 92.97 %, k = 3 only 1 - 2*37/256 = 71.1 %: [d(2), d(7)]
    lo, hi, cov = sign_test_interval([8, 1, 7, 2, 6, 3, 5, 4])
    assert (lo, hi) == (2, 7) and cov == pytest.approx(1 - 18 / 256)
    # n = 3 cannot reach 90 %: the full range at its true coverage, 75 %
    assert sign_test_interval([0.5, 0.2, 0.9]) == (0.2, 0.9, 0.75)


def test_sign_test_p_by_hand() -> None:
    assert sign_test_p([1, 2, 3, 4, 5]) == 2 / 32
    assert sign_test_p([1, 2, 3, 4, -5]) == 2 * 6 / 32
    assert sign_test_p([0, 0, 1]) == 1.0  # one non-zero difference: 2 * 1/2
    assert sign_test_p([0, 0]) == 1.0


def test_paired_comparison_verdicts() -> None:
    base = {s: 90.0 for s in range(5)}
    better = paired_comparison(base, {s: 91.0 + s for s in range(5)})
    assert better.verdict == "better" and better.median_difference == 3.0
    assert (better.low, better.high) == (1.0, 5.0) and better.n == 5
    worse = paired_comparison(base, {s: 89.0 - s for s in range(5)})
    assert worse.verdict == "worse"
    tie = paired_comparison(base, {0: 90.0, 1: 91.0, 2: 92.0, 3: 93.0, 4: 94.0})  # one zero difference
    assert tie.verdict == "within noise" and tie.low == 0.0
    mixed = paired_comparison(base, {0: 95.0, 1: 95.0, 2: 95.0, 3: 95.0, 4: 89.0})
    assert mixed.verdict == "within noise" and mixed.median_difference == 5.0
    # three seeds all better: not enough for a 90 % interval, so no claim
    few = paired_comparison({0: 1.0, 1: 1.0, 2: 1.0}, {0: 2.0, 1: 2.0, 2: 2.0})
    assert few.verdict == "within noise" and not few.enough_seeds and few.coverage == 0.75
    # loss: lower is better
    loss = paired_comparison(base, {s: 80.0 for s in range(5)}, higher_is_better=False)
    assert loss.verdict == "better"
    # pairs by seed, ignoring unmatched seeds
    partial = paired_comparison({0: 1.0, 1: 2.0, 7: 3.0}, {1: 4.0, 7: 4.0, 9: 0.0})
    assert partial.n == 2 and partial.median_difference == 1.5


def test_summary() -> None:
    assert summary([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    assert all(math.isnan(v) for v in summary([]))
