"""``InspectorSummary``: the inspector's per-layer metrics and alarms, read from its records.

``summarize(records, config, signals=...)`` turns the host-side ``LayerRecord`` of each layer
(from ``LayerState.host_state``, ``JaxLayerState.host_state`` or the distributed merge) into
the ``routing`` section of a report (docs/report-schema.md): load-balance metrics, the k and
complexity statistics, trend windows, and the alarms (routing collapse, dead experts, k and
complexity drift, non-finite tokens, capacity drops). With the model signals of a PyTorch
inspector (``ModelSignals.host_state``) it adds the section's ``aux_loss``, each biased
layer's ``selection_bias`` and their findings (docs/metrics.md, "Model signals").
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
    """What the inspector recorded: one entry per layer, and the alarms raised.

    ``aux_loss``: the model's aux loss beside the inspector's load-balancing loss, per
    forward (docs/metrics.md, "Model signals"); None without model signals.
    """

    layers: dict[str, dict[str, Any]]
    findings: tuple[Finding, ...]
    config: dict[str, Any] = field(default_factory=dict)
    aux_loss: dict[str, Any] | None = None

    def to_report(self) -> dict[str, Any]:
        """The JSON report envelope holding this summary as its ``routing`` section."""
        totals = _totals(self.layers)
        section = {"totals": totals, "config": self.config, "layers": self.layers}
        if self.aux_loss is not None:
            section["aux_loss"] = self.aux_loss
        return make_report({SECTION: section}, self.findings)


def summarize(
    records: Iterable[LayerRecord],
    config: InspectorConfig,
    signals: dict[str, Any] | None = None,
) -> InspectorSummary:
    """The metrics and alarms of each layer's statistics, layers keyed by their names.

    Args:
        records: one host-side record per layer.
        config: the inspector's settings (thresholds of the alarms).
        signals: ``ModelSignals.host_state()`` (default: none, as for the JAX inspector and
            the distributed merge): adds the aux-loss and selection-bias entries and findings.
    """
    layers = {record.name: _layer_summary(record, config.complexity_bins) for record in records}
    findings = [f for layer in layers.values() for f in alarms(layer, config)]
    aux_loss = None
    if signals:
        biases = signals.get("selection_bias") or {}
        for name, bias in biases.items():
            if name in layers:
                layers[name]["selection_bias"] = _bias_summary(bias)
                findings.extend(bias_alarms(name, layers[name]["selection_bias"], signals))
        if signals.get("aux_loss") is not None:
            aux_loss = _aux_summary(signals["aux_loss"])
            findings.extend(aux_loss_alarms(aux_loss, sorted(n for n in biases if n in layers)))
    order = {"error": 0, "warning": 1, "info": 2}
    ordered = tuple(sorted(findings, key=lambda f: order[f.severity]))
    return InspectorSummary(
        layers=layers, findings=ordered, config=asdict(config), aux_loss=aux_loss
    )


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
    counts = record.counts.numpy().astype(np.int64)  # executed pairs per expert
    selected = counts if record.selected is None else record.selected.numpy().astype(np.int64)
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
        "selections": int(selected.sum()),
        "executed_pairs": int(counts.sum()),
        "time_range": list(record.time_range),
        "utilization": {
            "counts": counts.tolist(),
            "selected_counts": selected.tolist(),
            **balance_metrics(counts),
        },
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


# ----------------------------------------------------------------------------- model signals

AUX_LOSS_RTOL = 0.02
"""The model's aux loss and the inspector's disagree beyond this relative difference."""

AUX_LOSS_CONSTANT_STEPS = 3
"""Forwards with an aux loss needed before it can be called constant."""

BIAS_FLIP_LIMIT = 0.25
"""Mean share of bias entries flipping sign per recorded step that counts as oscillation."""

BIAS_GROWTH_LIMIT = 0.10
"""Growth of the bias abs max over the last quarter of its history (relative to its last
value) that counts as still growing."""

BIAS_SATURATION = 1.0
"""Bias abs max at which the bias outweighs scores in [0, 1] (sigmoid or softmax)."""

BIAS_TREND_STEPS = 8
"""Recorded steps of a bias needed before its trend findings are read."""


def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _aux_summary(aux: dict[str, Any]) -> dict[str, Any]:
    """The model signals' aux-loss state with the means and the ratio of the two losses."""
    history = aux["history"]
    pairs = [
        (m, i)
        for m, i in zip(history["model"], history["inspector"], strict=True)
        if m is not None and i is not None and i > 0
    ]
    model, mine = _finite(history["model"]), _finite(history["inspector"])
    return {
        **aux,
        "model_mean": float(np.mean(model)) if model else None,
        "inspector_mean": float(np.mean(mine)) if mine else None,
        "model_last": model[-1] if model else None,
        "inspector_last": mine[-1] if mine else None,
        "compared_steps": len(pairs),
        "compared_model_mean": float(np.mean([m for m, _ in pairs])) if pairs else None,
        "compared_inspector_mean": float(np.mean([i for _, i in pairs])) if pairs else None,
        "ratio": float(np.median([m / i for m, i in pairs])) if pairs else None,
    }


def aux_loss_alarms(aux: dict[str, Any], biased_layers: list[str]) -> list[Finding]:
    """Aux-loss liveness: missing, constant, or unlike the inspector's value (docs/metrics.md)."""
    model, status = aux["model_type"], aux["status"]
    out: list[Finding] = []
    if not status["value"]:
        missing = _aux_missing(aux, biased_layers)
        return [missing] if missing is not None else []
    (low, high), (ilow, ihigh) = aux["min_max"]["model"], aux["min_max"]["inspector"]
    if (
        status["value"] >= AUX_LOSS_CONSTANT_STEPS
        and low is not None
        and high is not None
        and high - low <= 1e-6 * max(abs(high), 1e-12)
        and ilow is not None
        and ihigh is not None
        and ihigh - ilow > 1e-4 * max(abs(ihigh), 1e-12)
    ):
        out.append(
            Finding(
                "aux-loss-constant",
                "warning",
                f"{model}: aux_loss stayed {high:.6g} over {status['value']} forwards while the "
                f"routing changed (the inspector's load-balancing loss ranged {ilow:.4g} to "
                f"{ihigh:.4g}): the loss is not computed from each step's routing (a cached or "
                "detached value, or fixed logits), so it does not balance the routers",
                details={"value": high, "steps": status["value"], "inspector": [ilow, ihigh]},
            )
        )
    ratio = aux["ratio"]
    if (
        aux["definition"] == "transformers"
        and ratio is not None
        and abs(ratio - 1.0) > AUX_LOSS_RTOL
    ):
        m, i = aux["compared_model_mean"], aux["compared_inspector_mean"]
        out.append(
            Finding(
                "aux-loss-mismatch",
                "warning",
                f"{model}: its aux_loss {m:.6g} and the inspector's load-balancing loss {i:.6g} "
                f"from the same routing differ (ratio {ratio:.4g}, median over "
                f"{aux['compared_steps']} forwards; tolerance {AUX_LOSS_RTOL:.0%}). Likely: "
                + "; ".join(_mismatch_causes(ratio, aux["moe_layers"])),
                details={
                    "model": m,
                    "inspector": i,
                    "ratio": ratio,
                    "steps": aux["compared_steps"],
                    "tolerance": AUX_LOSS_RTOL,
                },
            )
        )
    return out


def _aux_missing(aux: dict[str, Any], biased_layers: list[str]) -> Finding | None:
    model, steps, status = aux["model_type"], aux["steps"], aux["status"]
    if biased_layers:
        return Finding(
            "aux-loss-free",
            "info",
            f"{model}: no auxiliary loss on any of {steps} forwards; the model balances its "
            f"experts with a selection bias instead ({len(biased_layers)} layer(s), e.g. "
            f"{biased_layers[0]}): see each layer's selection_bias",
            details={"layers": biased_layers},
        )
    if not aux["moe_layers"]:
        return None
    if status.get("unreadable") and not (status["none"] or status["absent"]):
        return Finding(
            "aux-loss-unreadable",
            "info",
            f"{model}: its output is a plain tuple on all {steps} forwards, so its aux loss "
            "cannot be identified and is not checked; call it with return_dict=True (or "
            "return a ModelOutput, dict or named tuple with an aux_loss entry)",
            details={"steps": steps},
        )
    what = (
        "aux_loss=None"
        if status["none"]
        else f"no aux_loss (its {aux['output_type']} output has none)"
    )
    reasons = []
    if aux["training_steps"]:
        reasons.append(f"{aux['training_steps']} of them ran in training mode")
    requested = aux.get("router_logits_requested_steps", 0)
    if aux["output_router_logits"]:
        reasons.append("config.output_router_logits is True")
    elif requested:
        reasons.append(f"{requested} of them passed output_router_logits=True")
    coef = aux["router_aux_loss_coef"]
    fix = (
        "Set output_router_logits=True (in the config or the forward call) so it returns "
        "aux_loss, and pass labels so router_aux_loss_coef x aux_loss is added to loss"
        if status["none"] and not (aux["output_router_logits"] or requested)
        else "It computes none itself: add the routers' load-balancing loss to the training loss"
    )
    details = {"steps": steps, "status": status, "router_aux_loss_coef": coef}
    if reasons:
        return Finding(
            "aux-loss-missing",
            "warning",
            f"{model}: the model returned {what} on all {steps} forwards, though "
            f"{' and '.join(reasons)}: its routers get no load-balancing gradient. {fix}.",
            details=details,
        )
    if coef:
        return Finding(
            "aux-loss-missing",
            "info",
            f"{model}: the model returned {what} on all {steps} forwards (eval mode); to "
            f"train it, set output_router_logits=True, or router_aux_loss_coef={coef:g} is "
            "never applied",
            details=details,
        )
    return None


def _mismatch_causes(ratio: float, layers: int) -> list[str]:
    if ratio <= 0:
        return [
            "the model's loss is 0: it got no router logits (transformers' "
            "load_balancing_loss_func returns 0 when they are not a tuple of the layers' logits)"
        ]
    causes = []
    factor = ratio if ratio >= 1 else (1.0 / ratio if ratio > 0 else 0.0)  # 0: the model's is 0
    n = round(factor)
    if n >= 2 and abs(factor / n - 1.0) <= AUX_LOSS_RTOL:
        verb = "multiplied" if ratio > 1 else "divided"
        causes.append(
            f"{verb} by {n}: the world size, or the number of layers ({n} ranks or layers "
            f"summed instead of averaged; the model has {layers} MoE layer(s))"
        )
    causes += [
        "computed over pad tokens (an attention_mask its loss ignores)",
        "computed from a top-k recomputed from the logits rather than the experts the "
        "router executed (selection bias, group-limited routing, capacity)",
        "softmax probabilities of a router that scores with sigmoid",
    ]
    return causes


def _bias_summary(bias: dict[str, Any]) -> dict[str, Any]:
    """The model signals' record of one layer's selection bias, with its last values."""
    history = bias["history"]
    flips = _finite(history["flip_fraction"])
    last = {name: history[name][-1] if history[name] else None for name in _BIAS_STATS}
    return {
        **bias,
        "last": last,
        "mean_flip_fraction": float(np.mean(flips)) if flips else None,
    }


_BIAS_STATS = ("abs_max", "mean", "std", "range", "flip_fraction")


def bias_alarms(name: str, bias: dict[str, Any], signals: dict[str, Any]) -> list[Finding]:
    """Selection-bias findings of one layer: saturated, oscillating, still growing, frozen."""
    history, out = bias["history"], []
    steps, abs_max = history["steps"], history["abs_max"]
    last = bias["last"]["abs_max"]
    if last is not None and last >= BIAS_SATURATION:
        out.append(
            Finding(
                "selection-bias-saturated",
                "warning",
                f"{name}: the selection bias reaches |b| = {last:.3g}, at or above "
                f"{BIAS_SATURATION:g} (the range of the scores it is added to): the bias, not "
                "the router's scores, decides the selection; lower the bias update rate",
                location=name,
                details={"abs_max": last, "limit": BIAS_SATURATION},
            )
        )
    tail = max(len(steps) // 4, 3)
    flips = _finite(history["flip_fraction"][-tail:])
    if len(flips) >= 3 and float(np.mean(flips)) > BIAS_FLIP_LIMIT:
        share = float(np.mean(flips))
        out.append(
            Finding(
                "selection-bias-oscillating",
                "warning",
                f"{name}: {100 * share:.0f}% of the selection bias's entries flip sign per "
                f"recorded step (mean over steps {steps[-len(flips)]}-{steps[-1]}; limit "
                f"{100 * BIAS_FLIP_LIMIT:.0f}%): the bias update rate is too high for the load "
                "it corrects; lower it",
                location=name,
                details={"flip_fraction": share, "limit": BIAS_FLIP_LIMIT},
            )
        )
    if len(steps) >= BIAS_TREND_STEPS:
        start = len(steps) - max(len(steps) // 4, 2)
        first, end = abs_max[start], abs_max[-1]
        if first is not None and end is not None and end - first > BIAS_GROWTH_LIMIT * end > 0:
            out.append(
                Finding(
                    "selection-bias-growing",
                    "warning",
                    f"{name}: the selection bias's abs max still grew from {first:.3g} to "
                    f"{end:.3g} over steps {steps[start]}-{steps[-1]} (more than "
                    f"{100 * BIAS_GROWTH_LIMIT:.0f}% of its last value): the bias has not "
                    "settled, the load is not balanced yet",
                    location=name,
                    details={"from": first, "to": end, "limit": BIAS_GROWTH_LIMIT},
                )
            )
    aux = signals.get("aux_loss") or {}
    if aux.get("training_steps") and bias["steps"] >= 2 and bias["max_step_change"] == 0:
        out.append(
            Finding(
                "selection-bias-frozen",
                "warning",
                f"{name}: the selection bias {bias['tensor']} did not change over "
                f"{bias['steps']} recorded steps while the model trained: nothing updates it "
                "(transformers does not; the training loop must, from the expert loads)",
                location=name,
                details={"steps": bias["steps"]},
            )
        )
    return out
