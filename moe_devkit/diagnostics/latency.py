"""Inference latency: timing done right, a scheduled torch.profiler run, per-stage breakdown.

The seed's ``profile_inference_latency`` timed 100 calls inside the profiler (so it timed the
profiler's overhead too) with ``time.time()`` and, on CUDA, without synchronising per call.
Here timing and profiling are separate runs:

* timing: warm-up, then per-iteration times (CUDA events on CUDA, ``perf_counter`` with the
  thread's CPU time on CPU), summarised as a ``Measurement`` (median, p10/p90/p99);
* profiling: ``torch.profiler`` with a wait/warm-up/active schedule, a Chrome trace written
  atomically (opens in Perfetto), top operators by device time (CPU time on CPU), and the
  time per routing stage from the router's ``moe.*`` ``record_function`` spans.

``compare_dynamic_static`` times a dynamic and a static MoELayer of the same max_k and
reports the time per active token-expert pair.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_devkit.routers.torch_router import STAGES, span_name

Timer = Callable[[], float]


@dataclass(frozen=True, kw_only=True)
class Measurement:
    """Timing summary of many iterations of one call; times in seconds per call.

    Attributes:
        name: what was measured.
        device: "cpu", "cuda:0", ...
        n: iterations measured (after warm-up).
        median, mean, p10, p90, p99, min: wall (CPU) or CUDA-event (GPU) times per call.
        cpu_median: median thread CPU time per call (host-side work on CUDA).
        method: "perf_counter" or "cuda_events".
    """

    name: str
    device: str
    n: int
    median: float
    mean: float
    p10: float
    p90: float
    p99: float
    min: float
    cpu_median: float
    method: str

    @classmethod
    def from_times(
        cls, name: str, device: str, times: Sequence[float], cpu_times: Sequence[float],
        method: str,
    ) -> Measurement:  # fmt: skip
        """Summarises per-iteration times (seconds)."""
        if not times:
            raise ValueError(f"times must hold at least one value; got none for {name!r}")
        t = np.asarray(times, dtype=np.float64)
        p10, p50, p90, p99 = np.percentile(t, [10, 50, 90, 99])
        cpu = float(np.median(cpu_times)) if cpu_times else math.nan
        return cls(
            name=name, device=device, n=len(t), median=float(p50), mean=float(t.mean()),
            p10=float(p10), p90=float(p90), p99=float(p99), min=float(t.min()),
            cpu_median=cpu, method=method,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        return cls(**data)


def _device_of(inputs: object) -> torch.device:
    if isinstance(inputs, torch.Tensor):
        return inputs.device
    if isinstance(inputs, list | tuple):
        for item in inputs:
            if isinstance(item, torch.Tensor):
                return item.device
    return torch.device("cpu")


def measure(
    fn: Callable[[], object],
    *,
    name: str = "call",
    device: torch.device | str = "cpu",
    warmup: int = 10,
    iterations: int = 100,
    timer: Timer = time.perf_counter,
    cpu_timer: Timer = time.thread_time,
) -> Measurement:
    """Times ``fn`` per iteration after a warm-up.

    On CUDA each iteration is timed with a pair of CUDA events (device time, no host sync
    inside the loop) and the stream is synchronised once at the end; on CPU with ``timer``.

    Args:
        fn: the call to time (run under the caller's grad mode).
        name: label of the Measurement.
        device: where fn runs; selects the timing method.
        warmup: untimed calls first (allocator, caches, lazy init, autotuning).
        iterations: timed calls.
        timer, cpu_timer: wall and thread-CPU clocks (injectable for tests).

    Raises:
        ValueError: iterations < 1 or warmup < 0.
    """
    if iterations < 1 or warmup < 0:
        raise ValueError(f"need iterations >= 1, warmup >= 0; got {iterations}, {warmup}")
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    if dev.type == "cuda":
        return _measure_cuda(fn, name, dev, iterations, cpu_timer)
    times, cpu_times = [], []
    for _ in range(iterations):
        wall0, cpu0 = timer(), cpu_timer()
        fn()
        wall1, cpu1 = timer(), cpu_timer()
        times.append(wall1 - wall0)
        cpu_times.append(cpu1 - cpu0)
    return Measurement.from_times(name, str(dev), times, cpu_times, "perf_counter")


def _measure_cuda(
    fn: Callable[[], object], name: str, dev: torch.device, iterations: int, cpu_timer: Timer
) -> Measurement:
    torch.cuda.synchronize(dev)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iterations)]  # type: ignore[no-untyped-call]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iterations)]  # type: ignore[no-untyped-call]
    cpu_times = []
    for start, end in zip(starts, ends, strict=True):
        cpu0 = cpu_timer()
        start.record()
        fn()
        end.record()
        cpu_times.append(cpu_timer() - cpu0)
    torch.cuda.synchronize(dev)
    times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends, strict=True)]  # ms -> s
    return Measurement.from_times(name, str(dev), times, cpu_times, "cuda_events")


# ----------------------------------------------------------------------------- profiler


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


# ----------------------------------------------------------------------------- entry points


@dataclass(frozen=True, kw_only=True)
class LatencyProfile:
    """The result of ``profile_inference_latency``: timing plus profile."""

    measurement: Measurement
    profile: ProfileResult

    def to_dict(self) -> dict[str, Any]:
        return {"measurement": self.measurement.to_dict(), "profile": self.profile.to_dict()}


def profile_inference_latency(
    model: Callable[..., object],
    inputs: object,
    *,
    warmup: int = 10,
    iterations: int = 100,
    profile_active: int = 3,
    trace_path: str | os.PathLike[str] | None = None,
    top: int = 10,
    timer: Timer = time.perf_counter,
    cpu_timer: Timer = time.thread_time,
) -> LatencyProfile:
    """Times ``model(inputs)`` in inference mode, then profiles a few steps.

    Args:
        model: a module or callable; called as ``model(inputs)`` (or ``model(*inputs)``
            when inputs is a tuple) under ``torch.inference_mode()``.
        inputs: a tensor or tuple of tensors; their device selects the timing method.
        warmup, iterations: timing run (see ``measure``).
        profile_active: steps recorded by the profiler.
        trace_path: Chrome trace destination (written atomically) if given.
        top: operators listed.
        timer, cpu_timer: injectable clocks (tests).
    """
    device = _device_of(inputs)
    args = inputs if isinstance(inputs, tuple) else (inputs,)

    def step() -> object:
        with torch.inference_mode():
            return model(*args)

    measurement = measure(
        step, name=type(model).__name__, device=device, warmup=warmup,
        iterations=iterations, timer=timer, cpu_timer=cpu_timer,
    )  # fmt: skip
    profile = profile_steps(
        step, device=device, active=profile_active, trace_path=trace_path, top=top
    )
    return LatencyProfile(measurement=measurement, profile=profile)


@dataclass(frozen=True, kw_only=True)
class DynamicStaticComparison:
    """A dynamic-k and a static top-max_k MoE layer timed on the same input.

    Attributes:
        static, dynamic: their Measurements.
        static_pairs, dynamic_pairs: active token-expert pairs per forward.
        mean_k: dynamic_pairs / tokens.
        time_ratio: dynamic median / static median.
        pairs_ratio: dynamic_pairs / static_pairs; dynamic routing pays off when
            time_ratio approaches pairs_ratio.
        static_per_pair, dynamic_per_pair: median seconds per active pair.
    """

    static: Measurement
    dynamic: Measurement
    static_pairs: int
    dynamic_pairs: int
    mean_k: float
    time_ratio: float
    pairs_ratio: float
    static_per_pair: float
    dynamic_per_pair: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["static"], data["dynamic"] = self.static.to_dict(), self.dynamic.to_dict()
        return data


def active_pairs(layer: Callable[[torch.Tensor], Any], hidden_states: torch.Tensor) -> int:
    """Active token-expert pairs of one forward of a MoELayer (one host sync)."""
    with torch.inference_mode():
        routing = layer(hidden_states).routing
    return int(routing.active.sum())


def compare_dynamic_static(
    dynamic: Callable[[torch.Tensor], Any],
    static: Callable[[torch.Tensor], Any],
    hidden_states: torch.Tensor,
    *,
    warmup: int = 10,
    iterations: int = 50,
    timer: Timer = time.perf_counter,
    cpu_timer: Timer = time.thread_time,
) -> DynamicStaticComparison:
    """Times a dynamic and a static MoELayer (same max_k) on one input, static first.

    Args:
        dynamic, static: MoELayer-like modules returning ``MoEOutput``.
        hidden_states: float[N, D] or float[batch, seq, D] on the layers' device.
        warmup, iterations, timer, cpu_timer: see ``measure``.
    """
    device = hidden_states.device
    tokens = hidden_states.reshape(-1, hidden_states.shape[-1]).shape[0]
    pairs = {"static": active_pairs(static, hidden_states)}
    pairs["dynamic"] = active_pairs(dynamic, hidden_states)

    def timed(layer: Callable[[torch.Tensor], Any], name: str) -> Measurement:
        def step() -> object:
            with torch.inference_mode():
                return layer(hidden_states)

        return measure(
            step, name=name, device=device, warmup=warmup, iterations=iterations,
            timer=timer, cpu_timer=cpu_timer,
        )  # fmt: skip

    static_m, dynamic_m = timed(static, "static"), timed(dynamic, "dynamic")
    return DynamicStaticComparison(
        static=static_m,
        dynamic=dynamic_m,
        static_pairs=pairs["static"],
        dynamic_pairs=pairs["dynamic"],
        mean_k=pairs["dynamic"] / tokens,
        time_ratio=dynamic_m.median / static_m.median,
        pairs_ratio=pairs["dynamic"] / max(pairs["static"], 1),
        static_per_pair=static_m.median / max(pairs["static"], 1),
        dynamic_per_pair=dynamic_m.median / max(pairs["dynamic"], 1),
    )


def latency_section(
    profile: LatencyProfile | None = None, comparison: DynamicStaticComparison | None = None
) -> dict[str, Any]:
    """The report's ``latency`` section (see ``moe_devkit.reporting.make_report``)."""
    section: dict[str, Any] = {}
    if profile is not None:
        section.update(profile.to_dict())
    if comparison is not None:
        section["dynamic_vs_static"] = comparison.to_dict()
    return section
