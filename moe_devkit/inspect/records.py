"""The inspector's typed records, from a routing decision to the summary.

* ``StepTensors``: the tensors of one routing decision that an update reads (``MergedSteps``:
  several steps' tensors, concatenated);
* ``RunningStats``: one router's running statistics, tensors on the router's device that the
  updates change in place;
* ``LayerRecord``: one layer's statistics read to the host, what ``summary.summarize`` reads
  (``LayerState``, ``JaxLayerState`` and the distributed merge build it).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import nn

from moe_devkit.inspect.config import InspectorConfig
from moe_devkit.routers.torch_router import RoutingDecision


class RouterSite(NamedTuple):
    """Where the inspector records one MoE layer of a model.

    Attributes:
        layer: the layer's name in the summary (a module path inside the MoE block).
        block: the MoE block (the router's parent module, or the router itself).
        router: the module whose forward gives the router logits (None when only the
            experts' inputs are hooked).
    """

    layer: str
    block: nn.Module
    router: nn.Module | None


class Selection(NamedTuple):
    """What a router selected, when its experts ran other (token, expert) pairs.

    Attributes:
        indices: int[N, S], the selected experts, -1 padded.
        dropped: bool[N, S], the selected pairs dropped by the capacity limit.
    """

    indices: torch.Tensor
    dropped: torch.Tensor


class StepTensors(NamedTuple):
    """The tensors of one decision that an update reads (references, never copies).

    Attributes:
        indices: int[N, K], the selected experts, -1 padded.
        complexity: float[N], the complexity score of each token.
        nonfinite: bool[N], tokens routed nowhere for a NaN/Inf input, logit or score.
        k: int[N], experts selected per token; -1 for a token left out of every statistic
            (padding: its indices are all -1).
        dropped: bool[N, K], pairs of ``indices`` dropped by the capacity limit.
        lb_loss: float[], the load-balancing loss.
        z_loss: float[], the router z-loss.
        selected: int[N, S], the experts the router selected, -1 padded: ``indices``
            itself, unless the experts ran other pairs than the router selected (a
            ``Selection``).
        selected_dropped: bool[N, S], the selected pairs dropped by capacity (``dropped``
            itself, unless a ``Selection`` was given).
    """

    indices: torch.Tensor
    complexity: torch.Tensor
    nonfinite: torch.Tensor
    k: torch.Tensor
    dropped: torch.Tensor
    lb_loss: torch.Tensor
    z_loss: torch.Tensor
    selected: torch.Tensor
    selected_dropped: torch.Tensor

    @classmethod
    def of(cls, decision: RoutingDecision, selection: Selection | None = None) -> StepTensors:
        """The tensors of ``decision`` that ``LayerState.update`` reads."""
        selected, selected_dropped = (
            (decision.expert_indices, decision.dropped) if selection is None else selection
        )
        return cls(
            decision.expert_indices,
            decision.complexity,
            decision.nonfinite,
            decision.k_per_token,
            decision.dropped,
            decision.load_balancing_loss,
            decision.z_loss,
            selected,
            selected_dropped,
        )


class MergedSteps(NamedTuple):
    """Several steps' ``StepTensors``: per-token tensors concatenated over the steps, and
    ``losses`` [2 * steps], the load-balancing losses then the z-losses of the steps."""

    indices: torch.Tensor
    complexity: torch.Tensor
    nonfinite: torch.Tensor
    k: torch.Tensor
    dropped: torch.Tensor
    selected: torch.Tensor
    selected_dropped: torch.Tensor
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
            self.indices,
            self.complexity,
            self.nonfinite,
            self.k,
            self.dropped,
            lb_loss,
            z_loss,
            self.selected,
            self.selected_dropped,
        )


_PER_TOKEN = ("indices", "complexity", "nonfinite", "k", "dropped", "selected", "selected_dropped")


def _losses(steps: Sequence[StepTensors]) -> list[torch.Tensor]:
    return [step.lb_loss for step in steps] + [step.z_loss for step in steps]


def _layout(steps: Sequence[StepTensors]) -> Hashable:
    return tuple((t.shape, t.dtype) for step in steps for t in step)


@dataclass(eq=False)
class RunningStats:
    """One router's running statistics: tensors changed in place, never rebound (a captured
    CUDA graph holds their addresses).

    Attributes:
        counts: int64[E], executed token-expert pairs per expert (selections minus the
            pairs dropped by capacity): what each expert ran.
        selected: int64[E], selections per expert, dropped pairs included.
        joint: int64[bins + 1, K + 1], tokens per (complexity bin, executed k); last row:
            non-finite.
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
    selected: torch.Tensor
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
            selected=torch.zeros(num_experts, dtype=i64, device=device),
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
        selected: as in ``RunningStats`` (None: no pair was dropped, the same as counts).
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
    selected: torch.Tensor | None = None
