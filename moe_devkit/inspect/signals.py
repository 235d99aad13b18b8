"""Model-level signals beside the routing statistics: the model's own auxiliary loss and
its routers' selection biases (aux-loss-free balancing).

``RouterInspector.attach`` calls ``ModelSignals.attach`` with every router site it found,
``record`` calls ``on_decision`` with each decision it records, and ``summary`` passes
``host_state()`` to ``summarize``, which turns it into the report's ``aux_loss`` and per-layer
``selection_bias`` entries and their findings (docs/metrics.md).

**Aux-loss liveness.** A forward pre-hook and a forward hook on the model passed to
``attach`` delimit one step (one forward of the model). The hook reads the model's own
auxiliary loss from its output: the ``aux_loss`` attribute or key of a ``ModelOutput``, a
dict or a named tuple (a plain tuple or list, as ``return_dict=False`` gives, has no entry that
can be identified: "unreadable").
During the step, every recorded decision adds to the inspector's own load-balancing loss,
computed over all MoE layers' tokens together as transformers' ``load_balancing_loss_func``
defines it::

    L = E * sum_e f_e * P_e,  f_e = (selected (token, slot) pairs of expert e) / T,
                              P_e = (sum of router_probs[:, e] over those tokens) / T

where T counts the tokens of every layer (a token in L layers counts L times), pad tokens
(``k_per_token < 0``) and tokens with non-finite logits left out. With balanced top-k routing
``L`` is k.

**Selection bias.** A router site has a selection bias when its MoE block or its router
holds a float tensor (parameter or buffer) whose attribute name contains "bias" but is not
exactly ``bias`` (a linear layer's or a router's logit bias), with E entries in shape [E] or
[1, E] (``e_score_correction_bias`` of DeepSeek-V3, GLM-4-MoE and others, ``expert_bias``
of LFM2-MoE and AFMoE). Each recorded decision of such a layer records the bias's abs max,
mean, population standard deviation, range (max - min) and the fraction of its entries whose
sign flipped (strictly opposite signs) since the layer's previous recorded decision.

Everything stays on the device in bounded buffers (the last ``HISTORY`` steps and running
extrema); no hook reads a value on the host. Under ``torch.compile`` and while a CUDA graph
is captured the signals are not recorded (their host-side step bookkeeping would be baked
into the graph).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moe_devkit.inspect.config import InspectorConfig
from moe_devkit.inspect.records import RouterSite
from moe_devkit.routers.torch_router import RoutingDecision

HISTORY = 256
"""Steps kept per signal (the last ones); older steps survive only in the running extrema."""

BIAS_STATS = ("abs_max", "mean", "std", "range", "flip_fraction")
"""The per-step statistics of a selection bias, in the order of its history columns."""


def selection_bias_candidates(site: RouterSite) -> list[tuple[str, nn.Module, str]]:
    """(name relative to the block, owner module, attribute) of each tensor of ``site`` that
    may be a selection bias: a float parameter or buffer of the block or the router (any
    depth) whose attribute name contains "bias" but is not "bias", of shape [n] or [1, n].

    The number of entries is checked against the layer's E at its first decision.
    """
    modules: dict[int, tuple[str, nn.Module]] = {}
    for prefix, module in site.block.named_modules():
        modules.setdefault(id(module), (prefix, module))
    if site.router is not None:
        for prefix, module in site.router.named_modules():
            name = f"<router>.{prefix}" if prefix else "<router>"
            modules.setdefault(id(module), (name, module))
    found: list[tuple[str, nn.Module, str]] = []
    for prefix, module in modules.values():
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for attr, tensor in tensors:
            if _is_bias_like(attr, tensor):
                found.append((f"{prefix}.{attr}" if prefix else attr, module, attr))
    return found


def _is_bias_like(attr: str, tensor: torch.Tensor) -> bool:
    if "bias" not in attr.lower() or attr == "bias" or not tensor.is_floating_point():
        return False
    return tensor.dim() == 1 or (tensor.dim() == 2 and tensor.shape[0] == 1)


# ----------------------------------------------------------------------------- aux loss


def model_aux_loss(output: Any) -> tuple[str, torch.Tensor | float | None]:
    """The status of a model output's aux loss, and the loss: ("value", the loss),
    ("none", None), ("absent", None) or ("unreadable", None).

    "value": the output has an ``aux_loss`` (attribute of a ``ModelOutput`` or named tuple,
    or key of a mapping) holding a tensor or a number; "none": it holds None (or an empty
    tensor); "absent": the output has no ``aux_loss`` entry; "unreadable": a plain tuple or
    list, whose entries have no names.
    """
    if hasattr(output, "aux_loss"):  # a ModelOutput field is an attribute, even when None
        value = output.aux_loss
    elif isinstance(output, Mapping):
        if "aux_loss" not in output:
            return "absent", None
        value = output["aux_loss"]
    elif isinstance(output, tuple | list):
        return "unreadable", None
    else:
        return "absent", None
    if value is None:
        return "none", None
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            return "none", None
        return "value", value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "value", float(value)
    return "absent", None


def follows_transformers(output: Any) -> bool:
    """True for a transformers ``ModelOutput``: its ``aux_loss`` is transformers'
    ``load_balancing_loss_func``, the definition the inspector's own value follows."""
    return any(
        cls.__name__ == "ModelOutput" and cls.__module__.startswith("transformers")
        for cls in type(output).__mro__
    )


@dataclass
class _StepAccumulator:
    """One step's load-balancing sums, per E: f64[2E + 2] = (pairs not counted, selections
    of each expert [E], router_probs summed over the tokens [E], tokens)."""

    sums: dict[int, torch.Tensor] = field(default_factory=dict)

    def add(self, decision: RoutingDecision) -> None:
        num_experts = decision.num_experts
        indices = decision.expert_indices
        valid = (decision.k_per_token.reshape(-1) >= 0) & ~decision.nonfinite.reshape(-1)  # [N]
        sums = self.sums.get(num_experts)
        if sums is None:
            sums = torch.zeros(2 * num_experts + 2, dtype=torch.float64, device=indices.device)
            self.sums[num_experts] = sums
        target = (
            sums if sums.device == indices.device else torch.zeros_like(sums, device=indices.device)
        )
        # Bucket 0 takes the empty slots (index -1) and every slot of an excluded token.
        buckets = ((indices + 1) * valid.unsqueeze(-1)).reshape(-1)
        ones = torch.ones((), dtype=torch.float64, device=indices.device).expand(buckets.numel())
        target[: num_experts + 1].index_add_(0, buckets, ones)
        probs = decision.router_probs.reshape(-1, num_experts)
        probs = torch.where(valid.unsqueeze(-1), probs, 0.0).sum(dim=0, dtype=torch.float64)
        target[num_experts + 1 : 2 * num_experts + 1].add_(probs)
        target[-1:].add_(valid.sum(dtype=torch.float64))
        if target is not sums:
            sums.add_(_moved(target, sums.device))

    def loss(self) -> torch.Tensor | None:
        """E * sum_e f_e P_e over the step's decisions (None without decisions, or when the
        layers have different numbers of experts; NaN when the decisions carry no router
        probabilities, as those built from expert indices alone)."""
        if len(self.sums) != 1:
            return None
        ((num_experts, sums),) = self.sums.items()
        counts, probs = sums[1 : num_experts + 1], sums[num_experts + 1 : 2 * num_experts + 1]
        total = sums[-1].clamp_min(1.0)
        loss = num_experts * ((counts / total) * (probs / total)).sum()
        return torch.where(probs.sum() > 0, loss, math.nan)  # NaN: no router probabilities


class _Ring:
    """The last ``HISTORY`` rows of per-step values on one device, the step of each row,
    and the running min and max of each column over every row ever put (NaN left out)."""

    def __init__(self, width: int, device: torch.device) -> None:
        self.rows = torch.full((HISTORY, width), math.nan, dtype=torch.float64, device=device)
        self.low = torch.full((width,), math.inf, dtype=torch.float64, device=device)
        self.high = torch.full((width,), -math.inf, dtype=torch.float64, device=device)
        self.device = device
        self.steps: list[int] = []  # the step of each slot
        self.count = 0

    def put(self, step: int, values: torch.Tensor) -> None:
        slot = self.count % HISTORY
        row = _moved(values.detach().double(), self.device)
        self.rows[slot].copy_(row)
        self.low = torch.fmin(self.low, row)  # fmin and fmax ignore NaN
        self.high = torch.fmax(self.high, row)
        if slot < len(self.steps):
            self.steps[slot] = step
        else:
            self.steps.append(step)
        self.count += 1

    def host(self) -> tuple[list[int], list[list[float]], list[list[float]]]:
        """(steps, rows, [min row, max row]) in step order, read in one transfer."""
        size = len(self.steps)
        data = torch.cat([self.rows[:size], self.low[None], self.high[None]]).cpu().tolist()
        order = sorted(range(size), key=self.steps.__getitem__)
        return [self.steps[i] for i in order], [data[i] for i in order], data[size:]


class _AuxTrack:
    """The model's aux loss and the inspector's load-balancing loss, per model forward."""

    def __init__(self) -> None:
        self.step = 0  # forwards seen
        self.status = {"value": 0, "none": 0, "absent": 0, "unreadable": 0}
        self.training_steps = 0
        self.requested_steps = 0  # forwards called with output_router_logits=True
        self.transformers_steps = 0
        self.model_outputs = 0  # forwards that returned a transformers ModelOutput
        self.output_type: str | None = None
        self.ring: _Ring | None = None  # columns: model value, inspector value
        self.current: _StepAccumulator | None = None

    def begin(self, requested: bool) -> None:
        # The inspector's own per-forward value is kept for transformers-style models (their
        # ModelOutput): once the first forward has shown another output type (moe-devkit's
        # reference model, a custom model), the per-layer work (about 11 small ops per
        # layer and step, on the model's stream) stops.
        compared = self.step == 0 or self.model_outputs > 0
        self.current = _StepAccumulator() if compared else None
        self.requested_steps += int(requested)

    def end(self, output: Any, training: bool) -> None:
        accumulator, self.current = self.current, None
        status, value = model_aux_loss(output)
        self.status[status] += 1
        self.training_steps += int(training)
        self.output_type = type(output).__name__
        transformers_output = follows_transformers(output)
        self.model_outputs += int(transformers_output)
        if status == "value" and transformers_output:
            self.transformers_steps += 1
        inspector = accumulator.loss() if accumulator is not None else None
        if value is not None or inspector is not None or self.ring is not None:
            if self.ring is None:
                # An accelerator's values stay there: never copied to the host during a step.
                devices = [t.device for t in (inspector, value) if isinstance(t, torch.Tensor)]
                accelerators = [d for d in devices if d.type != "cpu"]
                self.ring = _Ring(2, (accelerators or devices or [torch.device("cpu")])[0])
            device = self.ring.device
            nan = torch.full((), math.nan, dtype=torch.float64, device=device)
            model = _scalar(value, device) if value is not None else nan
            mine = _moved(inspector, device) if inspector is not None else nan
            self.ring.put(self.step, torch.stack([model, mine]))
        self.step += 1


def _moved(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; asynchronous unless copied to the host (a non-blocking copy
    to the host could be read before it lands)."""
    return tensor.to(device, non_blocking=device.type != "cpu")


def _scalar(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return _moved(value.detach().double().mean(), device)
    return torch.full((), value, dtype=torch.float64, device=device)


# ----------------------------------------------------------------------------- bias


class _BiasTrack:
    """One layer's selection bias: per recorded decision, the statistics of ``BIAS_STATS``."""

    def __init__(self, name: str, owner: nn.Module, attr: str, num_experts: int) -> None:
        self.name, self.owner, self.attr, self.num_experts = name, owner, attr, num_experts
        self.step = 0
        self.ring: _Ring | None = None
        self.previous: torch.Tensor | None = None
        self.max_change: torch.Tensor | None = None  # largest |b_t - b_{t-1}| of any entry
        self.first: torch.Tensor | None = None

    def update(self) -> None:
        tensor = getattr(self.owner, self.attr, None)
        if not isinstance(tensor, torch.Tensor) or tensor.numel() != self.num_experts:
            return
        if tensor.device.type == "meta":  # offloaded weights: nothing to read
            return
        bias = tensor.detach().reshape(-1).to(torch.float64, copy=True)  # never the live tensor
        if self.ring is None:
            self.ring = _Ring(len(BIAS_STATS), bias.device)
            self.max_change = torch.zeros((), dtype=torch.float64, device=bias.device)
        assert self.max_change is not None
        if self.previous is None:
            flips = torch.full((), math.nan, dtype=torch.float64, device=bias.device)
        else:  # strictly opposite signs: a product below 0
            flips = (bias * self.previous < 0).sum(dtype=torch.float64) / self.num_experts
            change = (bias - self.previous).abs().amax()
            self.max_change = torch.maximum(self.max_change, change)
        low, high = torch.aminmax(bias)
        std, mean = torch.std_mean(bias, correction=0)
        stats = torch.stack([torch.maximum(high, -low), mean, std, high - low, flips])
        self.ring.put(self.step, stats)
        if self.first is None:
            self.first = stats.clone()
        self.previous = bias
        self.step += 1


# ----------------------------------------------------------------------------- signals


def _tracing() -> bool:
    """True under torch.compile or while a CUDA graph is captured: the host-side step
    bookkeeping would be baked into the graph, so nothing is recorded."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class ModelSignals:
    """Aux-loss liveness and selection-bias monitoring of one model."""

    def __init__(self, config: InspectorConfig) -> None:
        self.config = config
        self._aux = _AuxTrack()
        self._candidates: dict[str, list[tuple[str, nn.Module, str]]] = {}
        self._bias: dict[str, _BiasTrack | None] = {}
        self._model_facts: dict[str, Any] = {}
        self._layers = 0

    def attach(
        self, model: nn.Module, sites: Sequence[RouterSite]
    ) -> list[torch.utils.hooks.RemovableHandle]:
        """Registers the hooks this needs on ``model``; returns their handles."""
        self._layers = len({site.layer for site in sites})
        config = getattr(model, "config", None)
        coef = getattr(config, "router_aux_loss_coef", None)
        router_logits = getattr(config, "output_router_logits", None)
        self._model_facts = {
            "model_type": type(model).__name__,
            "router_aux_loss_coef": float(coef) if isinstance(coef, int | float) else None,
            "output_router_logits": router_logits if isinstance(router_logits, bool) else None,
        }
        for site in sites:
            found = selection_bias_candidates(site)
            self._candidates[site.layer] = found
            track = self._bias.get(site.layer)
            if track is not None and not any(
                owner is track.owner and attr == track.attr for _, owner, attr in found
            ):  # attached to another model: its layer starts afresh
                del self._bias[site.layer]
        return [
            model.register_forward_pre_hook(self._begin_step, with_kwargs=True),
            model.register_forward_hook(self._end_step),
        ]

    def _begin_step(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if not _tracing():
            self._aux.begin(kwargs.get("output_router_logits") is True)

    def _end_step(self, module: nn.Module, args: Any, output: Any) -> None:
        if not _tracing():
            self._aux.end(output, module.training)

    def on_decision(self, site: RouterSite, decision: RoutingDecision) -> None:
        """Called for each decision the inspector records (no host synchronisation)."""
        if _tracing():
            return
        if self._aux.current is not None:
            self._aux.current.add(decision)
        track = self._bias_track(site.layer, decision.num_experts)
        if track is not None:
            track.update()

    def _bias_track(self, layer: str, num_experts: int) -> _BiasTrack | None:
        if layer in self._bias:
            return self._bias[layer]
        track = None
        for name, owner, attr in self._candidates.get(layer, []):
            if getattr(owner, attr).numel() == num_experts:
                track = _BiasTrack(name, owner, attr, num_experts)
                break
        self._bias[layer] = track
        return track

    def host_state(self) -> dict[str, Any]:
        """What ``summarize`` reads (JSON-able values): ``aux_loss`` (None before the first
        model forward) and ``selection_bias`` (layer -> statistics)."""
        biases = {
            layer: _bias_host(track)
            for layer, track in self._bias.items()
            if track is not None and track.ring is not None
        }
        return {"aux_loss": self._aux_host(), "selection_bias": biases}

    def _aux_host(self) -> dict[str, Any] | None:
        aux = self._aux
        if not aux.step:
            return None
        history: dict[str, list[Any]] = {"steps": [], "model": [], "inspector": []}
        extrema: dict[str, Any] = {"model": [None, None], "inspector": [None, None]}
        if aux.ring is not None:
            steps, rows, ext = aux.ring.host()
            history = {
                "steps": steps,
                "model": [_json_float(r[0]) for r in rows],
                "inspector": [_json_float(r[1]) for r in rows],
            }
            extrema = {
                "model": [_json_float(ext[0][0]), _json_float(ext[1][0])],
                "inspector": [_json_float(ext[0][1]), _json_float(ext[1][1])],
            }
        return {
            **self._model_facts,
            "moe_layers": self._layers,
            "steps": aux.step,
            "training_steps": aux.training_steps,
            "router_logits_requested_steps": aux.requested_steps,
            "status": dict(aux.status),
            "definition": (
                "transformers"
                if aux.transformers_steps
                else "model"
                if aux.status["value"]
                else None
            ),
            "output_type": aux.output_type,
            "min_max": extrema,
            "history": history,
        }


def _bias_host(track: _BiasTrack) -> dict[str, Any]:
    assert track.ring is not None and track.first is not None and track.max_change is not None
    steps, rows, extrema = track.ring.host()
    first = track.first.cpu().tolist()
    columns = {name: [_json_float(row[i]) for row in rows] for i, name in enumerate(BIAS_STATS)}
    return {
        "tensor": track.name,
        "num_experts": track.num_experts,
        "steps": track.step,
        "first": {name: _json_float(first[i]) for i, name in enumerate(BIAS_STATS)},
        "max_abs_max": _json_float(extrema[1][0]),
        "max_flip_fraction": _json_float(extrema[1][4]),
        "max_step_change": _json_float(float(track.max_change)),
        "history": {"steps": steps, **columns},
    }


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
