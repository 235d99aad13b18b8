"""RouterInspector: records every routing decision of a model through forward hooks.

The inspector never changes a model's code or outputs: it registers a forward hook on each
reference router (any module whose forward returns a ``RoutingDecision``) and on each module
with a registered router adapter (transformers MoE models: ``inspect.adapters``), and folds
each decision into bounded, on-device running statistics (``inspect.state.LayerState``), with
no host synchronisation. Values reach the host only in ``summary()`` and ``report()``.

On CUDA the cost to the observed model is kept to about a graph launch per 16 steps: the
per-token statistics are one two-pass Triton kernel (where Triton is installed), updates
are replayed from captured CUDA graphs on the model's stream, the hooks' decisions are kept
(by reference) and folded 16 steps at a time, and the co-activation matrix and the reservoir
are updated every 16th step (``coactivation_every``, ``reservoir_every``).

Under ``torch.compile`` the hooks trace into the graph without a break (``fullgraph=True``):
the reservoir's random keys are a counter-based hash (no ``torch.Generator``), and the
host-side bookkeeping (the Python step count, trend windows, wall-clock time) is skipped
while compiling; compiled steps are counted in a device tensor instead. So a compiled model
records the same counts, histograms, moments, losses, co-activation and sample as in eager
mode, but no trend windows or time range for its compiled steps.

Hooks skip the second forward that activation checkpointing runs during the backward pass
(see ``in_backward_recompute``), so each step is recorded once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from moe_devkit.diagnostics.findings import SEVERITIES, Finding, Severity
from moe_devkit.inspect.adapters import (
    Scoring,
    check_decision,
    decision_from_router_outputs,
    decision_from_tensors,
    exclude_tokens,
    raise_unknown_moe,
)
from moe_devkit.inspect.config import InspectorConfig
from moe_devkit.inspect.discovery import Probe, find_probes
from moe_devkit.inspect.live import (
    DeadSpan,
    Episodes,
    LiveReader,
    OnAlarm,
    Window,
    deliver,
    window_findings,
    window_metrics,
)
from moe_devkit.inspect.padding import TokenMasks
from moe_devkit.inspect.records import RouterSite, Selection, StepTensors
from moe_devkit.inspect.report import ReportPaths, write_report
from moe_devkit.inspect.signals import ModelSignals
from moe_devkit.inspect.state import LayerState
from moe_devkit.inspect.summary import InspectorSummary, _aux_summary, aux_loss_alarms, summarize
from moe_devkit.routers.torch_router import RoutingDecision


def in_backward_recompute() -> bool:
    """True while autograd's engine runs a forward: activation checkpointing's recompute.

    Checkpointing (reentrant or not, including transformers' gradient checkpointing) runs a
    layer's forward a second time inside the backward pass; hooks skip that call so a step
    is recorded once. Always False under torch.compile, which recomputes inside its graphs.
    """
    if torch.compiler.is_compiling():
        return False
    return bool(torch._C._current_graph_task_id() != -1)


def _may_sync() -> bool:
    """False under torch.compile and while CUDA sync-debug mode is on: the first-step value
    check (one host read) is then skipped."""
    if torch.compiler.is_compiling():
        return False
    return not torch.cuda.is_available() or torch.cuda.get_sync_debug_mode() == 0


class RouterInspector:
    """Records the routing of every reference router in a model.

    Use as ``with RouterInspector().attach(model) as inspector: ...`` or call ``attach`` /
    ``detach`` yourself; ``summary()`` and ``report(out_dir)`` read the statistics.

    Args:
        model: a model to attach to when used as a context manager (optional).
        config: statistics and alarm settings.
    """

    def __init__(
        self, model: nn.Module | None = None, config: InspectorConfig | None = None
    ) -> None:
        self.config = config if config is not None else InspectorConfig()
        self.layers: dict[str, LayerState] = {}
        self._model = model
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._masks = TokenMasks()
        self._checked: set[str] = set()
        # Layers whose router outputs may be kept by reference (inspect.raw): the layout
        # checked at an eager step, and the outputs of that step (refs + their versions)
        # until the next call shows nobody modified them in place.
        self._raw_layout: dict[str, tuple[object, ...]] = {}
        self._raw_probe: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]] = {}
        self._raw_refused: set[str] = set()
        self.signals = ModelSignals(self.config)
        self.probes: list[Probe] = []
        self.routing_history_size = 0
        self._live = LiveReader()  # the windows of metrics() and check_alarms()
        self._window: Window | None = None
        self._window_users: set[str] = set()
        self._dead = DeadSpan()
        self._episodes = Episodes()

    # ------------------------------------------------------------------ attach / detach

    def attach(self, model: nn.Module | None = None) -> RouterInspector:
        """Registers forward hooks on every router of ``model``; returns self.

        Routers are found by the model's structure (``inspect.discovery``): moe-devkit's
        routers, modules with a registered adapter, the router classes a transformers model
        declares for its router outputs, and experts modules that receive expert indices.
        ``probes`` lists what was found and how each is read.

        Raises:
            TypeError: model is not an nn.Module.
            ValueError: the model holds no router that can be found (for an MoE model, the
                message names its router class and how to register an adapter), or the
                inspector is already attached.
        """
        model = model if model is not None else self._model
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if self._handles:
            raise ValueError("the inspector is already attached; call detach() first")
        probes = find_probes(model)
        if not probes:
            raise_unknown_moe(model)
            raise ValueError(
                f"model must contain a moe_devkit router (DynamicMoERouter or StaticTopKRouter) "
                f"or an MoE layer; found none in {type(model).__name__}"
            )
        sites = [probe.site for probe in probes]
        for probe in probes:
            self._handles += probe.install(self._emit, self._emit_raw)
        self._handles += self._masks.attach(model, sites)
        self._handles += self.signals.attach(model, sites)
        self.probes = probes
        self._model = model
        return self

    def detach(self) -> None:
        """Removes every hook; the statistics are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> RouterInspector:
        if not self._handles:
            self.attach()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.detach()

    def _emit(
        self, site: RouterSite, decision: RoutingDecision, selection: Selection | None = None
    ) -> None:
        """Records one decision from a probe's hook (never during a checkpoint recompute)."""
        if in_backward_recompute():
            return
        first = site.layer not in self._checked
        if first:  # what an adapter returned is checked once per layer, before any count
            check_decision(decision, f"the router of layer {site.layer!r}", values=_may_sync())
            self._checked.add(site.layer)
        keep = self._masks.valid_tokens(site, decision.num_tokens)
        if keep is not None:
            decision = exclude_tokens(decision, keep)
            if selection is not None:
                pairs = keep.unsqueeze(-1)
                selection = Selection(
                    torch.where(pairs, selection.indices, -1), selection.dropped & pairs
                )
        self.record(decision, layer=site.layer, defer=True, selection=selection)
        self.signals.on_decision(site, decision)

    def _emit_raw(
        self,
        site: RouterSite,
        logits: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor | None,
        scoring: Scoring,
    ) -> None:
        """Records one router call from its outputs: kept by reference and built later in a
        batch (``inspect.raw``) once the layer's outputs were seen checked and unmodified;
        otherwise built and recorded now."""
        if in_backward_recompute():
            return
        layer = site.layer
        state = self.layers.get(layer)
        layout = (logits.shape, logits.dtype, indices.shape, indices.dtype, logits.device)
        if (
            state is None
            or state.stream is not None
            or self._raw_layout.get(layer) != layout
            or not self._raw_allowed(layer)
            or torch.compiler.is_compiling()
            or (logits.is_cuda and torch.cuda.is_current_stream_capturing())
        ):
            decision = decision_from_router_outputs(logits, indices, weights, scoring=scoring)
            self._emit(site, decision)
            if layer not in self._raw_refused:
                self._raw_layout[layer] = layout
                self._raw_probe[layer] = (logits, indices, (logits._version, indices._version))
            return
        keep = self._masks.valid_tokens(site, logits.numel() // logits.shape[-1])
        aux_step = self.signals.defer_decision(site, logits.shape[-1], logits.device)
        state.update_raw(logits.detach(), indices.detach(), keep, scoring, aux_step)

    def _raw_allowed(self, layer: str) -> bool:
        """Whether ``layer``'s router outputs may be kept by reference: its previous
        (eager) call's outputs were not modified in place since."""
        if layer in self._raw_refused:
            return False
        probe = self._raw_probe.pop(layer, None)
        if probe is None:
            return True
        logits, indices, version = probe
        if (logits._version, indices._version) != version:
            self._raw_refused.add(layer)
            return False
        return True

    # ------------------------------------------------------------------ recording

    def record(
        self,
        decision: RoutingDecision,
        layer: str = "router",
        *,
        defer: bool = False,
        selection: Selection | None = None,
    ) -> None:
        """Folds one decision into the statistics of ``layer`` (no host synchronisation).

        ``defer=True`` (what the forward hooks pass) lets a CUDA layer fold several steps'
        decisions at once; pass it only if nothing modifies the decision's tensors later.
        ``selection``: what the router selected, when the decision holds the pairs its
        experts actually ran and those differ (counted in ``selected_counts``).
        """
        state = self._layer(layer, decision)
        if state.stream is None:
            state.update(decision, defer=defer, selection=selection)
            return
        # On CUDA the update runs on a side stream, after the decision is computed, so its
        # small kernels overlap the model's next ones instead of lengthening the forward.
        main = torch.cuda.current_stream(state.stream.device)
        state.stream.wait_stream(main)
        with torch.cuda.stream(state.stream):
            state.update(decision, selection=selection)  # the side stream hides the work
        for tensor in StepTensors.of(decision, selection):
            tensor.record_stream(state.stream)  # keep its memory until the update has run

    def _layer(self, layer: str, decision: RoutingDecision) -> LayerState:
        """The state of ``layer``, created on the decision's device at its first decision."""
        state = self.layers.get(layer)
        if state is None:
            state = LayerState(
                layer,
                decision.num_experts,
                decision.max_k,
                decision.expert_indices.device,
                self.config,
            )
            state.deliver = self.signals.deliver
            self.layers[layer] = state
        elif (state.num_experts, state.max_k) != (decision.num_experts, decision.max_k):
            raise ValueError(
                f"layer {layer!r} was recorded with num_experts={state.num_experts}, "
                f"max_k={state.max_k}; got num_experts={decision.num_experts}, "
                f"max_k={decision.max_k}"
            )
        return state

    def inspect_routing_decision(
        self,
        inputs: torch.Tensor,
        complexity: torch.Tensor,
        k_values: torch.Tensor,
        expert_indices: torch.Tensor,
        layer: str = "manual",
        num_experts: int | None = None,
    ) -> dict[str, Any]:
        """Records one decision given as raw tensors, for code that routes outside the hooks.

        Args:
            inputs: float[..., D], only its shape is used.
            complexity: float[...] per token.
            k_values: int[...] per token.
            expert_indices: int[..., K], -1 padded.
            layer: the name the statistics are kept under.
            num_experts: E (default: the layer's, or 1 + the largest index seen).

        Returns:
            A summary of this decision: timestamp, input shape, complexity and k statistics.
            (This call reads values on the host, unlike the hooks.)
        """
        if num_experts is None and layer in self.layers:
            num_experts = self.layers[layer].num_experts
        decision = decision_from_tensors(complexity, k_values, expert_indices, num_experts)
        self.record(decision, layer=layer)
        c, k = decision.complexity, decision.k_per_token.double()
        return {
            "timestamp": time.time(),
            "input_shape": tuple(inputs.shape),
            "complexity_stats": _moments(c.double()),
            "k_stats": _moments(k),
        }

    # ------------------------------------------------------------------ reading

    def summary(self) -> InspectorSummary:
        """Per-layer statistics and alarms, read to the host (see inspect.summary)."""
        records = [state.host_state() for state in self.layers.values()]
        return summarize(records, self.config, signals=self.signals.host_state())

    def report(self, out_dir: str | Path = "moe_devkit_report") -> ReportPaths:
        """Writes report.json, routing_analysis.png and report.html into ``out_dir``."""
        return write_report(self.summary(), out_dir)

    def _window_for(self, user: str) -> Window:
        """The last window read, if ``user`` has not used it yet; else a new read."""
        if self._window is None or user in self._window_users:
            self._window = self._live.read(self.layers.values())
            self._window_users = set()
        self._window_users.add(user)
        return self._window

    def metrics(
        self, prefix: str = "moe/", *, per_layer: bool = False, top_experts: int = 0
    ) -> dict[str, float]:
        """Scalars of the steps since the previous read (a window; the first covers every
        step so far), read in one host transfer (docs/metrics.md, "Live metrics and alarms").

        The keys are ``prefix`` + each of ``live.METRIC_KEYS``, whatever the layers and
        experts; values are Python floats, NaN where undefined (no token in the window).
        ``check_alarms()`` right after uses the same window (no second read).

        Args:
            prefix: put before every key.
            per_layer: add ``{prefix}layer/{name}/{key}`` for each of ``LAYER_METRIC_KEYS``.
            top_experts: add the n most and n least loaded (layer, expert) by share of the
                layer's executed pairs, ``{prefix}expert_share/{layer}/{expert}`` (at most 2n).
        """
        if isinstance(top_experts, bool) or not isinstance(top_experts, int) or top_experts < 0:
            raise ValueError(f"top_experts must be an int >= 0; got top_experts={top_experts!r}")
        window = self._window_for("metrics")
        first_k = self._live.first_pooled_k
        return window_metrics(
            window,
            math.nan if first_k is None else first_k,
            prefix,
            per_layer=per_layer,
            top_experts=top_experts,
        )

    def check_alarms(
        self, on_alarm: OnAlarm = "warn", *, min_severity: Severity = "warning"
    ) -> list[Finding]:
        """The summary's findings over the current window, each once per episode.

        Evaluates routing collapse, non-finite tokens and dropped pairs over the window (the
        one ``metrics()`` just read, else a new read), dead experts over the last
        ``config.dead_window_steps`` steps, mean-k drift against each layer's first window,
        and the aux-loss liveness findings of the model signals. A finding fires when its
        condition becomes true, stays quiet while it stays true, and fires again after a
        check where it was false. Findings below ``min_severity`` (default: the "info"
        ones) are left out. Returns the new findings, after delivering them: ``"warn"``
        issues a ``RoutingAlarm`` warning each, ``"raise"`` raises ``RoutingAlarmError``
        holding them, a callable gets the list.
        """
        if not (on_alarm in ("warn", "raise") or callable(on_alarm)):
            raise ValueError(f"on_alarm must be 'warn', 'raise' or a callable; got {on_alarm!r}")
        window = self._window_for("alarms")
        findings = window_findings(window, self._live, self._dead, self.config)
        signals = self.signals.host_state()
        if signals.get("aux_loss") is not None:
            biases = sorted(n for n in signals.get("selection_bias") or {} if n in self.layers)
            findings += aux_loss_alarms(_aux_summary(signals["aux_loss"]), biases)
        if min_severity not in SEVERITIES:
            raise ValueError(
                f"min_severity must be one of {SEVERITIES}; got min_severity={min_severity!r}"
            )
        floor = SEVERITIES.index(min_severity)
        fresh = self._episodes.new([f for f in findings if SEVERITIES.index(f.severity) >= floor])
        deliver(fresh, on_alarm)
        return fresh

    def __iter__(self) -> Iterator[LayerState]:
        return iter(self.layers.values())


def _moments(values: torch.Tensor) -> dict[str, float]:
    std = float(values.std()) if values.numel() > 1 else 0.0
    return {
        "mean": float(values.mean()),
        "std": std,
        "min": float(values.min()),
        "max": float(values.max()),
    }
