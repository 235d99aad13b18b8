"""Dispatch and combine kernels whose work follows the active token-expert pairs.

The PyTorch dispatch of ``MoELayer`` works on all N x max_k slots: the gather of expert
inputs, the SwiGLU activation and the combine each touch every slot, active or not, because
the number of active pairs lives on the device and reading it would synchronise. These
Triton kernels read that number (the end of the last expert group) on the device and skip
the rest, so a dynamic router that activates half the pairs pays about half the time
(``benchmarks/bench_moe_layer.py`` measures that ratio).

``swiglu_rows_backward`` is the SwiGLU's backward; the gather and the combine are each
other's backward. ``triton_train`` makes autograd Functions of them for the layer's training
path; the layer's no-grad forward calls them directly. Triton is imported at first use;
with ``TRITON_INTERPRET=1`` set before that, the kernels run in Triton's interpreter on CPU
tensors (the tests use this).
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import NamedTuple

import torch

from moe_devkit.kernels import triton_grouped

__all__ = [
    "PLAN_MAX_EXPERTS",
    "DispatchPlan",
    "combine",
    "gather_rows",
    "is_available",
    "plan",
    "swiglu_rows",
    "swiglu_rows_backward",
]

_ROWS = 16  # rows (or tokens) per program
_COLS = 256  # columns per program (gather, SwiGLU) or per program step (combine)
# gather and SwiGLU: one [16, 256] block per program, no loop over the columns. On an H100,
# for 32886 (65536) of 65536 rows from 8192 x 2048 bf16 (SwiGLU: F = 1024):
#   gather, a loop per 16 rows 76.7 (151.6) us; blocks, row blocks fastest 62.4 (115.8) us;
#     blocks, column blocks fastest 82.1 (151.9) us;
#   SwiGLU, a loop per 16 rows 82.3 (149.4) us; row blocks fastest 72.2 (139.5) us;
#     column blocks fastest 69.2 (134.8) us.
# Dispatch plan: 256 pairs per program and 128 count rows per step of the one-program offsets
# kernel took 24 us for 8192 x 8 pairs on an H100, 128 and 64 took 28.5 us.
_PLAN_PAIRS = 256  # token-expert pairs per program of the dispatch plan
PLAN_MAX_EXPERTS = 256
"""Most experts ``plan`` takes: a program holds a [256, E] one-hot tile of its pairs."""
_PLAN_BLOCKS = 128  # per-block count rows per step of the plan's offsets kernel
_PLAN_WARPS = 4


def is_available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device`` (CUDA with Triton, or the interpreter)."""
    return triton_grouped.is_available(device)


@functools.cache
def _kernels() -> ModuleType:
    from moe_devkit.kernels import _triton_dispatch_kernels

    return _triton_dispatch_kernels


def gather_rows(x: torch.Tensor, src: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """out[r] = x[src[r]] for r < active[0]; rows past it are left uninitialised.

    Args:
        x: [T, D], row-contiguous.
        src: int64[M], source row of each output row (only the first ``active`` are read).
        active: int32[1] on the device: how many leading rows are live.
    """
    m, d = src.shape[0], x.shape[1]
    out = x.new_empty(m, d)
    if m:
        grid = (triton_grouped._cdiv(m, _ROWS), triton_grouped._cdiv(d, _COLS))
        _kernels().gather_rows_kernel[grid](
            x, src, out, active, d, x.stride(0), out.stride(0), BLOCK_R=_ROWS, BLOCK_D=_COLS
        )
    return out


def swiglu_rows(gate_up: torch.Tensor, weights: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up * weight per row r < active[0] (float32 math, one rounding).

    Args:
        gate_up: [M, 2F], gate in the first F columns, up in the last F (row-contiguous).
        weights: float32[M], the routing weight of each row.
        active: int32[1] on the device.
    """
    m, f = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(m, f)
    if m:
        grid = (triton_grouped._cdiv(m, _ROWS) * triton_grouped._cdiv(f, _COLS),)
        _kernels().swiglu_rows_kernel[grid](
            gate_up,
            weights,
            out,
            active,
            f,
            gate_up.stride(0),
            out.stride(0),
            BLOCK_R=_ROWS,
            BLOCK_F=_COLS,
        )
    return out


def swiglu_rows_backward(
    gate_up: torch.Tensor, weights: torch.Tensor, grad: torch.Tensor, active: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``swiglu_rows`` with respect to ``gate_up`` and ``weights``.

    Float32 math, like the forward; the weight's gradient (a sum over the F columns) is
    reduced in one program per row block, without atomics.

    Args:
        gate_up: [M, 2F] and weights: float32[M], the forward's inputs.
        grad: [M, F], the gradient of the forward's output (rows < active[0] are read).
        active: int32[1] on the device.

    Returns:
        grad_gate_up: [M, 2F] in gate_up's dtype and grad_weights: float32[M], both defined
        on rows < active[0] only.
    """
    m, f = gate_up.shape[0], gate_up.shape[1] // 2
    grad_gate_up = torch.empty_like(gate_up)
    grad_weights = torch.empty(m, dtype=torch.float32, device=gate_up.device)
    if m:
        grad = grad.contiguous()
        _kernels().swiglu_rows_backward_kernel[(triton_grouped._cdiv(m, _ROWS),)](
            gate_up,
            weights,
            grad,
            grad_gate_up,
            grad_weights,
            active,
            f,
            gate_up.stride(0),
            grad.stride(0),
            grad_gate_up.stride(0),
            BLOCK_R=_ROWS,
            BLOCK_F=_COLS,
        )
    return grad_gate_up, grad_weights


def combine(y: torch.Tensor, pos: torch.Tensor, nonfinite: torch.Tensor) -> torch.Tensor:
    """out[t] = sum of y[pos[t, j]] over the slots j with pos >= 0 (float32 sum); NaN rows
    where ``nonfinite``.

    Args:
        y: [M, D] expert outputs in expert-sorted order, row-contiguous.
        pos: int64[N, K], sorted row of each (token, slot), -1 for inactive slots.
        nonfinite: bool[N].
    """
    n, k = pos.shape
    d = y.shape[1]
    out = y.new_empty(n, d)
    if n:
        grid = (triton_grouped._cdiv(n, _ROWS), triton_grouped._cdiv(d, _COLS))
        _kernels().combine_kernel[grid](
            y,
            pos,
            nonfinite,
            out,
            n,
            d,
            y.stride(0),
            out.stride(0),
            K=k,
            BLOCK_T=_ROWS,
            BLOCK_D=_COLS,
        )
    return out


class DispatchPlan(NamedTuple):
    """Where each active token-expert pair goes in the expert-sorted rows.

    The active pairs fill rows [0, offsets[-1]) grouped by expert, in pair order within an
    expert: the order a stable sort by expert gives. Rows past offsets[-1] of ``src`` and
    ``row_weights`` are undefined.

    Attributes:
        src: int64[N * K], the token of each sorted row.
        row_weights: float32[N * K], the routing weight of each sorted row.
        offsets: int32[E], the end row of each expert's group.
        pos: int64[N, K], the sorted row of each (token, slot); -1 where inactive.
    """

    src: torch.Tensor
    row_weights: torch.Tensor
    offsets: torch.Tensor
    pos: torch.Tensor


def plan(
    expert_indices: torch.Tensor,
    dropped: torch.Tensor,
    expert_weights: torch.Tensor,
    num_experts: int,
) -> DispatchPlan:
    """Sorts the active pairs by expert in three kernels (a stable counting sort).

    Replaces a radix sort over all N x K slots and the dozen small kernels around it
    (active mask, keys, group offsets, source tokens, weights, each slot's row): fixed costs
    that do not shrink with k and bound a dynamic layer's time. Counting runs per block of
    pairs; one program turns the counts into group offsets and each block's first row per
    expert; the blocks then write their pairs' rows. No atomics: the rows are the same in
    every run, and no host synchronisation.

    Args:
        expert_indices: int64[N, K], -1 where a slot is unused.
        dropped: bool[N, K], slots dropped by the capacity limit (inactive).
        expert_weights: float32[N, K].
        num_experts: E; indices are in [0, E).
    """
    num_tokens, max_k = expert_indices.shape
    num_pairs = num_tokens * max_k
    device = expert_indices.device
    e_pad = max(16, triton_grouped._next_power_of_2(num_experts))
    blocks = max(1, triton_grouped._cdiv(num_pairs, _PLAN_PAIRS))
    counts = torch.empty(blocks, e_pad, dtype=torch.int32, device=device)
    starts = torch.empty_like(counts)
    offsets = torch.empty(num_experts, dtype=torch.int32, device=device)
    src = torch.empty(num_pairs, dtype=torch.int64, device=device)
    row_weights = torch.empty(num_pairs, dtype=torch.float32, device=device)
    pos = torch.empty(num_tokens, max_k, dtype=torch.int64, device=device)
    indices, dropped = expert_indices.contiguous(), dropped.contiguous()
    kernels = _kernels()
    kernels.plan_count_kernel[(blocks,)](
        indices, dropped, counts, num_pairs, BLOCK_P=_PLAN_PAIRS, E_PAD=e_pad
    )
    kernels.plan_offsets_kernel[(1,)](
        counts,
        starts,
        offsets,
        blocks,
        num_experts,
        E_PAD=e_pad,
        BLOCK_B=_PLAN_BLOCKS,
        num_warps=_PLAN_WARPS,
    )
    kernels.plan_scatter_kernel[(blocks,)](
        indices, dropped, expert_weights.contiguous(), starts, src, row_weights, pos,
        num_pairs, max_k, BLOCK_P=_PLAN_PAIRS, E_PAD=e_pad,
    )  # fmt: skip
    return DispatchPlan(src, row_weights, offsets, pos)
