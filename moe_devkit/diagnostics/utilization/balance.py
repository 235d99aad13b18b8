"""Load balance of per-expert counts: CV, MaxVio, normalised entropy, Gini, dead experts.

Pure, vectorised functions of an int[E] count vector with no host synchronisation; formulas
and sources in docs/metrics.md. ``moe_devkit.diagnostics.utilization`` re-exports every name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from moe_devkit.diagnostics._host import to_host
from moe_devkit.routers.torch_router import normalized_entropy


def selection_shares(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """float32[E]: each expert's fraction of all selections (zeros when there are none)."""
    counts = tokens_per_expert.to(torch.float32)
    return counts / counts.sum().clamp_min(1.0)


def _undefined_if_empty(counts: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """NaN where nothing was selected: the ratios below are undefined then."""
    return torch.where(counts.sum() > 0, value, torch.full_like(value, math.nan))


def coefficient_of_variation(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """float32[]: population std / mean of the per-expert load (0 = perfectly even)."""
    load = tokens_per_expert.to(torch.float64)
    mean = load.mean()
    cv = (load - mean).square().mean().sqrt() / mean.clamp_min(1e-300)
    return _undefined_if_empty(tokens_per_expert, cv).to(torch.float32)


def max_violation(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """float32[]: MaxVio = max load / mean load - 1 (Wang et al. 2024)."""
    load = tokens_per_expert.to(torch.float64)
    vio = load.max() / load.mean().clamp_min(1e-300) - 1.0
    return _undefined_if_empty(tokens_per_expert, vio).to(torch.float32)


def load_entropy(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """float32[]: entropy of the selection shares / log(E), in [0, 1] (1 = even)."""
    shares = selection_shares(tokens_per_expert).unsqueeze(0)  # [1, E]
    return _undefined_if_empty(tokens_per_expert, normalized_entropy(shares)[0])


def gini_coefficient(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """float32[]: Gini coefficient of the load, 0 (even) to (E - 1) / E (one expert)."""
    load = torch.sort(tokens_per_expert.to(torch.float64)).values  # ascending
    num = load.shape[0]
    rank = torch.arange(1, num + 1, dtype=torch.float64, device=load.device)
    gini = 2.0 * (rank * load).sum() / (num * load.sum().clamp_min(1e-300)) - (num + 1) / num
    return _undefined_if_empty(tokens_per_expert, gini).to(torch.float32)


def dead_experts(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """bool[E]: experts selected by no token."""
    return tokens_per_expert == 0


@dataclass(frozen=True)
class LoadBalance:
    """How evenly selections spread over experts (device tensors).

    Attributes:
        tokens_per_expert: int64[E], selections per expert.
        shares: float32[E], fraction of all selections.
        cv: float32[], coefficient of variation of the load.
        max_vio: float32[], max load / mean load - 1.
        entropy: float32[], normalised entropy of the shares.
        gini: float32[], Gini coefficient of the load.
        dead: bool[E], experts never selected.
    """

    tokens_per_expert: torch.Tensor
    shares: torch.Tensor
    cv: torch.Tensor
    max_vio: torch.Tensor
    entropy: torch.Tensor
    gini: torch.Tensor
    dead: torch.Tensor

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            "tokens_per_expert": self.tokens_per_expert,
            "shares": self.shares,
            "cv": self.cv,
            "max_vio": self.max_vio,
            "entropy": self.entropy,
            "gini": self.gini,
            "dead": self.dead,
        }

    @staticmethod
    def _assemble(host: Mapping[str, Any]) -> dict[str, Any]:
        out = {name: host[name] for name in ("tokens_per_expert", "shares", "cv", "max_vio")}
        out.update(entropy=host["entropy"], gini=host["gini"])
        dead = [e for e, is_dead in enumerate(host["dead"]) if is_dead]
        out.update(dead_count=len(dead), dead_experts=dead)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (one host transfer); dead experts as a count and id list."""
        return self._assemble(to_host(self._tensors()))


def load_balance(tokens_per_expert: torch.Tensor) -> LoadBalance:
    """All load-balance metrics of one per-expert count vector.

    Args:
        tokens_per_expert: int[E], e.g. from ``selection_counts``.
    """
    return LoadBalance(
        tokens_per_expert=tokens_per_expert,
        shares=selection_shares(tokens_per_expert),
        cv=coefficient_of_variation(tokens_per_expert),
        max_vio=max_violation(tokens_per_expert),
        entropy=load_entropy(tokens_per_expert),
        gini=gini_coefficient(tokens_per_expert),
        dead=dead_experts(tokens_per_expert),
    )
