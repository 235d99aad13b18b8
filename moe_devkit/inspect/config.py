"""``InspectorConfig``: the settings of the inspector's statistics and alarms.

Shared by ``RouterInspector`` (PyTorch) and ``JaxRouterInspector``; the report stores it as
its ``routing.config``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class InspectorConfig:
    """Knobs of the inspector's statistics and alarms.

    Attributes:
        window: steps per trend window (doubles when ``max_windows`` is reached).
        max_windows: snapshots kept per layer.
        complexity_bins: bins of the complexity histogram over [0, 1].
        reservoir_size: (complexity, k) pairs kept per layer for plots.
        reservoir_every: offer the tokens of every this many steps to the reservoir (default
            16: its top-k merge is the most expensive part of an update; the sample stays
            uniform over the tokens of the sampled steps, a systematic sample of the run).
        coactivation_every: update the co-activation matrix every this many steps (0: never;
            default 16: with the reservoir, the periodic part of an update is about 100 us of
            GPU work on an H100 at 8192 tokens, against about 10 us for the rest; the matrix
            is normalised by the steps that updated it).
        collapse_ratio: alarm when an expert's load exceeds this multiple of the mean load.
        collapse_token_share: alarm when one expert is chosen by at least this share of tokens
            (catches collapse where E / k is too small for ``collapse_ratio`` to be reached).
        dead_window_steps: an expert with no selection over the last this many steps is dead.
        drift_k: alarm when mean k moves by more than this between first and last window.
        drift_complexity: same for mean complexity.
        seed: seed of the reservoir's random keys.
        cuda_graphs: on CUDA, replay each update from a captured CUDA graph (one launch per
            step; up to 8 (input shapes, periodic updates) per layer, eager beyond).
        side_stream: on CUDA, run each update on a side stream of the inspector's (it then
            overlaps the model's next kernels) rather than on the model's stream.
        triton: on CUDA with Triton installed, compute the per-token statistics in one
            Triton kernel instead of about 45 PyTorch ops (same results).
        defer_steps: on CUDA with graphs, the forward hooks keep up to this many steps'
            decisions and fold them together (default 1: fold every step as it comes, one
            graph replay; on an H100 host, timed over 16-forward windows, folding 16 steps
            at once cost more CPU in its concatenations than 16 replays: +11-16% against
            +4% on a 1.2 ms forward).
        batch_steps: the forward hooks that read a transformers router's outputs keep up to
            this many steps' outputs by reference and build their decisions in one batched
            pass (``inspect.raw``; on CUDA replayed from a captured graph), instead of some
            60 small ops per layer and step on the model's critical path (default 16; 1:
            build every step as it comes). In training on CUDA (autograd on at the hook),
            the reference routers' decisions are kept up to this many steps too, unless
            ``defer_steps`` is above 1.
    """

    window: int = 50
    max_windows: int = 64
    complexity_bins: int = 20
    reservoir_size: int = 1024
    reservoir_every: int = 16
    coactivation_every: int = 16
    collapse_ratio: float = 4.0
    collapse_token_share: float = 0.9
    dead_window_steps: int = 50
    drift_k: float = 0.5
    drift_complexity: float = 0.15
    seed: int = 0
    cuda_graphs: bool = True
    side_stream: bool = False
    triton: bool = True
    defer_steps: int = 1
    batch_steps: int = 16

    def __post_init__(self) -> None:
        for name in ("window", "max_windows", "complexity_bins", "reservoir_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 2:
                raise ValueError(f"{name} must be an int >= 2; got {name}={value!r}")
        for name in ("reservoir_every", "defer_steps", "batch_steps"):
            every = getattr(self, name)
            if isinstance(every, bool) or not isinstance(every, int) or every < 1:
                raise ValueError(f"{name} must be an int >= 1; got {name}={every!r}")
        if self.max_windows % 2:
            raise ValueError(f"max_windows must be even; got max_windows={self.max_windows}")
