"""``profile_inference_latency``: time a model first, then profile a few steps of it.

Timing inside the profiler measures the profiler's overhead too, ``time.time()`` is too
coarse for short calls, and on CUDA a call returns before its kernels finish, so
unsynchronised wall times measure kernel launches, not the work. Timing (``timing.measure``)
and profiling (``profiler.profile_steps``) are therefore separate runs. ``latency_section``
builds the report's ``latency`` section from the results.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moe_devkit._checks import require_int
from moe_devkit.diagnostics.latency.compare import DynamicStaticComparison
from moe_devkit.diagnostics.latency.profiler import ProfileResult, profile_steps
from moe_devkit.diagnostics.latency.timing import Measurement, Timer, measure
from moe_devkit.diagnostics.latency.verdict import DynamicStaticVerdict

__all__ = ["LatencyProfile", "latency_section", "profile_inference_latency"]


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
