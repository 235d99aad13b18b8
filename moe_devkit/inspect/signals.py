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
from dataclasses import dataclass
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


class _StepSums:
    """The aux-loss sums of the open steps, one row per step: f64[rows, 2E + 2] = (pairs not
    counted, selections of each expert [E], router_probs summed over the tokens [E],
    tokens), on the device of the first decision. A step's row is ``step % rows``; every
    layer of a step adds to it (at once, or later from a batched build), and the step's
    loss is read when its last layer has added."""

    def __init__(self, num_experts: int, device: torch.device, rows: int = HISTORY) -> None:
        self.num_experts, self.device, self.rows = num_experts, device, rows
        self.sums = torch.zeros(rows, 2 * num_experts + 2, dtype=torch.float64, device=device)

    def add(self, steps: Sequence[int], block: torch.Tensor) -> None:
        """Adds ``block`` [S, 2E + 2] to the rows of ``steps`` (a run of consecutive steps
        is one slice: one op, or two where it wraps)."""
        block = _moved(block, self.device)
        start = 0
        while start < len(steps):
            stop = start + 1
            while stop < len(steps) and steps[stop] == steps[stop - 1] + 1:
                stop += 1
            self._add_run(steps[start] % self.rows, block[start:stop])
            start = stop

    def _add_run(self, row: int, block: torch.Tensor) -> None:
        first = min(block.shape[0], self.rows - row)
        self.sums[row : row + first].add_(block[:first])
        if first < block.shape[0]:
            self.sums[: block.shape[0] - first].add_(block[first:])

    def take(self, first_step: int, count: int) -> torch.Tensor:
        """f64[count]: the loss of ``count`` consecutive steps from ``first_step`` (NaN where
        no router probabilities were added); their rows are zeroed for reuse."""
        row = first_step % self.rows
        head = min(count, self.rows - row)
        parts = [self.sums[row : row + head]]
        if head < count:
            parts.append(self.sums[: count - head])
        sums = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        for part in parts:
            part.zero_()
        num_experts = self.num_experts
        counts, probs = sums[:, 1 : num_experts + 1], sums[:, num_experts + 1 : -1]
        total = sums[:, -1:].clamp_min(1.0)
        loss = num_experts * ((counts / total) * (probs / total)).sum(dim=-1)
        return torch.where(probs.sum(dim=-1) > 0, loss, math.nan)


def decision_sums(decision: RoutingDecision) -> torch.Tensor:
    """f64[2E + 2]: one decision's aux-loss sums (see ``_StepSums``)."""
    num_experts = decision.num_experts
    indices = decision.expert_indices
    valid = (decision.k_per_token.reshape(-1) >= 0) & ~decision.nonfinite.reshape(-1)  # [N]
    sums = torch.zeros(2 * num_experts + 2, dtype=torch.float64, device=indices.device)
    # Bucket 0 takes the empty slots (index -1) and every slot of an excluded token.
    buckets = ((indices + 1) * valid.unsqueeze(-1)).reshape(-1)
    ones = torch.ones((), dtype=torch.float64, device=indices.device).expand(buckets.numel())
    sums[: num_experts + 1].index_add_(0, buckets, ones)
    probs = decision.router_probs.reshape(-1, num_experts)
    probs = torch.where(valid.unsqueeze(-1), probs, 0.0).sum(dim=0, dtype=torch.float64)
    sums[num_experts + 1 : 2 * num_experts + 1].add_(probs)
    sums[-1:].add_(valid.sum(dtype=torch.float64))
    return sums


@dataclass
class _StepAccumulator:
    """One forward's inspector load-balancing loss: the layers' decisions add their sums to
    the step's row of ``_StepSums`` (at once, or later from a batched build: ``waiting``
    counts those not added yet). ``experts``: the E of the step's layers (-1 once two
    differ: the loss is then undefined)."""

    track: _AuxTrack
    step: int
    waiting: int = 0
    experts: int | None = None

    def joins(self, num_experts: int, device: torch.device) -> bool:
        """Whether a layer of ``num_experts`` experts adds to this step (a step whose layers
        have different numbers of experts has no inspector loss)."""
        if self.experts is None:
            self.experts = num_experts
        elif self.experts != num_experts:
            self.experts = -1
        return self.experts == num_experts and self.track.sums_for(num_experts, device)

    def add(self, decision: RoutingDecision) -> None:
        if self.joins(decision.num_experts, decision.expert_indices.device):
            assert self.track.sums is not None
            self.track.sums.add([self.step], decision_sums(decision).unsqueeze(0))


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

    def put_many(self, steps: Sequence[int], values: torch.Tensor) -> None:
        """Puts R rows at once (``values`` [R, width]); as R calls of ``put``."""
        if len(steps) > HISTORY:
            steps, values = steps[-HISTORY:], values[-HISTORY:]
        values = _moved(values.detach().double(), self.device)
        nan = values.isnan()  # left out of the extrema, as put's fmin and fmax do
        self.low = torch.fmin(self.low, values.masked_fill(nan, math.inf).amin(dim=0))
        self.high = torch.fmax(self.high, values.masked_fill(nan, -math.inf).amax(dim=0))
        slot, count = self.count % HISTORY, len(steps)
        head = min(count, HISTORY - slot)
        self.rows[slot : slot + head].copy_(values[:head])
        if head < count:
            self.rows[: count - head].copy_(values[head:])
        for i, step in enumerate(steps):
            index = (slot + i) % HISTORY
            if index < len(self.steps):
                self.steps[index] = step
            else:
                self.steps.append(step)
        self.count += count

    def host(self) -> tuple[list[int], list[list[float]], list[list[float]]]:
        """(steps, rows, [min row, max row]) in step order, read in one transfer."""
        size = len(self.steps)
        data = torch.cat([self.rows[:size], self.low[None], self.high[None]]).cpu().tolist()
        order = sorted(range(size), key=self.steps.__getitem__)
        return [self.steps[i] for i in order], [data[i] for i in order], data[size:]


class _AuxTrack:
    """The model's aux loss and the inspector's load-balancing loss, per model forward.

    Each forward's pair of values is kept by reference and put into the ring in batches of
    ``FLUSH_STEPS`` forwards (a handful of ops per batch instead of per forward), once every
    layer of those forwards has added its sums; ``flush`` puts the rest.
    """

    FLUSH_STEPS = 16

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
        self.sums: _StepSums | None = None
        self._rows: list[tuple[int, torch.Tensor | float | None, _StepAccumulator | None]] = []
        self._open: dict[int, _StepAccumulator] = {}  # steps with sums still to come
        self._staging: dict[torch.device, torch.Tensor] = {}  # kept aux losses, see _stage
        self._staged = 0

    def begin(self, requested: bool) -> None:
        # The inspector's own per-forward value is kept for transformers-style models (their
        # ModelOutput): once the first forward has shown another output type (moe-devkit's
        # reference model, a custom model), the per-layer work stops.
        compared = self.step == 0 or self.model_outputs > 0
        self.current = _StepAccumulator(self, self.step) if compared else None
        self.requested_steps += int(requested)

    def sums_for(self, num_experts: int, device: torch.device) -> bool:
        """Creates the sums buffer at the first decision; False for another E."""
        if self.sums is None:
            self.sums = _StepSums(num_experts, device)
        return self.sums.num_experts == num_experts

    def defer(self, num_experts: int, device: torch.device) -> int | None:
        """The current step, for a layer that adds its sums later (None: not compared)."""
        current = self.current
        if current is None or not current.joins(num_experts, device):
            return None
        if self._open and current.step - min(self._open) >= HISTORY // 2:
            return None  # the oldest open step's row would be reused: leave this one out
        current.waiting += 1
        self._open[current.step] = current
        return current.step

    def deliver(self, steps: Sequence[int], block: torch.Tensor) -> None:
        """Adds the sums of deferred layers (``block`` [S, 2E + 2], one row per step)."""
        assert self.sums is not None
        if all(step in self._open for step in steps):
            self.sums.add(steps, block)
        else:  # a step already put into the ring (its row may be reused): left out
            for i, step in enumerate(steps):
                if step in self._open:
                    self.sums.add([step], block[i : i + 1])
        for step in steps:
            accumulator = self._open.get(step)
            if accumulator is not None:
                accumulator.waiting -= 1
                if accumulator.waiting <= 0:
                    del self._open[step]

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
        if accumulator is not None and accumulator.experts in (None, -1):
            accumulator = None  # no layer added (or layers of different E): no value
        if value is not None or accumulator is not None or self.ring is not None or self._rows:
            kept = self._stage(value.detach()) if isinstance(value, torch.Tensor) else value
            self._rows.append((self.step, kept, accumulator))
            if len(self._rows) >= HISTORY // 2:
                self.flush()  # layers that never fold: a staging slot is about to be reused
            elif len(self._rows) >= self.FLUSH_STEPS:
                self.flush(complete=False)
        self.step += 1

    def _stage(self, value: torch.Tensor) -> torch.Tensor:
        """A scalar aux loss copied into a slot of a preallocated buffer on its device (one
        copy): holding the model's own tensor until the flush would keep its memory block
        from the allocator, and move the addresses of the next steps' tensors."""
        if value.dim() != 0 or not value.is_floating_point():
            return value
        staging = self._staging.get(value.device)
        if staging is None:
            staging = torch.zeros(HISTORY, dtype=torch.float64, device=value.device)
            self._staging[value.device] = staging
        slot = staging[self._staged % HISTORY]
        self._staged += 1
        slot.copy_(value)
        return slot

    def flush(self, complete: bool = True) -> None:
        """Puts the kept forwards into the ring: those whose layers have all added their
        sums (``complete``: every one; a sum still missing then reads NaN)."""
        ready = 0
        while ready < len(self._rows) and (complete or not _waiting(self._rows[ready][2])):
            ready += 1
        if not ready:
            return
        rows, self._rows = self._rows[:ready], self._rows[ready:]
        for _, _, accumulator in rows:
            if accumulator is not None:
                self._open.pop(accumulator.step, None)
        if self.ring is None:
            # An accelerator's values stay there: never copied to the host during a step.
            devices = [v.device for _, v, _ in rows if isinstance(v, torch.Tensor)]
            devices += [self.sums.device] if self.sums is not None else []
            accelerators = [d for d in devices if d.type != "cpu"]
            self.ring = _Ring(2, (accelerators or devices or [torch.device("cpu")])[0])
        device = self.ring.device
        model = _column([value for _, value, _ in rows], device)
        first, count = rows[0][0], rows[-1][0] - rows[0][0] + 1
        complete_rows = [a is not None and a.waiting <= 0 for _, _, a in rows]
        if self.sums is not None and any(a is not None for _, _, a in rows):
            losses = _moved(self.sums.take(first, count), device)
            if all(complete_rows) and count == len(rows):
                mine = losses  # consecutive forwards, each with its value: no gather
            else:
                nan = torch.full((), math.nan, dtype=torch.float64, device=device)
                picked = [
                    losses[step - first] if ok else nan
                    for (step, _, _), ok in zip(rows, complete_rows, strict=True)
                ]
                mine = torch.stack(picked)
        else:
            mine = torch.full((len(rows),), math.nan, dtype=torch.float64, device=device)
        self.ring.put_many([step for step, _, _ in rows], torch.stack([model, mine], dim=-1))


def _waiting(accumulator: _StepAccumulator | None) -> bool:
    return accumulator is not None and accumulator.waiting > 0


def _column(values: Sequence[torch.Tensor | float | None], device: torch.device) -> torch.Tensor:
    """f64[R] on ``device``: the model's aux losses (a tensor's mean, NaN where None)."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if len(tensors) == len(values) and all(t.dim() == 0 and t.device == device for t in tensors):
        return torch.stack(tensors).double()  # the common case: two ops for every forward
    return torch.stack(
        [
            _scalar(v, device)
            if v is not None
            else torch.full((), math.nan, dtype=torch.float64, device=device)
            for v in values
        ]
    )


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

    def defer_decision(
        self, site: RouterSite, num_experts: int, device: torch.device
    ) -> int | None:
        """For a decision built later in a batch (``inspect.raw``): the forward its aux-loss
        sums join (None: not compared), to pass to ``deliver``; the selection bias is
        recorded now, as ``on_decision`` does."""
        if _tracing():
            return None
        step = self._aux.defer(num_experts, device)
        track = self._bias_track(site.layer, num_experts)
        if track is not None:
            track.update()
        return step

    def deliver(self, steps: Sequence[int], block: torch.Tensor) -> None:
        """The aux-loss sums [S, 2E + 2] of deferred decisions, one row per step of
        ``steps`` (values ``defer_decision`` returned)."""
        self._aux.deliver(steps, block)

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
        aux.flush()
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
