"""Reference dynamic-k Mixture-of-Experts router and layer in PyTorch.

Reads top to bottom: the routing decision record, small helpers (input checks, k selection,
capacity, auxiliary losses), the complexity estimator, the routers (dynamic and static), the
experts, the MoE layer and a small stack of MoE layers.

The routers, the experts, the layer and the model take ``implementation``: "reference" runs
the PyTorch ops of this file and nothing else; "auto" (the default) hands a stage to a Triton
kernel where one runs and gives the same result (CUDA with Triton installed, autograd off for
the routing and the layer's dispatch); "triton" takes the kernels wherever a stage has one and
raises where Triton cannot run. The kernels and the choice between them live in
``moe_devkit.kernels`` (``moe_devkit.kernels.moe_layer``); each fast-path branch below is one
call into it.

Shape letters: N tokens, E experts, K = max_k slots, D hidden, F expert hidden.

Design notes:
* No host synchronisation in any forward on CUDA: every data-dependent quantity (k, counts,
  capacity, offsets) stays a device tensor; dispatch uses ``torch._grouped_mm`` with device
  offsets. Where a grouped matmul is unavailable for a device or dtype the experts fall back
  to a loop over experts, which reads the per-expert counts on the host (one synchronisation).
* The router runs in float32 whatever the model dtype ("selective precision", ST-MoE,
  Zoph et al. 2022): softmax and top-k over bfloat16 logits would tie and flip experts.
* Gradient to the complexity estimator: k is an integer, so each slot j gets a hard mask
  ``j < k`` in the forward pass and the gradient of a soft mask
  ``sigmoid((c * (R + 1) - (j - min_k + 1)) / tau)`` in the backward pass (straight-through
  estimator, Bengio et al. 2013), R = max_k - min_k. The soft mask scales the expert weights,
  so the task loss pushes c up where more experts help and the compute-cost term (expected
  k / max_k) pushes it down.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from moe_devkit.config import RouterConfig
from moe_devkit.kernels import moe_layer as fast_path
from moe_devkit.kernels.moe_layer import GroupedMatmul, KRule

STAGES: tuple[str, ...] = ("complexity", "gating", "select_k", "dispatch", "experts", "combine")
"""Routing stages, each wrapped in a ``record_function`` span named ``"moe." + stage``."""


def span_name(stage: str) -> str:
    """Returns the profiler span name of a routing stage."""
    return f"moe.{stage}"


@dataclass(frozen=True)
class RoutingDecision:
    """What a router decided for N tokens (flattened over batch and sequence).

    Attributes:
        expert_indices: int64[N, K], selected experts in decreasing probability, -1 padded.
        expert_weights: float32[N, K], renormalised over the selected experts; 0 on padding
            and on pairs dropped by the capacity limit.
        k_per_token: int64[N], number of experts selected (0 for non-finite tokens).
        complexity: float32[N], the complexity score in [0, 1] (learned estimator in
            "complexity" mode; normalised entropy of router_probs otherwise).
        router_logits: float32[N, E].
        router_probs: float32[N, E], softmax of router_logits.
        dropped: bool[N, K], selected pairs dropped by the capacity limit.
        nonfinite: bool[N], tokens whose input or logits were NaN/Inf (routed nowhere).
        load_balancing_loss: float32[], Switch loss E * sum_e f_e * P_e with variable k.
        z_loss: float32[], ST-MoE router z-loss mean(logsumexp(logits)^2).
        compute_loss: float32[], expected k / max_k (differentiable in "complexity" mode).
        aux_loss: float32[], the three losses weighted by the config's coefficients.
        batch_shape: leading shape of the input (e.g. (batch, seq)).
    """

    expert_indices: torch.Tensor
    expert_weights: torch.Tensor
    k_per_token: torch.Tensor
    complexity: torch.Tensor
    router_logits: torch.Tensor
    router_probs: torch.Tensor
    dropped: torch.Tensor
    nonfinite: torch.Tensor
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    compute_loss: torch.Tensor
    aux_loss: torch.Tensor
    batch_shape: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.expert_indices.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.router_logits.shape[-1])

    @property
    def max_k(self) -> int:
        return int(self.expert_indices.shape[-1])

    @property
    def active(self) -> torch.Tensor:
        """bool[N, K]: pairs that are selected and executed (not padding, not dropped)."""
        return (self.expert_indices >= 0) & ~self.dropped


# ----------------------------------------------------------------------------- helpers


def flatten_tokens(hidden_states: object, hidden_size: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Checks ``hidden_states`` and flattens it to [N, D].

    Args:
        hidden_states: float[batch, seq, D] or float[N, D].
        hidden_size: the expected D.

    Returns:
        The [N, D] view and the leading batch shape.

    Raises:
        TypeError: not a floating-point tensor.
        ValueError: wrong rank, wrong hidden size or no tokens.
    """
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor; got {type(hidden_states).__name__}")
    if not hidden_states.is_floating_point():
        raise TypeError(
            "hidden_states must be a floating-point tensor (float32, bfloat16 or float16); "
            f"got dtype={hidden_states.dtype}"
        )
    if hidden_states.dim() not in (2, 3):
        raise ValueError(
            "hidden_states must have shape [batch, seq, hidden] or [tokens, hidden]; "
            f"got shape {tuple(hidden_states.shape)}"
        )
    if hidden_states.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden_states last dimension must be hidden_size={hidden_size}; "
            f"got shape {tuple(hidden_states.shape)}"
        )
    if hidden_states.numel() == 0:
        raise ValueError(
            f"hidden_states must hold at least one token; got shape {tuple(hidden_states.shape)}"
        )
    batch_shape = tuple(hidden_states.shape[:-1])
    return hidden_states.reshape(-1, hidden_size), batch_shape  # [N, D]


def _find_nonfinite(router_logits: torch.Tensor, policy: str) -> torch.Tensor:
    """bool[N]: tokens whose input or logits hold NaN/Inf; raises under policy "raise".

    Only the logits are scanned ([N, E], not [N, D]): every logit sums over every input
    feature, and NaN * w and Inf * 0 are NaN, so a non-finite input always gives a non-finite
    logit row.
    """
    nonfinite = ~torch.isfinite(router_logits).all(dim=-1)
    if policy == "raise" and bool(nonfinite.any()):  # host sync, by the user's choice
        count = int(nonfinite.sum())
        first = int(nonfinite.int().argmax())
        raise ValueError(
            f"hidden_states must be finite; got {count} token(s) with NaN/Inf, first at "
            f"flattened token index {first} (set nonfinite_policy='mask' to route them nowhere)"
        )
    return nonfinite


def normalized_entropy(router_probs: torch.Tensor) -> torch.Tensor:
    """float32[N]: entropy of each row of router_probs divided by log(E), in [0, 1]."""
    num_experts = router_probs.shape[-1]
    if num_experts == 1:
        return torch.zeros_like(router_probs[:, 0])
    entropy = -(router_probs * torch.log(router_probs.clamp_min(1e-30))).sum(dim=-1)
    return entropy / math.log(num_experts)


def slot_positions(max_k: int, device: torch.device) -> torch.Tensor:
    """int64[1, K]: the slot number j of each of the K selection slots.

    Cached per (K, device) in eager mode: one kernel launch fewer in every forward (launches,
    not arithmetic, bound a small router on a GPU). Read-only; never write into it.
    """
    if torch.compiler.is_compiling():
        return torch.arange(max_k, device=device).unsqueeze(0)
    return _cached_slot_positions(max_k, torch.device(device))


@functools.lru_cache(maxsize=64)
def _cached_slot_positions(max_k: int, device: torch.device) -> torch.Tensor:
    return torch.arange(max_k, device=device).unsqueeze(0)


def k_from_complexity(complexity: torch.Tensor, min_k: int, max_k: int) -> torch.Tensor:
    """int64[N]: k = min_k + floor(c * (max_k - min_k + 1)), clamped to [min_k, max_k].

    Equal-width bins of the score: c in [0, 1/(R+1)) gives min_k, the top bin gives max_k.
    """
    span = max_k - min_k + 1
    steps = torch.floor(complexity.nan_to_num(0.0) * span).to(torch.int64)
    return (min_k + steps).clamp(min_k, max_k)


def soft_slot_mask(
    complexity: torch.Tensor, min_k: int, max_k: int, temperature: float
) -> torch.Tensor:
    """float32[N, K]: differentiable relaxation of ``j < k_from_complexity(c)``."""
    slots = slot_positions(max_k, complexity.device)  # [1, K]
    span = max_k - min_k + 1
    margin = complexity.unsqueeze(-1) * span - (slots - min_k + 1)  # [N, K]
    soft = torch.sigmoid(margin / temperature)
    return torch.where(slots < min_k, torch.ones_like(soft), soft)


def k_from_top_p(sorted_probs: torch.Tensor, top_p: float, min_k: int) -> torch.Tensor:
    """int64[N]: smallest k whose top-k probability mass reaches top_p, within [min_k, K].

    Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models".

    Args:
        sorted_probs: float32[N, K], the K = max_k largest probabilities, decreasing.
    """
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # [N, K] exclusive
    k = (mass_before < top_p).sum(dim=-1)
    return k.clamp(min_k, sorted_probs.shape[-1])


def count_values(values: torch.Tensor, num_bins: int) -> torch.Tensor:
    """int64[num_bins]: occurrences of each integer value in [0, num_bins); others ignored.

    ``torch.histc`` with a fixed range: no host synchronisation (unlike ``bincount`` with
    ``minlength``), and privatised histograms instead of the atomic contention that a
    ``scatter_add_`` into a few bins suffers on a GPU. Values are centred in their bins
    (v + 0.5); float32 counts are exact up to 2^24 per call, so larger inputs use float64.
    """
    dtype = torch.float32 if values.numel() < 2**24 else torch.float64
    centred = values.reshape(-1).to(dtype) + 0.5
    return torch.histc(centred, bins=num_bins, min=0, max=num_bins).to(torch.int64)


def _sort_pairs(
    routing: RoutingDecision, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-expert pairs grouped by expert, the executed ones first.

    Returns:
        sorted_key (expert of each sorted pair, num_experts for inactive ones), order (the
        [N*K] pair index of each sorted position; stable) and offsets (int32[E], end of each
        expert's group: the last is the number of executed pairs).
    """
    active = routing.active.reshape(-1)
    key = torch.where(active, routing.expert_indices.reshape(-1), num_experts)
    sorted_key, order = torch.sort(_narrow_keys(key, num_experts), stable=True)
    return sorted_key, order, group_offsets(sorted_key, num_experts).to(torch.int32)


def _narrow_keys(key: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert keys in [0, num_experts] as uint8 where they fit: a radix sort then makes one
    8-bit pass instead of eight for int64."""
    return key.to(torch.uint8) if num_experts < 256 else key


def group_offsets(sorted_keys: torch.Tensor, num_groups: int) -> torch.Tensor:
    """int64[G]: end position of each group g in keys sorted ascending (binary search)."""
    bounds = torch.arange(1, num_groups + 1, device=sorted_keys.device, dtype=sorted_keys.dtype)
    return torch.searchsorted(sorted_keys, bounds)


def capacity_dropped(
    expert_indices: torch.Tensor, num_experts: int, capacity_factor: float
) -> torch.Tensor:
    """bool[N, K]: selected pairs beyond each expert's capacity.

    Capacity = ceil(capacity_factor * (number of selected pairs) / E), a device tensor.
    Priority: all first choices before any second choice, then token order (Switch).
    """
    num_tokens, max_k = expert_indices.shape
    selected = expert_indices >= 0
    key = torch.where(selected, expert_indices, num_experts).t().reshape(-1)  # [K*N] slot-major
    sorted_key, order = torch.sort(key, stable=True)
    ends = group_offsets(sorted_key, num_experts + 1)  # [E+1]
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    rank_sorted = torch.arange(key.numel(), device=key.device) - starts[sorted_key]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)  # [K*N]
    rank = rank.reshape(max_k, num_tokens).t()  # [N, K]
    capacity = torch.ceil(capacity_factor * selected.sum() / num_experts)
    return selected & (rank >= capacity)


def expert_counts(expert_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64[E]: how often each expert was selected; -1 padding is ignored."""
    return count_values(expert_indices, num_experts)


def load_balancing_loss(
    router_probs: torch.Tensor, expert_indices: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """float32[]: Switch load-balancing loss E * sum_e f_e * P_e (Fedus et al. 2021).

    f_e = (selections of e) / N counts every selected slot, so a token with larger k weighs
    more; for static top-k this equals transformers' ``load_balancing_loss_func``. Balanced
    routing gives mean k; collapse onto one expert gives E * mean k.

    Args:
        router_probs: float32[N, E].
        expert_indices: int64[N, K], -1 padded.
        token_mask: bool[N], tokens to count (default all).
    """
    num_experts = router_probs.shape[-1]
    if token_mask is None:
        token_mask = torch.ones_like(router_probs[:, 0], dtype=torch.bool)
    num_valid = token_mask.sum().clamp_min(1).to(router_probs.dtype)
    indices = torch.where(token_mask.unsqueeze(-1), expert_indices, -1)
    fraction = expert_counts(indices, num_experts).to(router_probs.dtype) / num_valid
    probs = torch.where(token_mask.unsqueeze(-1), router_probs, 0.0)
    mean_prob = probs.sum(dim=0) / num_valid
    return num_experts * torch.sum(fraction * mean_prob)


def router_z_loss(
    router_logits: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """float32[]: ST-MoE router z-loss, mean over tokens of logsumexp(logits)^2."""
    if token_mask is None:
        return torch.logsumexp(router_logits, dim=-1).square().mean()
    logits = torch.where(token_mask.unsqueeze(-1), router_logits, 0.0)
    z = torch.logsumexp(logits, dim=-1).square()
    return torch.where(token_mask, z, 0.0).sum() / token_mask.sum().clamp_min(1)


# ----------------------------------------------------------------------------- routers


class ComplexityEstimator(nn.Module):
    """Small MLP giving each token a complexity score in [0, 1]."""

    def __init__(self, hidden_size: int, inner_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, inner_size)
        self.fc2 = nn.Linear(inner_size, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """float[N, D] -> float32[N]."""
        x = hidden_states.to(self.fc1.weight.dtype)
        return torch.sigmoid(self.fc2(F.gelu(self.fc1(x))).float()).squeeze(-1)


class _RouterBase(nn.Module):
    """Router network and the decision assembly shared by the dynamic and static routers."""

    def __init__(self, config: RouterConfig, implementation: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.implementation = fast_path.check_implementation(implementation)
        self.router_network = nn.Linear(config.hidden_size, config.num_experts, bias=False)

    def _gate(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float[N, D] -> float32 router_logits[N, E] and router_probs[N, E].

        On CUDA without autograd, half-precision inputs are multiplied as they are with a
        float32 result (tensor cores, float32 accumulation: the products of 16-bit values
        are exact in float32) instead of being copied to float32 first.
        """
        router_logits = self._logits(flat)
        return router_logits, torch.softmax(router_logits, dim=-1)

    def _logits(self, flat: torch.Tensor) -> torch.Tensor:
        """float[N, D] -> float32 router_logits[N, E] (see ``_gate``)."""
        weight = self.router_network.weight
        if (
            flat.is_cuda
            and flat.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == flat.dtype
            and not torch.is_grad_enabled()  # the float32-result matmul has no backward
        ):
            return torch.mm(flat, weight.t(), out_dtype=torch.float32)
        return F.linear(flat.float(), weight.float())

    def _takes_triton_path(self, flat: torch.Tensor) -> bool:
        """Whether forward routes in Triton kernels (``fast_path.routes_in_triton``)."""
        return fast_path.routes_in_triton(self.config, flat.device, self.implementation)

    def _decide_in_triton(
        self,
        flat: torch.Tensor,
        batch_shape: tuple[int, ...],
        *,
        rule: KRule,
        max_k: int,
        complexity: torch.Tensor | None = None,
    ) -> RoutingDecision:
        """``_decide`` without autograd, capacity or policy "raise", in two Triton kernels.

        Where the first kernel also computes the gating matmul (``fast_path.fuses_gating``:
        16-bit inputs), its time is counted in the "select_k" span, and the "gating" span,
        kept so that every path reports the same stages, is empty.
        """
        weight = self.router_network.weight
        with record_function(span_name("gating")):
            router_logits = None if fast_path.fuses_gating(flat, weight) else self._logits(flat)
        with record_function(span_name("select_k")):
            router_logits, fused = fast_path.route(
                flat,
                weight,
                router_logits,
                self.config,
                rule=rule,
                max_k=max_k,
                complexity=complexity,
            )
            return RoutingDecision(
                **fused._asdict(), router_logits=router_logits, batch_shape=batch_shape
            )

    def _decide(
        self,
        *,
        flat: torch.Tensor,
        batch_shape: tuple[int, ...],
        router_logits: torch.Tensor,
        router_probs: torch.Tensor,
        top_probs: torch.Tensor,
        top_indices: torch.Tensor,
        k_per_token: torch.Tensor,
        slot_gate: torch.Tensor,
        complexity: torch.Tensor,
    ) -> RoutingDecision:
        """Masks, weights, capacity and losses from the chosen k (all on device)."""
        cfg = self.config
        nonfinite = _find_nonfinite(router_logits, cfg.nonfinite_policy)
        finite = ~nonfinite
        k_per_token = torch.where(nonfinite, 0, k_per_token)
        max_k = top_indices.shape[-1]
        hard = slot_positions(max_k, flat.device) < k_per_token.unsqueeze(-1)  # [N, K]
        expert_indices = torch.where(hard, top_indices, -1)
        gate = torch.where(hard, slot_gate, 0.0)  # hard is all False on non-finite tokens
        masked = torch.where(finite.unsqueeze(-1), top_probs, 0.0) * gate  # [N, K]
        expert_weights = masked / masked.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        if cfg.capacity_factor is None:
            dropped = torch.zeros_like(hard)
        else:
            dropped = capacity_dropped(expert_indices, cfg.num_experts, cfg.capacity_factor)
            expert_weights = torch.where(dropped, 0.0, expert_weights)
        lb_loss = load_balancing_loss(router_probs, expert_indices, finite)
        z_loss = router_z_loss(router_logits, finite)
        expected_k = torch.where(finite, gate.sum(dim=-1), 0.0)
        compute_loss = expected_k.sum() / finite.sum().clamp_min(1) / max_k
        aux_loss = (
            cfg.load_balance_coef * lb_loss
            + cfg.z_loss_coef * z_loss
            + cfg.compute_cost_coef * compute_loss
        )
        return RoutingDecision(
            expert_indices=expert_indices,
            expert_weights=expert_weights,
            k_per_token=k_per_token,
            complexity=complexity,
            router_logits=router_logits,
            router_probs=router_probs,
            dropped=dropped,
            nonfinite=nonfinite,
            load_balancing_loss=lb_loss,
            z_loss=z_loss,
            compute_loss=compute_loss,
            aux_loss=aux_loss,
            batch_shape=batch_shape,
        )


class DynamicMoERouter(_RouterBase):
    """Routes each token to a data-dependent number of experts k in [min_k, max_k].

    Mode "complexity": a learned complexity estimator scores each token and ``compute_k``
    maps the score to k. Mode "top_p": k is the smallest number of experts whose softmax
    mass reaches ``top_p`` (capped at max_k); the complexity reported is the normalised
    entropy of the router distribution, and no estimator is built.

    ``implementation`` ("auto", "reference" or "triton"): see the module docstring.
    """

    def __init__(self, config: RouterConfig, implementation: str = "auto") -> None:
        super().__init__(config, implementation)
        self.complexity_estimator: ComplexityEstimator | None = (
            ComplexityEstimator(config.hidden_size, config.complexity_hidden_size)
            if config.mode == "complexity"
            else None
        )

    def compute_k(self, complexity: torch.Tensor) -> torch.Tensor:
        """Maps complexity float32[N] in [0, 1] to int64[N] k in [min_k, max_k]."""
        return k_from_complexity(complexity, self.config.min_k, self.config.max_k)

    def forward(self, hidden_states: torch.Tensor) -> RoutingDecision:
        """Routes float[..., D] hidden states; see RoutingDecision for the outputs."""
        cfg = self.config
        flat, batch_shape = flatten_tokens(hidden_states, cfg.hidden_size)
        with record_function(span_name("complexity")):
            estimated = (
                self.complexity_estimator(flat) if self.complexity_estimator is not None else None
            )
        if self._takes_triton_path(flat):
            return self._decide_in_triton(
                flat, batch_shape, rule=cfg.mode, max_k=cfg.max_k, complexity=estimated
            )
        with record_function(span_name("gating")):
            router_logits, router_probs = self._gate(flat)
            top_probs, top_indices = router_probs.topk(cfg.max_k, dim=-1)  # [N, K] sorted
        with record_function(span_name("select_k")):
            if estimated is not None:
                complexity = estimated
                k_per_token = self.compute_k(complexity)
                soft = soft_slot_mask(complexity, cfg.min_k, cfg.max_k, cfg.k_temperature)
                hard = slot_positions(cfg.max_k, flat.device) < k_per_token.unsqueeze(-1)
                slot_gate = hard.float() + soft - soft.detach()  # straight-through
            else:
                complexity = normalized_entropy(router_probs)
                k_per_token = k_from_top_p(top_probs, cfg.top_p, cfg.min_k)
                slot_gate = torch.ones_like(top_probs)
            return self._decide(
                flat=flat,
                batch_shape=batch_shape,
                router_logits=router_logits,
                router_probs=router_probs,
                top_probs=top_probs,
                top_indices=top_indices,
                k_per_token=k_per_token,
                slot_gate=slot_gate,
                complexity=complexity,
            )


class StaticTopKRouter(_RouterBase):
    """Fixed top-k router (k = config.max_k unless given): the baseline for dynamic routing.

    Its ``complexity`` is the normalised entropy of the router distribution.
    ``implementation`` ("auto", "reference" or "triton"): see the module docstring.
    """

    def __init__(
        self, config: RouterConfig, k: int | None = None, implementation: str = "auto"
    ) -> None:
        super().__init__(config, implementation)
        k = config.max_k if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= config.num_experts:
            raise ValueError(
                f"k must be an int in [1, num_experts={config.num_experts}]; got k={k!r}"
            )
        self.k = k

    def forward(self, hidden_states: torch.Tensor) -> RoutingDecision:
        """Routes float[..., D] hidden states to exactly k experts each."""
        flat, batch_shape = flatten_tokens(hidden_states, self.config.hidden_size)
        if self._takes_triton_path(flat):
            return self._decide_in_triton(flat, batch_shape, rule="static", max_k=self.k)
        with record_function(span_name("gating")):
            router_logits, router_probs = self._gate(flat)
            top_probs, top_indices = router_probs.topk(self.k, dim=-1)  # [N, k] sorted
        with record_function(span_name("select_k")):
            k_per_token = torch.full_like(top_indices[:, 0], self.k)
            return self._decide(
                flat=flat,
                batch_shape=batch_shape,
                router_logits=router_logits,
                router_probs=router_probs,
                top_probs=top_probs,
                top_indices=top_indices,
                k_per_token=k_per_token,
                slot_gate=torch.ones_like(top_probs),
                complexity=normalized_entropy(router_probs),
            )


# ----------------------------------------------------------------------------- experts

_GROUPED_MM_BROKEN: set[tuple[str, torch.dtype]] = set()
"""CPU dtypes whose ``torch._grouped_mm`` raised (stride alignment in some torch builds)."""


class _ZeroDeadRowGrad(torch.autograd.Function):
    """Identity on ``(x: float[M, D], row_weights: float32[M])`` whose backward zeroes the
    gradient of the rows where ``live: bool[M, 1]`` is False."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        row_weights: torch.Tensor,
        live: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(live)
        return x.view_as(x), row_weights.view_as(row_weights)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_x: torch.Tensor, grad_w: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        (live,) = ctx.saved_tensors  # type: ignore[attr-defined]
        gx = None if grad_x is None else grad_x.masked_fill(~live, 0.0)
        gw = None if grad_w is None else grad_w.masked_fill(~live.squeeze(-1), 0.0)
        return gx, gw, None


class SwiGLUExperts(nn.Module):
    """E SwiGLU feed-forward experts, run as grouped matmuls over expert-sorted rows.

    Weights follow nn.Linear's [out, in] layout per expert; the grouped matmul reads them
    transposed (column-major), the layout Hopper's grouped GEMM wants.

    Args:
        num_experts, hidden_size, inner_size: E, D and F.
        implementation: the grouped matmul's ("auto", "reference" or "triton"; see
            ``forward``).
    """

    def __init__(
        self, num_experts: int, hidden_size: int, inner_size: int, implementation: str = "auto"
    ) -> None:
        super().__init__()
        self.implementation = fast_path.check_implementation(implementation)
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, 2 * inner_size, hidden_size))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, inner_size))
        nn.init.normal_(self.w_gate_up, std=hidden_size**-0.5)
        nn.init.normal_(self.w_down, std=inner_size**-0.5)

    def forward(
        self, x_sorted: torch.Tensor, offsets: torch.Tensor, row_weights: torch.Tensor
    ) -> torch.Tensor:
        """Runs expert e on rows [offsets[e-1], offsets[e]) of x_sorted, scaled per row.

        On CUDA: ``torch._grouped_mm`` for bfloat16 on sm90/sm100, the Triton grouped matmul
        for other dtypes and devices ("auto" only), and otherwise the loop over experts (one
        host sync). On CPU: ``torch._grouped_mm``, or the loop where this build rejects it.
        Under "triton": the Triton grouped matmul on every device (``fast_path.grouped_matmul``).

        Args:
            x_sorted: float[M, D], rows grouped by expert; rows past offsets[-1] are ignored.
            offsets: int32[E], end row of each expert's group (cumulative counts).
            row_weights: float32[M], the routing weight of each row's token-expert pair,
                applied to the F-wide activation before the down projection (half the
                elements of scaling the D-wide output).

        Returns:
            float[M, D]: ``weight * expert(x)`` per row; rows past offsets[-1] are zero, and
            so are the gradients this module hands back to their rows of ``x_sorted`` and
            ``row_weights``.
        """
        if x_sorted.device.type == "cuda" or self.implementation == "triton":
            matmul = fast_path.grouped_matmul(x_sorted, self.implementation)
            if matmul is not None:  # no try/except: a sync-debug error must reach the caller
                return self._grouped(x_sorted, offsets, row_weights, matmul)
        elif x_sorted.device.type == "cpu" and hasattr(torch, "_grouped_mm"):
            key = ("cpu", x_sorted.dtype)
            if key not in _GROUPED_MM_BROKEN:
                try:
                    return self._grouped(x_sorted, offsets, row_weights)
                except RuntimeError:  # the CPU kernel's stride-alignment check in some builds
                    _GROUPED_MM_BROKEN.add(key)
        return self._looped(x_sorted, offsets, row_weights)

    def _grouped(
        self,
        x_sorted: torch.Tensor,
        offsets: torch.Tensor,
        row_weights: torch.Tensor,
        matmul: GroupedMatmul | None = None,
    ) -> torch.Tensor:
        matmul = torch._grouped_mm if matmul is None else matmul
        # The grouped matmul leaves rows past offsets[-1] undefined, in its output and in
        # the gradient of its input. Those rows stay inside this module: its output and the
        # gradients it hands back to x_sorted and row_weights are zero there.
        rows = torch.arange(x_sorted.shape[0], device=x_sorted.device)
        live = (rows < offsets[-1]).unsqueeze(-1)  # bool[M, 1]
        x_sorted, row_weights = _ZeroDeadRowGrad.apply(x_sorted, row_weights, live)  # type: ignore[no-untyped-call]
        gate_up = matmul(x_sorted, self.w_gate_up.transpose(-2, -1), offs=offsets)
        gate, up = gate_up.chunk(2, dim=-1)  # [M, F] each
        hidden = F.silu(gate) * up * row_weights.unsqueeze(-1).to(up.dtype)
        out = matmul(hidden, self.w_down.transpose(-2, -1), offs=offsets)  # [M, D]
        return out.masked_fill_(~live, 0.0)  # the matmul's backward does not read its output

    def _looped(
        self, x_sorted: torch.Tensor, offsets: torch.Tensor, row_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(x_sorted)
        start = 0
        for expert, end in enumerate(offsets.tolist()):  # one host sync, fallback only
            if end > start:
                gate, up = F.linear(x_sorted[start:end], self.w_gate_up[expert]).chunk(2, dim=-1)
                scale = row_weights[start:end].unsqueeze(-1).to(up.dtype)
                out[start:end] = F.linear(F.silu(gate) * up * scale, self.w_down[expert])
            start = end
        return out


# ----------------------------------------------------------------------------- layer


def _host_reads_are_free(device: torch.device) -> bool:
    """Whether the layer may read a device value on the host: off CUDA, outside
    torch.compile (a data-dependent shape would break its graph)."""
    return device.type != "cuda" and not torch.compiler.is_compiling()


_SPARE_ROWS = 1024  # scratch rows that the padding rows read in the dispatch, write in the combine


def _check_router_fits(router: object, config: RouterConfig) -> None:
    """A router given to MoELayer must route over the layer's experts and hidden size."""
    if not isinstance(router, nn.Module):
        raise TypeError(
            "router must be an nn.Module returning a RoutingDecision (or None); "
            f"got {type(router).__name__}"
        )
    theirs_config = getattr(router, "config", None)
    if not isinstance(theirs_config, RouterConfig):
        return  # a router of the user's own: its decision is checked in forward
    for field in ("num_experts", "hidden_size"):
        ours, theirs = getattr(config, field), getattr(theirs_config, field)
        if ours != theirs:
            raise ValueError(
                f"router.config.{field} must equal the layer's config.{field}={ours}; "
                f"got router.config.{field}={theirs}"
            )


class MoEOutput(NamedTuple):
    """Output of MoELayer: the layer output, same shape as its input, and the routing."""

    hidden_states: torch.Tensor
    routing: RoutingDecision


class MoELayer(nn.Module):
    """Router + E SwiGLU experts + sort-based dispatch and index_add_ combine.

    Args:
        config: the router configuration.
        router: a router to use instead of ``DynamicMoERouter(config)`` (e.g. a
            ``StaticTopKRouter`` for the baseline, or a module of your own that returns a
            ``RoutingDecision``); it must route over ``config.num_experts`` experts.
        implementation: "auto" (default), "reference" or "triton" (see the module
            docstring), for the experts, the dispatch and combine, and the router built
            here; a router given keeps its own.

    Raises:
        TypeError: ``config`` is not a RouterConfig or ``router`` is not an nn.Module.
        ValueError: the router's config differs from ``config`` in num_experts or
            hidden_size, or ``implementation`` is none of the three.
    """

    def __init__(
        self, config: RouterConfig, router: nn.Module | None = None, implementation: str = "auto"
    ) -> None:
        super().__init__()
        if not isinstance(config, RouterConfig):
            raise TypeError(f"config must be a RouterConfig; got {type(config).__name__}")
        self.implementation = fast_path.check_implementation(implementation)
        if router is not None:
            _check_router_fits(router, config)
        self.config = config
        self.router = router if router is not None else DynamicMoERouter(config, implementation)
        self.experts = SwiGLUExperts(
            config.num_experts, config.hidden_size, config.expert_hidden_size, implementation
        )

    def forward(self, hidden_states: torch.Tensor) -> MoEOutput:
        """float[..., D] -> MoEOutput with float[..., D] hidden states."""
        routing = self.router(hidden_states)
        if routing.num_experts != self.config.num_experts:
            raise ValueError(
                f"the router's decision must cover the layer's num_experts="
                f"{self.config.num_experts}; got router_logits over {routing.num_experts}"
            )
        flat = hidden_states.reshape(-1, self.config.hidden_size)  # [N, D], checked by router
        if flat.dtype != self.experts.w_down.dtype:
            raise TypeError(
                f"hidden_states dtype must match the experts' dtype {self.experts.w_down.dtype}; "
                f"got dtype={flat.dtype} (cast the input or call layer.to(dtype))"
            )
        num_experts, num_tokens = self.config.num_experts, flat.shape[0]
        if (matmul := fast_path.layer_matmul(flat, self.implementation)) is not None:
            out = self._forward_in_triton(flat, routing, matmul)
            return MoEOutput(out.reshape(hidden_states.shape), routing)
        if (matmul := fast_path.layer_train_matmul(flat, self.implementation)) is not None:
            out = self._forward_train(flat, routing, matmul)
            return MoEOutput(out.reshape(hidden_states.shape), routing)
        if _host_reads_are_free(flat.device):
            out = self._forward_active_rows(flat, routing)
            return MoEOutput(out.to(flat.dtype).reshape(hidden_states.shape), routing)
        with record_function(span_name("dispatch")):
            sorted_key, order, offsets = _sort_pairs(routing, num_experts)
            active_sorted = sorted_key < num_experts
            num_pairs = num_tokens * routing.max_k
            spare = min(num_pairs, _SPARE_ROWS)
            rows = torch.arange(num_pairs, device=flat.device)
            # Inactive rows (padding, drops) read spare zero rows past the N tokens: the
            # grouped matmul leaves rows past offsets[-1] undefined, forward and backward,
            # and this keeps that garbage out of every real token's output and gradient.
            # They are spread over up to _SPARE_ROWS rows: the gather's backward accumulates
            # rows that share an index one after another, so thousands of padding rows on
            # one spare row would serialise it (most of a dynamic-k training step on a GPU).
            token_of_pair = torch.where(
                active_sorted, order // routing.max_k, num_tokens + rows % spare
            )
            x_sorted = F.pad(flat, (0, 0, 0, spare))[token_of_pair]  # [N*K, D]
            # where, not a product: it also stops the padding rows' undefined gradients.
            row_weights = torch.where(active_sorted, routing.expert_weights.reshape(-1)[order], 0.0)
        with record_function(span_name("experts")):
            y_sorted = self.experts(x_sorted, offsets, row_weights)  # [N*K, D], weighted
        with record_function(span_name("combine")):
            # Back to (token, slot) order, then sum the K slots in float32: one read of the
            # expert outputs, no float32 copy of them, no atomics.
            # Inactive rows go to spare rows past the N*K pairs, spread over up to
            # _SPARE_ROWS of them: thousands of writes to a single row would serialise.
            pair_of_row = torch.where(active_sorted, order, num_pairs + rows % spare)
            by_pair = y_sorted.new_zeros(num_pairs + spare, flat.shape[-1])
            by_pair.index_copy_(0, pair_of_row, y_sorted)
            by_pair = by_pair[:num_pairs].view(num_tokens, routing.max_k, -1)  # [N, K, D]
            out = by_pair.sum(dim=1, dtype=torch.float32)  # [N, D]
            out = torch.where(routing.nonfinite.unsqueeze(-1), math.nan, out)
        return MoEOutput(out.to(flat.dtype).reshape(hidden_states.shape), routing)

    def _forward_active_rows(self, flat: torch.Tensor, routing: RoutingDecision) -> torch.Tensor:
        """Off CUDA, where reading the active-pair count costs no synchronisation: only the
        active pairs are gathered, run through the experts and written back, forward and
        backward, so the layer's time follows them. Same row order and the same float32
        sum over the K slots as the padded path, hence the same values."""
        num_tokens, max_k = flat.shape[0], routing.max_k
        with record_function(span_name("dispatch")):
            _, order, offsets = _sort_pairs(routing, self.config.num_experts)
            order = order[: int(offsets[-1])]  # the active pairs, grouped by expert
            x_sorted = flat.index_select(0, order // max_k)  # [A, D]
            row_weights = routing.expert_weights.reshape(-1).index_select(0, order)
        with record_function(span_name("experts")):
            y_sorted = self.experts(x_sorted, offsets, row_weights)  # [A, D], weighted
        with record_function(span_name("combine")):
            by_pair = y_sorted.new_zeros(num_tokens * max_k, flat.shape[-1])
            by_pair = by_pair.index_copy(0, order, y_sorted).view(num_tokens, max_k, -1)
            out = by_pair.sum(dim=1, dtype=torch.float32)  # [N, D]
            return torch.where(routing.nonfinite.unsqueeze(-1), math.nan, out)

    def _forward_train(
        self, flat: torch.Tensor, routing: RoutingDecision, matmul: GroupedMatmul
    ) -> torch.Tensor:
        """The forward with autograd in Triton kernels whose backward is theirs too, so the
        layer's training step follows the active pairs: same row order, grouped matmuls and
        float32 sum as the padded path; padding is never gathered, activated, summed or
        back-propagated, and no row is written by two slots."""
        with record_function(span_name("dispatch")):
            plan, x_sorted, row_weights = fast_path.train_dispatch(
                flat,
                routing.expert_indices,
                routing.dropped,
                routing.expert_weights,
                self.config.num_experts,
            )
        with record_function(span_name("experts")):
            y_sorted = fast_path.train_experts(
                x_sorted, row_weights, plan, self.experts.w_gate_up, self.experts.w_down, matmul
            )
        with record_function(span_name("combine")):
            return fast_path.train_combine(y_sorted, plan, routing.nonfinite)

    def _forward_in_triton(
        self, flat: torch.Tensor, routing: RoutingDecision, matmul: GroupedMatmul
    ) -> torch.Tensor:
        """The forward without autograd in Triton kernels that skip inactive slots, so the
        layer's time follows the active pairs: same row order and grouped matmuls as above;
        rows past the active count are neither gathered, activated nor read back."""
        with record_function(span_name("dispatch")):
            pairs = fast_path.dispatch(
                flat,
                routing.expert_indices,
                routing.dropped,
                routing.expert_weights,
                self.config.num_experts,
            )
        with record_function(span_name("experts")):
            y_sorted = fast_path.swiglu_experts(
                pairs.x_sorted,
                pairs.offsets,
                pairs.row_weights,
                self.experts.w_gate_up,
                self.experts.w_down,
                matmul,
            )
        with record_function(span_name("combine")):
            return fast_path.combine(y_sorted, pairs.pos, routing.nonfinite)


# ----------------------------------------------------------------------------- model


class MoEModelOutput(NamedTuple):
    """Output of MoEModel: final hidden states, one routing per layer, summed aux loss."""

    hidden_states: torch.Tensor
    routings: tuple[RoutingDecision, ...]
    aux_loss: torch.Tensor


class MoEBlock(nn.Module):
    """Pre-norm residual block: x + MoE(RMSNorm(x))."""

    def __init__(self, config: RouterConfig, implementation: str = "auto") -> None:
        super().__init__()
        self.norm = nn.RMSNorm(config.hidden_size)
        self.moe = MoELayer(config, implementation=implementation)

    def forward(self, hidden_states: torch.Tensor) -> MoEOutput:
        moe_out = self.moe(self.norm(hidden_states))
        return MoEOutput(hidden_states + moe_out.hidden_states, moe_out.routing)


class MoEModel(nn.Module):
    """A stack of MoE blocks, the reference model the devkit's tools are tried on.

    ``implementation`` ("auto", "reference" or "triton") goes to every layer.
    """

    def __init__(
        self, config: RouterConfig, num_layers: int = 2, implementation: str = "auto"
    ) -> None:
        super().__init__()
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1; got num_layers={num_layers!r}")
        fast_path.check_implementation(implementation)
        self.config = config
        self.layers = nn.ModuleList(MoEBlock(config, implementation) for _ in range(num_layers))

    def forward(self, hidden_states: torch.Tensor) -> MoEModelOutput:
        routings: list[RoutingDecision] = []
        for layer in self.layers:
            hidden_states, routing = layer(hidden_states)
            routings.append(routing)
        aux_loss = torch.stack([r.aux_loss for r in routings]).sum()
        return MoEModelOutput(hidden_states, tuple(routings), aux_loss)
