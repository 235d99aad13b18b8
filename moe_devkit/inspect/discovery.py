"""Finds the routers of a model by its structure, and the hooks that record them.

No list of architecture names is needed. ``find_probes(model)`` looks, in this order, for

1. moe-devkit's reference routers (their forward returns a ``RoutingDecision``);
2. modules with a registered adapter (``adapters.register_adapter``: an override, or one
   of the built-in adapters for routers whose outputs have an unusual structure);
3. the router classes a transformers model declares for its router outputs
   (``_can_record_outputs["router_logits"]`` of any ``PreTrainedModel`` in the model), and
   for each, what the router returns, read at its first call:

   * a ``(logits, weights, indices)`` tuple (any order: the float [N, E] tensor, the float
     [N, K] tensor and the integer [N, K] tensor): recorded from the router's output alone;
   * logits only (the top-k happens in the MoE block): the logits from the router, the
     indices and weights from what the block's experts module receives (a forward
     pre-hook on the sibling whose ``forward`` takes an index tensor);
   * dense per-expert scores, zero where an expert is not selected: the non-zero entries;
4. experts modules (``forward(hidden_states, top_k_index, top_k_weights)`` and its
   spellings) that no router of step 3 covers: the indices they receive, with the logits
   of a sibling linear gate when there is one.

Each ``Probe`` installs its hooks and hands every ``RoutingDecision`` to the inspector's
``emit`` callback; the inspector skips activation checkpointing's recompute and masks
padding (``padding.TokenMasks``). This module imports no transformers.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from moe_devkit.inspect.adapters import (
    RouterAdapter,
    Scoring,
    adapter_for,
    decision_from_dense_scores,
    decision_from_router_outputs,
)
from moe_devkit.inspect.layouts import (
    is_product_key_layer,
    product_key_decision,
    selection_adapter_for,
)
from moe_devkit.inspect.records import RouterSite, Selection
from moe_devkit.routers.torch_router import DynamicMoERouter, RoutingDecision, StaticTopKRouter


class Emit(Protocol):
    """The inspector's callback: one decision of a site (and what its router selected,
    when the experts ran other pairs)."""

    def __call__(
        self, site: RouterSite, decision: RoutingDecision, selection: Selection | None = None
    ) -> None: ...


class EmitRaw(Protocol):
    """The inspector's callback for a router's outputs read by reference: the logits, the
    selected experts, their weights (or None) and the scoring; it builds the decision now
    or later (``inspect.raw``)."""

    def __call__(
        self,
        site: RouterSite,
        logits: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor | None,
        scoring: Scoring,
    ) -> None: ...


Handle = torch.utils.hooks.RemovableHandle


class Install(Protocol):
    """Registers a probe's hooks; given the inspector's callbacks, returns the handles
    (``raw``: where a router's outputs may go by reference; default: ``emit`` a decision)."""

    def __call__(self, emit: Emit, raw: EmitRaw | None = None) -> list[Handle]: ...


# How transformers' experts modules name the index and weight arguments of their forward.
INDEX_ARGUMENTS = (
    "top_k_index",
    "top_k_indices",
    "topk_index",
    "topk_indices",
    "topk_idx",
    "router_indices",
    "selected_experts",
    "expert_indices",
    "router_mask",
)
WEIGHT_ARGUMENTS = (
    "top_k_weights",
    "topk_weights",
    "routing_weights",
    "router_weights",
    "expert_weights",
    "router_scores",
    "router_probs",
)


_ROUTER_NAME = re.compile(r"Router|Gate|Gating")


@dataclass
class Probe:
    """The hooks that record one MoE layer.

    Attributes:
        site: where the layer is (its name in the summary, its block and router).
        how: what is read, in words (shown by ``RouterInspector.probes``).
        install: registers the hooks; given the inspector's ``emit`` (and optionally its
            ``EmitRaw``), returns the handles.
    """

    site: RouterSite
    how: str
    install: Install = field(repr=False)


def find_probes(model: nn.Module) -> list[Probe]:
    """The probes of every router of ``model`` (empty when it has none that can be found)."""
    names = {id(m): n for n, m in model.named_modules()}
    parents = parent_modules(model)
    probes: list[Probe] = []
    covered: set[int] = set()  # ids of blocks whose routing a probe records

    for name, module in model.named_modules():
        if isinstance(module, DynamicMoERouter | StaticTopKRouter):
            probes.append(_reference_probe(name or "router", module))
            covered.add(id(module))
    for name, module in model.named_modules():
        selection = selection_adapter_for(module)
        block = parents.get(id(module), module)
        experts = _experts_of(block, exclude=module) if selection is not None else None
        if selection is not None and experts is not None and id(block) not in covered:
            probes.append(_router_probe(name, module, block, -1, experts, selection))
            covered.update({id(module), id(block)})
    for name, module in model.named_modules():
        adapter = adapter_for(module)
        if adapter is not None and id(module) not in covered:
            block = parents.get(id(module), module)
            probes.append(_adapter_probe(name or "router", module, block, adapter))
            covered.update({id(module), id(block)})
    for name, module in model.named_modules():
        if is_product_key_layer(module) and id(module) not in covered:
            probes.append(_product_key_probe(name, module))
            covered.add(id(module))
    for module, index in _recorded_routers(model):
        if id(module) in covered or any(_is_experts(m) for m in module.modules()):
            continue  # a block declared as the router (its experts inside): step 4 reads it
        block = parents.get(id(module), module)
        if id(block) in covered:
            continue
        experts = _experts_of(block, exclude=module)
        probes.append(_router_probe(names[id(module)], module, block, index, experts))
        covered.update({id(module), id(block)})
    for name, module in model.named_modules():
        if not _is_experts(module):
            continue
        block = parents.get(id(module), module)
        if id(block) in covered or id(module) in covered:
            continue
        gate = _linear_gate(block, module)
        probes.append(_experts_probe(name, module, block, gate))
        covered.update({id(module), id(block)})
    return probes


# ----------------------------------------------------------------------------- structure


def parent_modules(model: nn.Module) -> dict[int, nn.Module]:
    """id(module) -> its parent, for every module below ``model``."""
    parents: dict[int, nn.Module] = {}
    for module in model.modules():
        for child in module.children():
            parents.setdefault(id(child), module)
    return parents


def _recorded_routers(model: nn.Module) -> list[tuple[nn.Module, int]]:
    """(module, index of the logits in its output) of each router class that a transformers
    model in ``model`` declares in ``_can_record_outputs["router_logits"]``."""
    targets: list[tuple[type, int, str | None]] = []
    for module in model.modules():
        record = getattr(type(module), "_can_record_outputs", None)
        if not isinstance(record, dict) or "router_logits" not in record:
            continue
        for entry in _as_list(record["router_logits"]):
            target = getattr(entry, "target_class", entry)
            if isinstance(target, type):
                index = getattr(entry, "index", 0)
                targets.append((target, int(index or 0), getattr(entry, "layer_name", None)))
    found: list[tuple[nn.Module, int]] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        for target, index, layer_name in targets:
            if isinstance(module, target) and id(module) not in seen:
                if layer_name is not None and not name.endswith(layer_name):
                    continue
                found.append((module, index))
                seen.add(id(module))
    return found


def _as_list(value: object) -> list[object]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _forward_parameters(module: nn.Module) -> list[str]:
    try:
        signature = inspect.signature(type(module).forward)
    except (TypeError, ValueError):
        return []
    return [p for p in signature.parameters if p != "self"]


def _is_experts(module: nn.Module) -> bool:
    """Whether ``module``'s forward takes an index tensor: a batched experts module."""
    params = _forward_parameters(module)
    return len(params) >= 2 and params[1] in INDEX_ARGUMENTS


def _experts_of(block: nn.Module, exclude: nn.Module) -> nn.Module | None:
    for child in block.children():
        if child is not exclude and _is_experts(child):
            return child
    return None


def _linear_gate(block: nn.Module, experts: nn.Module) -> nn.Module | None:
    """A sibling of ``experts`` that is a Linear with one output per expert."""
    num_experts = getattr(experts, "num_experts", None)
    for child in block.children():
        if child is experts:
            continue
        if _ROUTER_NAME.search(type(child).__name__) and not _is_experts(child):
            return child
        linear = child if isinstance(child, nn.Linear) else None
        if linear is None:
            inner = [m for m in child.children() if isinstance(m, nn.Linear)]
            linear = inner[0] if len(inner) == 1 and len(list(child.children())) == 1 else None
        if linear is not None and (num_experts is None or linear.out_features == num_experts):
            return child
    return None


def _argument(
    args: tuple[Any, ...], kwargs: dict[str, Any], names: Sequence[str], position: int
) -> Any:
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return args[position] if len(args) > position else None


# ----------------------------------------------------------------------------- probes


def _reference_probe(name: str, module: nn.Module) -> Probe:
    site = RouterSite(name, module, module)

    def install(emit: Emit, raw: EmitRaw | None = None) -> list[Handle]:
        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, RoutingDecision):
                emit(site, output)

        return [module.register_forward_hook(hook)]

    return Probe(site, "reference router output", install)


def _adapter_probe(name: str, module: nn.Module, block: nn.Module, adapter: RouterAdapter) -> Probe:
    site = RouterSite(name, block, module)
    how = f"registered adapter {getattr(adapter, '__name__', type(adapter).__name__)}"

    def install(emit: Emit, raw: EmitRaw | None = None) -> list[Handle]:
        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            decision = adapter(mod, args, output)
            if decision is not None:
                emit(site, decision)

        return [module.register_forward_hook(hook)]

    return Probe(site, how, install)


def _router_probe(
    name: str,
    router: nn.Module,
    block: nn.Module,
    index: int,
    experts: nn.Module | None,
    selection_adapter: RouterAdapter | None = None,
) -> Probe:
    """A router declared for transformers' router outputs; its output read at each call.

    With ``selection_adapter`` the router's output gives what it selected (a ``Selection``)
    and the experts' inputs what ran.
    """
    site = RouterSite(name, block, router)
    max_k = _configured_top_k(router, block)
    scoring = _scoring(router, block)

    def install(emit: Emit, raw: EmitRaw | None = None) -> list[Handle]:
        pending: list[torch.Tensor] = []  # logits waiting for the experts' inputs
        selected: list[Selection] = []

        def router_hook(mod: nn.Module, args: Any, output: Any) -> None:
            logits = _pick(output, index)
            if selection_adapter is not None:
                chosen = selection_adapter(mod, args, output)
                if chosen is not None:
                    selected[:] = [Selection(chosen.expert_indices, chosen.dropped)]
                    pending[:] = [logits]
                    probe.how = "router output (selected) + experts' inputs (executed)"
                return
            parts = _topk_parts(output, logits)
            if parts is not None:
                weights, indices = parts
                probe.how = "router output: logits, weights, indices"
                if raw is not None:
                    raw(site, logits, indices, weights, scoring)
                else:
                    decision = decision_from_router_outputs(
                        logits, indices, weights, scoring=scoring
                    )
                    emit(site, decision)
                return
            dense = _dense_scores(output, logits)
            if dense is not None:
                decision = decision_from_dense_scores(logits, dense, max_k=max_k, scoring=scoring)
                probe.how = "router output: logits, dense scores"
                emit(site, decision)
                return
            if experts is None:
                raise _unreadable(router, output)
            probe.how = "router logits + experts' inputs"
            pending[:] = [logits]

        def experts_hook(mod: nn.Module, args: Any, kwargs: Any) -> None:
            if not pending:
                return  # this router's output held the routing: recorded already
            logits = pending.pop()
            indices = _argument(args, kwargs, INDEX_ARGUMENTS, 1)
            weights = _argument(args, kwargs, WEIGHT_ARGUMENTS, 2)
            decision = _decision_from_experts(mod, logits, indices, weights, scoring)
            emit(site, decision, selected.pop() if selected else None)

        handles = [router.register_forward_hook(router_hook)]
        if experts is not None:
            handles.append(experts.register_forward_pre_hook(experts_hook, with_kwargs=True))
        return handles

    probe = Probe(site, "router output (read at its first call)", install)
    return probe


def _experts_probe(
    name: str, experts: nn.Module, block: nn.Module, gate: nn.Module | None
) -> Probe:
    """An experts module no declared router covers: the indices it receives."""
    site = RouterSite(name, block, gate)

    def install(emit: Emit, raw: EmitRaw | None = None) -> list[Handle]:
        pending: list[torch.Tensor] = []

        def gate_hook(mod: nn.Module, args: Any, output: Any) -> None:
            width = getattr(experts, "num_experts", None)
            for logits in _tensors(output):  # the first float tensor of one value per expert
                if logits.is_floating_point() and width in (None, logits.shape[-1]):
                    pending[:] = [logits]
                    return

        def experts_hook(mod: nn.Module, args: Any, kwargs: Any) -> None:
            logits = pending.pop() if pending else None
            indices = _argument(args, kwargs, INDEX_ARGUMENTS, 1)
            weights = _argument(args, kwargs, WEIGHT_ARGUMENTS, 2)
            emit(site, _decision_from_experts(mod, logits, indices, weights))

        handles = [experts.register_forward_pre_hook(experts_hook, with_kwargs=True)]
        if gate is not None:
            handles.append(gate.register_forward_hook(gate_hook))
        return handles

    return Probe(site, "experts' inputs" + (" + gate logits" if gate is not None else ""), install)


def _product_key_probe(name: str, block: nn.Module) -> Probe:
    """Product-key experts: indices from the expert embedding lookup, logits from the
    block's output (``layouts.product_key_decision``)."""
    gate: nn.Module = getattr(block, "router_gate")  # noqa: B009
    lookup: nn.Module = getattr(block, "down_embed")  # noqa: B009
    site = RouterSite(name, block, gate)

    def install(emit: Emit, raw: EmitRaw | None = None) -> list[Handle]:
        pending: list[torch.Tensor] = []

        def lookup_hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            pending[:] = [args[0]]

        def block_hook(mod: nn.Module, args: Any, output: Any) -> None:
            logits = _pick(output, 1)
            if pending and isinstance(logits, torch.Tensor):
                emit(site, product_key_decision(mod, pending.pop(), logits))

        return [
            lookup.register_forward_pre_hook(lookup_hook),
            block.register_forward_hook(block_hook),
        ]

    return Probe(site, "product-key lookup indices + sub-key logits", install)


# ----------------------------------------------------------------------------- readers


def _pick(output: Any, index: int) -> Any:
    if isinstance(output, tuple | list):
        return output[index] if -len(output) <= index < len(output) else None
    return output


def _tensors(output: Any) -> list[torch.Tensor]:
    items = output if isinstance(output, tuple | list) else (output,)
    return [t for t in items if isinstance(t, torch.Tensor)]


def _topk_parts(output: Any, logits: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weights [.., K], indices [.., K]) when the router returned them beside the logits."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        return None
    tokens = logits.numel() // max(logits.shape[-1], 1)
    indices = weights = None
    for t in _tensors(output):
        if t is logits or t.dim() == 0 or t.numel() % max(tokens, 1) or t.shape[-1] == 0:
            continue
        if t.numel() // max(tokens, 1) >= logits.shape[-1]:
            continue  # per-expert values (a mask or dense scores), not per-slot ones
        if not t.is_floating_point() and t.dtype != torch.bool and indices is None:
            indices = t
        elif t.is_floating_point() and weights is None:
            weights = t
    if indices is None or indices.shape[-1] >= logits.shape[-1]:
        return None
    if weights is not None and weights.numel() != indices.numel():
        weights = None
    return weights, indices  # type: ignore[return-value]


def _dense_scores(output: Any, logits: Any) -> torch.Tensor | None:
    """A float tensor of the logits' shape beside them: per-expert combine scores."""
    if not isinstance(logits, torch.Tensor):
        return None
    for t in _tensors(output):
        if t is not logits and t.is_floating_point() and t.shape == logits.shape:
            return t
    return None


def _configured_top_k(*modules: nn.Module) -> int | None:
    for module in modules:
        for attr in ("top_k", "num_experts_per_tok", "moe_top_k", "topk"):
            value = getattr(module, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _num_experts(experts: nn.Module, logits: torch.Tensor | None) -> int:
    if isinstance(logits, torch.Tensor):
        return int(logits.shape[-1])
    for attr in ("num_experts", "n_routed_experts", "num_local_experts"):
        value = getattr(experts, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(
        f"{type(experts).__name__} receives expert indices, but the number of experts is not "
        "known: it has no num_experts attribute and no gate logits were found; register an "
        "adapter for its router (moe_devkit.integrations.hf.register_adapter)"
    )


def _decision_from_experts(
    experts: nn.Module, logits: Any, indices: Any, weights: Any, scoring: Scoring = "softmax"
) -> RoutingDecision:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(
            f"{type(experts).__name__}.forward must receive the expert indices as a tensor; "
            f"got {type(indices).__name__}"
        )
    num_experts = _num_experts(experts, logits if isinstance(logits, torch.Tensor) else None)
    if not isinstance(logits, torch.Tensor) or logits.shape[-1] != num_experts:
        tokens = indices.reshape(-1, indices.shape[-1]).shape[0]
        logits = torch.zeros(tokens, num_experts, device=indices.device)  # unknown: uniform
    if not isinstance(weights, torch.Tensor) or weights.numel() != indices.numel():
        weights = None
    return decision_from_router_outputs(logits, indices, weights, scoring=scoring)


def _scoring(router: nn.Module, block: nn.Module) -> Scoring:
    """How the router turns logits into probabilities: its config's ``scoring_func`` when
    there is one, else "sigmoid" when its forward applies one (DeepSeek-V3-style routers),
    else "softmax"."""
    for module in (router, block):
        func = getattr(getattr(module, "config", None), "scoring_func", None)
        if func == "sigmoid":
            return "sigmoid"
        if func == "softmax":
            return "softmax"
    try:
        source = inspect.getsource(type(router).forward)
    except (OSError, TypeError):
        return "softmax"
    return "sigmoid" if "sigmoid(" in source and "softmax(" not in source else "softmax"


def _unreadable(router: nn.Module, output: Any) -> ValueError:
    shapes = [tuple(t.shape) for t in _tensors(output)]
    return ValueError(
        f"{type(router).__name__} returned tensors of shapes {shapes}, with no expert indices "
        "and no experts module beside it to read them from; register an adapter for it: "
        f"moe_devkit.integrations.hf.register_adapter({type(router).__name__!r}, adapter)"
    )


def describe(probes: Iterable[Probe]) -> list[str]:
    """One line per probe: the layer name and what is read."""
    return [f"{p.site.layer}: {p.how}" for p in probes]
