"""Dynamic-k statistics, where docs/metrics.md names them: the names of
``moe_devkit.diagnostics.utilization.dynamic_k``, which ``utilization`` re-exports as well."""

from __future__ import annotations

from moe_devkit.diagnostics.utilization.dynamic_k import (
    DEFAULT_QUANTILES,
    ComplexityStats,
    co_activation,
    complexity_stats,
    compute_saved,
    k_histogram,
    mean_k,
    spearman_correlation,
)

__all__ = [
    "DEFAULT_QUANTILES",
    "ComplexityStats",
    "co_activation",
    "complexity_stats",
    "compute_saved",
    "k_histogram",
    "mean_k",
    "spearman_correlation",
]
