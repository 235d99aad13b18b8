"""The inspector's per-token statistics in one Triton kernel (CUDA, where Triton is installed).

``LayerState.update`` folds a routing decision into expert counts, the (complexity bin, k)
histogram, dropped pairs, loss sums and the complexity's sums and extrema. In PyTorch ops
that is about 45 small kernels; inside the captured update graph they cost little CPU but
about 100 us of GPU time on a side stream, where they compete with the model's kernels.
``token_stats`` does the same in two kernel launches, with the same results: the bins are
computed with the same float64 arithmetic, and the float64 sums differ only in summation
order.

Triton is imported only when the kernel is first needed (see ``moe_devkit.kernels.
triton_grouped``); with ``TRITON_INTERPRET=1`` set before that, the kernel runs in Triton's
interpreter on CPU tensors (the tests use this).
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from moe_devkit.kernels import triton_grouped

__all__ = ["is_available", "token_stats"]


def is_available(device: torch.device) -> bool:
    """Whether ``token_stats`` can run on ``device`` (CUDA with Triton, or the interpreter)."""
    return triton_grouped.is_available(device)


@functools.cache
def _kernels() -> ModuleType:
    from moe_devkit.kernels import _triton_inspector_update

    return _triton_inspector_update


_BLOCK = 256  # tokens per loop iteration of a program
_MAX_PROGRAMS = 64  # programs of the first pass (each folds a contiguous run of tokens)


def _bins(n: int) -> int:
    """The smallest power of two above n (room for one spare bin)."""
    return 1 << n.bit_length()


def token_stats(
    inputs: tuple[torch.Tensor, ...],
    state: dict[str, torch.Tensor],
    *,
    complexity_bins: int,
    max_k: int,
) -> bool:
    """Adds one decision's per-token statistics to ``state`` in place; two kernel launches.

    Up to 64 programs each fold a run of tokens into a partial row; one program then adds
    the rows, in a fixed order, to the state (no atomics: results do not depend on timing).

    Args:
        inputs: (expert_indices [N, K], complexity [N], nonfinite [N], k_per_token [N],
            dropped [N, K], load_balancing_loss [], z_loss []), the fields of
            ``moe_devkit.inspect.state.StepTensors``.
        state: the ``RunningStats`` tensors (``LayerState.stats.tensors()``) "counts",
            "joint", "dropped", "loss_sums", "sums" and "extrema" (contiguous, on the
            inputs' device).

    Returns:
        False, with nothing done, when the inputs do not have the layout the kernel reads
        (the caller then uses PyTorch ops).
    """
    indices, complexity, nonfinite, k, dropped, lb_loss, z_loss = inputs
    if indices.dim() != 2 or dropped.shape != indices.shape or complexity.dim() != 1:
        return False
    n, width = indices.shape
    if n == 0 or k.shape != (n,) or nonfinite.shape != (n,) or complexity.shape != (n,):
        return False
    counts = state["counts"]
    kk = max_k + 1
    e_bins, j_bins = _bins(counts.numel()), _bins((complexity_bins + 1) * kk)
    block = min(_BLOCK, max(16, _bins(n - 1)))
    programs = min(_MAX_PROGRAMS, -(-n // block))
    per_program = -(-n // programs)
    device = indices.device
    hist = torch.empty(programs, e_bins + j_bins, dtype=torch.int32, device=device)
    moments = torch.empty(programs, 5, dtype=torch.float64, device=device)
    drops = torch.empty(programs, dtype=torch.int64, device=device)
    kernels = _kernels()
    kernels.token_stats_kernel[(programs,)](
        indices.to(torch.int64).contiguous(),
        complexity.to(torch.float32).contiguous(),
        nonfinite.to(torch.bool).contiguous(),
        k.to(torch.int64).contiguous(),
        dropped.to(torch.bool).contiguous(),
        hist,
        moments,
        drops,
        n,
        per_program,
        K=width,
        E=counts.numel(),
        BINS=complexity_bins,
        KK=kk,
        E_BINS=e_bins,
        J_BINS=j_bins,
        BLOCK=block,
        num_warps=4,
    )
    kernels.reduce_kernel[(1,)](
        hist,
        moments,
        drops,
        lb_loss.reshape(1),
        z_loss.reshape(1),
        counts,
        state["joint"],
        state["dropped"],
        state["loss_sums"],
        state["sums"],
        state["extrema"],
        programs,
        E=counts.numel(),
        JOINT=(complexity_bins + 1) * kk,
        E_BINS=e_bins,
        J_BINS=j_bins,
        P_BINS=max(2, _bins(programs - 1)),
        num_warps=4,
    )
    return True
