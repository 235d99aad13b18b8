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

This package's modules, every public name of which is importable from here: ``timing``
(``measure``, ``measure_in_turns``, ``Measurement``), ``profiler`` (the profiler run and the
stage breakdown), ``compare`` (the dynamic-vs-static comparison), ``verdict`` (its rule) and
``inference`` (``profile_inference_latency`` and the report's ``latency`` section).
"""

from __future__ import annotations

from moe_devkit.diagnostics.latency.compare import (
    DynamicStaticComparison,
    active_pairs,
    compare_dynamic_static,
)
from moe_devkit.diagnostics.latency.inference import (
    LatencyProfile,
    latency_section,
    profile_inference_latency,
)
from moe_devkit.diagnostics.latency.profiler import (
    OpTime,
    ProfileResult,
    StageTime,
    profile_steps,
    stage_times,
    top_operators,
)
from moe_devkit.diagnostics.latency.timing import Measurement, Timer, measure, measure_in_turns
from moe_devkit.diagnostics.latency.verdict import DynamicStaticVerdict, judge_dynamic_static

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
