"""``InspectorSummary``: the inspector's per-layer metrics and alarms, read from its records.

``summarize(records, config)`` turns the host-side ``LayerRecord`` of each layer (from
``LayerState.host_state``, ``JaxLayerState.host_state`` or the distributed merge) into the
``routing`` section of a report (docs/report-schema.md): load-balance metrics, the k and
complexity statistics, trend windows, and the alarms (routing collapse, dead experts, k and
complexity drift, non-finite tokens, capacity drops).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from moe_devkit.diagnostics.findings import Finding
from moe_devkit.reporting import make_report

if TYPE_CHECKING:
    from moe_devkit.inspect.config import InspectorConfig
    from moe_devkit.inspect.records import LayerRecord

SECTION = "routing"


@dataclass(frozen=True)
class InspectorSummary:
    """What the inspector recorded: one entry per layer, and the alarms raised."""

    layers: dict[str, dict[str, Any]]
    findings: tuple[Finding, ...]
    config: dict[str, Any] = field(default_factory=dict)

    def to_report(self) -> dict[str, Any]:
        """The JSON report envelope holding this summary as its ``routing`` section."""
        totals = _totals(self.layers)
        section = {"totals": totals, "config": self.config, "layers": self.layers}
        return make_report({SECTION: section}, self.findings)


def summarize(records: Iterable[LayerRecord], config: InspectorConfig) -> InspectorSummary:
    """The metrics and alarms of each layer's statistics, layers keyed by their names."""
    layers = {record.name: _layer_summary(record, config.complexity_bins) for record in records}
    findings = tuple(f for layer in layers.values() for f in alarms(layer, config))
    order = {"error": 0, "warning": 1, "info": 2}
    findings = tuple(sorted(findings, key=lambda f: order[f.severity]))
    return InspectorSummary(layers=layers, findings=findings, config=asdict(config))


# ----------------------------------------------------------------------------- metrics


def balance_metrics(counts: np.ndarray) -> dict[str, Any]:
    """Load-balance metrics of per-expert counts (diagnostics.utilization; docs/metrics.md).

    Adds ``max_over_mean`` (= MaxVio + 1), the form the collapse alarm reads.
    """
    import torch

    from moe_devkit.diagnostics.utilization import load_balance

    metrics = load_balance(torch.from_numpy(np.asarray(counts, dtype=np.int64))).to_dict()
    metrics.pop("tokens_per_expert")
    metrics["max_over_mean"] = metrics["max_vio"] + 1.0
    return metrics


def binned_spearman(joint: np.ndarray) -> float:
    """Spearman correlation of (complexity bin, k) from their joint histogram.

    Tied values share their average rank; the result is Pearson's r of the ranks, each
    (bin, k) cell weighted by its count. NaN when either variable is constant.
    """
    total = joint.sum()
    if total < 2:
        return math.nan
    rows, cols = joint.sum(axis=1), joint.sum(axis=0)
    rank_r = np.cumsum(rows) - rows + (rows + 1) / 2  # average rank of each bin
    rank_c = np.cumsum(cols) - cols + (cols + 1) / 2
    mean_r = (rows * rank_r).sum() / total
    mean_c = (cols * rank_c).sum() / total
    dr, dc = rank_r - mean_r, rank_c - mean_c
    cov = (joint * np.outer(dr, dc)).sum()
    var_r, var_c = (rows * dr**2).sum(), (cols * dc**2).sum()
    if var_r <= 0 or var_c <= 0:
        return math.nan
    return float(cov / math.sqrt(var_r * var_c))


def _layer_summary(record: LayerRecord, bins: int) -> dict[str, Any]:
    counts = record.counts.numpy().astype(np.int64)
    joint = record.joint.numpy().astype(np.int64)
    finite_joint = joint[:bins]
    k_hist = joint.sum(axis=0)
    tokens = int(k_hist.sum())
    max_k, steps = record.max_k, record.steps
    return {
        "name": record.name,
        "num_experts": record.num_experts,
        "max_k": max_k,
        "steps": steps,
        "tokens": tokens,
        "selections": int(counts.sum()),
        "time_range": list(record.time_range),
        "utilization": {"counts": counts.tolist(), **balance_metrics(counts)},
        "k": _k_summary(k_hist, max_k, tokens),
        "complexity": _complexity_summary(record, finite_joint),
        "losses": {
            "load_balancing_mean": float(record.loss_sums[0]) / max(steps, 1),
            "z_loss_mean": float(record.loss_sums[1]) / max(steps, 1),
        },
        "nonfinite_tokens": int(joint[bins].sum()),
        "dropped_pairs": record.dropped,
        "coactivation": {
            "steps": record.coactivation_steps,
            "matrix": record.coactivation.numpy().round().astype(np.int64).tolist(),
        },
        "windows": _windows(
            record.snapshots.numpy(), list(record.snapshot_steps), record.num_experts, max_k
        ),
        "sample": {
            "complexity": [round(float(c), 5) for c in record.sample_complexity],
            "k": [int(k) for k in record.sample_k],
        },
    }


def _k_summary(k_hist: np.ndarray, max_k: int, tokens: int) -> dict[str, Any]:
    ks = np.arange(max_k + 1)
    routed_tokens = max(tokens, 1)
    mean_k = float((k_hist * ks).sum() / routed_tokens)
    std_k = float(math.sqrt(max((k_hist * ks**2).sum() / routed_tokens - mean_k**2, 0.0)))
    return {
        "histogram": k_hist.tolist(),
        "mean": mean_k,
        "std": std_k,
        "compute_saved": 1.0 - mean_k / max_k if tokens else 0.0,
    }


def _complexity_summary(record: LayerRecord, finite_joint: np.ndarray) -> dict[str, Any]:
    n, mean_c, m2 = (float(v) for v in record.moments)
    lo, hi = (float(v) for v in record.extrema)
    return {
        "mean": mean_c if n else math.nan,
        "std": math.sqrt(m2 / (n - 1)) if n > 1 else math.nan,
        "min": lo if n else math.nan,
        "max": hi if n else math.nan,
        "histogram": finite_joint.sum(axis=1).tolist(),
        "k_spearman": binned_spearman(finite_joint),
        "joint_histogram": finite_joint.tolist(),
    }


def _windows(
    snapshots: np.ndarray, steps: list[int], num_experts: int, max_k: int
) -> list[dict[str, Any]]:
    """Per-window statistics from cumulative snapshots (differences of neighbours)."""
    out: list[dict[str, Any]] = []
    previous = np.zeros(snapshots.shape[1]) if len(snapshots) else None
    start = 0
    for row, end in zip(snapshots, steps, strict=True):
        assert previous is not None
        delta = row - previous
        counts = delta[:num_experts]
        k_hist = delta[num_experts : num_experts + max_k + 1]
        tokens = float(k_hist.sum())
        csum = float(delta[-1])
        out.append(
            {
                "start_step": start,
                "end_step": end,
                "counts": counts.round().astype(np.int64).tolist(),
                "tokens": round(tokens),
                "mean_k": float((k_hist * np.arange(max_k + 1)).sum() / tokens)
                if tokens
                else math.nan,
                "mean_complexity": csum / tokens if tokens else math.nan,
                "max_share": float(counts.max() / counts.sum()) if counts.sum() else math.nan,
            }
        )
        previous, start = row, end
    return out


def _totals(layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    starts = [lay["time_range"][0] for lay in layers.values() if lay["time_range"][0]]
    ends = [lay["time_range"][1] for lay in layers.values() if lay["time_range"][1]]
    return {
        "layers": len(layers),
        "decisions": sum(lay["steps"] for lay in layers.values()),
        "tokens": sum(lay["tokens"] for lay in layers.values()),
        "selections": sum(lay["selections"] for lay in layers.values()),
        "time_range": {"start": min(starts, default=None), "end": max(ends, default=None)},
    }


# ----------------------------------------------------------------------------- alarms


def alarms(layer: dict[str, Any], config: InspectorConfig) -> list[Finding]:
    """Routing collapse, dead experts, k/complexity drift, NaNs and drops of one layer."""
    name, out = layer["name"], []
    util = layer["utilization"]
    top = int(np.argmax(util["counts"]))
    token_share = util["counts"][top] / max(layer["tokens"], 1)
    if layer["selections"] and (
        util["max_over_mean"] > config.collapse_ratio or token_share >= config.collapse_token_share
    ):
        out.append(
            Finding(
                "routing-collapse",
                "error",
                f"{name}: expert {top} takes {100 * util['shares'][top]:.1f}% of selections "
                f"({util['max_over_mean']:.1f}x the mean load; chosen by {100 * token_share:.0f}% "
                f"of tokens)",
                location=name,
                details={
                    "expert": top,
                    "max_over_mean": util["max_over_mean"],
                    "token_share": token_share,
                },
            )
        )
    dead, span = _dead_experts(layer, config)
    if dead:
        out.append(
            Finding(
                "dead-experts",
                "warning",
                f"{name}: {len(dead)} of {layer['num_experts']} experts got no token in {span}: "
                f"{dead[:16]}",
                location=name,
                details={"experts": dead},
            )
        )
    out.extend(_drift(layer, config))
    if layer["nonfinite_tokens"]:
        out.append(
            Finding(
                "nonfinite-tokens",
                "error",
                f"{name}: {layer['nonfinite_tokens']} token(s) had NaN/Inf input, logits or "
                "complexity and were routed to no expert",
                location=name,
                details={"tokens": layer["nonfinite_tokens"]},
            )
        )
    if layer["dropped_pairs"]:
        share = layer["dropped_pairs"] / max(layer["selections"], 1)
        out.append(
            Finding(
                "dropped-pairs",
                "warning",
                f"{name}: capacity dropped {layer['dropped_pairs']} token-expert pairs "
                f"({100 * share:.2f}% of selections)",
                location=name,
                details={"pairs": layer["dropped_pairs"], "share": share},
            )
        )
    return out


def _dead_experts(layer: dict[str, Any], config: InspectorConfig) -> tuple[list[int], str]:
    """The experts with no token over the last ``dead_window_steps`` steps (over every step
    when fewer were recorded), and which steps those were, in words."""
    windows = layer["windows"]
    recent = np.zeros(layer["num_experts"], dtype=np.int64)
    covered = 0
    for window in reversed(windows):
        if covered >= config.dead_window_steps:
            break
        recent += np.asarray(window["counts"], dtype=np.int64)
        covered += window["end_step"] - window["start_step"]
    span = f"the last {covered} steps"
    if covered < config.dead_window_steps:  # too few windows: use all steps
        recent = np.asarray(layer["utilization"]["counts"], dtype=np.int64)
        span = f"all {layer['steps']} step(s)"
    if not layer["selections"]:
        return [], span
    return [int(e) for e in np.flatnonzero(recent == 0)], span


def _drift(layer: dict[str, Any], config: InspectorConfig) -> list[Finding]:
    windows = [w for w in layer["windows"] if w["tokens"]]
    if len(windows) < 2:
        return []
    first, last = windows[0], windows[-1]
    out = []
    for key, limit, label in (
        ("mean_k", config.drift_k, "mean k"),
        ("mean_complexity", config.drift_complexity, "mean complexity"),
    ):
        change = last[key] - first[key]
        if math.isfinite(change) and abs(change) > limit:
            out.append(
                Finding(
                    f"{key.replace('_', '-')}-drift",
                    "warning",
                    f"{layer['name']}: {label} moved from {first[key]:.3f} (steps "
                    f"{first['start_step']}-{first['end_step']}) to {last[key]:.3f} (steps "
                    f"{last['start_step']}-{last['end_step']}), more than {limit}",
                    location=layer["name"],
                    details={"first": first[key], "last": last[key], "limit": limit},
                )
            )
    return out
