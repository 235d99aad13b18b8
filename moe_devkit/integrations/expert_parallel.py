"""Expert-parallel load: the tokens each expert-parallel (EP) rank receives after dispatch.

With expert parallelism the experts of a layer are placed on the ``ep_size`` ranks of an EP
group, and at every step each rank of the group sends each of its tokens' (token, expert)
pairs to the rank hosting that expert. The busiest rank sets the step's time, so the figure
that matters is Megatron-Core's overload factor: the tokens on the busiest rank of the EP
group over the balanced count (the group's tokens / ``ep_size``), **per step**. Averaging the
loads over steps first and then taking the max (the cumulative overload) hides a hot rank
that moves from step to step; both are reported.

``ExpertParallelLoad`` records, for every layer and every step (every forward of a router),
this rank's pairs per destination EP rank: ``int64[ep_size]`` from the step's expert counts
and the placement, on the router's device, with no host synchronisation. It keeps

* the running total per destination rank (exact, all steps);
* the per-step rows in a ``[capacity, ep_size]`` device buffer: exact up to ``capacity``
  steps; when it is full every other row is dropped and only every other step is recorded
  from then on (the stride doubles), so the per-step figures are then over a uniform
  subsample of the steps (every ``stride``-th step, reported).

A rank only sees its own tokens, so a step's load on EP rank ``j`` is the sum over the EP
group of the ranks' rows: ``reduce`` (called by ``distributed_summary(expert_parallel=...)``)
all-reduces the rows over the EP group, then takes each step's max before averaging, and
merges the figures of the EP groups (data-parallel replicas) over the summary's group.

Tokens are counted as the router's decision holds them (the pairs the experts ran, padding
included: a dispatcher sends padding tokens too). Steps run under ``torch.compile`` are not
recorded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe_devkit._checks import require_float
from moe_devkit.diagnostics.findings import Finding
from moe_devkit.inspect.discovery import find_probes
from moe_devkit.inspect.inspector import RouterInspector, in_backward_recompute
from moe_devkit.inspect.records import RouterSite, Selection
from moe_devkit.integrations.distributed import (
    _agreed_layout,
    _check_in,
    all_reduce,
    resolve_group,
)
from moe_devkit.routers.torch_router import RoutingDecision, count_values

DEFAULT_CAPACITY = 1024
DEFAULT_HOT_FACTOR = 1.5

Placement = Sequence[int] | Mapping[str, Sequence[int]]


def contiguous_placement(num_experts: int, ep_size: int) -> list[int]:
    """Expert ``e`` on EP rank ``e * ep_size // num_experts``: contiguous blocks, as Megatron
    and DeepSpeed place them (equal blocks when ``ep_size`` divides ``num_experts``)."""
    return [e * ep_size // num_experts for e in range(num_experts)]


class _LayerLoad:
    """One layer's per-destination totals and per-step rows, on the router's device."""

    def __init__(self, placement: list[int], ep_size: int, capacity: int, device: Any) -> None:
        self.placement = placement
        self.index = torch.tensor(placement, dtype=torch.int64, device=device)
        self.ep_size, self.capacity = ep_size, capacity
        self.total = torch.zeros(ep_size, dtype=torch.int64, device=device)
        self.rows = torch.zeros(capacity, ep_size, dtype=torch.int64, device=device)
        self.used, self.stride, self.steps = 0, 1, 0

    def add(self, loads: torch.Tensor) -> None:
        self.total += loads
        if self.steps % self.stride == 0 and self.used == self.capacity:
            keep = self.rows[0::2].clone()  # steps 0, 2*stride, 4*stride, ... stay
            self.rows.zero_()
            self.rows[: keep.shape[0]] = keep
            self.used = keep.shape[0]
            self.stride *= 2
        if self.steps % self.stride == 0:
            self.rows[self.used] = loads
            self.used += 1
        self.steps += 1


class ExpertParallelLoad:
    """Records each EP rank's per-step token load; merged by ``distributed_summary``.

    Use ``ExpertParallelLoad(group, placement=...).attach(inspector)`` (or ``attach(model)``)
    on every rank, train, then ``distributed_summary(inspector, expert_parallel=load)``.

    Args:
        group: the expert-parallel process group (default: the world), or a ``DeviceMesh``.
        mesh_dim: with a ``DeviceMesh``, the EP dimension (name or index).
        placement: expert -> EP rank, for every layer (a sequence of E ints in
            [0, ep_size)) or per layer name (a mapping; layers left out are contiguous);
            default contiguous (``contiguous_placement``).
        capacity: per-step rows kept per layer before the stride doubles (even, >= 2).
        hot_factor: a layer whose mean per-step overload factor exceeds this gets an
            ``ep-hot-rank`` warning.

    Raises:
        RuntimeError: torch.distributed is not initialised.
        ValueError: a bad capacity or hot_factor.
    """

    def __init__(
        self,
        group: Any = None,
        *,
        mesh_dim: str | int | None = None,
        placement: Placement | None = None,
        capacity: int = DEFAULT_CAPACITY,
        hot_factor: float = DEFAULT_HOT_FACTOR,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ExpertParallelLoad needs torch.distributed initialised (dist.init_process_group)"
            )
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 2:
            raise ValueError(f"capacity must be an even int >= 2; got capacity={capacity!r}")
        if capacity % 2:
            raise ValueError(f"capacity must be an even int >= 2; got capacity={capacity!r}")
        if not (isinstance(hot_factor, int | float) and hot_factor >= 1):
            raise ValueError(f"hot_factor must be a number >= 1; got hot_factor={hot_factor!r}")
        self.group = resolve_group(group, mesh_dim)
        self.ep_size = dist.get_world_size(self.group)
        self.placement = placement
        self.capacity = capacity
        self.hot_factor = float(hot_factor)
        self.layers: dict[str, _LayerLoad] = {}
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ recording

    def attach(self, target: RouterInspector | nn.Module) -> ExpertParallelLoad:
        """Hooks the routers ``target`` holds (an attached inspector's probes, or a model's)."""
        probes = target.probes if isinstance(target, RouterInspector) else find_probes(target)
        if not probes:
            raise ValueError(
                "found no router to record: attach the inspector first, or pass an MoE model"
            )
        for probe in probes:
            self._handles += probe.install(self._emit)
        return self

    def detach(self) -> None:
        """Removes the hooks; the loads are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _emit(
        self, site: RouterSite, decision: RoutingDecision, selection: Selection | None = None
    ) -> None:
        del selection  # the executed pairs are what is dispatched
        if in_backward_recompute():
            return
        self.record(decision.expert_indices, decision.num_experts, layer=site.layer)

    def record(self, expert_indices: torch.Tensor, num_experts: int, layer: str = "router") -> None:
        """Adds one step of ``layer``: ``expert_indices`` int[..., K], -1 for no expert."""
        if torch.compiler.is_compiling():
            return
        state = self.layers.get(layer)
        if state is None:
            placement = self._placement_of(layer, num_experts)
            device = expert_indices.device
            state = _LayerLoad(placement, self.ep_size, self.capacity, device)
            self.layers[layer] = state
        with torch.no_grad():
            counts = count_values(expert_indices.detach(), num_experts)
            loads = torch.zeros_like(state.total).index_add_(0, state.index, counts)
            state.add(loads)

    def _placement_of(self, layer: str, num_experts: int) -> list[int]:
        given = self.placement
        if isinstance(given, Mapping):
            given = given.get(layer)
        if given is None:
            return contiguous_placement(num_experts, self.ep_size)
        placement = [int(r) for r in given]
        if len(placement) != num_experts or any(not 0 <= r < self.ep_size for r in placement):
            raise ValueError(
                f"the placement of layer {layer!r} must give each of its {num_experts} experts "
                f"an EP rank in [0, {self.ep_size}); got {placement}"
            )
        return placement

    # ------------------------------------------------------------------ merging

    def reduce(
        self, *, group: Any = None, timeout: float = 60.0
    ) -> tuple[dict[str, dict[str, Any]], list[Finding]]:
        """Per layer the merged EP load, and the hot-rank findings (collective over ``group``,
        the summary's group, which holds whole EP groups; ``distributed_summary`` calls it).

        It first checks in through the group's store as ``distributed_summary`` does, so a
        rank that never calls it gives ``RankTimeoutError`` within ``timeout`` seconds.

        Raises:
            RankTimeoutError: a rank did not call it within ``timeout``.
            ValueError: the ranks of an EP group recorded a layer for different numbers of
                steps (their per-step rows cannot be summed).
        """
        timeout = require_float("timeout", timeout, 0.0, low_open=True)
        _check_in(group, timeout)
        shapes = {n: (len(s.placement), s.ep_size) for n, s in self.layers.items()}
        layout = _agreed_layout(shapes, group, timeout)
        states: dict[str, _LayerLoad] = {}
        for name, (num_experts, _) in layout.items():
            state = self.layers.get(name)
            if state is None:
                placement = self._placement_of(name, num_experts)
                state = _LayerLoad(placement, self.ep_size, self.capacity, "cpu")
            states[name] = state
        counts = torch.tensor(
            [v for s in states.values() for v in (s.steps, -s.steps)], dtype=torch.int64
        )
        peaks = all_reduce(counts, dist.ReduceOp.MAX, self.group).reshape(-1, 2)
        for name, (high, neg_low) in zip(states, peaks.tolist(), strict=True):
            if high != -neg_low:
                raise ValueError(
                    f"the ranks of an expert-parallel group recorded layer {name!r} for "
                    f"{-neg_low} to {high} steps; every EP rank must record the same steps"
                )
        rows = [s.rows[: s.used].cpu().reshape(-1) for s in states.values()]
        summed = all_reduce(
            torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64),
            dist.ReduceOp.SUM,
            self.group,
        )
        ep = self.ep_size
        sums, maxima, totals = [], [], []
        offset = 0
        for state in states.values():
            loads = summed[offset : offset + state.used * ep].reshape(state.used, ep).double()
            offset += state.used * ep
            balanced = loads.sum(1) / ep
            valid = balanced > 0
            factors = loads.max(1).values[valid] / balanced[valid]
            sums += [float(factors.sum()), float(factors.numel())]
            maxima.append(float(factors.max()) if factors.numel() else -math.inf)
            totals.append(state.total.cpu())
        world_sums = all_reduce(torch.tensor(sums, dtype=torch.float64), dist.ReduceOp.SUM, group)
        world_max = all_reduce(torch.tensor(maxima, dtype=torch.float64), dist.ReduceOp.MAX, group)
        world_totals = all_reduce(
            torch.cat(totals) if totals else torch.zeros(0, dtype=torch.int64),
            dist.ReduceOp.SUM,
            group,
        ).reshape(-1, ep)
        out: dict[str, dict[str, Any]] = {}
        findings: list[Finding] = []
        for i, (name, state) in enumerate(states.items()):
            total, n = float(world_sums[2 * i]), float(world_sums[2 * i + 1])
            tokens = world_totals[i].tolist()
            mean_tokens = sum(tokens) / ep
            peak = float(world_max[i])
            mean_factor = total / n if n else math.nan
            entry: dict[str, Any] = {
                "ep_size": ep,
                "placement": state.placement,
                "steps": state.steps,
                "step_stride": state.stride,
                "tokens_per_ep_rank": tokens,
                "overload_factor_mean": mean_factor,
                "overload_factor_max": peak if math.isfinite(peak) else math.nan,
                "cumulative_overload": max(tokens) / mean_tokens if mean_tokens else math.nan,
                "hot_rank": int(max(range(ep), key=lambda j: tokens[j])),
            }
            out[name] = entry
            if mean_factor > self.hot_factor:
                findings.append(_hot_rank_finding(name, entry, self.hot_factor))
        return out, findings


def _hot_rank_finding(layer: str, entry: dict[str, Any], threshold: float) -> Finding:
    mean, peak = entry["overload_factor_mean"], entry["overload_factor_max"]
    return Finding(
        code="ep-hot-rank",
        severity="warning",
        message=(
            f"layer {layer!r}: the busiest expert-parallel rank gets {mean:.2f}x the balanced "
            f"tokens on average per step (max {peak:.2f}x, above {threshold:g}); EP rank "
            f"{entry['hot_rank']} receives the most tokens overall: the whole step waits on it"
        ),
        location=layer,
        details={
            key: entry[key]
            for key in ("overload_factor_mean", "overload_factor_max", "cumulative_overload")
        }
        | {"hot_rank": entry["hot_rank"], "threshold": threshold},
    )
