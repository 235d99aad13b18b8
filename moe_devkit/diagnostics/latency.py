"""Inference latency: timing done right, a scheduled torch.profiler run, per-stage breakdown.

``profile_inference_latency`` times the model first and profiles it afterwards. Timing inside
the profiler measures the profiler's overhead too, ``time.time()`` is too coarse for short
calls, and on CUDA a call returns before its kernels finish, so unsynchronised wall times
measure kernel launches, not the work. Timing and profiling are therefore separate runs:

* timing: warm-up, then per-iteration times (CUDA events on CUDA, ``perf_counter`` with the
  thread's CPU time on CPU), summarised as a ``Measurement`` (median, p10/p90/p99);
* profiling: ``torch.profiler`` with a wait/warm-up/active schedule, a Chrome trace written
  atomically (opens in Perfetto), top operators by device time (CPU time on CPU), and the
  time per routing stage from the router's ``moe.*`` ``record_function`` spans.

``compare_dynamic_static`` times a dynamic and a static MoELayer of the same max_k and
reports the time per active token-expert pair; ``judge_dynamic_static`` decides from the
per-iteration times whether the dynamic layer is clearly slower than its active pairs allow
(the ``dynamic-slower-than-static`` finding).

The pieces live in their own modules and are re-exported here: ``measure``,
``measure_in_turns`` and ``Measurement`` in ``latency_timing``, the profiler run and stage
breakdown in ``latency_profiler``, the dynamic-vs-static comparison in ``latency_compare``
and its verdict in ``latency_verdict``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moe_devkit._checks import require_int
from moe_devkit.diagnostics.latency_compare import (
    DynamicStaticComparison,
    active_pairs,
    compare_dynamic_static,
)
from moe_devkit.diagnostics.latency_profiler import (
    OpTime,
    ProfileResult,
    StageTime,
    profile_steps,
    stage_times,
    top_operators,
)
from moe_devkit.diagnostics.latency_timing import Measurement, Timer, measure, measure_in_turns
from moe_devkit.diagnostics.latency_verdict import DynamicStaticVerdict, judge_dynamic_static

__all__ = [
    "DynamicStaticComparison",
    "DynamicStaticVerdict",
    "LatencyProfile",
    "Measurement",
    "OpTime",
    "ProfileResult",
    "StageTime",
    "Timer",
    "active_pairs",
    "compare_dynamic_static",
    "judge_dynamic_static",
    "latency_section",
    "measure",
    "measure_in_turns",
    "profile_inference_latency",
    "profile_steps",
    "stage_times",
    "top_operators",
]


def _device_of(inputs: object) -> torch.device:
    if isinstance(inputs, torch.Tensor):
        return inputs.device
    if isinstance(inputs, list | tuple):
        for item in inputs:
            if isinstance(item, torch.Tensor):
                return item.device
    return torch.device("cpu")


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
    require_int("profile_active", profile_active, 1)  # now, not after the timing run
    require_int("top", top, 0)
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


def latency_section(
    profile: LatencyProfile | None = None,
    comparison: DynamicStaticComparison | None = None,
    verdict: DynamicStaticVerdict | None = None,
) -> dict[str, Any]:
    """The report's ``latency`` section (see ``moe_devkit.reporting.make_report``)."""
    section: dict[str, Any] = {}
    if profile is not None:
        section.update(profile.to_dict())
    if comparison is not None:
        section["dynamic_vs_static"] = comparison.to_dict()
    if verdict is not None:
        section["dynamic_vs_static_verdict"] = verdict.to_dict()
    return section
