"""Per-layer state of ``RouterInspector``: ``LayerState`` folds decisions into its
``RunningStats`` (the typed records are in ``records``, the tensor work in ``update``, its
CUDA graphs in ``capture``) and keeps the trend snapshots; ``host_state()`` reads them into a
``LayerRecord``.

The statistics are bounded in memory:

* counts per expert, a joint histogram of (complexity bin, k), non-finite and dropped counts,
  loss sums, float64 running sums (moments) of complexity, an expert co-activation matrix;
* cumulative snapshots every ``window`` steps for trends (when the buffer is full, every
  other snapshot is dropped and the window doubles, so memory stays bounded);
* a uniform sample of (complexity, k) pairs for plots: a bottom-k reservoir on random keys.

Every update is a tensor operation on the decision's device: no ``.item()``, no ``nonzero``,
no ``bincount``, hence no host synchronisation. Values reach the host only in
``host_state()``. On CUDA the per-token statistics are one Triton kernel (where Triton is
installed), and the updates are replayed from CUDA graphs.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence

import torch

from moe_devkit.inspect.adapters import Scoring
from moe_devkit.inspect.capture import Inputs, UpdateGraphs
from moe_devkit.inspect.config import InspectorConfig
from moe_devkit.inspect.raw import RawInputs, RawRouting, steps_from_raw
from moe_devkit.inspect.records import (
    LayerRecord,
    MergedSteps,
    RunningStats,
    Selection,
    StepTensors,
    _layout,
)
from moe_devkit.inspect.update import executed, fold_coactivation, fold_reservoir, fold_tokens
from moe_devkit.kernels.inspector_update import is_available as fused_update_available
from moe_devkit.kernels.inspector_update import token_stats
from moe_devkit.routers.torch_router import RoutingDecision, count_values

HOST_FOLD_TOKENS = 8192
"""Off CUDA, the forward hooks' decisions are folded together once this many tokens are
pending: each fold is some 40 small ops whose per-op cost, not arithmetic, dominates below a
few thousand tokens; the bound keeps the pending tensors to about 1 MB per layer."""


RAW_BYTES = 16 * 2**20
"""A layer's router outputs kept by reference (``update_raw``) are folded once their logits
reach this many bytes, whatever ``InspectorConfig.batch_steps`` allows."""

Deliver = Callable[[Sequence[int], torch.Tensor], None]
"""Receives the aux-loss sums of batched steps: (forward of each step, f64[S, 2E + 2])."""


def coactivation_steps(steps: int, every: int) -> int:
    """The steps among ``steps`` that update the co-activation matrix (every ``every``-th)."""
    return 0 if not every else -(-steps // every)


def moments_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """float64[3] (n, mean, M2) from (n, sum, sum of squares)."""
    n, total, squares = sums.double().unbind()
    mean = total / n.clamp_min(1)
    m2 = (squares - total * mean).clamp_min(0.0)
    return torch.stack([n, mean, m2])


def _empty_step(step: StepTensors) -> StepTensors:
    """A step of ``step``'s layout that counts nothing: every token left out (k = -1, no
    expert), no pair dropped, zero losses."""
    none = torch.full_like(step.indices, -1)
    return StepTensors(
        none,
        torch.zeros_like(step.complexity),
        torch.zeros_like(step.nonfinite),
        torch.full_like(step.k, -1),
        torch.zeros_like(step.dropped),
        torch.zeros_like(step.lb_loss),
        torch.zeros_like(step.z_loss),
        torch.full_like(step.selected, -1),
        torch.zeros_like(step.selected_dropped),
    )


class LayerState:
    """Running statistics of one router, all tensors on the router's device."""

    def __init__(
        self, name: str, num_experts: int, max_k: int, device: torch.device, config: InspectorConfig
    ) -> None:
        self.name, self.num_experts, self.max_k, self.config = name, num_experts, max_k, config
        self.stats = RunningStats.zeros(num_experts, max_k, device=device, config=config)
        width = num_experts + max_k + 2
        self.snapshots = torch.zeros(config.max_windows, width, dtype=torch.float64, device=device)
        self.snapshot_steps: list[int] = []
        self.window = config.window
        self.compiled_steps = torch.zeros((), dtype=torch.int64, device=device)
        eager = device.type == "cuda" and not torch.compiler.is_compiling()
        self.graphed = eager and config.cuda_graphs
        self.stream: torch.cuda.Stream | None = (
            torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
            if eager and config.side_stream
            else None
        )
        self.graphs = UpdateGraphs(self.stats, device)
        self._device = device
        self._deferred: list[StepTensors] = []  # decision tensors not folded yet
        self._deferred_flags = (False, False)  # the first deferred step's periodic updates
        self._pending_tokens = 0
        self._raw: list[RawRouting] = []  # router outputs not built into decisions yet
        self._raw_bytes = 0
        self._raw_sums: dict[object, torch.Tensor] = {}  # a captured build's aux-sums output
        self._raw_pad: dict[object, RawRouting] = {}  # a call that counts nothing, per layout
        self._keep_all: dict[int, torch.Tensor] = {}  # True for every token, per token count
        self._step_pad: dict[object, StepTensors] = {}  # a step that counts nothing
        self._warned_modified = False
        self.deliver: Deliver | None = None  # where batched steps' aux-loss sums go
        self._host_fold = device.type != "cuda"
        # One Triton kernel for the per-token statistics (CUDA only: the interpreter is slow)
        self._fused = config.triton and device.type == "cuda" and fused_update_available(device)
        self.steps = 0
        self.first_time: float | None = None
        self.last_time: float | None = None

    def update(
        self, d: RoutingDecision, *, defer: bool = False, selection: Selection | None = None
    ) -> None:
        """Folds one decision into the statistics (device ops only, no host sync).

        On CUDA the tensor work is captured once per input shape into a CUDA graph and
        replayed: one launch instead of about fifty small kernels per step.

        ``defer``: keep references to this step's decision tensors and fold several steps
        at once (one concatenation and one pass), which divides the per-step cost of the
        fold's small ops: on CUDA with graphs up to ``config.defer_steps`` steps, elsewhere
        until ``HOST_FOLD_TOKENS`` tokens are pending. Only for decisions whose tensors
        nobody modifies afterwards (the hooks' fresh router outputs). A step with a
        periodic update (co-activation, reservoir) opens a new batch, whose pass applies
        that update to its first step; ``drain`` folds what is pending, and every reader
        of the statistics calls it first.
        """
        # A context, not a decorator: torch.compile cannot call a decorated method of a
        # LayerState created inside the compiled region (on the first step).
        if torch.is_grad_enabled():  # a training step
            with torch.no_grad():
                self._update(StepTensors.of(d, selection), defer, training=True)
        else:
            self._update(StepTensors.of(d, selection), defer)

    def _update(self, step: StepTensors, defer: bool, training: bool = False) -> None:
        if torch.compiler.is_compiling():
            self._update_compiled(step)
            return
        if self._raw:
            self._drain_raw()  # steps stay in order
        flags = self._periodic()
        limit = self._defer_limit(training)
        graphed = defer and self.graphed and limit > 1
        if (graphed or (defer and self._host_fold)) and any(flags) and self._deferred:
            self.drain()  # a periodic step opens a batch: its updates apply to the first
        if graphed:
            self._defer_step(step, flags)
            if len(self._deferred) >= limit:
                self.drain()
        elif defer and self._host_fold:
            self._defer_step(StepTensors(*(t.detach() for t in step)), flags)
            self._pending_tokens += step.k.shape[0]
            if self._pending_tokens >= HOST_FOLD_TOKENS:
                self.drain()
        elif self.graphed:
            self._replay(step, flags)
        else:
            self._update_tensors(step, coactivation=flags[0], sample=flags[1])
        self._count_step()

    def _defer_step(self, step: StepTensors, flags: tuple[bool, bool]) -> None:
        if not self._deferred:
            self._deferred_flags = flags
        self._deferred.append(step)

    def _defer_limit(self, training: bool) -> int:
        """Steps a CUDA layer defers: ``config.defer_steps``, or in training (where the
        decision's tensors sit at new addresses each step, so a per-step replay first copies
        them) ``config.batch_steps``."""
        if self.config.defer_steps > 1 or not training:
            return self.config.defer_steps
        return self.config.batch_steps

    def _count_step(self) -> None:
        self.steps += 1
        if self.steps % self.window == 0:
            self.drain()
            self._snapshot()
        now = time.time()
        self.first_time = now if self.first_time is None else self.first_time
        self.last_time = now

    def _periodic(self) -> tuple[bool, bool]:
        """Whether the next step updates the co-activation matrix and the reservoir."""
        every = self.config.coactivation_every
        return bool(
            every
        ) and self.steps % every == 0, self.steps % self.config.reservoir_every == 0

    def update_raw(
        self,
        logits: torch.Tensor,
        indices: torch.Tensor,
        keep: torch.Tensor | None,
        scoring: Scoring,
        aux_step: int | None,
    ) -> None:
        """Keeps one router call's outputs by reference (no op); ``drain`` builds the
        decisions of the kept calls at once (``inspect.raw``) and folds them.

        Only for outputs nobody modifies afterwards (checked when folded: a warning). Up to
        ``config.batch_steps`` calls or ``RAW_BYTES`` of logits are kept; ``aux_step``: the
        forward whose aux-loss sums this call joins (``ModelSignals.defer_decision``). A
        step with a periodic update (co-activation, reservoir) opens a new batch, whose
        build applies that update to its first step.
        """
        periodic = self._periodic()
        if self._deferred or (self._raw and any(periodic)):
            self.drain()  # steps stay in order; a periodic step is a batch's first
        version = (logits._version, indices._version)
        raw = RawRouting(logits, indices, keep, scoring, aux_step, version, periodic)
        self._raw.append(raw)
        self._raw_bytes += logits.numel() * logits.element_size()
        if len(self._raw) >= self.config.batch_steps or self._raw_bytes >= RAW_BYTES:
            self._drain_raw()
        self._count_step()

    def _update_compiled(self, step: StepTensors) -> None:
        """Under torch.compile: the periodic updates are masked by tensors (a Python step
        test would recompile every step), and the host-side bookkeeping stays out of the
        graph; steps are counted in ``compiled_steps``."""
        every, sample_every = self.config.coactivation_every, self.config.reservoir_every
        index = self.steps + self.compiled_steps
        due = None if every <= 1 else index % every == 0
        sample_due = None if sample_every == 1 else index % sample_every == 0
        self._update_tensors(
            step, coactivation=every > 0, sample=True, due=due, sample_due=sample_due
        )
        self.compiled_steps += 1

    def drain(self) -> None:
        """Folds the deferred steps in: their tensors concatenated, one pass, no host sync."""
        if torch.is_grad_enabled():  # a read during training: a deferred loss needs no grad
            with torch.no_grad():
                self._drain()
        else:
            self._drain()

    def _drain(self) -> None:
        if self._raw:
            self._drain_raw()
        if not self._deferred:
            return
        pending, self._deferred = self._deferred, []
        flags, self._deferred_flags = self._deferred_flags, (False, False)
        self._pending_tokens = 0
        if len(pending) == 1:
            if self.graphed:
                self._replay(pending[0], flags)
            else:
                self._update_tensors(pending[0], coactivation=flags[0], sample=flags[1])
            return
        first = pending[0].k.shape[0]  # the first step's tokens: its periodic updates
        if not (self.graphed and self.stats.counts.is_cuda):
            self._fold_merged(MergedSteps.concat(pending), flags, first)
            return
        one = _layout(pending[:1])
        if all(_layout([step]) == one for step in pending[1:]):
            # One graph per step layout, whatever the count: padded with steps that count
            # nothing, so a read at any step replays the same graph.
            pad = self._step_pad.get(one)
            if pad is None:
                pad = self._step_pad[one] = _empty_step(pending[0])
            slots = max(self.config.defer_steps, self.config.batch_steps)
            pending = [*pending, *([pad] * (slots - len(pending)))]
        self.graphs.run_built(
            (_layout(pending), flags),
            lambda: MergedSteps.concat(pending),
            lambda buffers: MergedSteps(*buffers).fill(pending),  # the graph's input buffers
            lambda inputs: self._fold_merged(MergedSteps(*inputs), flags, first),
        )

    def _drain_raw(self) -> None:
        """Builds and folds the kept router outputs, one batch per run of one layout."""
        pending, self._raw = self._raw, []
        self._raw_bytes = 0
        if not self._warned_modified and any(raw.modified() for raw in pending):
            self._warned_modified = True
            warnings.warn(
                f"layer {self.name!r}: the router's outputs were modified in place after its "
                "forward; the inspector read them when folding and may count what the model "
                "did not route. Record this layer's decisions yourself "
                "(RouterInspector.record) if the model changes them.",
                RuntimeWarning,
                stacklevel=2,
            )
        if self.graphed and self.stats.counts.is_cuda:  # one layout with and without a mask
            pending = [raw if raw.keep is not None else self._all_kept(raw) for raw in pending]
        start = 0
        while start < len(pending):
            layout, stop = pending[start].layout(), start + 1
            while stop < len(pending) and pending[stop].layout() == layout:
                stop += 1
            self._fold_raw(pending[start:stop], layout)
            start = stop

    def _all_kept(self, raw: RawRouting) -> RawRouting:
        tokens = raw.logits.numel() // max(raw.logits.shape[-1], 1)
        keep = self._keep_all.get(tokens)
        if keep is None:
            keep = torch.ones(tokens, dtype=torch.bool, device=raw.logits.device)
            self._keep_all[tokens] = keep
        return raw._replace(keep=keep)

    def _raw_slots(self, raw: RawRouting) -> int:
        """The steps a captured batch of ``raw``'s layout holds: the most that can be kept."""
        step_bytes = max(raw.logits.numel() * raw.logits.element_size(), 1)
        return max(1, min(self.config.batch_steps, -(-RAW_BYTES // step_bytes)))

    def _fold_raw(self, raws: Sequence[RawRouting], layout: object) -> None:
        scoring, periodic = raws[0].scoring, raws[0].periodic
        if self.graphed and self.stats.counts.is_cuda:
            # One graph per layout, whatever the batch's length: a shorter batch is padded
            # with calls that count nothing, so reads at any step replay the same graph.
            pad = self._raw_pad.get(layout)
            if pad is None:
                pad = self._raw_pad[layout] = raws[0].padding()
            slots = self._raw_slots(raws[0])
            filled = [*raws, *([pad] * (slots - len(raws)))]
            key = ("raw", slots, layout, periodic)
            out = self._raw_sums.get(key)
            if out is None:
                width = 2 * self.num_experts + 2
                out = torch.empty(slots, width, dtype=torch.float64, device=self._device)
                self._raw_sums[key] = out
            sums = out

            def update(inputs: Sequence[torch.Tensor]) -> None:
                sums.copy_(self._fold_raw_inputs(RawInputs.of(inputs), scoring, periodic))

            self.graphs.run_built(
                key,
                lambda: RawInputs.stack(filled).tensors(),
                lambda buffers: RawInputs.of(buffers).fill(filled),
                update,
            )
            out = out[: len(raws)]
        else:
            out = self._fold_raw_inputs(RawInputs.stack(raws), scoring, periodic)
        steps = [raw.aux_step for raw in raws]
        if self.deliver is not None and steps[0] is not None:
            self.deliver(steps, out)  # type: ignore[arg-type]

    def _fold_raw_inputs(
        self, inputs: RawInputs, scoring: Scoring, periodic: tuple[bool, bool] = (False, False)
    ) -> torch.Tensor:
        """Folds S stacked router calls, the periodic updates ``periodic`` on the first;
        returns their aux-loss sums [S, 2E + 2]."""
        built = steps_from_raw(inputs, scoring)
        coactivation, sample = periodic
        first = inputs.logits.shape[1]  # the first call's tokens
        self._update_tensors(
            built.merged.folded(), coactivation=coactivation, sample=sample, first=first
        )
        return built.aux_sums

    def _fold_merged(
        self,
        merged: MergedSteps,
        flags: tuple[bool, bool] = (False, False),
        first: int | None = None,
    ) -> None:
        """Token statistics of concatenated steps, the periodic updates ``flags`` on the
        ``first`` tokens (the first step's)."""
        coactivation, sample = flags
        self._update_tensors(merged.folded(), coactivation=coactivation, sample=sample, first=first)

    def _replay(self, step: StepTensors, flags: tuple[bool, bool]) -> None:
        """Runs one update from a captured CUDA graph (see ``capture.UpdateGraphs.run``)."""
        coactivation, sample = flags

        def update(inputs: Inputs) -> None:
            self._update_tensors(StepTensors(*inputs), coactivation=coactivation, sample=sample)

        self.graphs.run(step, flags, update)

    def _update_tensors(
        self,
        step: StepTensors,
        *,
        coactivation: bool,
        sample: bool,
        due: torch.Tensor | None = None,
        sample_due: torch.Tensor | None = None,
        first: int | None = None,
    ) -> None:
        """The tensor work of one update, all in place (so a CUDA graph can replay it).

        ``first``: the periodic updates take only the first ``first`` tokens (the first of
        several concatenated steps); None: all of them.
        """
        self.stats.selected += count_values(step.selected, self.num_experts)
        step = executed(step)
        if not (
            self._fused
            and not torch.compiler.is_compiling()
            and token_stats(
                (*step[:4], step.selected_dropped, step.lb_loss, step.z_loss),
                self.stats.tensors(),
                complexity_bins=self.config.complexity_bins,
                max_k=self.max_k,
            )
        ):
            fold_tokens(
                self.stats,
                step,
                num_experts=self.num_experts,
                max_k=self.max_k,
                bins=self.config.complexity_bins,
            )
        indices, complexity, k = step.indices, step.complexity, step.k
        if first is not None and (coactivation or sample):
            indices, complexity, k = (t.narrow(0, 0, first) for t in (indices, complexity, k))
        if coactivation:
            fold_coactivation(self.stats, indices, self.num_experts, due)
        if sample:
            k = k.clamp_max(self.max_k)  # -1 stays: an excluded token is never sampled
            fold_reservoir(self.stats, complexity.float(), k, self.config.seed, sample_due)

    def _snapshot(self) -> None:
        """Stores cumulative counts, k histogram and complexity sum at a window's end."""
        if len(self.snapshot_steps) == self.config.max_windows:
            keep = self.snapshots[1::2].clone()  # every other cumulative snapshot
            self.snapshots.zero_()
            self.snapshots[: keep.shape[0]] = keep
            self.snapshot_steps = self.snapshot_steps[1::2]
            self.window *= 2
            if self.steps % self.window:
                return
        row = len(self.snapshot_steps)
        k_hist = self.stats.joint.sum(dim=0).double()
        csum = self.stats.sums[1:2]
        self.snapshots[row] = torch.cat([self.stats.counts.double(), k_hist, csum])
        self.snapshot_steps.append(self.steps)

    def host_state(self) -> LayerRecord:
        """Moves the statistics to the host (the only synchronising call)."""
        self.drain()
        if self.stream is not None:
            self.stream.synchronize()  # updates run on a side stream
        stats, rows = self.stats, len(self.snapshot_steps)
        steps = self.steps + int(self.compiled_steps)
        valid = stats.res_k >= 0
        return LayerRecord(
            name=self.name,
            num_experts=self.num_experts,
            max_k=self.max_k,
            steps=steps,
            time_range=(self.first_time, self.last_time),
            counts=stats.counts.cpu(),
            selected=stats.selected.cpu(),
            joint=stats.joint.cpu(),
            dropped=int(stats.dropped),
            loss_sums=stats.loss_sums.cpu(),
            moments=moments_from_sums(stats.sums.cpu()),
            extrema=stats.extrema.cpu(),
            coactivation=stats.coactivation.cpu(),
            coactivation_steps=coactivation_steps(steps, self.config.coactivation_every),
            snapshots=self.snapshots[:rows].cpu(),
            snapshot_steps=tuple(self.snapshot_steps),
            sample_complexity=stats.res_complexity[valid].cpu(),
            sample_k=stats.res_k[valid].cpu(),
        )
