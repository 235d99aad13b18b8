"""Rank tests and the bootstrap behind the regression decision (numpy only, no scipy).

One-sided Mann-Whitney U and Wilcoxon signed-rank p-values by normal approximation, and a
percentile-bootstrap confidence interval of the median.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_vals = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def mann_whitney_greater(candidate: Sequence[float], baseline: Sequence[float]) -> float:
    """One-sided p-value that ``candidate`` is stochastically greater than ``baseline``.

    Normal approximation with tie and continuity corrections (fine from ~8 samples a side).
    """
    x, y = np.asarray(candidate, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        return 1.0
    ranks = _rankdata(np.concatenate([x, y]))
    u1 = float(ranks[:n1].sum()) - n1 * (n1 + 1) / 2
    _, tie_counts = np.unique(np.concatenate([x, y]), return_counts=True)
    n = n1 + n2
    tie_term = float(((tie_counts**3) - tie_counts).sum()) / (n * (n - 1)) if n > 1 else 0.0
    variance = n1 * n2 / 12 * ((n + 1) - tie_term)
    if variance <= 0:
        return 1.0
    z = (u1 - n1 * n2 / 2 - 0.5) / math.sqrt(variance)
    return 0.5 * math.erfc(z / math.sqrt(2))


def signed_rank_greater(differences: Sequence[float]) -> float:
    """One-sided Wilcoxon signed-rank p-value that ``differences`` are centred above 0.

    Zeros are dropped; normal approximation with tie and continuity corrections.
    """
    d = np.asarray([v for v in differences if v != 0], dtype=np.float64)
    n = len(d)
    if n == 0:
        return 1.0
    ranks = _rankdata(np.abs(d))
    w_plus = float(ranks[d > 0].sum())
    _, tie_counts = np.unique(np.abs(d), return_counts=True)
    variance = n * (n + 1) * (2 * n + 1) / 24 - float((tie_counts**3 - tie_counts).sum()) / 48
    if variance <= 0:
        return 1.0
    z = (w_plus - n * (n + 1) / 4 - 0.5) / math.sqrt(variance)
    return 0.5 * math.erfc(z / math.sqrt(2))


def bootstrap_median_ci(
    values: Sequence[float], *, confidence: float, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Median of ``values`` and its percentile-bootstrap confidence interval.

    Returns:
        (median, low, high).
    """
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(data), size=(resamples, len(data)))
    medians = np.median(data[picks], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    return float(np.median(data)), float(low), float(high)


def median_or_nan(values: Sequence[float]) -> float:
    """Median of ``values``; NaN when there are none."""
    return float(np.median(values)) if values else math.nan
