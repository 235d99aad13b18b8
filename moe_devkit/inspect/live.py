"""Live metrics and alarms of ``RouterInspector``: the steps since the previous read.

``LiveReader.read(layers)`` reads every layer's running statistics in one host transfer
(one ``.cpu()`` of a concatenated float64 vector per device) and subtracts the cumulative
values kept at the previous read: a ``Window`` of counts, k histograms, losses and drops per
layer. ``window_metrics`` turns a window into a fixed set of scalars (``METRIC_KEYS``, whose
number does not depend on layers or experts), and ``window_findings`` into the summary's
findings that apply to a window (routing collapse, dead experts, mean-k drift, non-finite
tokens, dropped pairs). ``Episodes`` keeps each finding quiet while it stays true.
Definitions in docs/metrics.md, "Live metrics and alarms".
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from moe_devkit.diagnostics.findings import Finding
from moe_devkit.inspect.summary import _drift, alarms

if TYPE_CHECKING:
    from moe_devkit.inspect.config import InspectorConfig
    from moe_devkit.inspect.state import LayerState

METRIC_KEYS: tuple[str, ...] = (
    "steps",
    "tokens",
    "routing_entropy_mean",
    "routing_entropy_min",
    "max_expert_share_mean",
    "max_expert_share_max",
    "active_expert_fraction",
    "dead_expert_fraction",
    "mean_k",
    "k_std",
    "k_drift",
    "load_balancing_loss",
    "z_loss",
    "dropped_pair_rate",
    "nonfinite_token_rate",
    "cv_p50",
    "cv_p90",
    "max_vio_p50",
    "max_vio_p90",
)
"""The keys of ``RouterInspector.metrics()`` (after its prefix), in order; always all of them."""

LAYER_METRIC_KEYS: tuple[str, ...] = (
    "tokens",
    "routing_entropy",
    "max_expert_share",
    "dead_expert_fraction",
    "cv",
    "max_vio",
    "mean_k",
)
"""The keys of each layer with ``per_layer=True``: ``{prefix}layer/{name}/{key}``."""

OnAlarm = Literal["warn", "raise"] | Callable[[list[Finding]], object]


class RoutingAlarm(UserWarning):
    """The warning ``RouterInspector.check_alarms()`` issues for each new finding."""


class RoutingAlarmError(RuntimeError):
    """Raised by ``check_alarms(on_alarm="raise")``; ``findings`` holds the new findings."""

    def __init__(self, findings: Sequence[Finding]) -> None:
        self.findings = list(findings)
        super().__init__("; ".join(f"[{f.code}] {f.message}" for f in self.findings))


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class LayerWindow:
    """One layer's statistics over a window (host NumPy arrays, differences of cumulative
    values). ``counts``: executed pairs per expert; ``selected``: selections per expert;
    ``joint``: tokens per (complexity bin, executed k), last row non-finite; ``dropped``:
    pairs dropped by capacity; ``losses``: sums of the load-balancing loss and the z-loss;
    ``complexity``: (n, sum) of the finite complexity scores; ``steps``: decisions."""

    name: str
    num_experts: int
    max_k: int
    start_step: int
    end_step: int
    counts: np.ndarray
    selected: np.ndarray
    joint: np.ndarray
    dropped: float
    losses: np.ndarray
    complexity: np.ndarray

    @property
    def steps(self) -> int:
        return self.end_step - self.start_step

    @property
    def k_hist(self) -> np.ndarray:
        hist: np.ndarray = self.joint.sum(axis=0)
        return hist

    @property
    def tokens(self) -> float:
        return float(self.joint.sum())

    @property
    def mean_k(self) -> float:
        tokens = self.tokens
        return (
            float((self.k_hist * np.arange(self.max_k + 1)).sum() / tokens) if tokens else math.nan
        )


@dataclass(frozen=True)
class Window:
    """The layers' windows of one read, and the cumulative counts at its end (for the
    dead-expert span): ``totals[name]`` = (steps, cumulative counts)."""

    layers: list[LayerWindow]
    totals: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)


def _width(state: LayerState) -> int:
    e, joint = state.num_experts, state.stats.joint.numel()
    return 2 * e + joint + 1 + 2 + 3 + 1


def _flat(state: LayerState, device: torch.device) -> torch.Tensor:
    """The statistics a window reads, as one float64 vector on ``device`` (no host read)."""
    stats = state.stats
    parts = [
        stats.counts,
        stats.selected,
        stats.joint.reshape(-1),
        stats.dropped.reshape(1),
        stats.loss_sums,
        stats.sums,
        state.compiled_steps.reshape(1),
    ]
    return torch.cat([p.to(device=device, dtype=torch.float64, non_blocking=True) for p in parts])


class LiveReader:
    """Reads windows of a set of layers: the cumulative values at the previous read are
    kept on the host, per layer, and subtracted."""

    def __init__(self) -> None:
        self.previous: dict[str, tuple[int, np.ndarray]] = {}
        self.first_mean_k: dict[str, float] = {}  # each layer's first window with tokens
        self.first_complexity: dict[str, tuple[int, int, float]] = {}
        self.first_pooled_k: float | None = None  # mean k of the first window with tokens

    def read(self, layers: Iterable[LayerState]) -> Window:
        """One window per layer: everything since the previous ``read`` (first: since the
        start). One ``.cpu()`` per device holding layers."""
        states = list(layers)
        for state in states:
            state.drain()
            if state.stream is not None:
                state.stream.synchronize()  # updates run on a side stream
        by_device: dict[torch.device, list[LayerState]] = {}
        for state in states:
            by_device.setdefault(state.stats.counts.device, []).append(state)
        host: dict[str, np.ndarray] = {}
        for device, group in by_device.items():
            flat = torch.cat([_flat(state, device) for state in group]).cpu().numpy()
            offset = 0
            for state in group:
                width = _width(state)
                host[state.name] = flat[offset : offset + width]
                offset += width
        out: list[LayerWindow] = []
        totals: dict[str, tuple[int, np.ndarray]] = {}
        for state in states:
            values = host[state.name]
            steps = state.steps + round(float(values[-1]))
            start, before = self.previous.get(state.name, (0, np.zeros_like(values)))
            delta = values - before
            self.previous[state.name] = (steps, values)
            e, joint_size = state.num_experts, state.stats.joint.numel()
            joint_shape = tuple(state.stats.joint.shape)
            at = 2 * e + joint_size
            out.append(
                LayerWindow(
                    name=state.name,
                    num_experts=e,
                    max_k=state.max_k,
                    start_step=start,
                    end_step=steps,
                    counts=delta[:e].round(),
                    selected=delta[e : 2 * e].round(),
                    joint=delta[2 * e : at].round().reshape(joint_shape),
                    dropped=float(round(delta[at])),
                    losses=delta[at + 1 : at + 3],
                    complexity=delta[at + 3 : at + 5],
                )
            )
            totals[state.name] = (steps, values[:e].round())
        for layer in out:
            if layer.name not in self.first_mean_k and layer.tokens:
                self.first_mean_k[layer.name] = layer.mean_k
                n, total = layer.complexity
                self.first_complexity[layer.name] = (
                    layer.start_step,
                    layer.end_step,
                    float(total / n) if n else math.nan,
                )
        tokens = sum(layer.tokens for layer in out)
        if self.first_pooled_k is None and tokens:
            self.first_pooled_k = pooled_k(out)[0]
        return Window(out, totals)


# ----------------------------------------------------------------------------- metrics


def _entropy(counts: np.ndarray) -> float:
    total = counts.sum()
    if not total:
        return math.nan
    if len(counts) < 2:
        return 1.0
    shares = counts[counts > 0] / total
    return float(-(shares * np.log(shares)).sum() / math.log(len(counts)))


def _cv(counts: np.ndarray) -> float:
    mean = counts.mean()
    return float(counts.std() / mean) if counts.sum() else math.nan


def _max_vio(counts: np.ndarray) -> float:
    return float(counts.max() / counts.mean() - 1.0) if counts.sum() else math.nan


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def pooled_k(layers: Sequence[LayerWindow]) -> tuple[float, float, float]:
    """(mean k, std of k, tokens) over every layer's tokens of the window (NaN: none)."""
    k_hists = [(lay.k_hist, np.arange(lay.max_k + 1)) for lay in layers]
    tokens = float(sum(h.sum() for h, _ in k_hists))
    k_sum = float(sum((h * ks).sum() for h, ks in k_hists))
    k_sq = float(sum((h * ks**2).sum() for h, ks in k_hists))
    mean_k = _ratio(k_sum, tokens)
    k_std = math.sqrt(max(k_sq / tokens - mean_k**2, 0.0)) if tokens else math.nan
    return mean_k, k_std, tokens


def layer_metrics(layer: LayerWindow) -> dict[str, float]:
    """The ``LAYER_METRIC_KEYS`` of one layer's window."""
    counts, pairs = layer.counts, float(layer.counts.sum())
    return {
        "tokens": layer.tokens,
        "routing_entropy": _entropy(counts),
        "max_expert_share": float(counts.max() / pairs) if pairs else math.nan,
        "dead_expert_fraction": float((counts == 0).mean()) if pairs else math.nan,
        "cv": _cv(counts),
        "max_vio": _max_vio(counts),
        "mean_k": layer.mean_k,
    }


def window_metrics(
    window: Window,
    first_mean_k: float,
    prefix: str = "moe/",
    *,
    per_layer: bool = False,
    top_experts: int = 0,
) -> dict[str, float]:
    """The scalars of a window (``METRIC_KEYS``, plus the opt-in per-layer and per-expert
    keys); NaN where a value is undefined (no token in the window)."""
    layers = window.layers
    per = [layer_metrics(layer) for layer in layers]
    used = [(lay, m) for lay, m in zip(layers, per, strict=True) if lay.counts.sum()]
    experts = sum(lay.num_experts for lay, _ in used)
    dead = sum(int((lay.counts == 0).sum()) for lay, _ in used)
    active = sum(
        int((lay.counts / lay.counts.sum() >= 0.5 / lay.num_experts).sum()) for lay, _ in used
    )
    mean_k, k_std, tokens = pooled_k(layers)
    decisions = float(sum(lay.steps for lay in layers))
    entropies = [m["routing_entropy"] for _, m in used]
    shares = [m["max_expert_share"] for _, m in used]
    cvs, vios = [m["cv"] for _, m in used], [m["max_vio"] for _, m in used]
    values = {
        "steps": float(max((lay.steps for lay in layers), default=0)),
        "tokens": _mean([lay.tokens for lay in layers]),
        "routing_entropy_mean": _mean(entropies),
        "routing_entropy_min": min(entropies, default=math.nan),
        "max_expert_share_mean": _mean(shares),
        "max_expert_share_max": max(shares, default=math.nan),
        "active_expert_fraction": _ratio(active, experts),
        "dead_expert_fraction": _ratio(dead, experts),
        "mean_k": mean_k,
        "k_std": k_std,
        "k_drift": mean_k - first_mean_k,
        "load_balancing_loss": _ratio(float(sum(lay.losses[0] for lay in layers)), decisions),
        "z_loss": _ratio(float(sum(lay.losses[1] for lay in layers)), decisions),
        "dropped_pair_rate": _ratio(
            float(sum(lay.dropped for lay in layers)),
            float(sum(lay.selected.sum() for lay in layers)),
        ),
        "nonfinite_token_rate": _ratio(float(sum(lay.joint[-1].sum() for lay in layers)), tokens),
        "cv_p50": _percentile(cvs, 50),
        "cv_p90": _percentile(cvs, 90),
        "max_vio_p50": _percentile(vios, 50),
        "max_vio_p90": _percentile(vios, 90),
    }
    out = {f"{prefix}{key}": float(values[key]) for key in METRIC_KEYS}
    if per_layer:
        for lay, m in zip(layers, per, strict=True):
            out.update({f"{prefix}layer/{lay.name}/{k}": float(m[k]) for k in LAYER_METRIC_KEYS})
    if top_experts > 0:
        ranked = sorted(
            (float(c / lay.counts.sum()), lay.name, e)
            for lay in layers
            if lay.counts.sum()
            for e, c in enumerate(lay.counts)
        )
        n = min(top_experts, len(ranked) // 2) if len(ranked) > 1 else len(ranked)
        for share, name, e in ranked[:n] + ranked[len(ranked) - n :]:
            out[f"{prefix}expert_share/{name}/{e}"] = share
    return out


# ----------------------------------------------------------------------------- alarms


class DeadSpan:
    """Per layer, the cumulative counts at earlier reads: the counts over the last
    ``dead_window_steps`` steps (or every step when fewer were recorded)."""

    def __init__(self) -> None:
        self.history: dict[str, deque[tuple[int, np.ndarray]]] = {}

    def recent(
        self, name: str, steps: int, totals: np.ndarray, span: int
    ) -> tuple[np.ndarray, int | None]:
        """(counts, start step) over at least ``span`` steps ending now; start None: every
        step so far (fewer than ``span``)."""
        history = self.history.setdefault(name, deque())
        base: tuple[int, np.ndarray] | None = None
        while history and steps - history[0][0] >= span:
            base = history.popleft()
        if base is not None:
            history.appendleft(base)  # the latest read at least ``span`` steps back stays
        history.append((steps, totals))
        if base is None:
            return totals, None
        return totals - base[1], base[0]


def window_findings(
    window: Window, reader: LiveReader, dead: DeadSpan, config: InspectorConfig
) -> list[Finding]:
    """The summary's findings that apply to a window, from ``summary.alarms``: collapse,
    non-finite tokens and dropped pairs over the window, dead experts over the last
    ``dead_window_steps`` steps, and mean-k drift from each layer's first window."""
    out: list[Finding] = []
    for lay in window.layers:
        counts = lay.counts.astype(np.int64)
        pairs = int(counts.sum())
        shares = (counts / pairs).tolist() if pairs else [0.0] * lay.num_experts
        mean = counts.mean() if lay.num_experts else 0.0
        entry: dict[str, Any] = {
            "name": lay.name,
            "num_experts": lay.num_experts,
            "steps": lay.steps,
            "tokens": round(lay.tokens),
            "selections": int(lay.selected.sum()),
            "utilization": {
                "counts": counts.tolist(),
                "shares": shares,
                "max_over_mean": float(counts.max() / mean) if pairs else math.nan,
            },
            "windows": [],
            "nonfinite_tokens": int(lay.joint[-1].sum()),
            "dropped_pairs": int(lay.dropped),
        }
        found = [f for f in alarms(entry, config) if f.code != "dead-experts"]
        steps, totals = window.totals[lay.name]
        recent, start = dead.recent(lay.name, steps, totals, config.dead_window_steps)
        dead_entry = {
            **entry,
            "steps": steps,
            "selections": int(recent.sum()),
            "utilization": {**entry["utilization"], "counts": recent.astype(np.int64).tolist()},
            "windows": []
            if start is None
            else [{"counts": recent.tolist(), "tokens": 0, "start_step": start, "end_step": steps}],
            "nonfinite_tokens": 0,
            "dropped_pairs": 0,
        }
        found += [f for f in alarms(dead_entry, config) if f.code == "dead-experts"]
        if lay.name in reader.first_mean_k and lay.tokens:
            first_start, first_end, first_c = reader.first_complexity[lay.name]
            n, total = lay.complexity
            windows = [
                {
                    "tokens": 1,
                    "mean_k": reader.first_mean_k[lay.name],
                    "mean_complexity": first_c,
                    "start_step": first_start,
                    "end_step": first_end,
                },
                {
                    "tokens": 1,
                    "mean_k": lay.mean_k,
                    "mean_complexity": float(total / n) if n else math.nan,
                    "start_step": lay.start_step,
                    "end_step": lay.end_step,
                },
            ]
            if (first_start, first_end) != (lay.start_step, lay.end_step):
                found += [
                    f
                    for f in _drift({"name": lay.name, "windows": windows}, config)
                    if f.code == "mean-k-drift"
                ]
        out += [_at(f, lay.end_step) for f in found]
    return out


def _at(finding: Finding, step: int) -> Finding:
    return replace(finding, step=step)


class Episodes:
    """Fires each finding once per episode: when its (code, location) becomes true; quiet
    while it stays true; again after a check where it was false."""

    def __init__(self) -> None:
        self.active: set[tuple[str, str | None]] = set()

    def new(self, findings: Sequence[Finding]) -> list[Finding]:
        keys = [(f.code, f.location) for f in findings]
        fresh = [f for f, key in zip(findings, keys, strict=True) if key not in self.active]
        self.active = set(keys)
        return fresh


def deliver(findings: list[Finding], on_alarm: OnAlarm) -> None:
    """Warns (``RoutingAlarm``), raises ``RoutingAlarmError`` or calls ``on_alarm``."""
    if not findings:
        return
    if on_alarm == "warn":
        for finding in findings:
            warnings.warn(f"[{finding.code}] {finding.message}", RoutingAlarm, stacklevel=3)
    elif on_alarm == "raise":
        raise RoutingAlarmError(findings)
    elif callable(on_alarm):
        on_alarm(findings)
    else:
        raise ValueError(f"on_alarm must be 'warn', 'raise' or a callable; got {on_alarm!r}")
