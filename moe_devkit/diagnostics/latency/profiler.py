"""Scheduled ``torch.profiler`` runs: top operators, per-stage times, Chrome trace.

``profile_steps`` records a wait/warm-up/active schedule and writes the trace atomically;
``stage_times`` reads the router's ``moe.*`` ``record_function`` spans and ``top_operators``
ranks operators by self time (device time on CUDA, CPU time on CPU).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moe_devkit._checks import require_int
from moe_devkit.routers.torch_router import STAGES, span_name


@dataclass(frozen=True, kw_only=True)
class OpTime:
    """One operator of the profile; times in seconds per profiled step.

    Attributes:
        name: operator (e.g. "aten::mm") or kernel name.
        calls: calls per step.
        self_time: time in the operator itself (device time on CUDA, CPU time on CPU).
        total_time: time including children.
    """

    name: str
    calls: float
    self_time: float
    total_time: float


@dataclass(frozen=True, kw_only=True)
class StageTime:
    """Time of one routing stage (``moe.<stage>`` span) per profiled step.

    Attributes:
        stage: "complexity", "gating", "select_k", "dispatch", "experts" or "combine".
        time: seconds per step (device time on CUDA, CPU time on CPU), inclusive.
        share: time / sum of the stage times.
        calls: span entries per step (one per MoE layer).
    """

    stage: str
    time: float
    share: float
    calls: float


@dataclass(frozen=True, kw_only=True)
class ProfileResult:
    """What the scheduled profiler run found.

    Attributes:
        steps: active (recorded) steps.
        time_basis: "device" (CUDA kernel time) or "cpu".
        stages: one StageTime per stage seen, in STAGES order.
        top_ops: operators by self time, largest first.
        trace_path: the Chrome trace, if one was written.
    """

    steps: int
    time_basis: str
    stages: tuple[StageTime, ...]
    top_ops: tuple[OpTime, ...]
    trace_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _export_trace_atomic(prof: torch.profiler.profile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        prof.export_chrome_trace(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def profile_steps(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    wait: int = 1,
    warmup: int = 2,
    active: int = 3,
    trace_path: str | os.PathLike[str] | None = None,
    top: int = 10,
) -> ProfileResult:
    """Runs ``fn`` under a scheduled torch.profiler and summarises the active steps.

    Args:
        fn: one step (e.g. a forward pass).
        device: where fn runs; on CUDA the CUDA activity is recorded and device time used.
        wait, warmup, active: the profiler schedule (steps skipped, warmed, recorded).
        trace_path: write a Chrome trace here (atomically) if given.
        top: number of operators in ``top_ops``.
    """
    for name, value, minimum in (("wait", wait, 0), ("warmup", warmup, 0), ("active", active, 1)):
        require_int(name, value, minimum)
    require_int("top", top, 0)
    dev = torch.device(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1)
    target = Path(trace_path) if trace_path is not None else None

    def on_ready(prof: torch.profiler.profile) -> None:
        if target is not None:
            _export_trace_atomic(prof, target)

    with torch.profiler.profile(
        activities=activities, schedule=schedule, on_trace_ready=on_ready, record_shapes=False
    ) as prof:
        for _ in range(wait + warmup + active):
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            prof.step()
    events = prof.key_averages()
    basis = "device" if dev.type == "cuda" else "cpu"
    return ProfileResult(
        steps=active,
        time_basis=basis,
        stages=stage_times(events, active, basis),
        top_ops=top_operators(events, active, basis, top),
        trace_path=str(target) if target is not None else None,
    )


def _times(event: Any, basis: str) -> tuple[float, float]:
    """(self, total) microseconds of a key_averages entry on the chosen basis."""
    if basis == "device":
        return float(event.self_device_time_total), float(event.device_time_total)
    return float(event.self_cpu_time_total), float(event.cpu_time_total)


def stage_times(events: Sequence[Any], steps: int, basis: str) -> tuple[StageTime, ...]:
    """Per-stage time per step from the ``moe.*`` spans of ``prof.key_averages()``."""
    by_key = {str(e.key): e for e in events}
    found = [(s, by_key[span_name(s)]) for s in STAGES if span_name(s) in by_key]
    totals = [_times(e, basis)[1] / 1e6 / steps for _, e in found]
    whole = sum(totals)
    return tuple(
        StageTime(
            stage=s, time=t, share=t / whole if whole > 0 else math.nan, calls=e.count / steps
        )
        for (s, e), t in zip(found, totals, strict=True)
    )


def top_operators(events: Sequence[Any], steps: int, basis: str, top: int) -> tuple[OpTime, ...]:
    """The ``top`` operators by self time (spans and profiler steps left out)."""
    rows = []
    for e in events:
        key = str(e.key)
        if key.startswith(("moe.", "ProfilerStep")):
            continue
        self_us, total_us = _times(e, basis)
        rows.append(OpTime(
            name=key, calls=e.count / steps, self_time=self_us / 1e6 / steps,
            total_time=total_us / 1e6 / steps,
        ))  # fmt: skip
    rows.sort(key=lambda r: r.self_time, reverse=True)
    return tuple(rows[:top])
