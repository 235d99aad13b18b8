"""Dynamic-k statistics: k histogram, compute saved, complexity, rank correlation, co-activation.

Pure, vectorised functions over tensors with no host synchronisation; formulas and sources in
docs/metrics.md. ``moe_devkit.diagnostics.utilization`` re-exports every public name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moe_devkit.diagnostics._host import to_host

DEFAULT_QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)


def k_histogram(k_per_token: torch.Tensor, max_k: int) -> torch.Tensor:
    """int64[max_k + 1]: number of tokens with k = 0, 1, ..., max_k (others are ignored)."""
    k = k_per_token.reshape(-1).long()
    inside = (k >= 0) & (k <= max_k)
    hist = torch.zeros(max_k + 2, dtype=torch.int64, device=k.device)
    hist.scatter_add_(0, torch.where(inside, k, max_k + 1), torch.ones_like(k))
    return hist[: max_k + 1]


def mean_k(k_per_token: torch.Tensor) -> torch.Tensor:
    """float32[]: mean number of experts per token."""
    return k_per_token.to(torch.float64).mean().to(torch.float32)


def compute_saved(k_per_token: torch.Tensor, max_k: int) -> torch.Tensor:
    """float32[]: 1 - sum(k) / (N * max_k), the expert compute saved against static top-max_k."""
    used = k_per_token.to(torch.float64).sum() / (k_per_token.numel() * max(max_k, 1))
    return (1.0 - used).to(torch.float32)


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """float64[N]: ranks 1..N, tied values sharing the mean of their ranks."""
    num = values.numel()
    ordered, order = torch.sort(values)
    starts = torch.ones(num, dtype=torch.int64, device=values.device)
    starts[1:] = (ordered[1:] != ordered[:-1]).long()
    group = torch.cumsum(starts, dim=0) - 1  # [N] tie group of each sorted position
    size = torch.zeros(num, dtype=torch.float64, device=values.device)
    size.scatter_add_(0, group, torch.ones_like(size))
    first = torch.cumsum(size, dim=0) - size  # 0-based first position of each group
    mean_rank = first + (size + 1.0) / 2.0  # [N] per group
    ranks = torch.empty(num, dtype=torch.float64, device=values.device)
    return ranks.scatter_(0, order, mean_rank.index_select(0, group))


def spearman_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """float32[]: Spearman's rank correlation, ties given average ranks.

    NaN when either input is constant or holds a NaN.

    Args:
        x, y: real tensors with the same number of elements.

    Raises:
        ValueError: different numbers of elements, or fewer than one.
    """
    if x.numel() != y.numel() or x.numel() < 1:
        raise ValueError(
            f"x and y must hold the same number (>= 1) of elements; got {x.numel()} and {y.numel()}"
        )
    x = x.reshape(-1).to(torch.float64)
    y = y.reshape(-1).to(torch.float64)
    rx, ry = _average_ranks(x), _average_ranks(y)
    dx, dy = rx - rx.mean(), ry - ry.mean()
    rho = (dx * dy).sum() / ((dx * dx).sum() * (dy * dy).sum()).sqrt()
    has_nan = torch.isnan(x).any() | torch.isnan(y).any()
    return torch.where(has_nan, math.nan, rho).to(torch.float32)


@dataclass(frozen=True)
class ComplexityStats:
    """Distribution of complexity scores (NaN scores counted, then left out).

    Attributes:
        count: int64[], scores that are not NaN.
        nan_count: int64[], NaN scores.
        mean, std, min, max: float32[], over non-NaN scores (std: population, ddof=0).
        quantile_levels: the levels q of ``quantiles``.
        quantiles: float32[Q], linear interpolation between order statistics (numpy default).
    """

    count: torch.Tensor
    nan_count: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    quantile_levels: tuple[float, ...]
    quantiles: torch.Tensor

    def _tensors(self) -> dict[str, torch.Tensor]:
        names = ("count", "nan_count", "mean", "std", "min", "max", "quantiles")
        return {name: getattr(self, name) for name in names}

    def _assemble(self, host: Mapping[str, Any]) -> dict[str, Any]:
        out = {name: host[name] for name in ("count", "nan_count", "mean", "std", "min", "max")}
        out["quantiles"] = dict(zip(map(str, self.quantile_levels), host["quantiles"], strict=True))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (one host transfer); quantiles keyed by level, e.g. "0.5"."""
        return self._assemble(to_host(self._tensors()))


def _device_vector(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """float64[len(values)] filled on the device (torch.tensor(list, device="cuda") would be a
    synchronous host-to-device copy)."""
    out = torch.empty(len(values), dtype=torch.float64, device=device)
    for i, value in enumerate(values):
        # fill_ passes the number as a kernel argument; `out[i] = value` would copy a CPU
        # scalar tensor to the device, which synchronises.
        out.select(0, i).fill_(float(value))
    return out


def complexity_stats(
    complexity: torch.Tensor, quantiles: Sequence[float] = DEFAULT_QUANTILES
) -> ComplexityStats:
    """Mean, std, min, max and quantiles of complexity scores, by one sort (no host sync).

    Args:
        complexity: float[...], one score per token.
        quantiles: levels in [0, 1].

    Raises:
        ValueError: no scores, or a level outside [0, 1].
    """
    if complexity.numel() == 0:
        raise ValueError("complexity must hold at least one score; got an empty tensor")
    if any(not 0.0 <= q <= 1.0 for q in quantiles):
        raise ValueError(f"quantiles must lie in [0, 1]; got {tuple(quantiles)}")
    scores = complexity.reshape(-1).to(torch.float64)
    valid = ~torch.isnan(scores)
    count = valid.sum()
    ordered = torch.sort(scores).values  # NaN sort last
    mean = torch.where(valid, scores, 0.0).sum() / count.clamp_min(1)
    var = torch.where(valid, (scores - mean).square(), 0.0).sum() / count.clamp_min(1)
    levels = _device_vector(quantiles, scores.device)
    pos = levels * (count - 1).clamp_min(0)  # [Q] fractional order statistic
    low, high = pos.floor().long(), pos.ceil().long()
    frac = pos - low
    # index_select, not ordered[tensor]: a 0-d tensor index would be read on the host.
    values = ordered.index_select(0, low) * (1.0 - frac) + ordered.index_select(0, high) * frac
    last = ordered.index_select(0, (count - 1).clamp_min(0).reshape(1)).squeeze(0)
    nan = torch.full_like(mean, math.nan)
    empty = count == 0
    return ComplexityStats(
        count=count,
        nan_count=scores.numel() - count,
        mean=torch.where(empty, nan, mean).float(),
        std=torch.where(empty, nan, var.sqrt()).float(),
        min=torch.where(empty, nan, ordered[0]).float(),
        max=torch.where(empty, nan, last).float(),
        quantile_levels=tuple(float(q) for q in quantiles),
        quantiles=torch.where(empty, nan, values).float(),
    )


def co_activation(expert_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64[E, E]: tokens that selected both expert i and expert j (diagonal: expert i).

    One multi-hot [N, E] matrix A, then A^T A (a matmul; exact: float32 below 2**24 tokens,
    float64 above). -1 padding is ignored; a repeated expert in one token counts once.

    Args:
        expert_indices: int[N, K], -1 padded, each in [-1, E).
    """
    *lead, max_k = expert_indices.shape
    indices = expert_indices.reshape(math.prod(lead), max_k).long()  # [N, K], K may be 0
    dtype = torch.float32 if indices.shape[0] < 2**24 else torch.float64
    slots = torch.where(indices >= 0, indices, num_experts)
    hot = torch.zeros(indices.shape[0], num_experts + 1, dtype=dtype, device=indices.device)
    hot.scatter_(1, slots, 1.0)
    hot = hot[:, :num_experts]  # [N, E]
    return (hot.t() @ hot).round().long()
