"""Router adapters: how ``RouterInspector.attach`` records routers it does not know.

This module holds the adapter registry (``register_adapter``, ``adapter_for``...), the
built-in adapters of transformers MoE models and the builders of a ``RoutingDecision`` from
what a router returned (``decision_from_router_outputs``, ``decision_from_dense_scores``) or
from per-token tensors (``decision_from_tensors``). Its public names are documented under
``moe_devkit.integrations.hf``, which re-exports them; it imports neither transformers nor
the rest of the inspector.

transformers 5.x runs each MoE layer's experts as one batched module, so nothing per expert
can be hooked; the router (gate) module can. An adapter is a function
``(module, args, output) -> RoutingDecision | None`` that turns one router module's forward
into a ``RoutingDecision``; the registry maps router class names to adapters, and ``attach``
puts a forward hook on every module whose class (or a base class) has one.

Built in (transformers 5.24; each router returns ``(router_logits, weights, indices)``):

=====================================  ================================================
router class                           selection recorded
=====================================  ================================================
MixtralTopKRouter                      top-k of softmax(logits)
Qwen2MoeTopKRouter, Qwen3MoeTopKRouter top-k of softmax(logits)
OlmoeTopKRouter                        top-k of softmax(logits)
GptOssTopKRouter                       top-k of logits (+ bias), softmax over the k
DeepseekV3TopkRouter                   sigmoid + correction bias, group-limited top-k
SwitchTransformersTop1Router           one-hot dispatch mask after the capacity limit
=====================================  ================================================

The indices recorded are the ones the router returned (what the experts run), never a
top-k recomputed from the logits: DeepSeek-V3's grouped, biased choice differs from
``softmax(logits).topk``. ``router_probs`` is softmax(logits), or for sigmoid routers the
sigmoid scores normalised to sum 1 (DeepSeek-V3's sequence-wise balance loss does the same);
the load-balancing loss and complexity (normalised entropy) are computed from it.

Gradient checkpointing runs each layer's forward again inside the backward pass; the hooks
skip that second call (``in_backward_recompute``), so each step is recorded once.

To register an adapter for another architecture, see ``moe_devkit.integrations.hf``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from moe_devkit.routers.torch_router import (
    RoutingDecision,
    load_balancing_loss,
    router_z_loss,
)

RouterAdapter = Callable[[nn.Module, tuple[Any, ...], Any], "RoutingDecision | None"]
"""(module, forward args, forward output) -> the decision, or None to record nothing."""

Scoring = Literal["softmax", "sigmoid"]

_ADAPTERS: dict[str, RouterAdapter] = {}

_ROUTER_CLASS_HINT = re.compile(r"Router|Gate|Gating")
_MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


# ----------------------------------------------------------------------------- registry


def register_adapter(
    router_class: str | type[nn.Module], adapter: RouterAdapter, *, replace: bool = False
) -> None:
    """Registers ``adapter`` for modules of ``router_class`` (a class or its ``__name__``).

    Subclasses match too. Call it before ``RouterInspector.attach``.

    Raises:
        ValueError: an adapter is already registered for that class and replace is False.
        TypeError: adapter is not callable.
    """
    name = router_class if isinstance(router_class, str) else router_class.__name__
    if not callable(adapter):
        raise TypeError(f"adapter must be callable; got {type(adapter).__name__}")
    if name in _ADAPTERS and not replace:
        raise ValueError(
            f"an adapter for {name!r} is already registered; pass replace=True to override it"
        )
    _ADAPTERS[name] = adapter


def unregister_adapter(router_class: str | type[nn.Module]) -> None:
    """Removes the adapter of ``router_class`` (no error if there is none)."""
    name = router_class if isinstance(router_class, str) else router_class.__name__
    _ADAPTERS.pop(name, None)


def registered_adapters() -> dict[str, RouterAdapter]:
    """A copy of the registry: router class name -> adapter."""
    return dict(_ADAPTERS)


def adapter_for(module: nn.Module) -> RouterAdapter | None:
    """The adapter of ``module``'s class or of its nearest registered base class."""
    for cls in type(module).__mro__:
        if cls is nn.Module:
            break
        adapter = _ADAPTERS.get(cls.__name__)
        if adapter is not None:
            return adapter
    return None


def raise_unknown_moe(model: nn.Module) -> None:
    """Raises, naming the router, when ``model`` looks like an MoE model; returns otherwise.

    The router named is the module holding a linear layer with one output per expert (the
    number of experts read from the model's config), or, without a config, a module whose
    class name says router or gate and that holds such a linear layer.

    Raises:
        ValueError: the model has an MoE config or router-like modules.
    """
    config = getattr(model, "config", None)
    experts = {}
    for source in (config, getattr(config, "text_config", None)):
        for key in _MOE_CONFIG_KEYS:
            value = getattr(source, key, None) if source is not None else None
            if isinstance(value, int) and value > 1:
                experts[key] = value
    counts = set(experts.values())
    candidates: list[tuple[str, str]] = []  # (qualified name, class) of router modules
    for name, module in model.named_modules():
        outputs = [p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 2]
        outputs += [c.out_features for c in module.children() if isinstance(c, nn.Linear)]
        if isinstance(module, nn.Linear):
            continue  # its owner is the router (or the linear is the gate: below)
        named = bool(_ROUTER_CLASS_HINT.search(type(module).__name__))
        fits = [o for o in outputs if (o in counts if counts else o > 1)]
        if fits and (named or (counts and len(outputs) == 1)):
            candidates.append((name, type(module).__name__))
    if not candidates and counts:  # a bare nn.Linear gate, e.g. block.gate
        candidates = [
            (n, f"{type(m).__name__} (a plain linear gate)")
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.out_features in counts
        ][:1]
    if not experts and not candidates:
        return
    where, router_class = candidates[0] if candidates else ("?", "TheRouterClass")
    found = (
        f"its router looks like {router_class} at {where!r}"
        if candidates
        else ("no module with one output per expert was found")
    )
    raise ValueError(
        f"{type(model).__name__} looks like an MoE model (config {experts}) but no router "
        f"could be read: {found}. Register an adapter before attach: "
        f"moe_devkit.integrations.hf.register_adapter({router_class!r}, adapter), where "
        "adapter(module, args, output) returns a RoutingDecision, e.g. "
        "decision_from_router_outputs(router_logits, expert_indices, expert_weights) "
        "(see docs/integrations.md)"
    )


# ----------------------------------------------------------------------------- builders


@torch.no_grad()
def decision_from_router_outputs(
    router_logits: torch.Tensor,
    expert_indices: torch.Tensor,
    expert_weights: torch.Tensor | None = None,
    *,
    scoring: Scoring = "softmax",
    dropped: torch.Tensor | None = None,
    batch_shape: tuple[int, ...] | None = None,
) -> RoutingDecision:
    """Builds a RoutingDecision from what a router returned (no recomputed selection).

    Args:
        router_logits: float[..., E], any float dtype (read in float32).
        expert_indices: int[..., K], the experts the model selected, -1 padded.
        expert_weights: float[..., K], the model's combine weights (default: router_probs
            of the selected experts).
        scoring: how router_probs follow from the logits: "softmax", or "sigmoid" (scores
            normalised to sum 1, for sigmoid routers such as DeepSeek-V3's).
        dropped: bool[..., K], selected pairs the model dropped (capacity); default none.
        batch_shape: the input's leading shape (default: (N,)).

    Raises:
        ValueError: the token counts of logits and indices differ, or scoring is unknown.
    """
    num_experts = router_logits.shape[-1]
    logits = router_logits.detach().reshape(-1, num_experts).float()  # [N, E]
    num_tokens = logits.shape[0]
    if expert_indices.numel() % max(num_tokens, 1) or expert_indices.numel() == 0:
        raise ValueError(
            f"expert_indices must hold K entries for each of the {num_tokens} tokens of "
            f"router_logits {tuple(router_logits.shape)}; got shape {tuple(expert_indices.shape)}"
        )
    if expert_indices.is_floating_point() or expert_indices.dtype == torch.bool:
        raise TypeError(
            f"expert_indices must be an integer tensor; got dtype={expert_indices.dtype} "
            f"(shape {tuple(expert_indices.shape)})"
        )
    indices = expert_indices.detach().reshape(num_tokens, -1).long()  # [N, K]
    scores = _logit_statistics(logits, scoring)
    probs, finite = scores.probs, scores.finite
    selected = indices >= 0
    if expert_weights is None:
        weights = probs.gather(1, indices.clamp_min(0))
    else:
        weights = expert_weights.detach().reshape(indices.shape).float()  # [N, K]
    weights = torch.where(selected, weights, 0.0)  # a model may leave NaN in empty slots
    k_per_token = selected.sum(dim=-1) * finite
    return RoutingDecision(
        expert_indices=indices,
        expert_weights=weights,
        k_per_token=k_per_token,
        complexity=scores.entropy,
        router_logits=logits,
        router_probs=probs,
        dropped=torch.zeros_like(selected) if dropped is None else dropped.reshape(indices.shape),
        nonfinite=~finite,
        load_balancing_loss=load_balancing_loss(probs, indices, finite),
        z_loss=scores.lse.square().sum() / finite.sum().clamp_min(1),
        compute_loss=k_per_token.sum() / (max(num_tokens, 1) * indices.shape[1]),
        aux_loss=logits.new_zeros(()),
        batch_shape=(num_tokens,) if batch_shape is None else batch_shape,
    )


class _LogitStatistics(NamedTuple):
    probs: torch.Tensor  # float32[..., E]
    finite: torch.Tensor  # bool[...]: every logit of the token finite
    entropy: torch.Tensor  # float32[...]: normalized entropy of probs, in [0, 1]
    lse: torch.Tensor  # float32[...]: logsumexp of the logits, 0 where not finite


def _logit_statistics(logits: torch.Tensor, scoring: Scoring) -> _LogitStatistics:
    """Router probabilities, finiteness, normalized entropy and logsumexp of float32[..., E]
    logits (any leading shape), from one shifted exponential: the values of
    ``torch.softmax``, ``normalized_entropy`` and the logsumexp of ``router_z_loss`` (to
    float32 rounding) in about a third of their separate kernels, which bound a router
    hook's cost on small token counts."""
    num_experts = logits.shape[-1]
    top = logits.amax(dim=-1, keepdim=True)  # NaN propagates
    finite = (logits.amin(dim=-1) > -math.inf) & (top.squeeze(-1) < math.inf)  # NaN: False
    if scoring == "softmax":
        shifted = (logits - top).clamp_min(-1e30)  # -inf logits: p = 0 and p * shifted = 0
        exp = shifted.exp()
        total = exp.sum(dim=-1, keepdim=True)
        probs = exp / total
        log_total = total.log().squeeze(-1)
        # H = -sum p log p, with log p = shifted - log(total)
        entropy = log_total - (probs * shifted).sum(dim=-1)
        lse = top.squeeze(-1) + log_total
    else:
        probs = _router_probs(logits, scoring)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)
        lse = torch.logsumexp(torch.where(finite.unsqueeze(-1), logits, 0.0), dim=-1)
    entropy = entropy / math.log(num_experts) if num_experts > 1 else torch.zeros_like(entropy)
    return _LogitStatistics(probs, finite, entropy, torch.where(finite, lse, 0.0))


def exclude_tokens(decision: RoutingDecision, keep: torch.Tensor) -> RoutingDecision:
    """The decision with the tokens where ``keep`` is False left out of every statistic.

    Those tokens (padding) get k = -1 and no selected expert, so the inspector does not count
    them; the losses are recomputed over the kept tokens, as transformers' masked
    ``load_balancing_loss_func`` does. Device ops only (no host synchronisation).

    Args:
        decision: any decision of N tokens.
        keep: bool[N], the tokens to keep.
    """
    keep = keep.reshape(-1).to(device=decision.expert_indices.device, dtype=torch.bool)
    pairs = keep.unsqueeze(-1)
    finite = ~decision.nonfinite & keep
    indices = torch.where(pairs, decision.expert_indices, -1)
    return RoutingDecision(
        expert_indices=indices,
        expert_weights=torch.where(pairs, decision.expert_weights, 0.0),
        k_per_token=torch.where(keep, decision.k_per_token, -1),
        complexity=torch.where(keep, decision.complexity, 0.0),
        router_logits=decision.router_logits,
        router_probs=decision.router_probs,
        dropped=decision.dropped & pairs,
        nonfinite=decision.nonfinite & keep,
        load_balancing_loss=load_balancing_loss(decision.router_probs, indices, finite),
        z_loss=router_z_loss(decision.router_logits, finite),
        compute_loss=decision.compute_loss,
        aux_loss=decision.aux_loss,
        batch_shape=decision.batch_shape,
    )


def check_decision(decision: object, source: str, *, values: bool = True) -> None:
    """Raises a clear error when what an adapter returned cannot be counted.

    Checks the type, the dtypes and the shapes (host metadata, no synchronisation) and, with
    ``values``, that every index is in [-1, num_experts) (one host read: the inspector does
    it at a layer's first step only, and not while CUDA sync-debug mode is on).

    Args:
        decision: what the adapter returned.
        source: the adapter or module, for the message.

    Raises:
        TypeError: not a RoutingDecision, or indices that are not integers.
        ValueError: shapes that disagree, or indices out of range.
    """
    if not isinstance(decision, RoutingDecision):
        raise TypeError(
            f"{source} must return a RoutingDecision or None; got {type(decision).__name__}"
        )
    indices = decision.expert_indices
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(
            f"{source} returned expert_indices of dtype {indices.dtype}; expected an integer "
            "tensor (build the decision with decision_from_router_outputs, which checks this)"
        )
    num_tokens, num_experts = decision.router_logits.shape[0], decision.num_experts
    if indices.dim() != 2 or indices.shape[0] != num_tokens or indices.shape[1] == 0:
        raise ValueError(
            f"{source} returned expert_indices of shape {tuple(indices.shape)}; expected "
            f"[N, K] with N = {num_tokens}, the tokens of router_logits "
            f"{tuple(decision.router_logits.shape)}"
        )
    for name in ("k_per_token", "complexity", "nonfinite"):
        shape = tuple(getattr(decision, name).shape)
        if shape != (num_tokens,):
            raise ValueError(f"{source} returned {name} of shape {shape}; expected ({num_tokens},)")
    if decision.dropped.shape != indices.shape:
        raise ValueError(
            f"{source} returned dropped of shape {tuple(decision.dropped.shape)}; expected "
            f"the shape of expert_indices {tuple(indices.shape)}"
        )
    if values and indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < -1 or high >= num_experts:
            raise ValueError(
                f"{source} returned expert_indices in [{low}, {high}]; expected values in "
                f"[-1, num_experts={num_experts}) (-1: no expert)"
            )


def decision_from_dense_scores(
    router_logits: torch.Tensor,
    dense_scores: torch.Tensor,
    *,
    max_k: int | None = None,
    scoring: Scoring = "softmax",
) -> RoutingDecision:
    """For routers returning dense per-expert weights, zero where an expert is not selected.

    Also fits one-hot or multi-hot dispatch masks [..., E] (the weights are then 0/1).

    Args:
        router_logits: float[..., E].
        dense_scores: float or int[..., E]; non-zero entries are the selected experts.
        max_k: K, the most experts a token can select (default E).
        scoring: see decision_from_router_outputs.
    """
    num_experts = dense_scores.shape[-1]
    scores = dense_scores.detach().reshape(-1, num_experts)  # [N, E]
    k = num_experts if max_k is None else max_k
    chosen = scores != 0
    # Selected experts first, larger |score| first among them; ties keep any order.
    key = chosen.float() * (1.0 + scores.float().abs().nan_to_num(0.0))
    top_key, top_idx = key.topk(k, dim=-1)  # [N, K]
    indices = torch.where(top_key > 0, top_idx, -1)
    weights = scores.float().gather(1, top_idx)
    return decision_from_router_outputs(router_logits, indices, weights, scoring=scoring)


def _router_probs(logits: torch.Tensor, scoring: Scoring) -> torch.Tensor:
    if scoring == "softmax":
        return torch.softmax(logits, dim=-1)
    if scoring == "sigmoid":
        scores = torch.sigmoid(logits)
        return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    raise ValueError(f"scoring must be 'softmax' or 'sigmoid'; got scoring={scoring!r}")


def _whole_numbers(name: str, values: torch.Tensor) -> torch.Tensor:
    """``values`` as int64; floats must hold whole numbers (never truncated)."""
    if values.dtype == torch.bool or values.is_complex():
        raise TypeError(f"{name} must be an integer tensor; got dtype={values.dtype}")
    if values.is_floating_point():
        bad = ~torch.isfinite(values) | (values != values.round())
        if bool(bad.any()):
            first = values.reshape(-1)[bad.reshape(-1)][0].item()
            raise ValueError(f"{name} must hold whole numbers; got {first:g} ({values.dtype})")
    return values.long()


def _first_k(indices: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """int64[N, K]: each token's first k valid indices, -1 elsewhere (ValueError when a k is
    negative or above the token's valid indices)."""
    valid = indices >= 0  # [N, K]
    available = valid.sum(dim=-1)  # [N]
    bad = (k < 0) | (k > available)
    if bool(bad.any()):
        token = int(bad.long().argmax())
        raise ValueError(
            "k_values must be in [0, the token's valid (non -1) expert_indices]; "
            f"got k={int(k[token])} for token {token}, which has {int(available[token])}"
        )
    rank = valid.long().cumsum(dim=-1)  # [N, K]: 1-based rank of each valid slot
    return torch.where(valid & (rank <= k.unsqueeze(-1)), indices, -1)


def decision_from_tensors(
    complexity: torch.Tensor,
    k_values: torch.Tensor,
    expert_indices: torch.Tensor,
    num_experts: int | None = None,
) -> RoutingDecision:
    """Builds a RoutingDecision from raw per-token tensors (losses set to 0, no logits).

    Reads the values on the host to check them.

    Args:
        complexity: float[...] per token.
        k_values: int[...] per token (whole-valued floats are accepted), each in
            [0, the token's valid indices].
        expert_indices: int[..., K], -1 padded, ranked: a token with k below its valid
            indices keeps its first k (the slots past k are set to -1).
        num_experts: E (default: 1 + the largest index).

    Raises:
        TypeError: an index or k tensor that is boolean or complex.
        ValueError: shapes disagree, a value is not a whole number or out of range, a k
            exceeds its token's valid indices, or there are no tokens.
    """
    indices = _whole_numbers("expert_indices", expert_indices)
    indices = indices.reshape(-1, indices.shape[-1])  # [N, K]
    num_tokens = indices.shape[0]
    if num_tokens == 0:
        raise ValueError(
            f"expert_indices must hold at least one token; got shape {tuple(expert_indices.shape)}"
        )
    if complexity.numel() != num_tokens or k_values.numel() != num_tokens:
        raise ValueError(
            "complexity and k_values must have one value per token of expert_indices "
            f"({num_tokens}); got complexity shape {tuple(complexity.shape)}, "
            f"k_values shape {tuple(k_values.shape)}"
        )
    largest, smallest = int(indices.max()), int(indices.min())
    if num_experts is None:
        num_experts = max(largest + 1, 1)
    if largest >= num_experts or smallest < -1:
        raise ValueError(
            f"expert_indices must be in [-1, num_experts={num_experts}); "
            f"got values in [{smallest}, {largest}]"
        )
    k = _whole_numbers("k_values", k_values).reshape(-1).to(indices.device)
    indices = _first_k(indices, k)
    zero = torch.zeros((), device=indices.device)
    empty = torch.zeros(num_tokens, num_experts, device=indices.device)
    return RoutingDecision(
        expert_indices=indices,
        expert_weights=torch.zeros(indices.shape, device=indices.device),
        k_per_token=k,
        complexity=complexity.reshape(-1).float(),
        router_logits=empty,
        router_probs=empty,
        dropped=torch.zeros(indices.shape, dtype=torch.bool, device=indices.device),
        nonfinite=~torch.isfinite(complexity.reshape(-1).float()),
        load_balancing_loss=zero,
        z_loss=zero,
        compute_loss=zero,
        aux_loss=zero,
        batch_shape=(num_tokens,),
    )


# ----------------------------------------------------------------------------- adapters


def topk_tuple_adapter(scoring: Scoring = "softmax") -> RouterAdapter:
    """Adapter for routers returning ``(router_logits, expert_weights, expert_indices)``."""

    def adapt(module: nn.Module, args: tuple[Any, ...], output: Any) -> RoutingDecision:
        if not (isinstance(output, tuple) and len(output) == 3):
            raise TypeError(
                f"{type(module).__name__} must return (router_logits, weights, indices) for "
                f"this adapter; got {type(output).__name__}. Register a matching adapter with "
                "moe_devkit.integrations.hf.register_adapter(..., replace=True)"
            )
        logits, weights, indices = output
        return decision_from_router_outputs(logits, indices, weights, scoring=scoring)

    return adapt


def switch_top1_adapter(module: nn.Module, args: tuple[Any, ...], output: Any) -> RoutingDecision:
    """SwitchTransformersTop1Router: ``(dispatch_mask, max_prob, router_logits)``.

    The mask is one-hot [B, S, E] with tokens over an expert's capacity zeroed. The choice
    recorded is the mask's expert; for a zeroed row (dropped by capacity) it is the argmax of
    the logits, the expert the router had picked, and the pair is marked dropped, as the
    reference routers do (counts include dropped pairs; ``dropped_pairs`` counts them).
    """
    mask, _, logits = output
    num_experts = logits.shape[-1]
    flat_mask = mask.detach().reshape(-1, num_experts)  # [N, E]
    executed = (flat_mask != 0).any(dim=-1, keepdim=True)  # [N, 1]
    fallback = logits.detach().reshape(-1, num_experts).float().argmax(dim=-1, keepdim=True)
    choice = torch.where(executed, flat_mask.argmax(dim=-1, keepdim=True), fallback)
    return decision_from_router_outputs(logits, choice, executed.float(), dropped=~executed)


register_adapter("SwitchTransformersTop1Router", switch_top1_adapter)
