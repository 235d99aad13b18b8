"""Expert utilization, load balance and dynamic-k statistics of routing decisions.

Pure, vectorised functions over tensors: no per-token Python loop, no printing, and no host
synchronisation in the counting and metric paths (results stay 0-d or small device tensors).
Values reach the host once, in ``to_dict()`` / ``summary()``. Every formula and its source is
in docs/metrics.md. This package's modules:

* ``selection``: which experts router logits pick for a per-token k (``debug_expert_selection``);
* ``balance``: load balance of per-expert counts (CV, MaxVio, entropy, Gini, dead experts);
* ``dynamic_k``: k histogram, compute saved, complexity statistics, co-activation;
* ``stats``: ``UtilizationStats`` and its three ways in.

Three ways in, one result (``UtilizationStats``):

* ``utilization_from_decision(decision)``: a ``RoutingDecision`` from a reference router;
* ``utilization_from_indices(expert_indices, num_experts)``: int[N, K] indices, -1 padded;
* ``utilization_from_logits(router_logits, k_per_token)``: raw logits and a per-token k.

``per_layer_utilization(decisions)`` applies the first to one decision per layer. The raw
tensor entry points take ``validate=True``, which checks value ranges with one host sync; the
inspector passes ``validate=False`` on its streaming path. Every public name of the modules
is importable from here.
"""

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
from moe_devkit.diagnostics.utilization.selection import (
    count_selections,
    debug_expert_selection,
    selected_experts,
    selection_counts_from_logits,
)
from moe_devkit.diagnostics.utilization.stats import (
    UtilizationStats,
    per_layer_utilization,
    selection_counts,
    utilization_from_decision,
    utilization_from_indices,
    utilization_from_logits,
    utilization_to_dicts,
)

__all__ = [
    "DEFAULT_QUANTILES",
    "ComplexityStats",
    "LoadBalance",
    "UtilizationStats",
    "co_activation",
    "coefficient_of_variation",
    "complexity_stats",
    "compute_saved",
    "count_selections",
    "dead_experts",
    "debug_expert_selection",
    "gini_coefficient",
    "k_histogram",
    "load_balance",
    "load_entropy",
    "max_violation",
    "mean_k",
    "per_layer_utilization",
    "selected_experts",
    "selection_counts",
    "selection_counts_from_logits",
    "selection_shares",
    "spearman_correlation",
    "utilization_from_decision",
    "utilization_from_indices",
    "utilization_from_logits",
    "utilization_to_dicts",
]
