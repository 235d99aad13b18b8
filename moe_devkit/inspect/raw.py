"""Router outputs kept by reference, turned into the inspector's step tensors in batches.

A transformers router returns ``(router_logits, weights, indices)``. Building a
``RoutingDecision`` from them (probabilities, entropy, finiteness, z-loss, load-balancing
loss) is some 60 small ops, and the aux-loss check adds its per-layer sums: on a GPU each is
a kernel launch on the model's critical path, which dominates the step of a small model.
So after a layer's first step (built and checked at once), the forward hook keeps only
references to the router's outputs (``RawRouting``), and ``steps_from_raw`` builds the
tensors of many steps at once, stacked on a leading step axis: one pass of the same ops,
with the per-step losses and aux-loss sums reduced over each step's tokens.
``LayerState`` replays that pass from a captured CUDA graph.

The values equal the per-step ones (``decision_from_router_outputs`` followed by
``exclude_tokens``) to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from moe_devkit.inspect.adapters import Scoring, _logit_statistics
from moe_devkit.inspect.records import MergedSteps
from moe_devkit.routers.torch_router import count_values


class RawRouting(NamedTuple):
    """One router call's outputs, by reference (no copy, no op).

    Attributes:
        logits: float[..., E], the router logits (any float dtype).
        indices: int[..., K], the experts the model selected, -1 padded.
        keep: bool[N] or None: the tokens to count (None: all; False for padding).
        scoring: how the router probabilities follow from the logits.
        aux_step: the model forward whose aux-loss sums this call joins (None: not compared).
        version: the logits' and indices' version counters when kept (an in-place change
            after the forward would alter what is read later).
        periodic: whether this call's step updates the co-activation matrix and the
            reservoir (such a call opens a batch: it is always its first).
    """

    logits: torch.Tensor
    indices: torch.Tensor
    keep: torch.Tensor | None
    scoring: Scoring
    aux_step: int | None
    version: tuple[int, int]
    periodic: tuple[bool, bool] = (False, False)

    def layout(self) -> tuple[object, ...]:
        """What a batched build depends on besides values: shapes, dtypes, masks, flags."""
        logits, indices = self.logits, self.indices
        return (
            logits.shape,
            logits.dtype,
            indices.shape,
            indices.dtype,
            self.keep is None,
            self.scoring,
            self.aux_step is None,
        )

    def padding(self) -> RawRouting:
        """A call of this layout that counts nothing (every token left out): the slots of a
        captured batch that a shorter batch does not fill."""
        logits = torch.zeros_like(self.logits)
        indices = torch.full_like(self.indices, -1)
        tokens = logits.numel() // max(logits.shape[-1], 1)
        keep = torch.zeros(tokens, dtype=torch.bool, device=logits.device)  # made there: no copy
        return self._replace(logits=logits, indices=indices, keep=keep, periodic=(False, False))

    def modified(self) -> bool:
        """True when the logits or indices were changed in place since they were kept."""
        return (self.logits._version, self.indices._version) != self.version


class RawInputs(NamedTuple):
    """Stacked tensors of S calls of one layout: the inputs of ``steps_from_raw``."""

    logits: torch.Tensor  # [S, N, E], the logits' dtype
    indices: torch.Tensor  # [S, N, K]
    keep: torch.Tensor | None  # bool[S, N]

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor]) -> RawInputs:
        """From ``tensors()`` (a captured graph's input buffers)."""
        return cls(tensors[0], tensors[1], tensors[2] if len(tensors) > 2 else None)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors, without a missing ``keep``."""
        if self.keep is None:
            return (self.logits, self.indices)
        return (self.logits, self.indices, self.keep)

    @classmethod
    def stack(cls, raws: Sequence[RawRouting]) -> RawInputs:
        """New stacked tensors of ``raws`` (one layout)."""
        logits, indices, keep = _parts(raws)
        return cls(torch.stack(logits), torch.stack(indices), _stack_keep(keep))

    def fill(self, raws: Sequence[RawRouting]) -> None:
        """Writes ``raws`` (of the layout these tensors were stacked from) into them."""
        logits, indices, keep = _parts(raws)
        torch.stack(logits, out=self.logits)
        torch.stack(indices, out=self.indices)
        if self.keep is not None:
            torch.stack(keep, out=self.keep)  # type: ignore[arg-type]


def _parts(
    raws: Sequence[RawRouting],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None]]:
    num_experts, slots = raws[0].logits.shape[-1], raws[0].indices.shape[-1]
    logits = [r.logits.reshape(-1, num_experts) for r in raws]
    indices = [r.indices.reshape(-1, slots) for r in raws]
    return logits, indices, [r.keep for r in raws]


def _stack_keep(keep: list[torch.Tensor | None]) -> torch.Tensor | None:
    if keep[0] is None:
        return None
    return torch.stack([k.reshape(-1) for k in keep if k is not None])


class RawSteps(NamedTuple):
    """What ``steps_from_raw`` builds.

    Attributes:
        merged: the S steps' tensors, concatenated over the steps (``MergedSteps``).
        aux_sums: float64[S, 2E + 2], each step's aux-loss sums (pairs not counted,
            selections per expert, router probabilities summed per expert, tokens), as the
            aux-loss check's ``_StepAccumulator`` adds them.
    """

    merged: MergedSteps
    aux_sums: torch.Tensor


def steps_from_raw(inputs: RawInputs, scoring: Scoring = "softmax") -> RawSteps:
    """The step tensors of S router calls at once (device ops only, no host sync).

    Per token as ``decision_from_router_outputs``: router probabilities, finiteness,
    normalised entropy (the complexity), k = selected slots of a finite token; tokens
    outside ``keep`` get k = -1 and no expert, as ``exclude_tokens`` does. Per step, over
    its finite kept tokens: the load-balancing loss E * sum_e f_e P_e and the z-loss.
    """
    logits = inputs.logits.float()  # [S, N, E]
    steps, num_tokens, num_experts = logits.shape
    indices = inputs.indices.long()  # [S, N, K]
    probs, finite, entropy, lse = _logit_statistics(logits, scoring)  # [S, N, E], [S, N]
    keep = inputs.keep
    valid = finite if keep is None else finite & keep  # [S, N]
    selected = indices >= 0
    k = selected.sum(dim=-1) * finite
    if keep is not None:
        indices = torch.where(keep.unsqueeze(-1), indices, -1)
        k = torch.where(keep, k, -1)
        entropy = torch.where(keep, entropy, 0.0)
    nonfinite = ~finite if keep is None else ~finite & keep
    tokens = valid.sum(dim=-1, dtype=torch.float64)  # [S]
    z_loss = torch.where(valid, lse, 0.0).square().sum(dim=-1) / tokens.clamp_min(1)
    # Selections per (step, expert) of the valid tokens: bucket 0 takes every other slot.
    bucket = torch.where(valid.unsqueeze(-1) & (indices >= 0), indices + 1, 0)
    step_offset = torch.arange(steps, device=bucket.device).view(steps, 1, 1) * (num_experts + 1)
    counts = count_values(bucket + step_offset, steps * (num_experts + 1)).view(steps, -1)
    counts = counts.double()
    prob_sums = torch.where(valid.unsqueeze(-1), probs, 0.0).sum(dim=1, dtype=torch.float64)
    per_token = tokens.clamp_min(1).unsqueeze(-1)
    lb_loss = num_experts * ((counts[:, 1:] / per_token) * (prob_sums / per_token)).sum(dim=-1)
    aux_sums = torch.cat([counts, prob_sums, tokens.unsqueeze(-1)], dim=-1)
    flat = indices.reshape(steps * num_tokens, -1)
    dropped = torch.zeros_like(flat, dtype=torch.bool)
    merged = MergedSteps(
        indices=flat,
        complexity=entropy.reshape(-1),
        nonfinite=nonfinite.reshape(-1),
        k=k.reshape(-1),
        dropped=dropped,
        selected=flat,
        selected_dropped=dropped,
        losses=torch.cat([lb_loss.float(), z_loss.float()]),
    )
    return RawSteps(merged, aux_sums)
