"""Global routing statistics over torch.distributed ranks, reduced at summary time only.

Each rank's ``RouterInspector`` keeps its statistics on its own device and never talks to
the other ranks while training. ``distributed_summary`` (a collective: every rank calls it)
first checks in with every rank through the process group's store, with its own timeout, so
a rank that failed, exited or never calls it gives ``RankTimeoutError`` on the others within
``timeout`` seconds whatever the process group's own timeout, instead of a hang; then it
gathers every rank's statistics in one ``all_gather`` and merges them on the host:

* counts (executed and selected), k/complexity histogram, drops, loss sums, co-activation
  and steps are summed;
* complexity mean and variance are merged with Chan et al.'s parallel formula, extrema by
  min/max; trend windows are summed when all ranks took the same steps (else omitted);
* the reservoir keeps the smallest keys of all ranks' samples.

Each layer of the result carries ``per_rank_counts`` (E counts per rank), ``per_rank_tokens``,
``per_rank_steps`` and ``rank_imbalance`` (max over mean tokens per rank): the per-rank load.
A rank that recorded no decision for a layer contributes zeros to it.

The check-in is a rendezvous on the group's store, not a collective, so the ranks that give
up leave their process group usable. Calls are matched by count (each rank's n-th call meets
the others' n-th), and each call has one decision that every rank reads (all arrived, or a
rank gave up), so a rank that arrives after the others gave up raises at once instead of
entering the collectives alone.

With NCCL, the data goes through the NCCL group (tensors on the rank's current CUDA device)
and the layer metadata through a gloo group created from it; create that group at start-up
with ``control_group()`` while every rank is alive (creating a group is itself collective).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import Store

from moe_devkit._checks import require_float
from moe_devkit.inspect.config import InspectorConfig
from moe_devkit.inspect.inspector import RouterInspector
from moe_devkit.inspect.records import LayerRecord
from moe_devkit.inspect.report import ReportPaths, write_report
from moe_devkit.inspect.state import LayerState, coactivation_steps
from moe_devkit.inspect.summary import InspectorSummary, summarize

DEFAULT_TIMEOUT_S = 60.0
_STORE_PREFIX = "moe_devkit/distributed_summary"
_GO = "go"

_CONTROL_GROUPS: dict[int, Any] = {}


class RankTimeoutError(RuntimeError):
    """Some rank did not reach the inspector's reduction within the timeout."""


def control_group(group: Any = None, *, timeout: float = DEFAULT_TIMEOUT_S) -> Any:
    """The gloo group the layer metadata is gathered on: ``group`` itself when it is gloo.

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
    inspector: RouterInspector, *, group: Any = None, timeout: float = DEFAULT_TIMEOUT_S
) -> InspectorSummary:
    """The inspector's summary over all ranks of ``group``, with the per-rank load.

    Collective: every rank calls it and gets the same summary.

    Args:
        inspector: this rank's inspector.
        group: the process group (default: the world).
        timeout: seconds to wait for every rank to arrive, whatever the process group's own
            timeout (a finite number > 0).

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
    _check_in(group, timeout)
    control = control_group(group, timeout=timeout)
    config = inspector.config
    local = {name: _local_layer(state) for name, state in inspector.layers.items()}
    metas = _all_gather_object({n: v.meta for n, v in local.items()}, control, timeout)
    layout = _layout(metas)
    world = len(metas)
    gathered = _all_gather_tensor(_pack(local, layout, config), group, world)
    records: list[LayerRecord] = []
    per_rank: dict[str, dict[str, Any]] = {}
    offset = 0
    for name, (num_experts, max_k) in layout.items():
        size = _packed_size(num_experts, max_k, config)
        rows = gathered[:, offset : offset + size]
        offset += size
        record, per_rank[name] = _merge(name, rows, metas, num_experts, max_k, config)
        records.append(record)
    summary = summarize(records, config)
    for name, extra in per_rank.items():
        summary.layers[name].update(extra)
    return InspectorSummary(
        layers=summary.layers,
        findings=summary.findings,
        config={**summary.config, "world_size": world},
    )


def distributed_report(
    inspector: RouterInspector,
    out_dir: str = "moe_devkit_report",
    *,
    group: Any = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    dst: int = 0,
) -> ReportPaths | None:
    """Writes the global report on rank ``dst`` (collective; other ranks return None)."""
    summary = distributed_summary(inspector, group=group, timeout=timeout)
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


def _all_gather_object(obj: Any, control: Any, timeout: float) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size(control)
    try:
        dist.all_gather_object(out, obj, group=control)
    except RuntimeError as err:
        raise _timeout_error(timeout, err) from err
    return out


def _all_gather_tensor(packed: torch.Tensor, group: Any, world: int) -> torch.Tensor:
    """[world, L] float64 on the host; on the current CUDA device in between for NCCL."""
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if _backend(group) == "nccl"
        else torch.device("cpu")
    )
    packed = packed.to(device)
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed, group=group)
    return torch.stack(parts).cpu()


# ----------------------------------------------------------------------------- pack / merge


@dataclass(frozen=True)
class _LayerMeta:
    """What the ranks tell each other of one layer, beside its packed statistics."""

    num_experts: int
    max_k: int
    steps: int
    snapshot_steps: tuple[int, ...]
    time_range: tuple[float | None, float | None]


@dataclass(frozen=True)
class _LocalLayer:
    """One layer of this rank: its metadata, host statistics and raw reservoir."""

    meta: _LayerMeta
    record: LayerRecord
    reservoir: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # keys, complexity, k


def _local_layer(state: LayerState) -> _LocalLayer:
    record = state.host_state()  # synchronises this rank's device once
    meta = _LayerMeta(
        num_experts=state.num_experts,
        max_k=state.max_k,
        steps=record.steps,
        snapshot_steps=record.snapshot_steps,
        time_range=record.time_range,
    )
    stats = state.stats
    reservoir = (stats.res_keys.cpu(), stats.res_complexity.cpu(), stats.res_k.cpu())
    return _LocalLayer(meta=meta, record=record, reservoir=reservoir)


def _layout(metas: list[dict[str, _LayerMeta]]) -> dict[str, tuple[int, int]]:
    """Layer name -> (E, K) over the union of all ranks' layers, sorted by name."""
    layout: dict[str, tuple[int, int]] = {}
    for rank, layers in enumerate(metas):
        for name, meta in layers.items():
            shape = (meta.num_experts, meta.max_k)
            if layout.setdefault(name, shape) != shape:
                raise ValueError(
                    f"layer {name!r} must have the same num_experts and max_k on every rank; "
                    f"got (num_experts, max_k)={layout[name]} on one rank and {shape} on "
                    f"rank {rank}"
                )
    return dict(sorted(layout.items()))


def _part_sizes(num_experts: int, max_k: int, config: InspectorConfig) -> list[int]:
    """The sizes of the packed parts of one layer, in ``_pack``'s order."""
    kk, reservoir = max_k + 1, config.reservoir_size
    return [
        num_experts,  # counts
        num_experts,  # selected
        (config.complexity_bins + 1) * kk,  # joint
        1, 2, 3, 2,  # dropped, loss sums, moments, extrema
        num_experts * num_experts,  # co-activation
        config.max_windows * (num_experts + kk + 1),  # snapshots
        reservoir, reservoir, reservoir,  # keys, complexity, k
    ]  # fmt: skip


def _packed_size(num_experts: int, max_k: int, config: InspectorConfig) -> int:
    return sum(_part_sizes(num_experts, max_k, config))


def _pack(
    local: dict[str, _LocalLayer], layout: dict[str, tuple[int, int]], config: InspectorConfig
) -> torch.Tensor:
    chunks: list[torch.Tensor] = []
    for name, (num_experts, max_k) in layout.items():
        if name not in local:  # this rank never ran the layer: zeros, empty reservoir
            empty = LayerState(name, num_experts, max_k, torch.device("cpu"), config)
            local = {**local, name: _local_layer(empty)}
        record, (keys, comp, ks) = local[name].record, local[name].reservoir
        width = num_experts + max_k + 2
        snapshots = torch.zeros(config.max_windows, width, dtype=torch.float64)
        snapshots[: record.snapshots.shape[0]] = record.snapshots
        selected = record.counts if record.selected is None else record.selected
        parts = [
            record.counts, selected, record.joint, torch.tensor([record.dropped]), record.loss_sums,
            record.moments, record.extrema, record.coactivation, snapshots, keys, comp, ks,
        ]  # fmt: skip
        chunks.extend(p.reshape(-1).double() for p in parts)
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.float64)


def _merge(
    name: str,
    rows: torch.Tensor,
    metas: list[dict[str, _LayerMeta]],
    num_experts: int,
    max_k: int,
    config: InspectorConfig,
) -> tuple[LayerRecord, dict[str, Any]]:
    """One layer's [world, L] packed statistics -> its merged record and the per-rank load."""
    parts = torch.split(rows, _part_sizes(num_experts, max_k, config), dim=1)
    counts, selected, joint, dropped, losses, moments, extrema, coact, snaps, keys, comp, ks = parts
    here = [m.get(name) for m in metas]
    steps = [0 if m is None else m.steps for m in here]
    windows = {None if m is None else m.snapshot_steps for m in here}
    first = here[0]  # trend windows are kept when every rank took the same steps
    snapshot_steps = first.snapshot_steps if first is not None and len(windows) == 1 else ()
    snapshots = snaps.sum(0).reshape(config.max_windows, -1)[: len(snapshot_steps)]
    keep = torch.topk(keys.reshape(-1), config.reservoir_size, largest=False, sorted=False).indices
    sample_k = ks.reshape(-1)[keep].long()
    valid = sample_k >= 0
    record = LayerRecord(
        name=name,
        num_experts=num_experts,
        max_k=max_k,
        steps=sum(steps),
        time_range=_time_range(here),
        counts=counts.sum(0).round().long(),
        selected=selected.sum(0).round().long(),
        joint=joint.sum(0).round().long().reshape(config.complexity_bins + 1, max_k + 1),
        dropped=int(dropped.sum().round().long()),
        loss_sums=losses.sum(0),
        moments=_chan_merge(moments),
        extrema=torch.stack([extrema[:, 0].min(), extrema[:, 1].max()]),
        coactivation=coact.sum(0).reshape(num_experts, num_experts),
        coactivation_steps=coactivation_steps(sum(steps), config.coactivation_every),
        snapshots=snapshots,
        snapshot_steps=snapshot_steps,
        sample_complexity=comp.reshape(-1)[keep].float()[valid],
        sample_k=sample_k[valid],
    )
    tokens = joint.sum(1).round().long().tolist()
    extra: dict[str, Any] = {
        "per_rank_counts": counts.round().long().tolist(),
        "per_rank_tokens": tokens,
        "per_rank_steps": steps,
        "rank_imbalance": rank_imbalance(tokens),
    }
    return record, extra


def _chan_merge(moments: torch.Tensor) -> torch.Tensor:
    """Merges per-rank (n, mean, M2) rows into one (Chan, Golub and LeVeque 1979)."""
    n, mean, m2 = 0.0, 0.0, 0.0
    for n_b, mean_b, m2_b in moments.tolist():
        if n_b <= 0:
            continue
        total = n + n_b
        delta = mean_b - mean
        mean += delta * n_b / total
        m2 += m2_b + delta * delta * n * n_b / total
        n = total
    return torch.tensor([n, mean, m2], dtype=torch.float64)


def _time_range(metas: list[_LayerMeta | None]) -> tuple[float | None, float | None]:
    starts = [m.time_range[0] for m in metas if m and m.time_range[0] is not None]
    ends = [m.time_range[1] for m in metas if m and m.time_range[1] is not None]
    return (min(starts, default=None), max(ends, default=None))


def rank_imbalance(per_rank_tokens: list[int]) -> float:
    """Max over mean tokens per rank (1.0 = balanced; NaN when no rank saw a token)."""
    tokens = np.asarray(per_rank_tokens, dtype=np.float64)
    mean = tokens.mean() if tokens.size else 0.0
    return float(tokens.max() / mean) if mean > 0 else math.nan
