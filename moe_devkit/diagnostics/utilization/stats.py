"""``UtilizationStats``: utilization, load balance and dynamic-k statistics in one result.

Three ways in, one result:

* ``utilization_from_decision(decision)``: a ``RoutingDecision`` from a reference router;
* ``utilization_from_indices(expert_indices, num_experts)``: int[N, K] indices, -1 padded;
* ``utilization_from_logits(router_logits, k_per_token)``: raw logits and a per-token k.

``per_layer_utilization(decisions)`` applies the first to one decision per layer. The raw
tensor entry points take ``validate=True``, which checks value ranges with one host sync; the
inspector passes ``validate=False`` on its streaming path. The metrics themselves are in
``balance``, ``dynamic_k`` and ``selection`` beside this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moe_devkit.diagnostics._host import prefixed, to_host, unprefixed
from moe_devkit.diagnostics.utilization.balance import LoadBalance, load_balance
from moe_devkit.diagnostics.utilization.dynamic_k import (
    ComplexityStats,
    co_activation,
    complexity_stats,
    compute_saved,
    k_histogram,
    mean_k,
    spearman_correlation,
)
from moe_devkit.diagnostics.utilization.selection import (
    check_logits_and_k,
    count_selections,
    host_min_max,
    require_integer,
    selected_experts,
)
from moe_devkit.routers.torch_router import (
    RoutingDecision,
    capacity_dropped,
    load_balancing_loss,
    router_z_loss,
)

__all__ = [
    "UtilizationStats",
    "per_layer_utilization",
    "selection_counts",
    "utilization_from_decision",
    "utilization_from_indices",
    "utilization_from_logits",
    "utilization_to_dicts",
]

# ----------------------------------------------------------------------------- counts


def selection_counts(
    source: RoutingDecision | torch.Tensor,
    num_experts: int | None = None,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """int64[E]: how often each expert was selected (one ``index_add_``, -1 ignored).

    Args:
        source: a ``RoutingDecision`` (its selected pairs, before capacity drops; no checks,
            no host sync) or int[..., K] expert indices, -1 padded.
        num_experts: E; required for indices.
        validate: check that indices lie in [-1, E) (a host sync).

    Raises:
        TypeError: indices not an integer tensor.
        ValueError: no tokens, num_experts missing or < 1, indices out of range.
    """
    if isinstance(source, RoutingDecision):
        return count_selections(source.expert_indices, source.num_experts)
    indices, experts = _check_indices(source, num_experts, validate=validate)
    return count_selections(indices, experts)


def _check_indices(
    expert_indices: object, num_experts: object, *, validate: bool
) -> tuple[torch.Tensor, int]:
    """int64[N, K] view of -1 padded indices and E, checked."""
    indices = require_integer(expert_indices, "expert_indices")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1; got num_experts={num_experts!r}")
    if indices.dim() < 1 or indices.shape[-1] < 1:
        raise ValueError(
            f"expert_indices must have shape [..., K] with K >= 1 (or [N] for K = 1); "
            f"got shape {tuple(indices.shape)}"
        )
    width = indices.shape[-1] if indices.dim() > 1 else 1
    flat = indices.long().reshape(-1, width)  # [N, K]
    if flat.shape[0] == 0:
        raise ValueError(
            f"expert_indices must hold at least one token; got shape {tuple(indices.shape)}"
        )
    if validate:
        low, high = host_min_max(flat)
        if low < -1 or high >= num_experts:
            raise ValueError(
                f"expert_indices must lie in [-1, num_experts={num_experts}) (-1 is padding); "
                f"got min={low}, max={high}"
            )
    return flat, num_experts


# ----------------------------------------------------------------------------- all together


@dataclass(frozen=True)
class UtilizationStats:
    """Utilization, load balance and dynamic-k statistics of one router's decisions.

    Tensors stay on the decisions' device; ``to_dict()`` and ``summary()`` copy them to the
    host once.

    Attributes:
        num_tokens: N.
        num_experts: E.
        max_k: K, the largest k the router may choose.
        balance: per-expert counts (selected pairs, before capacity drops) and their balance.
        k_histogram: int64[K + 1], tokens per k.
        mean_k: float32[].
        compute_saved: float32[], 1 - sum(k) / (N * K).
        complexity: complexity score statistics, when scores were given.
        complexity_k_spearman: float32[], rank correlation of complexity and k, when given.
        co_activation: int64[E, E], tokens selecting both experts.
        load_balancing_loss: float32[], Switch loss, when router probabilities are known.
        z_loss: float32[], ST-MoE router z-loss, when router logits are known.
        dropped_pairs: int64[], token-expert pairs beyond capacity, when a capacity applies.
        capacity_factor: the capacity factor ``dropped_pairs`` was computed under, if any.
    """

    num_tokens: int
    num_experts: int
    max_k: int
    balance: LoadBalance
    k_histogram: torch.Tensor
    mean_k: torch.Tensor
    compute_saved: torch.Tensor
    complexity: ComplexityStats | None
    complexity_k_spearman: torch.Tensor | None
    co_activation: torch.Tensor
    load_balancing_loss: torch.Tensor | None
    z_loss: torch.Tensor | None
    dropped_pairs: torch.Tensor | None
    capacity_factor: float | None

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """int64[E]: selections per expert (``balance.tokens_per_expert``)."""
        return self.balance.tokens_per_expert

    _OPTIONAL = ("complexity_k_spearman", "load_balancing_loss", "z_loss", "dropped_pairs")

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = prefixed("balance.", self.balance._tensors())
        if self.complexity is not None:
            tensors.update(prefixed("complexity.", self.complexity._tensors()))
        tensors.update(
            k_histogram=self.k_histogram,
            mean_k=self.mean_k,
            compute_saved=self.compute_saved,
            co_activation=self.co_activation,
        )
        for name in self._OPTIONAL:
            value = getattr(self, name)
            if value is not None:
                tensors[name] = value
        return tensors

    def _assemble(self, host: Mapping[str, Any]) -> dict[str, Any]:
        complexity = None
        if self.complexity is not None:
            complexity = self.complexity._assemble(unprefixed("complexity.", host))
        out: dict[str, Any] = {
            "num_tokens": self.num_tokens,
            "num_experts": self.num_experts,
            "max_k": self.max_k,
            "balance": LoadBalance._assemble(unprefixed("balance.", host)),
            "k_histogram": host["k_histogram"],
            "mean_k": host["mean_k"],
            "compute_saved": host["compute_saved"],
            "complexity": complexity,
            "co_activation": host["co_activation"],
        }
        out.update({name: host.get(name) for name in self._OPTIONAL})
        out["capacity_factor"] = self.capacity_factor
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form with plain ints, floats and lists (one host transfer).

        Undefined values are NaN floats (``reporting.write_report_json`` writes them as
        "nan"); statistics that were not computed are None.
        """
        return self._assemble(to_host(self._tensors()))

    def summary(self) -> dict[str, Any]:
        """The headline numbers (for a table row), from one host transfer."""
        full = self.to_dict()
        balance = full["balance"]
        keys = ("num_tokens", "mean_k", "compute_saved", *self._OPTIONAL)
        out = {key: full[key] for key in keys}
        out.update({key: balance[key] for key in ("cv", "max_vio", "entropy", "gini")})
        out["dead_count"] = balance["dead_count"]
        return out


def utilization_to_dicts(stats: Sequence[UtilizationStats]) -> list[dict[str, Any]]:
    """``[s.to_dict() for s in stats]`` with one host transfer for all of them (per layer)."""
    tensors: dict[str, torch.Tensor] = {}
    for layer, item in enumerate(stats):
        tensors.update(prefixed(f"{layer}/", item._tensors()))
    host = to_host(tensors)
    return [item._assemble(unprefixed(f"{i}/", host)) for i, item in enumerate(stats)]


def _check_capacity_factor(capacity_factor: float | None) -> None:
    if capacity_factor is None:
        return
    bad = isinstance(capacity_factor, bool) or not isinstance(capacity_factor, int | float)
    if bad or not capacity_factor > 0 or not math.isfinite(capacity_factor):
        raise ValueError(
            f"capacity_factor must be a finite number > 0 or None; got {capacity_factor!r}"
        )


def _check_complexity(complexity: object, num_tokens: int) -> torch.Tensor | None:
    if complexity is None:
        return None
    if not isinstance(complexity, torch.Tensor) or not complexity.is_floating_point():
        got = (
            complexity.dtype if isinstance(complexity, torch.Tensor) else type(complexity).__name__
        )
        raise TypeError(f"complexity must be a floating-point tensor; got {got}")
    if complexity.numel() != num_tokens:
        raise ValueError(
            f"complexity must hold one score per token ({num_tokens}); "
            f"got shape {tuple(complexity.shape)}"
        )
    return complexity.reshape(-1)


def _build(
    indices: torch.Tensor,
    num_experts: int,
    k: torch.Tensor,
    max_k: int,
    *,
    complexity: torch.Tensor | None,
    losses: tuple[torch.Tensor | None, torch.Tensor | None],
    dropped: torch.Tensor | None,
    capacity_factor: float | None,
) -> UtilizationStats:
    """UtilizationStats from checked int64[N, K] indices and int64[N] k."""
    with torch.no_grad():  # statistics never join the training graph
        spearman = None if complexity is None else spearman_correlation(complexity, k)
        return UtilizationStats(
            num_tokens=int(indices.shape[0]),
            num_experts=num_experts,
            max_k=max_k,
            balance=load_balance(count_selections(indices, num_experts)),
            k_histogram=k_histogram(k, max_k),
            mean_k=mean_k(k),
            compute_saved=compute_saved(k, max_k),
            complexity=None if complexity is None else complexity_stats(complexity),
            complexity_k_spearman=spearman,
            co_activation=co_activation(indices, num_experts),
            load_balancing_loss=None if losses[0] is None else losses[0].detach(),
            z_loss=None if losses[1] is None else losses[1].detach(),
            dropped_pairs=dropped,
            capacity_factor=capacity_factor,
        )


def _logit_losses(logits: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch and z losses over the tokens with finite logits (as the router computes them)."""
    logits = logits.detach().float()
    finite = torch.isfinite(logits).all(dim=-1)
    probs = torch.softmax(torch.where(finite.unsqueeze(-1), logits, 0.0), dim=-1)
    return load_balancing_loss(probs, indices, finite), router_z_loss(logits, finite)


def _dropped(indices: torch.Tensor, num_experts: int, capacity_factor: float | None) -> Any:
    if capacity_factor is None:
        return None
    return capacity_dropped(indices, num_experts, capacity_factor).sum()


def utilization_from_indices(
    expert_indices: torch.Tensor,
    num_experts: int,
    *,
    router_logits: torch.Tensor | None = None,
    complexity: torch.Tensor | None = None,
    capacity_factor: float | None = None,
    validate: bool = True,
) -> UtilizationStats:
    """Statistics of -1 padded expert indices; k of a token = its non-padding slots.

    Args:
        expert_indices: int[N, K] (or int[..., K]), -1 padded, each in [-1, E).
        num_experts: E.
        router_logits: float[N, E], adds the Switch loss and the z-loss.
        complexity: float[N], adds complexity statistics and their correlation with k.
        capacity_factor: adds the pairs dropped under this capacity (Switch priority).
        validate: check index ranges (a host sync); off on the inspector's hot path.

    Raises:
        TypeError, ValueError: wrong types, shapes, ranges, no tokens.
    """
    indices, num_experts = _check_indices(expert_indices, num_experts, validate=validate)
    _check_capacity_factor(capacity_factor)
    scores = _check_complexity(complexity, indices.shape[0])
    losses: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    if router_logits is not None:
        expected = (indices.shape[0], num_experts)
        if not isinstance(router_logits, torch.Tensor) or router_logits.numel() != math.prod(
            expected
        ):
            got = tuple(router_logits.shape) if isinstance(router_logits, torch.Tensor) else None
            raise ValueError(f"router_logits must have shape {expected}; got {got}")
        losses = _logit_losses(router_logits.reshape(expected), indices)
    k = (indices >= 0).sum(dim=-1)  # [N]
    return _build(
        indices, num_experts, k, int(indices.shape[1]),
        complexity=scores, losses=losses,
        dropped=_dropped(indices, num_experts, capacity_factor), capacity_factor=capacity_factor,
    )  # fmt: skip


def utilization_from_logits(
    router_logits: torch.Tensor,
    k_per_token: torch.Tensor,
    *,
    max_k: int | None = None,
    complexity: torch.Tensor | None = None,
    capacity_factor: float | None = None,
    validate: bool = True,
) -> UtilizationStats:
    """Statistics of top-k selection from router logits with a per-token k.

    Args:
        router_logits: float[..., E].
        k_per_token: int[...], the leading shape of router_logits, each in [0, E].
        max_k: K for the k histogram and compute saved; default the largest k (a host sync).
        complexity: float[...], one score per token.
        capacity_factor: adds the pairs dropped under this capacity.
        validate: check k's range (a host sync).

    Raises:
        TypeError, ValueError: see ``check_logits_and_k``; max_k below the largest k.
    """
    _check_capacity_factor(capacity_factor)
    logits, k, _ = check_logits_and_k(router_logits, k_per_token, validate=False)
    indices = selected_experts(logits, k, max_k=max_k, validate=validate)  # [N, K]
    scores = _check_complexity(complexity, logits.shape[0])
    num_experts = logits.shape[-1]
    return _build(
        indices, num_experts, k, int(indices.shape[1]),
        complexity=scores, losses=_logit_losses(logits, indices),
        dropped=_dropped(indices, num_experts, capacity_factor), capacity_factor=capacity_factor,
    )  # fmt: skip


def utilization_from_decision(
    decision: RoutingDecision, *, capacity_factor: float | None = None
) -> UtilizationStats:
    """Statistics of a reference router's decision (no host sync, no value checks).

    The losses are the decision's own (computed by the router). ``dropped_pairs`` counts the
    router's own capacity drops, or, when ``capacity_factor`` is given, the pairs a capacity
    of that factor would drop.

    Raises:
        TypeError: not a RoutingDecision.
    """
    if not isinstance(decision, RoutingDecision):
        raise TypeError(f"decision must be a RoutingDecision; got {type(decision).__name__}")
    _check_capacity_factor(capacity_factor)
    indices = decision.expert_indices
    dropped = _dropped(indices, decision.num_experts, capacity_factor)
    return _build(
        indices, decision.num_experts, decision.k_per_token, decision.max_k,
        complexity=decision.complexity,
        losses=(decision.load_balancing_loss, decision.z_loss),
        dropped=decision.dropped.sum() if dropped is None else dropped,
        capacity_factor=capacity_factor,
    )  # fmt: skip


def per_layer_utilization(
    decisions: Sequence[RoutingDecision], *, capacity_factor: float | None = None
) -> tuple[UtilizationStats, ...]:
    """``utilization_from_decision`` for each layer's decision, in layer order.

    ``utilization_to_dicts`` turns the result into JSON with one host transfer.

    Raises:
        ValueError: no decisions.
    """
    if len(decisions) == 0:
        raise ValueError("decisions must hold one RoutingDecision per layer; got none")
    return tuple(utilization_from_decision(d, capacity_factor=capacity_factor) for d in decisions)
