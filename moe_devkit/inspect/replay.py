"""Routing replay: run a model with its routing forced, to tell routing effects from the rest.

``RoutingReplay(model, source)`` hooks every router of ``model`` (found as the inspector
finds them, ``discovery.find_probes``) with a forward hook that returns a replaced output:
the model's own code then dispatches the forced experts. Nothing of the model is patched.
The source is one of

* a ``RoutingTrace``: each token takes the experts the trace recorded for it, and their
  weights when the trace has them (else the model's own probabilities of those experts,
  renormalised as the model renormalises). Tokens are numbered as ``RoutingTraceRecorder``
  numbers them (sequences in call order, positions over the non-pad tokens, a generate step
  continuing its prompt's sequences) and looked up by (sequence, position); the token ids
  are checked where both the run and the trace know them. Pad tokens (attention mask 0) are
  not in a trace and keep the model's own routing;
* ``"balanced"``: token t of a layer (counted over the run) takes experts
  ``(t * k + j) mod E`` for j < k, so every expert gets the same load (to one pair);
* ``"top_k"`` with ``k=``: every token takes exactly the top-k experts of the model's own
  scores.

Routers that can be forced: moe-devkit's reference routers (``DynamicMoERouter``,
``StaticTopKRouter``: a ``RoutingDecision`` is replaced) and the transformers routers that
return ``(router_logits, weights, indices)`` from a softmax top-k (Mixtral, Qwen2/3-MoE,
OLMoE and the architectures sharing their router; ``SOFTMAX_TOPK_ROUTERS``). Any other
router is refused at ``attach`` with its class named.

Everything stays on the model's device: the lookups are device ops, and the checks that
need a value (a token missing from the trace, other token ids) are read on the host at
once where that costs nothing (off CUDA) and otherwise counted on the device and read at
``detach`` (``sync_checks``).

``compare_with_replay(reference, candidate, inputs)`` runs ``reference`` (recording its
trace), ``candidate`` normally and ``candidate`` replayed from that trace, and compares the
outputs: a ``replay-output-differs`` finding says that the candidate's outputs still differ
with the reference's routing forced, so the difference is not (only) routing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe_devkit.config import RouterConfig
from moe_devkit.diagnostics.findings import Finding
from moe_devkit.inspect.discovery import find_probes
from moe_devkit.inspect.inspector import in_backward_recompute
from moe_devkit.inspect.trace import (
    CallNumbering,
    RoutingTrace,
    RoutingTraceRecorder,
    TraceComparison,
    compare_traces,
)
from moe_devkit.routers.torch_router import (
    DynamicMoERouter,
    RoutingDecision,
    StaticTopKRouter,
    capacity_dropped,
    load_balancing_loss,
)

FINDING_CODE = "replay-output-differs"

SOFTMAX_TOPK_ROUTERS: dict[str, Literal["always", "config", "never"]] = {
    # top-k of softmax(logits), weights renormalised over the k always
    "MixtralTopKRouter": "always",
    "MiniMaxTopKRouter": "always",
    "Qwen3_5MoeTopKRouter": "always",
    "Qwen3OmniMoeTextTopKRouter": "always",
    "Qwen3VLMoeTextTopKRouter": "always",
    # ... renormalised when the router's ``norm_topk_prob`` is set
    "Qwen2MoeTopKRouter": "config",
    "Qwen3MoeTopKRouter": "config",
    "Qwen3NextTopKRouter": "config",
    "OlmoeTopKRouter": "config",
    "FlexOlmoTopKRouter": "config",
    # ... never renormalised
    "JambaTopKRouter": "never",
}
"""transformers router classes whose forward returns ``(router_logits, weights, indices)``
with the indices the top-k of ``softmax(logits)`` and the weights those probabilities,
renormalised over the k "always", when ``norm_topk_prob`` is set ("config") or "never"."""

Mode = Literal["trace", "balanced", "top_k"]


@dataclass
class _Layer:
    name: str
    router: nn.Module
    kind: Literal["reference", "softmax_topk"]
    num_experts: int
    top_k: int  # the router's own k (max_k for a dynamic router)
    renormalise: bool  # transformers routers: weights renormalised over the selected
    start: int = 0  # balanced: tokens of this layer routed so far
    last_start: int = 0  # balanced: the start of the last call (a recompute reuses it)
    forced: int = 0  # router calls forced
    config: RouterConfig | None = None  # reference routers


@dataclass
class _Call:
    tokens: int
    rows: torch.Tensor  # int64 [N]: the trace row of each token (clamped)
    found: torch.Tensor  # bool [N]: the token is in the trace (and not a pad)


def _layer_of(name: str, router: nn.Module | None) -> _Layer:
    if isinstance(router, DynamicMoERouter | StaticTopKRouter):
        cfg = router.config
        k = router.k if isinstance(router, StaticTopKRouter) else cfg.max_k
        return _Layer(name, router, "reference", cfg.num_experts, k, True, config=cfg)
    rule = None
    for cls in type(router).__mro__ if router is not None else ():
        rule = SOFTMAX_TOPK_ROUTERS.get(cls.__name__)
        if rule is not None:
            break
    weight = getattr(router, "weight", None)
    top_k = getattr(router, "top_k", None)
    if router is None or rule is None or not isinstance(weight, torch.Tensor):
        what = "no router module (only its experts' inputs are read)"
        if router is not None:
            what = f"router class {type(router).__name__}"
        raise ValueError(
            f"RoutingReplay cannot force the routing of layer {name!r}: {what}; it forces "
            "DynamicMoERouter, StaticTopKRouter and the softmax top-k routers of "
            f"SOFTMAX_TOPK_ROUTERS ({', '.join(sorted(SOFTMAX_TOPK_ROUTERS))})"
        )
    if not isinstance(top_k, int) or weight.dim() != 2:
        raise ValueError(
            f"RoutingReplay cannot force layer {name!r}: {type(router).__name__} has no int "
            f"top_k or no [num_experts, hidden] weight (top_k={top_k!r}, weight shape "
            f"{tuple(weight.shape)})"
        )
    renormalise = rule == "always" or (
        rule == "config" and bool(getattr(router, "norm_topk_prob", False))
    )
    return _Layer(name, router, "softmax_topk", int(weight.shape[0]), top_k, renormalise)


def _pad(values: torch.Tensor, width: int, fill: float) -> torch.Tensor:
    return (
        F.pad(values, (0, width - values.shape[1]), value=fill)
        if values.shape[1] < width
        else values
    )


class RoutingReplay:
    """Forces the routing of ``model`` while attached (see the module docstring).

    ``with RoutingReplay(model, trace): model(...)``; also ``RoutingReplay(model,
    "balanced")`` and ``RoutingReplay(model, "top_k", k=4)`` (or ``RoutingReplay(model,
    k=4)``).

    Args:
        model: the model; its own forward is hooked (trace source) to number the tokens as
            ``RoutingTraceRecorder`` does.
        source: a ``RoutingTrace``, "balanced" or "top_k".
        k: experts per token for "top_k" (required) and "balanced" (default: each router's
            own k, ``max_k`` for a dynamic router); not with a trace.
        weights: with a trace, force its weights too (default: when it has them); False
            uses the model's own probabilities of the forced experts.
        sync_checks: raise at once, in the model's forward, when a token is not in the trace
            or its token id differs (reads a device value). Default: off CUDA only; on CUDA
            the offending tokens are counted on the device and ``detach`` raises.

    Raises:
        TypeError: ``model`` is not an nn.Module, ``source`` none of the three.
        ValueError: a bad ``k``, ``weights=True`` with a trace without weights.
    """

    def __init__(
        self,
        model: nn.Module,
        source: RoutingTrace | str | None = None,
        *,
        k: int | None = None,
        weights: bool | None = None,
        sync_checks: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if source is None and k is not None:
            source = "top_k"
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be an int >= 1; got k={k!r}")
        self.trace: RoutingTrace | None = None
        mode: Mode
        if isinstance(source, RoutingTrace):
            if k is not None:
                raise ValueError(f"k applies to 'balanced' and 'top_k', not to a trace; got k={k}")
            if weights and source.weights is None:
                raise ValueError(
                    "weights=True needs a trace with weights; got a trace without weights "
                    "(record it with RoutingTraceRecorder(..., weights=True))"
                )
            mode, self.trace = "trace", source
        elif source == "balanced":
            mode = "balanced"
        elif source == "top_k":
            if k is None:
                raise ValueError("source='top_k' needs k=<experts per token>; got k=None")
            mode = "top_k"
        else:
            raise TypeError(
                f"source must be a RoutingTrace, 'balanced' or 'top_k'; got source={source!r}"
            )
        if weights is not None and mode != "trace":
            raise ValueError(f"weights applies to a trace source only; got weights={weights!r}")
        self.model = model
        self.mode: Mode = mode
        self.k = k
        self.use_weights = (
            self.trace is not None and self.trace.weights is not None and weights is not False
        )
        self.sync_checks = sync_checks
        self.layers: list[_Layer] = []
        self.calls = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._call: _Call | None = None
        self._in_call = False
        self._device_trace: dict[str, torch.Tensor] = {}
        self._bad: torch.Tensor | None = None  # int64 [2]: missing, other ids (deferred)
        self._numbering = CallNumbering()  # sequences numbered as the recorder numbers them

    # ------------------------------------------------------------------ attach / detach

    def attach(self) -> RoutingReplay:
        """Hooks the model's routers; returns self.

        Raises:
            ValueError: already attached, no router found, a router that cannot be forced
                (its class named), a ``k`` out of range for a layer, or a trace whose
                layers or numbers of experts are not the model's.
        """
        if self._handles:
            raise ValueError("the replay is already attached; call detach() first")
        probes = find_probes(self.model)
        if not probes:
            raise ValueError(f"found no MoE router in {type(self.model).__name__}")
        layers = [_layer_of(p.site.layer, p.site.router) for p in probes]
        if self.k is not None:
            for layer in layers:
                if self.k > layer.num_experts:
                    raise ValueError(
                        f"k must be in [1, num_experts={layer.num_experts}] for layer "
                        f"{layer.name!r}; got k={self.k}"
                    )
        if self.trace is not None:
            self._check_trace(self.trace, layers)
        self.layers = layers
        self._handles = [
            layer.router.register_forward_hook(self._hook(layer), prepend=True) for layer in layers
        ]
        if self.mode == "trace":
            self._handles.append(
                self.model.register_forward_pre_hook(self._begin_call, with_kwargs=True)
            )
            self._handles.append(self.model.register_forward_hook(self._end_call, always_call=True))
        return self

    def detach(self, check: bool = True) -> None:
        """Removes the hooks; then, with ``check``, ``self.check()``."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._call = None
        if check:
            self.check()

    def check(self) -> None:
        """Raises for tokens counted on the device (``sync_checks`` off): tokens of the run
        the trace does not hold, or whose token id differs from the trace's.

        Raises:
            ValueError: such tokens were seen (their numbers named).
        """
        if self._bad is None:
            return
        missing, other = (int(v) for v in self._bad.tolist())  # the one device read
        self._bad.zero_()
        if missing:
            raise ValueError(
                f"trace: {missing} token(s) of the run are not in the trace (it holds "
                f"{self.trace.num_tokens if self.trace else 0} tokens): the trace is shorter "
                "than the run, or was recorded on other calls"
            )
        if other:
            raise ValueError(
                f"trace: {other} token(s) have other token ids in the run than in the trace: "
                "it was recorded on other inputs"
            )

    def __enter__(self) -> RoutingReplay:
        return self.attach()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.detach(check=exc is None)

    @property
    def forced_calls(self) -> dict[str, int]:
        """Router calls forced so far, per layer."""
        return {layer.name: layer.forced for layer in self.layers}

    # ------------------------------------------------------------------ the trace

    @staticmethod
    def _check_trace(trace: RoutingTrace, layers: list[_Layer]) -> None:
        names = [layer.name for layer in layers]
        if len(trace.layers) != len(layers):
            raise ValueError(
                f"trace: the model has {len(layers)} MoE layers {names}; got a trace of "
                f"{len(trace.layers)} layers {trace.layers}"
            )
        if trace.layers != names:
            raise ValueError(f"trace: layers must be the model's {names}; got {trace.layers}")
        for layer, experts in zip(layers, trace.num_experts, strict=True):
            if experts != layer.num_experts:
                raise ValueError(
                    f"trace: layer {layer.name!r} has num_experts={layer.num_experts}; got "
                    f"num_experts={experts} in the trace"
                )
        ids = trace.expert_ids
        bad = (ids < -1) | (ids >= np.asarray(trace.num_experts)[None, :, None])
        if bad.any():
            t, j, _ = np.argwhere(bad)[0]
            raise ValueError(
                f"trace: expert ids must be in [-1, {trace.num_experts[j]}) in layer "
                f"{trace.layers[j]!r}; got {ids[t, j].tolist()} at token {t}"
            )
        keys = np.stack([trace.sequence, trace.positions], axis=1)
        if len(np.unique(keys, axis=0)) != len(keys):
            raise ValueError("trace: holds a (sequence, position) more than once")

    def _trace_tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The trace on ``device``, sorted by key (copied once per device)."""
        cached = self._device_trace
        if cached and cached["keys"].device == device:
            return cached
        trace = self.trace
        assert trace is not None
        width = int(trace.positions.max(initial=0)) + 1
        keys = trace.sequence.astype(np.int64) * width + trace.positions.astype(np.int64)
        order = np.argsort(keys, kind="stable")
        tensors = {
            "keys": torch.from_numpy(keys[order]).to(device),
            "token_ids": torch.from_numpy(trace.token_ids[order].astype(np.int64)).to(device),
            "width": torch.tensor(width, device=device),
        }
        for j, name in enumerate(trace.layers):
            ids = trace.expert_ids[order, j].astype(np.int64)
            tensors[f"ids:{name}"] = torch.from_numpy(ids).to(device)
            if self.use_weights and trace.weights is not None:
                weights = trace.weights[order, j].astype(np.float32)
                tensors[f"weights:{name}"] = torch.from_numpy(weights).to(device)
        self._device_trace = tensors
        return tensors

    def _begin_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if in_backward_recompute():
            return
        self._call = None
        self._in_call = True
        numbered = self._numbering.number(args, kwargs)
        if numbered is None:
            return
        ids, batch, length, device, mask, first = numbered
        self.calls += 1

        trace = self._trace_tensors(device)
        positions = RoutingTraceRecorder._positions(kwargs, mask, batch, length, device)
        sequence = torch.arange(first, first + batch, device=device).repeat_interleave(length)
        if mask is not None:
            valid = (mask[:, mask.shape[1] - length :] != 0).reshape(-1)
        else:
            valid = torch.ones(batch * length, dtype=torch.bool, device=device)
        width = trace["width"]
        query = sequence * width + positions.clamp(min=0)
        rows = torch.searchsorted(trace["keys"], query).clamp(max=max(trace["keys"].numel() - 1, 0))
        if trace["keys"].numel():
            found = (trace["keys"][rows] == query) & (positions >= 0) & (positions < width)
        else:
            found = torch.zeros_like(valid)
        missing = valid & ~found
        found &= valid
        if ids is not None:
            theirs = trace["token_ids"][rows] if trace["keys"].numel() else ids.reshape(-1)
            mine = ids.reshape(-1).to(torch.int64)
            other = found & (mine >= 0) & (theirs >= 0) & (mine != theirs)
        else:
            other = torch.zeros_like(found)
        if self._syncs(device):
            self._raise_now(missing, other, sequence, positions, ids, rows)
        else:
            if self._bad is None or self._bad.device != device:
                self._bad = torch.zeros(2, dtype=torch.int64, device=device)
            self._bad += torch.stack([missing.sum(), other.sum()])
        self._call = _Call(batch * length, rows, found)

    def _syncs(self, device: torch.device) -> bool:
        if self.sync_checks is not None:
            return self.sync_checks
        return device.type != "cuda" and not torch.compiler.is_compiling()

    def _raise_now(
        self,
        missing: torch.Tensor,
        other: torch.Tensor,
        sequence: torch.Tensor,
        positions: torch.Tensor,
        ids: torch.Tensor | None,
        rows: torch.Tensor,
    ) -> None:
        trace = self.trace
        assert trace is not None
        if bool(missing.any()):
            first = int(missing.int().argmax())
            raise ValueError(
                f"trace: {int(missing.sum())} token(s) of model call {self.calls} are not in "
                f"the trace, the first at sequence {int(sequence[first])}, position "
                f"{int(positions[first])}; the trace holds {trace.num_tokens} tokens of "
                f"{len(np.unique(trace.sequence))} sequences: it is shorter than the run, or "
                "was recorded on other calls"
            )
        if bool(other.any()) and ids is not None:
            first = int(other.int().argmax())
            theirs = int(self._device_trace["token_ids"][rows[first]])
            raise ValueError(
                f"trace: {int(other.sum())} token(s) of model call {self.calls} have other "
                f"token ids than the trace's, the first at sequence {int(sequence[first])}, "
                f"position {int(positions[first])}: expected token id {theirs} (the "
                f"trace's), got {int(ids.reshape(-1)[first])}: it was recorded on other inputs"
            )

    def _end_call(self, module: nn.Module, args: Any, output: Any) -> None:
        if not in_backward_recompute():
            self._in_call = False  # the call's lookup is kept for a backward's recompute

    # ------------------------------------------------------------------ forcing

    def _hook(self, layer: _Layer) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            return self._force(layer, output)

        return hook

    def _force(self, layer: _Layer, output: Any) -> Any:
        if layer.kind == "reference":
            if not isinstance(output, RoutingDecision):
                raise TypeError(
                    f"{type(layer.router).__name__} ({layer.name}) must return a "
                    f"RoutingDecision to be forced; got {type(output).__name__}"
                )
            probs = output.router_probs
            own_ids, own_weights = output.expert_indices, output.expert_weights
        else:
            if not (isinstance(output, tuple) and len(output) == 3):
                raise TypeError(
                    f"{type(layer.router).__name__} ({layer.name}) must return (router_logits, "
                    f"weights, indices) to be forced; got {type(output).__name__}"
                )
            logits = output[0]
            probs = torch.softmax(logits.reshape(-1, layer.num_experts).float(), dim=-1)
            own_ids = output[2].reshape(probs.shape[0], -1).long()
            own_weights = output[1].reshape(own_ids.shape).float()
        ids, given = self._choose(layer, probs, own_ids, own_weights)
        layer.forced += 1
        if layer.kind == "reference":
            return self._forced_decision(layer, output, ids, given)
        selected = ids >= 0
        if given is None:
            given = torch.where(selected, probs.gather(1, ids.clamp_min(0)), 0.0)
            if layer.renormalise:
                given = given / given.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        weights = torch.where(selected, given, 0.0).to(output[1].dtype)
        # An empty slot runs expert 0 with weight 0: every experts module takes it.
        return output[0], weights, ids.clamp_min(0).to(output[2].dtype)

    def _choose(
        self,
        layer: _Layer,
        probs: torch.Tensor,
        own_ids: torch.Tensor,
        own_weights: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(expert ids [N, K] -1 padded, forced weights [N, K] or None: the model's own)."""
        tokens = probs.shape[0]
        if self.mode == "top_k":
            assert self.k is not None
            return probs.topk(self.k, dim=-1).indices, None
        if self.mode == "balanced":
            k = self.k if self.k is not None else layer.top_k
            if k > layer.num_experts:
                raise ValueError(
                    f"k must be in [1, num_experts={layer.num_experts}] for layer "
                    f"{layer.name!r}; got k={k}"
                )
            if not in_backward_recompute():
                layer.last_start = layer.start
                layer.start += tokens
            first = layer.last_start * k
            pairs = torch.arange(first, first + tokens * k, device=probs.device)
            return (pairs % layer.num_experts).view(tokens, k), None
        call = self._call
        if call is None or not (self._in_call or in_backward_recompute()):
            raise ValueError(
                f"{layer.name}: the router ran outside a call of the model "
                f"({type(self.model).__name__}): a trace is replayed by the model's calls"
            )
        if tokens != call.tokens:
            raise ValueError(
                f"{layer.name}: the router got {tokens} tokens; expected the model call's "
                f"{call.tokens} (a trace is replayed token by token)"
            )
        trace = self._device_trace
        theirs = trace[f"ids:{layer.name}"][call.rows]
        width = max(theirs.shape[1], own_ids.shape[1])
        found = call.found.unsqueeze(-1)
        ids = torch.where(found, _pad(theirs, width, -1), _pad(own_ids, width, -1))
        if not self.use_weights:
            return ids, None
        weights = trace[f"weights:{layer.name}"][call.rows]
        mixed = torch.where(found, _pad(weights, width, 0.0), _pad(own_weights, width, 0.0))
        return ids, mixed

    @staticmethod
    def _forced_decision(
        layer: _Layer, decision: RoutingDecision, ids: torch.Tensor, given: torch.Tensor | None
    ) -> RoutingDecision:
        cfg = layer.config
        assert cfg is not None
        nonfinite = decision.nonfinite
        finite = ~nonfinite
        ids = torch.where(nonfinite.unsqueeze(-1), -1, ids)
        selected = ids >= 0
        if given is None:
            own = torch.where(selected, decision.router_probs.gather(1, ids.clamp_min(0)), 0.0)
            weights = own / own.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        else:
            weights = torch.where(selected, given, 0.0)
        if cfg.capacity_factor is None:
            dropped = torch.zeros_like(selected)
        else:
            dropped = capacity_dropped(ids, layer.num_experts, cfg.capacity_factor)
            weights = torch.where(dropped, 0.0, weights)
        k_per_token = selected.sum(dim=-1)
        lb_loss = load_balancing_loss(decision.router_probs, ids, finite)
        compute_loss = k_per_token.sum() / finite.sum().clamp_min(1) / ids.shape[1]
        aux_loss = (
            cfg.load_balance_coef * lb_loss
            + cfg.z_loss_coef * decision.z_loss
            + cfg.compute_cost_coef * compute_loss
        )
        return dataclasses.replace(
            decision,
            expert_indices=ids,
            expert_weights=weights.float(),
            k_per_token=k_per_token,
            dropped=dropped,
            load_balancing_loss=lb_loss,
            compute_loss=compute_loss,
            aux_loss=aux_loss,
        )


# ----------------------------------------------------------------------------- comparison


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor a model output is compared by: the output itself, its ``logits``, its
    ``last_hidden_state`` or ``hidden_states`` (a tensor), or the first tensor of a tuple.

    Raises:
        TypeError: none of those is a tensor.
    """
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state", "hidden_states"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, tuple | list):
        for value in output:
            if isinstance(value, torch.Tensor):
                return value
    raise TypeError(
        "a model output must be a tensor, have logits / last_hidden_state / hidden_states, or "
        f"be a tuple holding a tensor; got {type(output).__name__}"
    )


@dataclass(frozen=True)
class OutputDifference:
    """How far a model output is from a reference output.

    Attributes:
        max_abs_error: max |candidate - reference| over the elements.
        relative_error: max_abs_error / max |reference| (0 when both are all zero).
        mismatched: elements with |candidate - reference| > atol + rtol * |reference|
            (``torch.isclose``; NaN differs from everything).
        elements: elements compared.
    """

    max_abs_error: float
    relative_error: float
    mismatched: int
    elements: int
    atol: float
    rtol: float

    @property
    def within_tolerance(self) -> bool:
        return self.mismatched == 0


def output_difference(
    reference: Any,
    candidate: Any,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    attention_mask: torch.Tensor | None = None,
) -> OutputDifference:
    """Compares two model outputs (``output_tensor`` of each) element by element, in float64.

    Args:
        attention_mask: [B, S] (or longer: its last S columns), for outputs [B, S, ...]:
            only the positions where it is non-zero are compared (pads are left out).

    Raises:
        ValueError: the shapes differ, a mask that does not fit them, a negative tolerance.
    """
    for name, value in (("atol", atol), ("rtol", rtol)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0; got {name}={value!r}")
    a = output_tensor(reference).detach().double()
    b = output_tensor(candidate).detach().to(a.device).double()
    if a.shape != b.shape:
        raise ValueError(
            f"the outputs must have the same shape; got {tuple(a.shape)} (reference) and "
            f"{tuple(b.shape)} (candidate)"
        )
    if attention_mask is not None:
        fits = attention_mask.dim() == 2 and a.dim() >= 2
        if (
            not fits
            or attention_mask.shape[0] != a.shape[0]
            or attention_mask.shape[1] < a.shape[1]
        ):
            raise ValueError(
                f"attention_mask must be [B, >= S] for outputs {tuple(a.shape)}; got shape "
                f"{tuple(attention_mask.shape)}"
            )
        keep = attention_mask[:, attention_mask.shape[1] - a.shape[1] :].to(a.device) != 0
        a, b = a[keep], b[keep]
    gap = (a - b).abs()
    max_abs = float(gap.max()) if gap.numel() else 0.0
    scale = float(a.abs().max()) if a.numel() else 0.0
    close = torch.isclose(b, a, rtol=rtol, atol=atol, equal_nan=False)
    return OutputDifference(
        max_abs_error=max_abs,
        relative_error=max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf),
        mismatched=int((~close).sum()),
        elements=int(a.numel()),
        atol=float(atol),
        rtol=float(rtol),
    )


def _finite(value: float) -> float | None:
    """``value``, or None where it is NaN or infinite (the report is strict JSON)."""
    return value if math.isfinite(value) else None


def replay_finding(
    replayed: OutputDifference, normal: OutputDifference | None = None, location: str | None = None
) -> Finding | None:
    """The ``replay-output-differs`` finding when the replayed run's outputs are not within
    tolerance of the reference's (the difference is not explained by routing), else None."""
    if replayed.within_tolerance:
        return None
    details: dict[str, Any] = {
        "max_abs_error": _finite(replayed.max_abs_error),
        "relative_error": _finite(replayed.relative_error),
        "mismatched": replayed.mismatched,
        "elements": replayed.elements,
        "atol": replayed.atol,
        "rtol": replayed.rtol,
    }
    if normal is not None:
        details["normal_max_abs_error"] = _finite(normal.max_abs_error)
        details["normal_relative_error"] = _finite(normal.relative_error)
    return Finding(
        code=FINDING_CODE,
        severity="warning",
        message=(
            f"with the reference's routing replayed, the outputs still differ: max abs error "
            f"{replayed.max_abs_error:.3g}, relative {replayed.relative_error:.3g}, "
            f"{replayed.mismatched} of {replayed.elements} elements over atol {replayed.atol:g}"
            f" + rtol {replayed.rtol:g}: the difference is not explained by routing"
        ),
        location=location,
        details=details,
    )


@dataclass(frozen=True)
class ReplayComparison:
    """``compare_with_replay``'s result.

    Attributes:
        normal: the candidate's own run against the reference's outputs.
        replayed: the candidate replayed from the reference's trace against them.
        routing: the reference's trace against the candidate's own routing.
        trace: the reference's trace (with weights).
    """

    normal: OutputDifference
    replayed: OutputDifference
    routing: TraceComparison
    trace: RoutingTrace

    def findings(self) -> list[Finding]:
        """``[replay-output-differs]`` when the replayed outputs differ, else ``[]``."""
        finding = replay_finding(self.replayed, self.normal)
        return [] if finding is None else [finding]


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def compare_with_replay(
    reference: nn.Module,
    candidate: nn.Module,
    inputs: Any,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    weights: bool = True,
    max_tokens: int = 65536,
) -> ReplayComparison:
    """Runs ``inputs`` through ``reference`` (recording its routing trace, with weights),
    through ``candidate`` normally and through ``candidate`` with the reference's routing
    replayed, all without autograd, and compares the candidate's outputs with the reference's
    (where ``inputs`` has an ``attention_mask``, at its non-pad positions only: pads keep
    the candidate's own routing).

    Args:
        inputs: a mapping (keyword arguments), a tuple (positional) or one value.
        weights: replay the trace's weights too (False: only the experts).
        max_tokens: the trace's token budget (the inputs' tokens must fit).

    Raises:
        ValueError: as ``RoutingReplay`` (a router that cannot be forced, the inputs not
            fitting ``max_tokens``), or outputs of other shapes.
    """
    with torch.no_grad():
        with RoutingTraceRecorder(reference, max_tokens=max_tokens, weights=True) as recorder:
            expected = _call(reference, inputs)
        trace = recorder.trace()
        with RoutingTraceRecorder(candidate, max_tokens=max_tokens) as own:
            normal = _call(candidate, inputs)
        with RoutingReplay(candidate, trace, weights=weights):
            replayed = _call(candidate, inputs)
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        mask = None
    return ReplayComparison(
        normal=output_difference(expected, normal, atol=atol, rtol=rtol, attention_mask=mask),
        replayed=output_difference(expected, replayed, atol=atol, rtol=rtol, attention_mask=mask),
        routing=compare_traces(trace, own.trace()),
        trace=trace,
    )
