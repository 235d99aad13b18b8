"""Routers whose outputs have an unusual layout, read by dedicated adapters and probes.

Structural discovery (``inspect.discovery``) reads routers that return per-token indices,
logits beside an experts module, or dense scores. A few MoE layers route differently:

* JetMoE's ``JetMoeTopKGating`` (MLP and mixture-of-attention experts) returns the
  (token, slot) pairs sorted by expert with the experts' group sizes: the indices are put
  back in token order (``jetmoe_adapter``);
* NLLB-MoE's ``NllbMoeTop2Router`` returns a top-1 mask and dense combine weights after the
  capacity limit: the two selected experts are its top-2 by probability, and a selected
  pair whose combine weight is zero was dropped (``nllb_top2_adapter``). What its experts
  module runs is read from that module's inputs, as for any experts module: the
  selection and the executed pairs are recorded side by side (``selected_counts`` and
  ``counts``). In transformers 5.x ``NllbMoeExperts`` reads the top-1 mask as expert
  indices, so its experts 0 and 1 run every token whatever the router chose, and the
  report shows that;
* Switch Transformers' one-hot dispatch mask after the capacity limit
  (``adapters.switch_top1_adapter``);
* product-key experts (Doge's ``DogeCDMoE``): each token retrieves K expert embeddings by
  index; the indices are read from the embedding lookup and the E logits are the sums of
  the two sub-key scores (``product_key_layout``).

The adapters are registered by router class name (``adapters.register_adapter``), so a user
can replace any of them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from moe_devkit.inspect.adapters import (
    RouterAdapter,
    decision_from_router_outputs,
    register_adapter,
)
from moe_devkit.routers.torch_router import RoutingDecision


def jetmoe_adapter(module: nn.Module, args: tuple[Any, ...], output: Any) -> RoutingDecision:
    """JetMoeTopKGating: ``(index_sorted, batch_index, batch_gates, expert_size, logits)``.

    ``index_sorted[p]`` is the flat (token * K + slot) position of the p-th pair in expert
    order and ``expert_size[e]`` the pairs of expert e: the expert of each sorted pair is
    its group's, scattered back to the token's slot. Device ops only (the group sizes are
    the Python list the model itself already read).
    """
    index_sorted, _, gates, expert_size, logits = output
    num_experts, pairs = logits.shape[-1], index_sorted.numel()
    sizes = torch.tensor(list(expert_size), dtype=torch.long)
    if logits.is_cuda:  # from pinned memory, non-blocking: a pageable copy would synchronise
        sizes = sizes.pin_memory().to(logits.device, non_blocking=True)
    experts = torch.arange(num_experts, device=logits.device)
    expert_of_pair = experts.repeat_interleave(sizes, output_size=pairs)  # output_size: no sync
    flat = torch.empty(pairs, dtype=torch.long, device=logits.device)
    flat.scatter_(0, index_sorted, expert_of_pair)
    weights = torch.empty(pairs, dtype=torch.float32, device=logits.device)
    weights.scatter_(0, index_sorted, gates.detach().float())
    num_tokens = logits.reshape(-1, num_experts).shape[0]
    k = pairs // max(num_tokens, 1)
    return decision_from_router_outputs(logits, flat.view(num_tokens, k), weights.view(-1, k))


def nllb_top2_adapter(module: nn.Module, args: tuple[Any, ...], output: Any) -> RoutingDecision:
    """NllbMoeTop2Router: ``(top_1_mask, combine_weights, router_logits)``, after capacity.

    The selected experts are the top 2 of the router's probabilities (its default
    ``second_expert_policy="all"``; with "random" or "sampling" the second choice is drawn,
    and the recorded one is then the expert it ran, when it ran). A selected pair whose
    combine weight is zero was dropped by the capacity limit (or by the router's own
    padding mask).
    """
    _, combine, logits = output
    num_experts = logits.shape[-1]
    flat_logits = logits.detach().reshape(-1, num_experts).float()
    flat_combine = combine.detach().reshape(-1, num_experts).float()
    policy = getattr(module, "second_expert_policy", "all")
    if policy == "all":
        chosen = flat_logits.topk(2, dim=-1).indices  # [N, 2]: top-1, then top-2
    else:
        top1 = flat_logits.argmax(dim=-1, keepdim=True)
        ran = torch.where(flat_combine.scatter(1, top1, 0.0) != 0, flat_logits, -math.inf)
        chosen = torch.cat([top1, ran.argmax(dim=-1, keepdim=True)], dim=-1)
    weights = flat_combine.gather(1, chosen)
    return decision_from_router_outputs(logits, chosen, weights, dropped=weights == 0)


register_adapter("JetMoeTopKGating", jetmoe_adapter)

# Routers whose output says what they selected while their experts module receives the
# pairs it runs in another form: the probe records both (``records.Selection``).
SELECTION_ADAPTERS: dict[str, RouterAdapter] = {"NllbMoeTop2Router": nllb_top2_adapter}


def selection_adapter_for(module: nn.Module) -> RouterAdapter | None:
    """The selection adapter of ``module``'s class or of a base class (None: none)."""
    for cls in type(module).__mro__:
        adapter = SELECTION_ADAPTERS.get(cls.__name__)
        if adapter is not None:
            return adapter
    return None


# ----------------------------------------------------------------------------- product keys


def is_product_key_layer(module: nn.Module) -> bool:
    """A block that retrieves experts as embeddings by product keys (Doge's ``DogeCDMoE``):
    a ``router_gate`` linear with 2 * num_keys outputs and a ``down_embed`` embedding of
    the experts."""
    gate, embed = getattr(module, "router_gate", None), getattr(module, "down_embed", None)
    keys = getattr(module, "num_keys", None)
    return (
        isinstance(gate, nn.Linear)
        and isinstance(embed, nn.Embedding)
        and isinstance(keys, int)
        and gate.out_features == 2 * keys
    )


def product_key_decision(
    module: nn.Module, indices: torch.Tensor, router_logits: torch.Tensor
) -> RoutingDecision:
    """The decision of a product-key layer from the retrieved indices and its sub-key logits.

    Args:
        module: the layer (``num_keys``, ``down_embed``).
        indices: int[N, K], the experts retrieved (the embedding lookup's input).
        router_logits: float[2, N, num_keys], the two sub-key scores of each token.
    """
    keys = getattr(module, "num_keys")  # noqa: B009 (an attribute of the model's class)
    embed = getattr(module, "down_embed")  # noqa: B009
    num_experts = int(embed.num_embeddings)
    flat = indices.detach().reshape(-1, indices.shape[-1])
    scores = router_logits.detach().float().reshape(2, flat.shape[0], keys)
    logits = (scores[0].unsqueeze(-1) + scores[1].unsqueeze(-2)).reshape(flat.shape[0], -1)
    if logits.shape[-1] < num_experts:  # experts beyond num_keys**2 are never retrieved
        never = torch.finfo(torch.float32).min / 4  # finite: an infinite logit reads as NaN
        pad = logits.new_full((flat.shape[0], num_experts - logits.shape[-1]), never)
        logits = torch.cat([logits, pad], dim=-1)
    weights = torch.softmax(logits.gather(1, flat), dim=-1)
    return decision_from_router_outputs(logits, flat, weights)
