"""RouterInspector: records every routing decision of a model through forward hooks.

The inspector never changes a model's code or outputs: it registers a forward hook on each
reference router (any module whose forward returns a ``RoutingDecision``) and folds each
decision into bounded, on-device running statistics:

* counts per expert, a joint histogram of (complexity bin, k), non-finite and dropped counts,
  loss sums, float64 running sums (moments) of complexity, an expert co-activation matrix;
* cumulative snapshots every ``window`` steps for trends (when the buffer is full, every
  other snapshot is dropped and the window doubles, so memory stays bounded);
* a uniform sample of (complexity, k) pairs for plots: a bottom-k reservoir on random keys.

Every update is a tensor operation on the decision's device: no ``.item()``, no ``nonzero``,
no ``bincount``, hence no host synchronisation. Values reach the host only in ``summary()``
and ``report()``.

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

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn

from moe_devkit.kernels.inspector_update import is_available as fused_update_available
from moe_devkit.kernels.inspector_update import token_stats
from moe_devkit.routers.torch_router import RoutingDecision, count_values


@dataclass(frozen=True, kw_only=True)
class InspectorConfig:
    """Knobs of the inspector's statistics and alarms.

    Attributes:
        window: steps per trend window (doubles when ``max_windows`` is reached).
        max_windows: snapshots kept per layer.
        complexity_bins: bins of the complexity histogram over [0, 1].
        reservoir_size: (complexity, k) pairs kept per layer for plots.
        reservoir_every: offer the tokens of every this many steps to the reservoir (default
            16: its top-k merge is the most expensive part of an update; the sample stays
            uniform over the tokens of the sampled steps, a systematic sample of the run).
        coactivation_every: update the co-activation matrix every this many steps (0: never;
            default 16: with the reservoir, the periodic part of an update is about 100 us of
            GPU work on an H100 at 8192 tokens, against about 10 us for the rest; the matrix
            is normalised by the steps that updated it).
        collapse_ratio: alarm when an expert's load exceeds this multiple of the mean load.
        collapse_token_share: alarm when one expert is chosen by at least this share of tokens
            (catches collapse where E / k is too small for ``collapse_ratio`` to be reached).
        dead_window_steps: an expert with no selection over the last this many steps is dead.
        drift_k: alarm when mean k moves by more than this between first and last window.
        drift_complexity: same for mean complexity.
        seed: seed of the reservoir's random keys.
        cuda_graphs: on CUDA, replay each update from a captured CUDA graph (one launch per
            step; up to 8 (input shapes, periodic updates) per layer, eager beyond).
        side_stream: on CUDA, run each update on a side stream of the inspector's (it then
            overlaps the model's next kernels) rather than on the model's stream.
        triton: on CUDA with Triton installed, compute the per-token statistics in one
            Triton kernel instead of about 45 PyTorch ops (same results).
        defer_steps: on CUDA with graphs, the forward hooks keep up to this many steps'
            decisions and fold them together (default 1: fold every step as it comes, one
            graph replay; on an H100 host, timed over 16-forward windows, folding 16 steps
            at once cost more CPU in its concatenations than 16 replays: +11-16% against
            +4% on a 1.2 ms forward).
    """

    window: int = 50
    max_windows: int = 64
    complexity_bins: int = 20
    reservoir_size: int = 1024
    reservoir_every: int = 16
    coactivation_every: int = 16
    collapse_ratio: float = 4.0
    collapse_token_share: float = 0.9
    dead_window_steps: int = 50
    drift_k: float = 0.5
    drift_complexity: float = 0.15
    seed: int = 0
    cuda_graphs: bool = True
    side_stream: bool = False
    triton: bool = True
    defer_steps: int = 1

    def __post_init__(self) -> None:
        for name in ("window", "max_windows", "complexity_bins", "reservoir_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 2:
                raise ValueError(f"{name} must be an int >= 2; got {name}={value!r}")
        for name in ("reservoir_every", "defer_steps"):
            every = getattr(self, name)
            if isinstance(every, bool) or not isinstance(every, int) or every < 1:
                raise ValueError(f"{name} must be an int >= 1; got {name}={every!r}")
        if self.max_windows % 2:
            raise ValueError(f"max_windows must be even; got max_windows={self.max_windows}")


class LayerState:
    """Running statistics of one router, all tensors on the router's device."""

    def __init__(
        self, name: str, num_experts: int, max_k: int, device: torch.device, config: InspectorConfig
    ) -> None:
        self.name, self.num_experts, self.max_k, self.config = name, num_experts, max_k, config
        bins, kk = config.complexity_bins, max_k + 1
        i64, f64 = torch.int64, torch.float64
        self.counts = torch.zeros(num_experts, dtype=i64, device=device)
        self.joint = torch.zeros(bins + 1, kk, dtype=i64, device=device)  # last row: non-finite
        self.dropped = torch.zeros((), dtype=i64, device=device)
        self.loss_sums = torch.zeros(2, dtype=f64, device=device)  # load-balancing, z
        self.sums = torch.zeros(3, dtype=f64, device=device)  # n, sum, sum of squares
        self.extrema = torch.tensor([float("inf"), float("-inf")], dtype=f64, device=device)
        self.coactivation = torch.zeros(num_experts, num_experts, dtype=f64, device=device)
        width = num_experts + kk + 1
        self.snapshots = torch.zeros(config.max_windows, width, dtype=f64, device=device)
        self.snapshot_steps: list[int] = []
        self.window = config.window
        self.res_keys = torch.full((config.reservoir_size,), float("inf"), device=device)
        self.res_complexity = torch.zeros(config.reservoir_size, device=device)
        self.res_k = torch.full((config.reservoir_size,), -1, dtype=i64, device=device)
        self.tokens_seen = torch.zeros((), dtype=torch.int64, device=device)  # reservoir keys
        self.compiled_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.graphed = (
            device.type == "cuda" and config.cuda_graphs and not torch.compiler.is_compiling()
        )
        self.stream: torch.cuda.Stream | None = (
            torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
            if device.type == "cuda" and config.side_stream and not torch.compiler.is_compiling()
            else None
        )
        self._graphs: dict[Any, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
        self._direct: dict[Any, torch.cuda.CUDAGraph] = {}  # graphs reading inputs in place
        self._addresses: dict[Any, int] = {}  # input addresses seen, for _direct
        self._deferred: list[tuple[torch.Tensor, ...]] = []  # decision tensors not folded yet
        self._drain_graphs: dict[Any, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
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
                self._update(d, defer)
        else:
            self._update(d, defer)

    def _update(self, d: RoutingDecision, defer: bool) -> None:
        inputs = _decision_tensors(d)  # read under no_grad: no detach needed
        every, sample_every = self.config.coactivation_every, self.config.reservoir_every
        compiling = torch.compiler.is_compiling()
        if compiling:
            step = self.steps + self.compiled_steps
            due = None if every <= 1 else step % every == 0
            sample_due = None if sample_every == 1 else step % sample_every == 0
            self._update_tensors(
                *inputs, coactivation=every > 0, sample=True, due=due, sample_due=sample_due
            )
            self.compiled_steps += 1  # host-side bookkeeping stays out of the graph
            return
        flags = (bool(every) and self.steps % every == 0, self.steps % sample_every == 0)
        if defer and self.graphed and not any(flags) and self.config.defer_steps > 1:
            self._deferred.append(inputs)
            if len(self._deferred) >= self.config.defer_steps:
                self.drain()
        elif self.graphed:
            self._replay(inputs, flags)
        else:
            self._update_tensors(*inputs, coactivation=flags[0], sample=flags[1])
        self.steps += 1
        if self.steps % self.window == 0:
            self.drain()
            self._snapshot()
        now = time.time()
        self.first_time = now if self.first_time is None else self.first_time
        self.last_time = now

    def drain(self) -> None:
        """Folds the deferred steps in: their tensors concatenated, one pass, no host sync."""
        if not self._deferred:
            return
        pending, self._deferred = self._deferred, []
        if len(pending) == 1:
            self._replay(pending[0], (False, False))
            return
        columns = list(zip(*pending, strict=True))
        losses = [*columns[5], *columns[6]]  # load-balancing then z-loss of each step
        key = tuple(tuple((t.shape, t.dtype) for t in column) for column in columns)
        entry = self._drain_graphs.get(key)
        if entry is None:
            merged = [torch.cat(column) for column in columns[:5]]  # per-token tensors
            stacked = torch.stack(losses)
            capture = (
                self.graphed
                and self.counts.is_cuda
                and torch.cuda.get_sync_debug_mode() == 0
                and len(self._drain_graphs) < _MAX_GRAPHS
            )
            if not capture:
                self._fold_merged(merged, stacked)
                return
            graph = self._capture_fn(lambda: self._fold_merged(merged, stacked))
            entry = self._drain_graphs[key] = (graph, (*merged, stacked))
        graph, buffers = entry
        for buffer, column in zip(buffers[:5], columns[:5], strict=True):
            torch.cat(column, out=buffer)  # straight into the graph's input buffers
        torch.stack(losses, out=buffers[5])
        graph.replay()

    def _fold_merged(self, merged: list[torch.Tensor], losses: torch.Tensor) -> None:
        """Token statistics of concatenated steps; ``losses``: [2 * steps] (lb..., z...)."""
        lb_loss, z_loss = losses.view(2, -1).sum(dim=1).unbind()
        indices, complexity, nonfinite, k, dropped = merged
        self._update_tensors(
            indices,
            complexity,
            nonfinite,
            k,
            dropped,
            lb_loss,
            z_loss,
            coactivation=False,
            sample=False,
        )

    def _update_tensors(
        self,
        indices: torch.Tensor,
        complexity: torch.Tensor,
        nonfinite: torch.Tensor,
        k: torch.Tensor,
        dropped: torch.Tensor,
        lb_loss: torch.Tensor,
        z_loss: torch.Tensor,
        *,
        coactivation: bool,
        sample: bool,
        due: torch.Tensor | None = None,
        sample_due: torch.Tensor | None = None,
    ) -> None:
        """The tensor work of one update, all in place (so a CUDA graph can replay it)."""
        num_experts = self.num_experts
        inputs = (indices, complexity, nonfinite, k, dropped, lb_loss, z_loss)
        if not (
            self._fused
            and not torch.compiler.is_compiling()
            and token_stats(
                inputs,
                self._state_tensors(),
                complexity_bins=self.config.complexity_bins,
                max_k=self.max_k,
            )
        ):
            self._token_stats(inputs)
        if coactivation:
            multi_hot = torch.zeros(indices.shape[0], num_experts + 1, device=indices.device)
            multi_hot.scatter_(1, torch.where(indices >= 0, indices, num_experts), 1.0)
            multi_hot = multi_hot[:, :num_experts]  # [N, E]
            if due is not None:  # compiled: a Python step test would recompile every step
                multi_hot = multi_hot * due
            self.coactivation += (multi_hot.t() @ multi_hot).double()
        if sample:
            self._update_reservoir(complexity.float(), k.clamp(0, self.max_k), sample_due)

    def _token_stats(self, inputs: tuple[torch.Tensor, ...]) -> None:
        """Counts, the (complexity bin, k) histogram, drops, losses, complexity moments.

        PyTorch ops over the decision tensors (as ``_update_tensors`` takes them); on CUDA
        with Triton, ``fused_update.token_stats`` does the same in two launches.
        """
        indices, complexity, nonfinite, k, dropped, lb_loss, z_loss = inputs
        num_experts, kk, bins = self.num_experts, self.max_k + 1, self.config.complexity_bins
        self.counts += count_values(indices, num_experts)  # histc: no atomics, no sync
        complexity = complexity.to(torch.float64)
        finite = ~nonfinite & torch.isfinite(complexity)
        cbin = (complexity.nan_to_num(0.0).clamp(0, 1) * bins).long().clamp_max(bins - 1)
        cbin = torch.where(finite, cbin, bins)
        k = k.clamp(0, self.max_k)
        self.joint.view(-1).add_(count_values(cbin * kk + k, self.joint.numel()))
        self.dropped += dropped.sum()
        self.loss_sums += torch.stack([lb_loss, z_loss]).double()
        self._update_moments(complexity, finite)

    def _replay(self, inputs: tuple[torch.Tensor, ...], flags: tuple[bool, bool]) -> None:
        """Replays a captured update.

        A steady training loop hands the hook its decision tensors at the same addresses
        step after step (the caching allocator reuses them), so a graph captured on those
        very tensors is replayed as is; other inputs are copied into the buffers of a graph
        captured per shape. Capturing synchronises the device once, so nothing is captured
        while CUDA sync-debug mode is on: the update then runs eagerly.
        """
        where = (tuple((t.data_ptr(), t.shape, t.stride(), t.dtype) for t in inputs), flags)
        direct = self._direct.get(where)
        if direct is not None:
            direct.replay()
            return
        capturing_allowed = torch.cuda.get_sync_debug_mode() == 0
        seen = self._addresses.get(where, 0) + 1
        if capturing_allowed and seen >= 2 and len(self._direct) < _MAX_GRAPHS:
            self._direct[where] = self._capture(inputs, flags, own_buffers=False)[0]
            self._direct[where].replay()
            return
        if len(self._addresses) < 4 * _MAX_GRAPHS:
            self._addresses[where] = seen
        key = (tuple(t.shape for t in inputs), flags)
        entry = self._graphs.get(key)
        if entry is None:
            if not capturing_allowed or len(self._graphs) >= _MAX_GRAPHS:
                self._update_tensors(*inputs, coactivation=flags[0], sample=flags[1])
                return
            entry = self._capture(inputs, flags, own_buffers=True)
            self._graphs[key] = entry
        graph, buffers = entry
        torch._foreach_copy_(list(buffers), list(inputs))  # one call for the seven copies
        graph.replay()

    def _capture(
        self, inputs: tuple[torch.Tensor, ...], flags: tuple[bool, bool], *, own_buffers: bool
    ) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]:
        """Captures one update (on its own input buffers, or reading ``inputs`` in place)."""
        buffers = tuple(t.clone() for t in inputs) if own_buffers else inputs
        graph = self._capture_fn(
            lambda: self._update_tensors(*buffers, coactivation=flags[0], sample=flags[1])
        )
        return graph, buffers

    def _capture_fn(self, fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """Captures ``fn`` (state updates) into a CUDA graph.

        It runs once on a side stream first: lazy initialisation (cuBLAS handles, the
        allocator) and Triton's compilation for these shapes must not happen inside the
        capture. Warm-up and capture run the update for real, so the state is restored.
        """
        saved = {name: t.clone() for name, t in self._state_tensors().items()}
        device = self.counts.device
        warm = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        warm.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(warm):
            fn()
        torch.cuda.current_stream(device).wait_stream(warm)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        for name, value in saved.items():
            getattr(self, name).copy_(value)
        return graph

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        names = (
            "counts", "joint", "dropped", "loss_sums", "sums", "extrema", "coactivation",
            "res_keys", "res_complexity", "res_k", "tokens_seen",
        )  # fmt: skip
        return {name: getattr(self, name) for name in names}

    def _update_moments(self, complexity: torch.Tensor, finite: torch.Tensor) -> None:
        """Running float64 sums of the finite complexity scores and their squares.

        Complexity scores are of order 1 (the reference routers' lie in [0, 1]): float64 sums
        keep what Welford's update would, at a third of its kernels (each a launch inside
        the captured update); ``host_state`` turns them into (n, mean, M2).
        """
        values = torch.where(finite, complexity, 0.0)
        batch = torch.stack([finite.sum(dtype=torch.float64), values.sum(), values.square().sum()])
        self.sums += batch
        lo = torch.where(finite, complexity, float("inf")).min()
        hi = torch.where(finite, complexity, float("-inf")).max()
        self.extrema.copy_(torch.stack([self.extrema[0].minimum(lo), self.extrema[1].maximum(hi)]))

    def _update_reservoir(
        self, complexity: torch.Tensor, k: torch.Tensor, due: torch.Tensor | None
    ) -> None:
        """Keeps the pairs with the smallest random keys: a uniform sample of the tokens of
        the sampled steps (every ``reservoir_every``-th step)."""
        index = self.tokens_seen + torch.arange(k.shape[0], device=k.device)
        keys = _uniform_keys(index, self.config.seed)
        if due is None:
            self.tokens_seen += k.shape[0]
        else:  # compiled: a step that is not sampled offers no token (empty slots, k = -1)
            self.tokens_seen += k.shape[0] * due
            keys = torch.where(due, keys, float("inf"))
            k = torch.where(due, k, -1)
        all_keys = torch.cat([self.res_keys, keys])
        keep = torch.topk(all_keys, self.res_keys.shape[0], largest=False, sorted=False).indices
        # In place, never rebinding: a captured CUDA graph holds these addresses.
        self.res_complexity.copy_(torch.cat([self.res_complexity, complexity])[keep])
        self.res_k.copy_(torch.cat([self.res_k, k])[keep])
        self.res_keys.copy_(all_keys[keep])

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
        k_hist = self.joint.sum(dim=0).double()
        csum = self.sums[1:2]
        self.snapshots[row] = torch.cat([self.counts.double(), k_hist, csum])
        self.snapshot_steps.append(self.steps)

    def host_state(self) -> dict[str, Any]:
        """Moves the statistics to the host (the only synchronising call)."""
        self.drain()
        if self.stream is not None:
            self.stream.synchronize()  # updates run on a side stream
        rows = len(self.snapshot_steps)
        valid = self.res_k >= 0
        return {
            "name": self.name,
            "num_experts": self.num_experts,
            "max_k": self.max_k,
            "steps": self.steps + int(self.compiled_steps),
            "time_range": [self.first_time, self.last_time],
            "counts": self.counts.cpu(),
            "joint": self.joint.cpu(),
            "dropped": int(self.dropped),
            "loss_sums": self.loss_sums.cpu(),
            "moments": moments_from_sums(self.sums.cpu()),
            "extrema": self.extrema.cpu(),
            "coactivation": self.coactivation.cpu(),
            "coactivation_steps": (
                0
                if not self.config.coactivation_every
                else -(-(self.steps + int(self.compiled_steps)) // self.config.coactivation_every)
            ),
            "snapshots": self.snapshots[:rows].cpu(),
            "snapshot_steps": list(self.snapshot_steps),
            "sample_complexity": self.res_complexity[valid].cpu(),
            "sample_k": self.res_k[valid].cpu(),
        }


_MASK32 = 0xFFFFFFFF


_MAX_GRAPHS = 8  # captured (input shapes, periodic flags) per layer


def _uniform_keys(index: torch.Tensor, seed: int) -> torch.Tensor:
    """float32[N] in [0, 1): a counter-based hash of int64 token indices (no RNG state).

    Two rounds of a 32-bit multiply-xorshift mix; every product stays below 2**63, so int64
    arithmetic never overflows on any backend. Compiles without a graph break, unlike a
    ``torch.Generator``, and leaves the model's random streams untouched.
    """
    h = (index + ((seed * 0x9E3779B9) & _MASK32)) & _MASK32
    for multiplier in (0x7FEB352D, 0x2C1B3C6D):
        h = h ^ (h >> 16)
        h = (h * multiplier) & _MASK32
    h = h ^ (h >> 15)
    return (h >> 8).float() / float(1 << 24)


def in_backward_recompute() -> bool:
    """True while autograd's engine runs a forward: activation checkpointing's recompute.

    Checkpointing (reentrant or not, including transformers' gradient checkpointing) runs a
    layer's forward a second time inside the backward pass; hooks skip that call so a step
    is recorded once. Always False under torch.compile, which recomputes inside its graphs.
    """
    if torch.compiler.is_compiling():
        return False
    return bool(torch._C._current_graph_task_id() != -1)


def moments_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """float64[3] (n, mean, M2) from (n, sum, sum of squares)."""
    n, total, squares = sums.double().unbind()
    mean = total / n.clamp_min(1)
    m2 = (squares - total * mean).clamp_min(0.0)
    return torch.stack([n, mean, m2])


def sums_from_moments(moments: torch.Tensor) -> torch.Tensor:
    """float64[3] (n, sum, sum of squares) from (n, mean, M2): the inverse."""
    n, mean, m2 = moments.double().unbind()
    return torch.stack([n, n * mean, m2 + n * mean * mean])


def _decision_tensors(decision: RoutingDecision) -> tuple[torch.Tensor, ...]:
    """The decision's tensors that ``LayerState.update`` reads."""
    return (
        decision.expert_indices,
        decision.complexity,
        decision.nonfinite,
        decision.k_per_token,
        decision.dropped,
        decision.load_balancing_loss,
        decision.z_loss,
    )


def _is_router(module: nn.Module) -> bool:
    from moe_devkit.routers.torch_router import DynamicMoERouter, StaticTopKRouter

    return isinstance(module, DynamicMoERouter | StaticTopKRouter)


Hook = Callable[[nn.Module, Any, Any], None]


def _adapter_hooks(
    inspector: RouterInspector, model: nn.Module, *, required: bool
) -> list[tuple[nn.Module, Hook]]:
    """Hooks from the adapter registry (moe_devkit.integrations.hf), imported lazily.

    The registry is consulted when it was already imported (a user registered an adapter) or
    when the model holds a transformers module; otherwise nothing is imported.
    """
    registry = "moe_devkit.integrations.hf"
    if registry not in sys.modules and not any(
        type(m).__module__.startswith("transformers.") for m in model.modules()
    ):
        return []
    from moe_devkit.integrations.hf import adapter_hooks

    return adapter_hooks(inspector, model, required=required)


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
        self.routing_history_size = 0

    # ------------------------------------------------------------------ attach / detach

    def attach(self, model: nn.Module | None = None) -> RouterInspector:
        """Registers forward hooks on every router of ``model``; returns self.

        Routers are the reference routers and any module a registered adapter converts
        (transformers MoE models: see moe_devkit.integrations.hf).

        Raises:
            TypeError: model is not an nn.Module.
            ValueError: the model holds no router it knows (for an MoE model of an unknown
                architecture, the message says how to register an adapter), or the
                inspector is already attached.
        """
        model = model if model is not None else self._model
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if self._handles:
            raise ValueError("the inspector is already attached; call detach() first")
        routers = [(name or "router", m) for name, m in model.named_modules() if _is_router(m)]
        hooks = [(m, self._hook_for(name)) for name, m in routers]
        hooks += _adapter_hooks(self, model, required=not routers)
        if not hooks:
            raise ValueError(
                f"model must contain a moe_devkit router (DynamicMoERouter or StaticTopKRouter) "
                f"or a router with a registered adapter; found none in {type(model).__name__}"
            )
        for module, hook in hooks:
            self._handles.append(module.register_forward_hook(hook))
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

    def _hook_for(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, RoutingDecision) and not in_backward_recompute():
                self.record(output, layer=name, defer=True)  # a fresh router output

        return hook

    # ------------------------------------------------------------------ recording

    def record(
        self, decision: RoutingDecision, layer: str = "router", *, defer: bool = False
    ) -> None:
        """Folds one decision into the statistics of ``layer`` (no host synchronisation).

        ``defer=True`` (what the forward hooks pass) lets a CUDA layer fold several steps'
        decisions at once; pass it only if nothing modifies the decision's tensors later.
        """
        state = self.layers.get(layer)
        if state is None:
            state = LayerState(
                layer,
                decision.num_experts,
                decision.max_k,
                decision.expert_indices.device,
                self.config,
            )
            self.layers[layer] = state
        elif (state.num_experts, state.max_k) != (decision.num_experts, decision.max_k):
            raise ValueError(
                f"layer {layer!r} was recorded with num_experts={state.num_experts}, "
                f"max_k={state.max_k}; got num_experts={decision.num_experts}, "
                f"max_k={decision.max_k}"
            )
        if state.stream is None:
            state.update(decision, defer=defer)
            return
        # On CUDA the update runs on a side stream, after the decision is computed, so its
        # small kernels overlap the model's next ones instead of lengthening the forward.
        main = torch.cuda.current_stream(state.stream.device)
        state.stream.wait_stream(main)
        with torch.cuda.stream(state.stream):
            state.update(decision)  # not deferred: the side stream already hides the work
        for tensor in _decision_tensors(decision):
            tensor.record_stream(state.stream)  # keep its memory until the update has run

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

    def summary(self) -> Any:
        """Per-layer statistics and alarms, read to the host (see inspect.report)."""
        from moe_devkit.inspect.report import summarize

        return summarize(self)

    def report(self, out_dir: str = "moe_devkit_report") -> Any:
        """Writes report.json, routing_analysis.png and report.html into ``out_dir``."""
        from moe_devkit.inspect.report import write_report

        return write_report(self.summary(), out_dir)

    def __iter__(self) -> Iterator[LayerState]:
        return iter(self.layers.values())


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


def _moments(values: torch.Tensor) -> dict[str, float]:
    std = float(values.std()) if values.numel() > 1 else 0.0
    return {
        "mean": float(values.mean()),
        "std": std,
        "min": float(values.min()),
        "max": float(values.max()),
    }


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
