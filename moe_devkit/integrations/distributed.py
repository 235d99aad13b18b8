"""Global routing statistics over torch.distributed ranks, reduced at summary time only.

Each rank's ``RouterInspector`` keeps its statistics on its own device and never talks to
the other ranks while training. ``distributed_summary`` (a collective: every rank calls it)
first checks in with every rank through the process group's store, with its own timeout, so
a rank that failed, exited or never calls it gives ``RankTimeoutError`` on the others within
``timeout`` seconds whatever the process group's own timeout, instead of a hang; then it
merges every statistic with the reduction that fits it, so the bytes a rank sends do not
grow with the world size:

* one ``all_reduce(MAX)`` of a hash of the layer layout (names, num_experts, max_k): when
  the ranks disagree, the layouts are gathered (the only gather, and only then) and merged
  over their union, a rank that never ran a layer adding zeros;
* one ``all_reduce(SUM)`` of a flat int64 buffer: counts (executed and selected), the
  (complexity bin, k) histogram, drops, steps, and co-activation when asked for;
* one ``all_reduce(SUM)`` of a flat float64 buffer: loss sums, the moments' running sums
  (n, sum, sum of squares, so mean and variance merge exactly) and the trend snapshots;
* one ``all_reduce(MAX)`` of int64 (per-layer trend-window hashes, tokens) and one of
  float64 (extrema as max and -min, time range, reservoir keys negated);
* the reservoir as a bucketed sketch (``_Sketch``): each of the ``reservoir_size`` buckets
  keeps, over all ranks, the sample that wins an exponential race weighted by the tokens it
  stands for (an ``all_reduce(MAX)`` of the negated race keys, one of the winning rank, then
  a ``SUM`` of the winners' values). The merged sample holds only samples of the ranks'
  reservoirs, a bucket's winner comes from rank r with probability proportional to r's
  tokens in that bucket, and it holds at most ``reservoir_size`` samples: about
  ``reservoir_size * (1 - exp(-w))`` for ``w`` full reservoirs (0.63, 0.86, 0.98 of it for
  1, 2, 4 ranks), where one process would keep ``reservoir_size``.

Each layer carries ``rank_imbalance`` (max over mean tokens per rank, from a MAX and a SUM).
Per-rank detail (``per_rank_counts``, ``per_rank_tokens``, ``per_rank_steps``) is opt-in
(``per_rank=True``) and gathered to rank ``dst`` only.

The check-in is a rendezvous on the group's store, not a collective, so the ranks that give
up leave their process group usable. Calls are matched by count (each rank's n-th call meets
the others' n-th), and each call has one decision that every rank reads (all arrived, or a
rank gave up), so a rank that arrives after the others gave up raises at once instead of
entering the collectives alone.

With NCCL, the reductions run on the NCCL group (tensors on the rank's current CUDA device)
and the layout fallback through a gloo group created from it; create that group at start-up
with ``control_group()`` while every rank is alive (creating a group is itself collective).
A ``DeviceMesh`` and a dimension name may stand for the process group (``mesh_dim``).
"""

from __future__ import annotations

import hashlib
import math
from datetime import timedelta
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import Store

from moe_devkit._checks import require_float
from moe_devkit.diagnostics.findings import Finding
from moe_devkit.inspect.config import InspectorConfig
from moe_devkit.inspect.inspector import RouterInspector
from moe_devkit.inspect.records import LayerRecord
from moe_devkit.inspect.report import ReportPaths, write_report
from moe_devkit.inspect.state import LayerState, coactivation_steps, moments_from_sums
from moe_devkit.inspect.summary import InspectorSummary, summarize

DEFAULT_TIMEOUT_S = 60.0
_STORE_PREFIX = "moe_devkit/distributed_summary"
_GO = "go"

_CONTROL_GROUPS: dict[int, Any] = {}


class RankTimeoutError(RuntimeError):
    """Some rank did not reach the inspector's reduction within the timeout."""


class ExpertParallelReducer(Protocol):
    """What ``distributed_summary(expert_parallel=...)`` takes: an ``ExpertParallelLoad``."""

    def reduce(
        self, *, group: Any = None, timeout: float = ...
    ) -> tuple[dict[str, dict[str, Any]], list[Finding]]: ...


def resolve_group(group: Any = None, mesh_dim: str | int | None = None) -> Any:
    """The process group of ``group``: itself, or for a ``DeviceMesh`` its ``mesh_dim`` group.

    Args:
        group: a process group, None (the world) or a ``torch.distributed.DeviceMesh``.
        mesh_dim: the mesh dimension (name or index); may be left out for a 1-D mesh.

    Raises:
        ValueError: ``mesh_dim`` given without a mesh, or left out for a mesh of 2+ dims.
    """
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(group, DeviceMesh):
        if mesh_dim is not None:
            raise ValueError(f"mesh_dim={mesh_dim!r} needs group to be a DeviceMesh")
        return group
    if mesh_dim is None:
        if group.ndim != 1:
            names = group.mesh_dim_names
            raise ValueError(f"a DeviceMesh of {group.ndim} dims needs mesh_dim (one of {names})")
        return group.get_group()
    return group.get_group(mesh_dim)


def control_group(group: Any = None, *, timeout: float = DEFAULT_TIMEOUT_S) -> Any:
    """The gloo group the layout fallback runs on: ``group`` itself when it is gloo.

    Collective the first time for a non-gloo group: call it on every rank, at start-up.

    Args:
        group: the process group whose ranks are reduced (default: the world).
        timeout: the new gloo group's own timeout, in seconds.
    """
    if _backend(group) == "gloo":
        return group
    key = id(group)
    if key not in _CONTROL_GROUPS:
        ranks = None if group is None else dist.get_process_group_ranks(group)
        _CONTROL_GROUPS[key] = dist.new_group(
            ranks=ranks, backend="gloo", timeout=timedelta(seconds=timeout)
        )
    return _CONTROL_GROUPS[key]


def distributed_summary(
    inspector: RouterInspector,
    *,
    group: Any = None,
    mesh_dim: str | int | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    coactivation: bool = False,
    per_rank: bool = False,
    dst: int = 0,
    expert_parallel: ExpertParallelReducer | None = None,
) -> InspectorSummary:
    """The inspector's summary over all ranks of ``group``.

    Collective: every rank calls it and gets the same summary (the per-rank keys only on
    ``dst``).

    Args:
        inspector: this rank's inspector.
        group: the process group (default: the world), or a ``DeviceMesh``.
        mesh_dim: with a ``DeviceMesh``, the dimension whose group is reduced.
        timeout: seconds to wait for every rank to arrive, whatever the process group's own
            timeout (a finite number > 0).
        coactivation: merge the [E, E] co-activation matrices too (E*E int64 per layer);
            otherwise a layer's ``coactivation`` has ``steps`` 0 and a zero matrix.
        per_rank: gather ``per_rank_counts`` ([world][E]), ``per_rank_tokens`` and
            ``per_rank_steps`` to rank ``dst`` (the only part that grows with the world).
        dst: the global rank that receives the per-rank detail.
        expert_parallel: an ``ExpertParallelLoad`` recorded on this rank: adds each layer's
            ``expert_parallel`` entry and the hot-rank findings (see ``expert_parallel``).

    Raises:
        RuntimeError: torch.distributed is not initialised.
        RankTimeoutError: a rank failed, exited or did not call it within ``timeout`` (on
            every rank that called it, naming the missing ranks), or this rank called it
            after another rank had stopped waiting.
        TypeError, ValueError: ``timeout`` is not a finite number > 0.
        ValueError: ranks recorded a layer with different num_experts or max_k.
    """
    timeout = require_float("timeout", timeout, 0.0, low_open=True)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed_summary needs torch.distributed initialised "
            "(dist.init_process_group); use inspector.summary() in a single process"
        )
    group = resolve_group(group, mesh_dim)
    _check_in(group, timeout)
    config = inspector.config
    local_layout = {n: (s.num_experts, s.max_k) for n, s in inspector.layers.items()}
    layout = _agreed_layout(local_layout, group, timeout)
    states = {
        name: inspector.layers.get(name)
        or LayerState(name, num_experts, max_k, torch.device("cpu"), config)
        for name, (num_experts, max_k) in layout.items()
    }
    records, extras = _reduce_layers(states, group, config, coactivation=coactivation)
    if per_rank:
        _gather_per_rank(states, extras, group, dst)
    summary = summarize(records, config)
    for name, extra in extras.items():
        summary.layers[name].update(extra)
    findings = summary.findings
    if expert_parallel is not None:
        ep_layers, ep_findings = expert_parallel.reduce(group=group, timeout=timeout)
        for name, entry in ep_layers.items():
            summary.layers.setdefault(name, {})["expert_parallel"] = entry
        findings = (*findings, *ep_findings)
    return InspectorSummary(
        layers=summary.layers,
        findings=findings,
        config={**summary.config, "world_size": dist.get_world_size(group)},
    )


def distributed_report(
    inspector: RouterInspector,
    out_dir: str = "moe_devkit_report",
    *,
    group: Any = None,
    mesh_dim: str | int | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    dst: int = 0,
    coactivation: bool = False,
    per_rank: bool = False,
    expert_parallel: ExpertParallelReducer | None = None,
) -> ReportPaths | None:
    """Writes the global report on rank ``dst`` (collective; other ranks return None)."""
    summary = distributed_summary(
        inspector,
        group=group,
        mesh_dim=mesh_dim,
        timeout=timeout,
        coactivation=coactivation,
        per_rank=per_rank,
        dst=dst,
        expert_parallel=expert_parallel,
    )
    if dist.get_rank() != dst:
        return None
    return write_report(summary, out_dir)


# ----------------------------------------------------------------------------- collectives


def _backend(group: Any) -> str:
    return str(dist.get_backend(group)).lower()


def _check_in(group: Any, timeout: float) -> None:
    """Returns once every rank of ``group`` made this call, else raises on every rank.

    A rendezvous on the group's store: each rank's n-th call has the key prefix of call n.
    Each rank marks its arrival and counts itself in; the last to arrive sets the call's
    decision to "go", and a rank whose wait times out sets it to its own rank and timeout
    instead (the call is abandoned). ``compare_set`` makes the first to set it win, so every
    rank sees the same decision.

    Raises:
        RankTimeoutError: a rank did not arrive within ``timeout``, this rank arrived after
            another gave up, or the store failed (the rank hosting it exited).
    """
    store = _group_store(group)
    me, world = dist.get_rank(group), dist.get_world_size(group)
    try:
        call = store.add(f"{_STORE_PREFIX}/calls/{me}", 1)
        key = f"{_STORE_PREFIX}/call/{call}"
        store.set(f"{key}/arrived/{me}", "1")
        if store.add(f"{key}/count", 1) == world:
            decision = _decide(store, key, _GO)
        else:
            decision = _await_decision(store, key, f"{me} {timeout!r}", timeout)
        if decision == _GO:
            return
        missing = [r for r in range(world) if not store.check([f"{key}/arrived/{r}"])]
    except RuntimeError as err:  # DistStoreError, DistNetworkError: the store itself failed
        raise _timeout_error(timeout, err) from err
    raise _abandoned_error(group, me, decision, missing)


def _group_store(group: Any) -> Store:
    """The store the ranks of ``group`` share (a per-group prefix of the world's store)."""
    pg = dist.distributed_c10d._get_default_group() if group is None else group
    return dist.distributed_c10d._get_process_group_store(pg)


def _await_decision(store: Store, key: str, abandon: str, timeout: float) -> str:
    try:
        store.wait([f"{key}/decision"], timedelta(seconds=timeout))
    except RuntimeError:  # timed out; if the store itself failed, _decide raises again
        return _decide(store, key, abandon)
    return bytes(store.get(f"{key}/decision")).decode()


def _decide(store: Store, key: str, value: str) -> str:
    """Sets the call's decision unless one is set; returns the one that holds."""
    return bytes(store.compare_set(f"{key}/decision", "", value)).decode()


def _abandoned_error(group: Any, me: int, decision: str, missing: list[int]) -> RankTimeoutError:
    """The error for a call some rank gave up on; ``decision`` is "<group rank> <timeout>"."""
    by_text, timeout_text = decision.split()
    by, timeout = int(by_text), float(timeout_text)
    who = "this rank" if by == me else f"rank {_global_rank(group, by)}"
    if missing:
        plural = "s" if len(missing) > 1 else ""
        why = f"missing: rank{plural} {', '.join(str(_global_rank(group, r)) for r in missing)}"
        why += "" if by == me else f"; {who} stopped waiting"
    else:
        why = f"{who} stopped waiting before the last rank came"
    return RankTimeoutError(
        f"rank {dist.get_rank()} of {dist.get_world_size()}: not every rank reached the "
        f"inspector's reduction within {timeout:g} s ({why}); a rank failed, exited or did "
        f"not call distributed_summary/distributed_report (every rank must call it, the "
        f"same number of times)"
    )


def _global_rank(group: Any, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _timeout_error(timeout: float, err: BaseException) -> RankTimeoutError:
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return RankTimeoutError(
        f"rank {dist.get_rank()} of {dist.get_world_size()}: not every rank reached the "
        f"inspector's reduction within {timeout:g} s; a rank failed, exited or did not call "
        f"distributed_summary/distributed_report (every rank must call it). Backend: {detail}"
    )


def reduction_device(group: Any) -> torch.device:
    """Where a collective's tensors live: the current CUDA device for NCCL, else the CPU."""
    if _backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    """``tensor`` reduced over ``group`` with ``op`` (a copy, back on the host)."""
    out = tensor.to(reduction_device(group), copy=True)
    dist.all_reduce(out, op=op, group=group)
    return out.cpu()


def _layout_hash(layout: dict[str, tuple[int, int]]) -> int:
    digest = hashlib.blake2b(repr(sorted(layout.items())).encode(), digest_size=7).digest()
    return int.from_bytes(digest, "little")  # < 2**56: an int64, and its negation


def _agreed_layout(
    local: dict[str, tuple[int, int]], group: Any, timeout: float
) -> dict[str, tuple[int, int]]:
    """Layer name -> (E, K), sorted by name: this rank's when all agree (one 16-byte
    all_reduce), else the union of the gathered layouts."""
    mine = _layout_hash(local)
    both = all_reduce(torch.tensor([mine, -mine], dtype=torch.int64), dist.ReduceOp.MAX, group)
    if int(both[0]) == mine and -int(both[1]) == mine:
        return dict(sorted(local.items()))
    out: list[Any] = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(out, local, group=control_group(group, timeout=timeout))
    except RuntimeError as err:
        raise _timeout_error(timeout, err) from err
    layout: dict[str, tuple[int, int]] = {}
    for rank, layers in enumerate(out):
        for name, shape in layers.items():
            shape = tuple(shape)
            if layout.setdefault(name, shape) != shape:
                raise ValueError(
                    f"layer {name!r} must have the same num_experts and max_k on every rank; "
                    f"got (num_experts, max_k)={layout[name]} on one rank and {shape} on "
                    f"rank {rank}"
                )
    return dict(sorted(layout.items()))


# ----------------------------------------------------------------------------- reductions


class _Buffer:
    """Parts of many layers packed into one flat tensor for one reduction."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.parts: list[torch.Tensor] = []
        self.keys: list[tuple[str, str]] = []
        self.shapes: list[torch.Size] = []

    def add(self, layer: str, key: str, value: torch.Tensor) -> None:
        self.parts.append(value.detach().cpu().to(self.dtype).reshape(-1))
        self.keys.append((layer, key))
        self.shapes.append(value.shape)

    def reduce(self, op: Any, group: Any) -> dict[tuple[str, str], torch.Tensor]:
        flat = torch.cat(self.parts) if self.parts else torch.zeros(0, dtype=self.dtype)
        out = all_reduce(flat, op, group)
        sizes = [p.numel() for p in self.parts]
        chunks = torch.split(out, sizes)
        return {k: c.reshape(s) for k, c, s in zip(self.keys, chunks, self.shapes, strict=True)}


_ABSENT = "absent"


def _steps_hash(steps: tuple[int, ...] | str) -> int:
    digest = hashlib.blake2b(repr(steps).encode(), digest_size=7).digest()
    return int.from_bytes(digest, "little")


def _reduce_layers(
    states: dict[str, LayerState], group: Any, config: InspectorConfig, *, coactivation: bool
) -> tuple[list[LayerRecord], dict[str, dict[str, Any]]]:
    """Merged records and the per-layer extras (``rank_imbalance``), by reductions only."""
    world, me = dist.get_world_size(group), dist.get_rank(group)
    sums_i, sums_f = _Buffer(torch.int64), _Buffer(torch.float64)
    max_i, max_f = _Buffer(torch.int64), _Buffer(torch.float64)
    local: dict[str, tuple[LayerRecord, _Sketch]] = {}
    for name, state in states.items():
        record = state.host_state()  # synchronises this rank's device once
        ran = record.steps > 0 or bool(record.counts.sum())
        sketch = _Sketch.of(state, config.reservoir_size, me)
        local[name] = (record, sketch)
        sums_i.add(name, "counts", record.counts)
        selected = record.counts if record.selected is None else record.selected
        sums_i.add(name, "selected", selected)
        sums_i.add(name, "joint", record.joint)
        sums_i.add(name, "scalars", torch.tensor([record.dropped, record.steps]))
        if coactivation:
            sums_i.add(name, "coactivation", record.coactivation.round())
        sums_f.add(name, "loss_sums", record.loss_sums)
        sums_f.add(name, "sums", state.stats.sums)
        snapshots = torch.zeros(config.max_windows, state.num_experts + state.max_k + 2)
        snapshots[: record.snapshots.shape[0]] = record.snapshots
        sums_f.add(name, "snapshots", snapshots)
        h = _steps_hash(record.snapshot_steps if ran else _ABSENT)
        tokens = int(record.joint.sum())
        max_i.add(name, "windows", torch.tensor([h, -h, tokens]))
        start, end = record.time_range
        neg_inf = -math.inf
        times = [neg_inf if start is None else -start, neg_inf if end is None else end]
        max_f.add(name, "extrema", torch.tensor([-record.extrema[0], record.extrema[1], *times]))
        max_f.add(name, "keys", -sketch.keys)
    got = {
        **sums_i.reduce(dist.ReduceOp.SUM, group),
        **sums_f.reduce(dist.ReduceOp.SUM, group),
    }
    peaks = {**max_i.reduce(dist.ReduceOp.MAX, group), **max_f.reduce(dist.ReduceOp.MAX, group)}
    samples = _merge_sketches(
        {n: s for n, (_, s) in local.items()},
        {n: -peaks[n, "keys"] for n in local},
        group,
        me,
        world,
    )
    records: list[LayerRecord] = []
    extras: dict[str, dict[str, Any]] = {}
    for name, (record, _) in local.items():
        state = states[name]
        num_experts, max_k = state.num_experts, state.max_k
        dropped, steps = (int(v) for v in got[name, "scalars"])
        h, neg_h, peak_tokens = (int(v) for v in peaks[name, "windows"])
        ran = record.steps > 0 or bool(record.counts.sum())
        same_windows = h == -neg_h and h == _steps_hash(record.snapshot_steps if ran else _ABSENT)
        snapshot_steps = record.snapshot_steps if same_windows and ran else ()
        snapshots = got[name, "snapshots"][: len(snapshot_steps)]
        ext = peaks[name, "extrema"]
        start, end = float(-ext[2]), float(ext[3])
        comp, ks = samples[name]
        every = config.coactivation_every if coactivation else 0
        records.append(
            LayerRecord(
                name=name,
                num_experts=num_experts,
                max_k=max_k,
                steps=steps,
                time_range=(
                    start if math.isfinite(start) else None,
                    end if math.isfinite(end) else None,
                ),
                counts=got[name, "counts"],
                selected=got[name, "selected"],
                joint=got[name, "joint"],
                dropped=dropped,
                loss_sums=got[name, "loss_sums"],
                moments=moments_from_sums(got[name, "sums"]),
                extrema=torch.stack([-ext[0], ext[1]]),
                coactivation=(
                    got[name, "coactivation"].double()
                    if coactivation
                    else torch.zeros(num_experts, num_experts, dtype=torch.float64)
                ),
                coactivation_steps=coactivation_steps(steps, every),
                snapshots=snapshots,
                snapshot_steps=snapshot_steps,
                sample_complexity=comp,
                sample_k=ks,
            )
        )
        total = int(got[name, "joint"].sum())
        extras[name] = {"rank_imbalance": _imbalance(peak_tokens, total, world)}
    return records, extras


class _Sketch:
    """One rank's reservoir as a bucketed sketch: per bucket the sample of smallest race key.

    Each sample gets a fresh uniform ``u`` from a hash of its reservoir key and the rank (the
    ranks' keys come from the same counter-based hash, so they repeat across ranks), a
    bucket from the same hash, and the race key ``-log(u) / w`` with ``w`` the tokens the
    sample stands for (tokens offered to this rank's reservoir over its samples): over the
    ranks, a bucket's winner is a given sample with probability ``w / sum of w`` in the
    bucket (exponential races), so each rank is represented in proportion to its tokens.
    """

    def __init__(self, keys: torch.Tensor, complexity: torch.Tensor, k: torch.Tensor) -> None:
        self.keys, self.complexity, self.k = keys, complexity, k

    @classmethod
    def of(cls, state: LayerState, buckets: int, rank: int) -> _Sketch:
        stats = state.stats
        keys = stats.res_keys.detach().float().cpu()
        comp = stats.res_complexity.detach().float().cpu()
        k = stats.res_k.detach().cpu()
        valid = (k >= 0) & torch.isfinite(keys)
        keys, comp, k = keys[valid], comp[valid], k[valid]
        weight = float(stats.tokens_seen) / max(keys.numel(), 1)
        bits = keys.numpy().view(np.uint32).astype(np.uint64) | (np.uint64(rank) << np.uint64(32))
        mixed = _splitmix64(bits)
        u = ((mixed >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
        race = torch.from_numpy(-np.log(u) / max(weight, 1e-300))
        bucket = torch.from_numpy((mixed % np.uint64(buckets)).astype(np.int64))
        best = torch.full((buckets,), math.inf, dtype=torch.float64)
        best = best.scatter_reduce(0, bucket, race, reduce="amin")
        win = race == best[bucket]
        out_comp = torch.zeros(buckets)
        out_k = torch.full((buckets,), -1, dtype=torch.int64)
        out_comp[bucket[win]] = comp[win]
        out_k[bucket[win]] = k[win]
        return cls(best, out_comp, out_k)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Steele, Lea and Flood's SplitMix64 finaliser (uint64, wrapping)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        out: np.ndarray = z ^ (z >> np.uint64(31))
        return out


def _merge_sketches(
    sketches: dict[str, _Sketch],
    minima: dict[str, torch.Tensor],
    group: Any,
    me: int,
    world: int,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer the merged (complexity float32, k int64) sample: each bucket's winner."""
    claim = _Buffer(torch.int64)
    for name, sketch in sketches.items():
        mine = (sketch.keys == minima[name]) & torch.isfinite(minima[name])
        claim.add(name, "rank", torch.where(mine, -me, -world))  # MAX: the smallest rank
    winners = claim.reduce(dist.ReduceOp.MAX, group)
    values = _Buffer(torch.float64)
    for name, sketch in sketches.items():
        won = -winners[name, "rank"] == me
        both = torch.stack([sketch.complexity.double(), sketch.k.double() + 1])
        values.add(name, "values", torch.where(won, both, 0.0))
    merged = values.reduce(dist.ReduceOp.SUM, group)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in sketches:
        comp, k_plus = merged[name, "values"]
        valid = (-winners[name, "rank"] < world) & (k_plus > 0)
        out[name] = (comp[valid].float(), (k_plus[valid] - 1).round().long())
    return out


def _gather_per_rank(
    states: dict[str, LayerState], extras: dict[str, dict[str, Any]], group: Any, dst: int
) -> None:
    """Adds ``per_rank_counts``, ``per_rank_tokens``, ``per_rank_steps`` on rank ``dst``."""
    parts = []
    for state in states.values():
        record = state.host_state()
        parts.append(record.counts.long())
        parts.append(torch.tensor([int(record.joint.sum()), record.steps]))
    device = reduction_device(group)
    flat = (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)).to(device)
    world = dist.get_world_size(group)
    receiving = dist.get_rank() == dst
    rows = [torch.empty_like(flat) for _ in range(world)] if receiving else None
    dist.gather(flat, rows, dst=dst, group=group)
    if rows is None:
        return
    table = torch.stack(rows).cpu()
    offset = 0
    for name, state in states.items():
        width = state.num_experts
        counts = table[:, offset : offset + width]
        tokens, steps = table[:, offset + width], table[:, offset + width + 1]
        offset += width + 2
        extras[name].update(
            per_rank_counts=counts.tolist(),
            per_rank_tokens=tokens.tolist(),
            per_rank_steps=steps.tolist(),
        )


def _imbalance(peak: int, total: int, world: int) -> float:
    return float(peak * world / total) if total > 0 else math.nan


def rank_imbalance(per_rank_tokens: list[int]) -> float:
    """Max over mean tokens per rank (1.0 = balanced; NaN when no rank saw a token)."""
    tokens = np.asarray(per_rank_tokens, dtype=np.float64)
    mean = tokens.mean() if tokens.size else 0.0
    return float(tokens.max() / mean) if mean > 0 else math.nan
