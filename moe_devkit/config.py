"""Configuration of the reference dynamic-k routers (shared by the PyTorch and JAX files)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from moe_devkit._checks import require_float, require_int

RoutingMode = Literal["complexity", "top_p"]
NonfinitePolicy = Literal["mask", "raise"]

_MODES: tuple[str, ...] = ("complexity", "top_p")
_NONFINITE: tuple[str, ...] = ("mask", "raise")


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """Hyper-parameters of a dynamic-k MoE router and its layer.

    Attributes:
        hidden_size: D, width of the token representations.
        num_experts: E, number of experts.
        min_k: fewest experts a token is sent to.
        max_k: most experts a token is sent to (the static baseline uses this k).
        mode: "complexity" maps a learned per-token score in [0, 1] to k; "top_p" picks
            the smallest set of experts whose softmax mass reaches ``top_p``.
        top_p: probability mass threshold of the "top_p" mode, in (0, 1].
        expert_hidden_size: F, inner width of each SwiGLU expert.
        complexity_hidden_size: inner width of the complexity estimator MLP.
        k_temperature: temperature of the soft k mask that carries gradients to the
            complexity estimator (straight-through; smaller is closer to the hard mask).
        capacity_factor: if set, each expert takes at most
            ``ceil(capacity_factor * sum(k) / E)`` token-expert pairs; the rest are dropped
            and reported in ``RoutingDecision.dropped``.
        load_balance_coef: weight of the Switch load-balancing loss in ``aux_loss``.
        z_loss_coef: weight of the ST-MoE router z-loss in ``aux_loss``.
        compute_cost_coef: weight of the compute-cost term (expected k / max_k).
        nonfinite_policy: "mask" routes tokens whose input or logits are not finite to no
            expert, flags them in ``RoutingDecision.nonfinite`` and makes their layer output
            NaN (no host synchronisation); "raise" raises ValueError (synchronises on CUDA).
    """

    hidden_size: int = 256
    num_experts: int = 16
    min_k: int = 1
    max_k: int = 4
    mode: RoutingMode = "complexity"
    top_p: float = 0.6
    expert_hidden_size: int = 512
    complexity_hidden_size: int = 64
    k_temperature: float = 0.25
    capacity_factor: float | None = None
    load_balance_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    compute_cost_coef: float = 1e-2
    nonfinite_policy: NonfinitePolicy = "mask"

    def __post_init__(self) -> None:
        require_int("hidden_size", self.hidden_size, 1)
        require_int("num_experts", self.num_experts, 1)
        require_int("min_k", self.min_k, 1)
        require_int("max_k", self.max_k, 1)
        require_int("expert_hidden_size", self.expert_hidden_size, 1)
        require_int("complexity_hidden_size", self.complexity_hidden_size, 1)
        if self.min_k > self.max_k:
            raise ValueError(f"min_k must be <= max_k; got min_k={self.min_k}, max_k={self.max_k}")
        if self.max_k > self.num_experts:
            raise ValueError(
                "max_k must be <= num_experts; "
                f"got max_k={self.max_k}, num_experts={self.num_experts}"
            )
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}; got mode={self.mode!r}")
        if self.nonfinite_policy not in _NONFINITE:
            raise ValueError(
                f"nonfinite_policy must be one of {_NONFINITE}; "
                f"got nonfinite_policy={self.nonfinite_policy!r}"
            )
        require_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        require_float("k_temperature", self.k_temperature, 0.0, math.inf, low_open=True)
        if self.capacity_factor is not None:
            require_float("capacity_factor", self.capacity_factor, 0.0, math.inf, low_open=True)
        for name in ("load_balance_coef", "z_loss_coef", "compute_cost_coef"):
            require_float(name, getattr(self, name), 0.0, math.inf, low_open=False)

    def to_dict(self) -> dict[str, Any]:
        """Returns the configuration as a JSON-serialisable dict."""
        return asdict(self)
