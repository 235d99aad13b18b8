"""Load balance of per-expert counts, where docs/metrics.md names it: the names of
``moe_devkit.diagnostics.utilization.balance``, which ``utilization`` re-exports as well."""

from __future__ import annotations

from moe_devkit.diagnostics.utilization.balance import (
    LoadBalance,
    coefficient_of_variation,
    dead_experts,
    gini_coefficient,
    load_balance,
    load_entropy,
    max_violation,
    selection_shares,
)

__all__ = [
    "LoadBalance",
    "coefficient_of_variation",
    "dead_experts",
    "gini_coefficient",
    "load_balance",
    "load_entropy",
    "max_violation",
    "selection_shares",
]
