"""Dynamic-k against static top-max_k: both MoE layers timed on one input, per active pair.

``compare_dynamic_static`` counts the active token-expert pairs of each layer and times
both with ``measure``; dynamic routing pays off when the time ratio approaches the pairs
ratio. ``DynamicStaticComparison.verdict`` applies the rule of ``latency.verdict`` to the
paired per-iteration times.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from moe_devkit.diagnostics.latency.timing import Measurement, Timer, measure_in_turns
from moe_devkit.diagnostics.latency.verdict import DynamicStaticVerdict, judge_dynamic_static


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

    def verdict(self, *, tolerance: float = 1.1, confidence: float = 0.95) -> DynamicStaticVerdict:
        """Whether the dynamic layer is clearly slower than its pairs allow (see
        ``latency.verdict``), judged from the two runs' per-iteration times."""
        return judge_dynamic_static(
            self.static.times, self.dynamic.times, pairs_ratio=self.pairs_ratio,
            tolerance=tolerance, confidence=confidence,
        )  # fmt: skip

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
    """Times a dynamic and a static MoELayer (same max_k) on one input, in turns.

    Each iteration runs both layers, static first on even iterations and dynamic first on
    odd ones (``measure_in_turns``), so the i-th times of the two form a pair.

    Args:
        dynamic, static: MoELayer-like modules returning ``MoEOutput``.
        hidden_states: float[N, D] or float[batch, seq, D] on the layers' device.
        warmup, iterations, timer, cpu_timer: see ``measure_in_turns``.
    """
    tokens = hidden_states.reshape(-1, hidden_states.shape[-1]).shape[0]
    pairs = {"static": active_pairs(static, hidden_states)}
    pairs["dynamic"] = active_pairs(dynamic, hidden_states)

    def step(layer: Callable[[torch.Tensor], Any]) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return layer(hidden_states)

        return run

    timed = measure_in_turns(
        {"static": step(static), "dynamic": step(dynamic)}, device=hidden_states.device,
        warmup=warmup, iterations=iterations, timer=timer, cpu_timer=cpu_timer,
    )  # fmt: skip
    static_m, dynamic_m = timed["static"], timed["dynamic"]
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
