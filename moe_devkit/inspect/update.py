"""The in-place tensor work of one inspector update, in PyTorch ops.

Each function folds one step's tensors (``state.StepTensors``) into a layer's
``state.RunningStats``, in place and with device ops only: no ``.item()``, no ``nonzero``, no
``bincount``, hence no host synchronisation, so a CUDA graph can capture and replay it.

* ``executed``: the step's pairs the experts ran (capacity drops removed);
* ``fold_tokens``: counts per expert, the (complexity bin, k) histogram, drops, loss sums and
  the complexity's float64 sums and extrema (on CUDA with Triton,
  ``kernels.inspector_update.token_stats`` does the same in two launches);
* ``fold_coactivation``: the expert co-activation matrix;
* ``fold_reservoir``: a bottom-k reservoir on random keys, a uniform sample of the tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moe_devkit.routers.torch_router import count_values

if TYPE_CHECKING:
    from moe_devkit.inspect.records import RunningStats, StepTensors

_MASK32 = 0xFFFFFFFF


def fold_tokens(
    stats: RunningStats, step: StepTensors, *, num_experts: int, max_k: int, bins: int
) -> None:
    """Counts, the (complexity bin, k) histogram, drops, losses, complexity moments.

    ``step`` is already in executed form (``executed``): its indices and k leave out the
    pairs dropped by capacity, and excluded tokens (padding) have k = -1.
    """
    kk = max_k + 1
    stats.counts += count_values(step.indices, num_experts)  # histc: no atomics, no sync
    complexity = step.complexity.to(torch.float64)
    included = step.k >= 0
    finite = ~step.nonfinite & torch.isfinite(complexity) & included
    cbin = (complexity.nan_to_num(0.0).clamp(0, 1) * bins).long().clamp_max(bins - 1)
    cbin = torch.where(finite, cbin, bins)
    k = step.k.clamp(0, max_k)
    code = torch.where(included, cbin * kk + k, -1)  # -1: outside the histogram, not counted
    stats.joint.view(-1).add_(count_values(code, stats.joint.numel()))
    stats.dropped += step.selected_dropped.sum()
    stats.loss_sums += torch.stack([step.lb_loss, step.z_loss]).double()
    _fold_moments(stats, complexity, finite)


def executed(step: StepTensors) -> StepTensors:
    """The step with only the pairs the experts ran: dropped pairs become -1 in the
    indices and leave each token's k (excluded tokens keep k = -1)."""
    indices = torch.where(step.dropped, -1, step.indices)
    k = torch.where(step.k >= 0, step.k - step.dropped.sum(dim=-1), step.k)
    return step._replace(indices=indices, k=k)


def _fold_moments(stats: RunningStats, complexity: torch.Tensor, finite: torch.Tensor) -> None:
    """Running float64 sums of the finite complexity scores and their squares.

    Complexity scores are of order 1 (the reference routers' lie in [0, 1]): float64 sums
    keep what Welford's update would, at a third of its kernels (each a launch inside
    the captured update); ``LayerState.host_state`` turns them into (n, mean, M2).
    """
    values = torch.where(finite, complexity, 0.0)
    batch = torch.stack([finite.sum(dtype=torch.float64), values.sum(), values.square().sum()])
    stats.sums += batch
    lo = torch.where(finite, complexity, float("inf")).min()
    hi = torch.where(finite, complexity, float("-inf")).max()
    stats.extrema.copy_(torch.stack([stats.extrema[0].minimum(lo), stats.extrema[1].maximum(hi)]))


def fold_coactivation(
    stats: RunningStats, indices: torch.Tensor, num_experts: int, due: torch.Tensor | None = None
) -> None:
    """Adds each token's pairs of selected experts to the co-activation matrix.

    ``due``: under torch.compile, a 0-d mask of whether this step updates the matrix (a
    Python step test would recompile every step).
    """
    multi_hot = torch.zeros(indices.shape[0], num_experts + 1, device=indices.device)
    multi_hot.scatter_(1, torch.where(indices >= 0, indices, num_experts), 1.0)
    multi_hot = multi_hot[:, :num_experts]  # [N, E]
    if due is not None:
        multi_hot = multi_hot * due
    stats.coactivation += (multi_hot.t() @ multi_hot).double()


def fold_reservoir(
    stats: RunningStats,
    complexity: torch.Tensor,
    k: torch.Tensor,
    seed: int,
    due: torch.Tensor | None = None,
) -> None:
    """Keeps the pairs with the smallest random keys: a uniform sample of the tokens of
    the sampled steps.

    ``due``: under torch.compile, a 0-d mask of whether this step is sampled (a step that is
    not offers no token: infinite keys, k = -1).
    """
    index = stats.tokens_seen + torch.arange(k.shape[0], device=k.device)
    keys = torch.where(k >= 0, uniform_keys(index, seed), float("inf"))  # k < 0: excluded
    if due is None:
        stats.tokens_seen += k.shape[0]
    else:
        stats.tokens_seen += k.shape[0] * due
        keys = torch.where(due, keys, float("inf"))
        k = torch.where(due, k, -1)
    all_keys = torch.cat([stats.res_keys, keys])
    keep = torch.topk(all_keys, stats.res_keys.shape[0], largest=False, sorted=False).indices
    # In place, never rebinding: a captured CUDA graph holds these addresses.
    stats.res_complexity.copy_(torch.cat([stats.res_complexity, complexity])[keep])
    stats.res_k.copy_(torch.cat([stats.res_k, k])[keep])
    stats.res_keys.copy_(all_keys[keep])


def uniform_keys(index: torch.Tensor, seed: int) -> torch.Tensor:
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
