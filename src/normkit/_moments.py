"""Exact merging of per-set moments, shared by Batch Renormalization (ghost / synced batches) and LSUV."""

from __future__ import annotations

from torch import Tensor


def merge_moments(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, M2) of the union of K sets from each set's (count, mean, M2 = Σ(x − mean)²).

    Chan et al.'s pairwise update in closed form: M2 = Σ M2_i + Σ n_i (mean_i − mean)². ``counts`` is (K,);
    ``means`` and ``m2s`` are (K, ...), merged elementwise over their first dimension.
    """
    n = counts.reshape(-1, *([1] * (means.dim() - 1)))
    total = counts.sum()
    mean = (n * means).sum(0) / total
    return total, mean, m2s.sum(0) + (n * (means - mean).square()).sum(0)
