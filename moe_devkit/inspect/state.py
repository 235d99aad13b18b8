"""Per-layer state of ``RouterInspector``: its typed records, and ``LayerState``.

* ``StepTensors``: the tensors of one routing decision that an update reads (``MergedSteps``:
  several steps' tensors, concatenated);
* ``RunningStats``: one router's running statistics, tensors on the router's device that the
  updates change in place;
* ``LayerState``: folds decisions into its ``RunningStats`` (the tensor work is in
  ``update``, its CUDA graphs in ``capture``) and keeps the trend snapshots;
* ``LayerRecord``: one layer's statistics read to the host, what ``summary.summarize`` reads
  (``JaxLayerState`` and the distributed merge build it too).

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
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from moe_devkit.inspect.capture import Inputs, UpdateGraphs
from moe_devkit.inspect.config import InspectorConfig
from moe_devkit.inspect.update import fold_coactivation, fold_reservoir, fold_tokens
from moe_devkit.kernels.inspector_update import is_available as fused_update_available
from moe_devkit.kernels.inspector_update import token_stats
from moe_devkit.routers.torch_router import RoutingDecision


class StepTensors(NamedTuple):
    """The tensors of one decision that an update reads (references, never copies).

    Attributes:
        indices: int[N, K], the selected experts, -1 padded.
        complexity: float[N], the complexity score of each token.
        nonfinite: bool[N], tokens routed nowhere for a NaN/Inf input, logit or score.
        k: int[N], experts per token.
        dropped: bool[N, K], pairs dropped by the capacity limit.
        lb_loss: float[], the load-balancing loss.
        z_loss: float[], the router z-loss.
    """

    indices: torch.Tensor
    complexity: torch.Tensor
    nonfinite: torch.Tensor
    k: torch.Tensor
    dropped: torch.Tensor
    lb_loss: torch.Tensor
    z_loss: torch.Tensor

    @classmethod
    def of(cls, decision: RoutingDecision) -> StepTensors:
        """The tensors of ``decision`` that ``LayerState.update`` reads."""
        return cls(
            decision.expert_indices,
            decision.complexity,
            decision.nonfinite,
            decision.k_per_token,
            decision.dropped,
            decision.load_balancing_loss,
            decision.z_loss,
        )


class MergedSteps(NamedTuple):
    """Several steps' ``StepTensors``: per-token tensors concatenated over the steps, and
    ``losses`` [2 * steps], the load-balancing losses then the z-losses of the steps."""

    indices: torch.Tensor
    complexity: torch.Tensor
    nonfinite: torch.Tensor
    k: torch.Tensor
    dropped: torch.Tensor
    losses: torch.Tensor

    @classmethod
    def concat(cls, steps: Sequence[StepTensors]) -> MergedSteps:
        """The steps merged into new tensors."""
        columns = {name: [getattr(step, name) for step in steps] for name in _PER_TOKEN}
        merged = {name: torch.cat(column) for name, column in columns.items()}
        return cls(**merged, losses=torch.stack(_losses(steps)))

    def fill(self, steps: Sequence[StepTensors]) -> None:
        """Writes the steps into these tensors (steps of the layout they were built from)."""
        for name in _PER_TOKEN:
            torch.cat([getattr(step, name) for step in steps], out=getattr(self, name))
        torch.stack(_losses(steps), out=self.losses)

    def folded(self) -> StepTensors:
        """One step's tensors, with the losses summed over the steps."""
        lb_loss, z_loss = self.losses.view(2, -1).sum(dim=1).unbind()
        return StepTensors(
            self.indices, self.complexity, self.nonfinite, self.k, self.dropped, lb_loss, z_loss
        )


_PER_TOKEN = ("indices", "complexity", "nonfinite", "k", "dropped")


def _losses(steps: Sequence[StepTensors]) -> list[torch.Tensor]:
    return [step.lb_loss for step in steps] + [step.z_loss for step in steps]


def _layout(steps: Sequence[StepTensors]) -> Hashable:
    return tuple((t.shape, t.dtype) for step in steps for t in step)


@dataclass(eq=False)
class RunningStats:
    """One router's running statistics: tensors changed in place, never rebound (a captured
    CUDA graph holds their addresses).

    Attributes:
        counts: int64[E], selections per expert.
        joint: int64[bins + 1, K + 1], tokens per (complexity bin, k); last row: non-finite.
        dropped: int64[], pairs dropped by capacity.
        loss_sums: float64[2], sums of the load-balancing loss and the z-loss.
        sums: float64[3], n, sum and sum of squares of the finite complexity scores.
        extrema: float64[2], their min and max.
        coactivation: float64[E, E], tokens that selected both experts.
        res_keys: float32[S], the reservoir's random keys (inf: an empty slot).
        res_complexity: float32[S], the reservoir's complexity scores.
        res_k: int64[S], the reservoir's k (-1: an empty slot).
        tokens_seen: int64[], tokens offered to the reservoir (the counter of its keys).
    """

    counts: torch.Tensor
    joint: torch.Tensor
    dropped: torch.Tensor
    loss_sums: torch.Tensor
    sums: torch.Tensor
    extrema: torch.Tensor
    coactivation: torch.Tensor
    res_keys: torch.Tensor
    res_complexity: torch.Tensor
    res_k: torch.Tensor
    tokens_seen: torch.Tensor

    @classmethod
    def zeros(
        cls, num_experts: int, max_k: int, config: InspectorConfig, device: torch.device
    ) -> RunningStats:
        """Statistics of no decision yet, on ``device``."""
        bins, kk, size = config.complexity_bins, max_k + 1, config.reservoir_size
        i64, f64 = torch.int64, torch.float64
        return cls(
            counts=torch.zeros(num_experts, dtype=i64, device=device),
            joint=torch.zeros(bins + 1, kk, dtype=i64, device=device),
            dropped=torch.zeros((), dtype=i64, device=device),
            loss_sums=torch.zeros(2, dtype=f64, device=device),
            sums=torch.zeros(3, dtype=f64, device=device),
            extrema=torch.tensor([float("inf"), float("-inf")], dtype=f64, device=device),
            coactivation=torch.zeros(num_experts, num_experts, dtype=f64, device=device),
            res_keys=torch.full((size,), float("inf"), device=device),
            res_complexity=torch.zeros(size, device=device),
            res_k=torch.full((size,), -1, dtype=i64, device=device),
            tokens_seen=torch.zeros((), dtype=i64, device=device),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by field name (as the Triton update and the graph capture take them)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, kw_only=True, eq=False)
class LayerRecord:
    """One layer's statistics on the host (CPU tensors): what ``summarize`` reads.

    Attributes:
        name, num_experts, max_k: the layer's name, E and K.
        steps: decisions recorded.
        time_range: (first, last) record time in unix seconds (None when unknown).
        counts, joint, loss_sums, extrema, coactivation: as in ``RunningStats``.
        dropped: pairs dropped by capacity.
        moments: float64[3], (n, mean, M2) of the finite complexity scores.
        coactivation_steps: the steps that updated the co-activation matrix.
        snapshots: float64[W, E + K + 2], cumulative counts, k histogram and complexity sum
            at the end of each trend window.
        snapshot_steps: the step at the end of each window.
        sample_complexity, sample_k: the reservoir's (complexity, k) pairs.
    """

    name: str
    num_experts: int
    max_k: int
    steps: int
    time_range: tuple[float | None, float | None]
    counts: torch.Tensor
    joint: torch.Tensor
    dropped: int
    loss_sums: torch.Tensor
    moments: torch.Tensor
    extrema: torch.Tensor
    coactivation: torch.Tensor
    coactivation_steps: int
    snapshots: torch.Tensor
    snapshot_steps: tuple[int, ...]
    sample_complexity: torch.Tensor
    sample_k: torch.Tensor


def coactivation_steps(steps: int, every: int) -> int:
    """The steps among ``steps`` that update the co-activation matrix (every ``every``-th)."""
    return 0 if not every else -(-steps // every)


def moments_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """float64[3] (n, mean, M2) from (n, sum, sum of squares)."""
    n, total, squares = sums.double().unbind()
    mean = total / n.clamp_min(1)
    m2 = (squares - total * mean).clamp_min(0.0)
    return torch.stack([n, mean, m2])


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
        self._deferred: list[StepTensors] = []  # decision tensors not folded yet
        # One Triton kernel for the per-token statistics (CUDA only: the interpreter is slow)
        self._fused = config.triton and device.type == "cuda" and fused_update_available(device)
        self.steps = 0
        self.first_time: float | None = None
        self.last_time: float | None = None

    def update(self, d: RoutingDecision, *, defer: bool = False) -> None:
        """Folds one decision into the statistics (device ops only, no host sync).

        On CUDA the tensor work is captured once per input shape into a CUDA graph and
        replayed: one launch instead of about fifty small kernels per step.

        ``defer``: on CUDA, keep references to this step's decision tensors and fold up to
        ``config.defer_steps`` steps at once (one concatenation and one pass), which divides the
        per-step launch cost; for decisions whose tensors nobody modifies afterwards (the
        hooks' fresh router outputs). Steps with a periodic update (co-activation,
        reservoir) are folded at once, and ``drain`` folds what is pending.
        """
        # A context, not a decorator: torch.compile cannot call a decorated method of a
        # LayerState created inside the compiled region (on the first step).
        if torch.is_grad_enabled():
            with torch.no_grad():
                self._update(StepTensors.of(d), defer)
        else:
            self._update(StepTensors.of(d), defer)

    def _update(self, step: StepTensors, defer: bool) -> None:
        if torch.compiler.is_compiling():
            self._update_compiled(step)
            return
        every, sample_every = self.config.coactivation_every, self.config.reservoir_every
        flags = (bool(every) and self.steps % every == 0, self.steps % sample_every == 0)
        if defer and self.graphed and not any(flags) and self.config.defer_steps > 1:
            self._deferred.append(step)
            if len(self._deferred) >= self.config.defer_steps:
                self.drain()
        elif self.graphed:
            self._replay(step, flags)
        else:
            self._update_tensors(step, coactivation=flags[0], sample=flags[1])
        self.steps += 1
        if self.steps % self.window == 0:
            self.drain()
            self._snapshot()
        now = time.time()
        self.first_time = now if self.first_time is None else self.first_time
        self.last_time = now

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
        if not self._deferred:
            return
        pending, self._deferred = self._deferred, []
        if len(pending) == 1:
            self._replay(pending[0], (False, False))
            return
        if not (self.graphed and self.stats.counts.is_cuda):
            self._fold_merged(MergedSteps.concat(pending))
            return
        self.graphs.run_built(
            _layout(pending),
            lambda: MergedSteps.concat(pending),
            lambda buffers: MergedSteps(*buffers).fill(pending),  # the graph's input buffers
            lambda inputs: self._fold_merged(MergedSteps(*inputs)),
        )

    def _fold_merged(self, merged: MergedSteps) -> None:
        """Token statistics of concatenated steps (no periodic update)."""
        self._update_tensors(merged.folded(), coactivation=False, sample=False)

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
    ) -> None:
        """The tensor work of one update, all in place (so a CUDA graph can replay it)."""
        if not (
            self._fused
            and not torch.compiler.is_compiling()
            and token_stats(
                step,
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
        if coactivation:
            fold_coactivation(self.stats, step.indices, self.num_experts, due)
        if sample:
            k = step.k.clamp(0, self.max_k)
            fold_reservoir(self.stats, step.complexity.float(), k, self.config.seed, sample_due)

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
