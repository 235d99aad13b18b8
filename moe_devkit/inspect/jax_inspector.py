"""Routing statistics inside ``jax.jit`` and a JAX inspector that feeds the same report.

JAX has no forward hooks, and a jitted step should not hand every decision back to Python.
So the statistics are computed inside the compiled function and returned as an auxiliary
output (a small, fixed-size pytree), then accumulated across steps by ``JaxRouterInspector``:

    @jax.jit
    def step(params, x, key):
        out = model(params, x)
        return out.hidden_states, model_routing_stats(out.routings, key=key)

    inspector = JaxRouterInspector()
    for i, x in enumerate(batches):
        y, stats = step(params, x, jax.random.fold_in(key, i))
        inspector.record_model(stats)           # layer names "layers.{i}.moe.router"
    inspector.report("out")                     # report.json/.png/.html, same schema

``routing_stats`` counts with scatter-adds (``.at[].add``, XLA's segment sum): counts per
expert, a joint (complexity bin, k) histogram whose last row holds non-finite tokens, the
dropped pairs, the losses, this step's (n, mean, M2) of complexity and its extrema, the
expert co-activation matrix and a random sample of (complexity, k) pairs for plots.

Accumulation stays on the device between windows: each ``record`` folds the step's
statistics into device accumulators with one jitted call (asynchronous, no host read). At
each window end (``InspectorConfig.window`` steps) the accumulators are read to the host
once and added to int64/float64 host totals, so int32 device counters never overflow and
the window snapshots match ``RouterInspector``'s. ``summary()``/``report()`` go through
``inspect.summary.summarize`` and ``inspect.report`` as the PyTorch inspector's do
(``host_state()`` returns the same ``LayerRecord``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch

from moe_devkit.inspect.config import InspectorConfig
from moe_devkit.inspect.records import LayerRecord
from moe_devkit.inspect.report import ReportPaths, write_report
from moe_devkit.inspect.state import coactivation_steps
from moe_devkit.inspect.summary import InspectorSummary, summarize
from moe_devkit.routers.jax_router import RoutingDecision, expert_counts


class RoutingStats(NamedTuple):
    """Routing statistics of one decision, fixed-size arrays (a pytree, jit-friendly).

    Attributes:
        counts: int32[E], executed pairs per expert (capacity drops left out).
        selected: int32[E], selections per expert (dropped pairs included).
        joint: int32[bins + 1, K + 1], tokens per (complexity bin, executed k); last row
            non-finite.
        dropped: int32[], pairs dropped by the capacity limit.
        loss_sums: float32[2], load-balancing loss and z-loss of this decision.
        moments: float32[3], (n, mean, M2) of the finite complexity scores.
        extrema: float32[2], min and max finite complexity (inf, -inf when none).
        coactivation: float32[E, E], tokens selecting both experts.
        sample_keys: float32[S], random keys of the sampled tokens (smallest kept).
        sample_complexity: float32[S], their complexity.
        sample_k: int32[S], their k.
    """

    counts: jax.Array
    selected: jax.Array
    joint: jax.Array
    dropped: jax.Array
    loss_sums: jax.Array
    moments: jax.Array
    extrema: jax.Array
    coactivation: jax.Array
    sample_keys: jax.Array
    sample_complexity: jax.Array
    sample_k: jax.Array


def routing_stats(
    decision: RoutingDecision,
    *,
    complexity_bins: int = 20,
    sample_size: int = 256,
    key: jax.Array | None = None,
) -> RoutingStats:
    """Statistics of one decision, computed with array ops only (call it inside ``jit``).

    Args:
        decision: a JAX ``RoutingDecision``.
        complexity_bins: bins of the complexity histogram (``InspectorConfig``'s, default 20).
        sample_size: tokens sampled for the (complexity, k) plot.
        key: PRNG key of the sample; pass a fresh one per step (``fold_in(key, step)``).
            By default it is derived from the batch's complexity, so different batches
            sample different tokens.
    """
    num_experts, max_k = decision.num_experts, decision.max_k
    selected = expert_counts(decision.expert_indices, num_experts)
    indices = jnp.where(decision.dropped, -1, decision.expert_indices)  # what the experts ran
    counts = expert_counts(indices, num_experts)
    complexity = decision.complexity.astype(jnp.float32)
    finite = ~decision.nonfinite & jnp.isfinite(complexity)
    cbin = (jnp.clip(jnp.nan_to_num(complexity), 0, 1) * complexity_bins).astype(jnp.int32)
    cbin = jnp.where(finite, jnp.minimum(cbin, complexity_bins - 1), complexity_bins)
    executed_k = decision.k_per_token - decision.dropped.sum(axis=-1)
    k = jnp.clip(executed_k, 0, max_k).astype(jnp.int32)
    joint = jnp.zeros((complexity_bins + 1) * (max_k + 1), jnp.int32)
    joint = joint.at[cbin * (max_k + 1) + k].add(1).reshape(complexity_bins + 1, max_k + 1)
    rows = jnp.arange(indices.shape[0])[:, None]  # [N, 1]
    multi_hot = jnp.zeros((indices.shape[0], num_experts + 1), jnp.float32)
    multi_hot = multi_hot.at[rows, _slot(indices, num_experts)].set(1.0)[:, :num_experts]  # [N, E]
    if key is None:
        seed = jax.lax.bitcast_convert_type(jnp.where(finite, complexity, 0).sum(), jnp.int32)
        key = jax.random.fold_in(jax.random.key(0), seed)
    keys, sample_c, sample_k = _sample(key, complexity, k, sample_size)
    return RoutingStats(
        counts=counts,
        selected=selected,
        joint=joint,
        dropped=decision.dropped.sum(dtype=jnp.int32),
        loss_sums=jnp.stack([decision.load_balancing_loss, decision.z_loss]).astype(jnp.float32),
        moments=_moments(complexity, finite),
        extrema=_extrema(complexity, finite),
        coactivation=multi_hot.T @ multi_hot,
        sample_keys=keys,
        sample_complexity=sample_c,
        sample_k=sample_k,
    )


def model_routing_stats(
    routings: Sequence[RoutingDecision],
    *,
    complexity_bins: int = 20,
    sample_size: int = 256,
    key: jax.Array | None = None,
) -> tuple[RoutingStats, ...]:
    """``routing_stats`` of each layer of an ``MoEModelOutput.routings`` (one key per layer)."""
    keys: list[jax.Array | None] = (
        [None] * len(routings) if key is None else list(jax.random.split(key, len(routings)))
    )
    return tuple(
        routing_stats(d, complexity_bins=complexity_bins, sample_size=sample_size, key=k)
        for d, k in zip(routings, keys, strict=True)
    )


def _slot(indices: jax.Array, num_experts: int) -> jax.Array:
    """Indices with the -1 padding sent to an extra bin E."""
    return jnp.where(indices >= 0, indices, num_experts)


def _extrema(complexity: jax.Array, finite: jax.Array) -> jax.Array:
    """float32[2]: min and max of the finite scores (inf, -inf when there are none)."""
    low = jnp.where(finite, complexity, jnp.inf).min()
    return jnp.stack([low, jnp.where(finite, complexity, -jnp.inf).max()])


def _moments(complexity: jax.Array, finite: jax.Array) -> jax.Array:
    """float32[3]: (n, mean, M2) of the finite scores (two-pass, as LayerState does)."""
    n = finite.sum().astype(jnp.float32)
    mean = jnp.where(finite, complexity, 0.0).sum() / jnp.maximum(n, 1.0)
    m2 = jnp.where(finite, jnp.square(complexity - mean), 0.0).sum()
    return jnp.stack([n, mean, m2])


def _sample(
    key: jax.Array, complexity: jax.Array, k: jax.Array, size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The min(size, N) tokens with the smallest uniform keys (a uniform sample)."""
    keys = jax.random.uniform(key, complexity.shape)
    neg_keys, pick = jax.lax.top_k(-keys, min(size, keys.shape[0]))
    return -neg_keys, complexity[pick], k[pick]


# ----------------------------------------------------------------------------- accumulation


def _merge_moments(a: Any, b: Any, xp: Any) -> Any:
    """Chan et al.'s parallel merge of two (n, mean, M2) triples (xp: jnp or np)."""
    n = a[0] + b[0]
    delta = b[1] - a[1]
    safe_n = xp.maximum(n, 1)
    mean = a[1] + delta * b[0] / safe_n
    m2 = a[2] + b[2] + delta * delta * a[0] * b[0] / safe_n
    return xp.stack([n, mean, m2])


@partial(jax.jit, static_argnames=("coactivation", "sample"))
def _fold(acc: RoutingStats, step: RoutingStats, coactivation: bool, sample: bool) -> RoutingStats:
    """Adds one step's statistics to the device accumulators; keeps the smallest keys.

    ``sample``: offer this step's tokens to the reservoir (every ``reservoir_every``-th step,
    as ``LayerState`` does); otherwise the reservoir is kept as it is.
    """
    if sample:
        keys = jnp.concatenate([acc.sample_keys, step.sample_keys])
        neg, keep = jax.lax.top_k(-keys, acc.sample_keys.shape[0])
        sample_keys = -neg
        sample_complexity = jnp.concatenate([acc.sample_complexity, step.sample_complexity])[keep]
        sample_k = jnp.concatenate([acc.sample_k, step.sample_k])[keep]
    else:
        sample_keys, sample_complexity, sample_k = (
            acc.sample_keys,
            acc.sample_complexity,
            acc.sample_k,
        )
    co = step.coactivation if coactivation else jnp.zeros_like(step.coactivation)
    low = jnp.minimum(acc.extrema[0], step.extrema[0])
    high = jnp.maximum(acc.extrema[1], step.extrema[1])
    return RoutingStats(
        counts=acc.counts + step.counts,
        selected=acc.selected + step.selected,
        joint=acc.joint + step.joint,
        dropped=acc.dropped + step.dropped,
        loss_sums=acc.loss_sums + step.loss_sums,
        moments=_merge_moments(acc.moments, step.moments, jnp),
        extrema=jnp.stack([low, high]),
        coactivation=acc.coactivation + jnp.round(co),
        sample_keys=sample_keys,
        sample_complexity=sample_complexity,
        sample_k=sample_k,
    )


def _empty(num_experts: int, max_k: int, bins: int, reservoir: int) -> RoutingStats:
    return RoutingStats(
        counts=jnp.zeros(num_experts, jnp.int32),
        selected=jnp.zeros(num_experts, jnp.int32),
        joint=jnp.zeros((bins + 1, max_k + 1), jnp.int32),
        dropped=jnp.zeros((), jnp.int32),
        loss_sums=jnp.zeros(2, jnp.float32),
        moments=jnp.zeros(3, jnp.float32),
        extrema=jnp.array([jnp.inf, -jnp.inf], jnp.float32),
        coactivation=jnp.zeros((num_experts, num_experts), jnp.float32),
        sample_keys=jnp.full(reservoir, jnp.inf, jnp.float32),
        sample_complexity=jnp.zeros(reservoir, jnp.float32),
        sample_k=jnp.full(reservoir, -1, jnp.int32),
    )


_HOST_SUMS = ("counts", "selected", "joint", "dropped", "loss_sums", "coactivation")


class JaxLayerState:
    """Running statistics of one JAX router: device accumulators, host totals per window."""

    def __init__(self, name: str, num_experts: int, max_k: int, config: InspectorConfig) -> None:
        self.name, self.num_experts, self.max_k, self.config = name, num_experts, max_k, config
        bins = config.complexity_bins
        self._device = _empty(num_experts, max_k, bins, config.reservoir_size)
        self._host: dict[str, np.ndarray] = {
            "counts": np.zeros(num_experts, np.int64),
            "selected": np.zeros(num_experts, np.int64),
            "joint": np.zeros((bins + 1, max_k + 1), np.int64),
            "dropped": np.zeros((), np.int64),
            "loss_sums": np.zeros(2, np.float64),
            "coactivation": np.zeros((num_experts, num_experts), np.float64),
            "moments": np.zeros(3, np.float64),
            "extrema": np.array([np.inf, -np.inf]),
        }
        self.snapshots = np.zeros((config.max_windows, num_experts + max_k + 2))
        self.snapshot_steps: list[int] = []
        self.window = config.window
        self.steps = 0
        self.first_time: float | None = None
        self.last_time: float | None = None

    def update(self, stats: RoutingStats) -> None:
        """Folds one step's statistics in (one asynchronous jitted call)."""
        if stats.joint.shape[0] != self.config.complexity_bins + 1:
            raise ValueError(
                f"stats must have complexity_bins={self.config.complexity_bins} (the inspector "
                f"config's); got {stats.joint.shape[0] - 1} (pass complexity_bins= to "
                "routing_stats)"
            )
        every = self.config.coactivation_every
        self._device = _fold(
            self._device,
            stats,
            bool(every) and self.steps % every == 0,
            self.steps % self.config.reservoir_every == 0,
        )
        self.steps += 1
        if self.steps % self.window == 0:
            self._flush()
            self._snapshot()
        now = time.time()
        self.first_time = now if self.first_time is None else self.first_time
        self.last_time = now

    def _flush(self) -> None:
        """Adds the device accumulators to the host totals and zeroes them (one transfer)."""
        device = jax.device_get(self._device)
        host = self._host
        for name in _HOST_SUMS:
            host[name] = host[name] + np.asarray(getattr(device, name)).astype(host[name].dtype)
        host["moments"] = _merge_moments(
            host["moments"], np.asarray(device.moments, np.float64), np
        )
        extrema = np.asarray(device.extrema, np.float64)
        host["extrema"] = np.array(
            [min(host["extrema"][0], extrema[0]), max(host["extrema"][1], extrema[1])]
        )
        zero = _empty(self.num_experts, self.max_k, self.config.complexity_bins, 1)
        self._device = self._device._replace(
            **{name: getattr(zero, name) for name in (*_HOST_SUMS, "moments", "extrema")}
        )

    def _snapshot(self) -> None:
        """Stores cumulative counts, k histogram and complexity sum at a window's end."""
        if len(self.snapshot_steps) == self.config.max_windows:
            keep = self.snapshots[1::2].copy()  # every other cumulative snapshot
            self.snapshots[:] = 0
            self.snapshots[: keep.shape[0]] = keep
            self.snapshot_steps = self.snapshot_steps[1::2]
            self.window *= 2
            if self.steps % self.window:
                return
        host = self._host
        k_hist = host["joint"].sum(axis=0).astype(np.float64)
        csum = host["moments"][0] * host["moments"][1]
        self.snapshots[len(self.snapshot_steps)] = np.concatenate(
            [host["counts"].astype(np.float64), k_hist, [csum]]
        )
        self.snapshot_steps.append(self.steps)

    def host_state(self) -> LayerRecord:
        """The statistics on the host, as ``LayerState.host_state()`` returns them."""
        self._flush()
        host, rows = self._host, len(self.snapshot_steps)
        sample = jax.device_get(self._device)
        valid = np.asarray(sample.sample_k) >= 0
        return LayerRecord(
            name=self.name,
            num_experts=self.num_experts,
            max_k=self.max_k,
            steps=self.steps,
            time_range=(self.first_time, self.last_time),
            counts=_tensor(host["counts"]),
            selected=_tensor(host["selected"]),
            joint=_tensor(host["joint"]),
            dropped=int(host["dropped"]),
            loss_sums=_tensor(host["loss_sums"]),
            moments=_tensor(host["moments"]),
            extrema=_tensor(host["extrema"]),
            coactivation=_tensor(host["coactivation"]),
            coactivation_steps=coactivation_steps(self.steps, self.config.coactivation_every),
            snapshots=_tensor(self.snapshots[:rows]),
            snapshot_steps=tuple(self.snapshot_steps),
            sample_complexity=_tensor(np.asarray(sample.sample_complexity)[valid]),
            sample_k=_tensor(np.asarray(sample.sample_k)[valid].astype(np.int64)),
        )


def _tensor(array: Any) -> torch.Tensor:
    """A CPU tensor of a copy of ``array`` (the report's metrics are computed in torch)."""
    return torch.from_numpy(np.array(array))


_routing_stats_jit = jax.jit(routing_stats, static_argnames=("complexity_bins", "sample_size"))


class JaxRouterInspector:
    """Accumulates ``RoutingStats`` of JAX routers across steps; same report as RouterInspector.

    Args:
        config: statistics and alarm settings (``InspectorConfig``, shared with PyTorch).
    """

    def __init__(self, config: InspectorConfig | None = None) -> None:
        self.config = config if config is not None else InspectorConfig()
        self.layers: dict[str, JaxLayerState] = {}

    def record_stats(self, stats: RoutingStats, layer: str = "router") -> None:
        """Folds one step's statistics (from ``routing_stats`` inside jit) into ``layer``.

        Raises:
            ValueError: ``layer`` was recorded with another number of experts or max_k.
        """
        num_experts, max_k = int(stats.counts.shape[0]), int(stats.joint.shape[1]) - 1
        state = self.layers.get(layer)
        if state is None:
            state = self.layers[layer] = JaxLayerState(layer, num_experts, max_k, self.config)
        elif (state.num_experts, state.max_k) != (num_experts, max_k):
            raise ValueError(
                f"layer {layer!r} was recorded with num_experts={state.num_experts}, "
                f"max_k={state.max_k}; got num_experts={num_experts}, max_k={max_k}"
            )
        state.update(stats)

    def record_model(self, stats: Sequence[RoutingStats], prefix: str = "layers") -> None:
        """Records ``model_routing_stats`` output as ``{prefix}.{i}.moe.router`` (torch names)."""
        for i, layer_stats in enumerate(stats):
            self.record_stats(layer_stats, layer=f"{prefix}.{i}.moe.router")

    def record(self, decision: RoutingDecision, layer: str = "router") -> None:
        """Records a JAX decision outside jit (computes its statistics with a jitted call)."""
        if not isinstance(decision, RoutingDecision):
            raise TypeError(
                f"decision must be a JAX RoutingDecision; got {type(decision).__name__} "
                "(use RouterInspector for PyTorch decisions)"
            )
        stats = _routing_stats_jit(decision, complexity_bins=self.config.complexity_bins)
        self.record_stats(stats, layer)

    def summary(self) -> InspectorSummary:
        """Per-layer statistics and alarms (``inspect.summary.summarize``)."""
        return summarize([state.host_state() for state in self.layers.values()], self.config)

    def report(self, out_dir: str | Path = "moe_devkit_report") -> ReportPaths:
        """Writes report.json, routing_analysis.png and report.html into ``out_dir``."""
        return write_report(self.summary(), out_dir)
