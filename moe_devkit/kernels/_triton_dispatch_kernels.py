"""Triton kernels behind ``triton_dispatch``; imported only once Triton is known to be there.

Each kernel reads the number of active rows (the last expert group's end) from device memory
and does nothing for rows past it, so its work follows the active token-expert pairs, with
no host synchronisation. Kept apart from ``triton_dispatch`` so that ``@triton.jit`` runs at
first use (compiled, or interpreted when ``TRITON_INTERPRET=1`` was set before).
"""

# mypy: disable-error-code="misc, no-untyped-def, untyped-decorator"
# (Triton kernels are untyped by nature: their arguments are pointers, scalars and constexprs.)

from __future__ import annotations

import triton  # type: ignore[import-not-found, import-untyped, unused-ignore]
import triton.language as tl  # type: ignore[import-not-found, import-untyped, unused-ignore]

from moe_devkit.kernels._triton_combine import _add


@triton.jit
def gather_rows_kernel(
    x_ptr,  # [N + 1, D] rows (row N unused here)
    src_ptr,  # int64[M]: source row of each output row
    out_ptr,  # [M, D]
    active_ptr,  # int32[1]: rows [0, active) are written; the rest are left as they are
    D,
    stride_x,
    stride_out,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (i, j) copies rows [i * BLOCK_R, ...) x columns [j * BLOCK_D, ...): one load and
    # one store, no loop, so the loads of many programs are in flight together. Row blocks
    # vary fastest: the programs that run together read one column band of x, which stays in
    # L2 while its rows are read again for other experts.
    first = tl.program_id(0).to(tl.int64) * BLOCK_R
    active = tl.load(active_ptr).to(tl.int64)
    if first < active:
        rows = first + tl.arange(0, BLOCK_R)
        live = rows < active
        src = tl.load(src_ptr + rows, mask=live, other=0)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = live[:, None] & (cols[None, :] < D)
        values = tl.load(x_ptr + src[:, None] * stride_x + cols[None, :], mask=mask)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], values, mask=mask)


@triton.jit
def swiglu_rows_kernel(
    gate_up_ptr,  # [M, 2F]: gate in columns [0, F), up in [F, 2F)
    weight_ptr,  # float32[M]: routing weight of each row
    out_ptr,  # [M, F]: silu(gate) * up * weight, computed in float32, rounded once
    active_ptr,  # int32[1]
    F,
    stride_in,
    stride_out,
    BLOCK_R: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    # Program p: one [BLOCK_R, BLOCK_F] block, no loop. Unlike gather_rows, column blocks
    # vary fastest (each row is read once: contiguous memory is what counts here).
    blocks_per_row = (F + BLOCK_F - 1) // BLOCK_F  # not tl.cdiv (see _triton_grouped_kernels)
    pid = tl.program_id(0).to(tl.int64)
    first = (pid // blocks_per_row) * BLOCK_R
    active = tl.load(active_ptr).to(tl.int64)
    if first < active:
        rows = first + tl.arange(0, BLOCK_R)
        live = rows < active
        weight = tl.load(weight_ptr + rows, mask=live, other=0.0).to(tl.float32)
        cols = (pid % blocks_per_row) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask = live[:, None] & (cols[None, :] < F)
        base = gate_up_ptr + rows[:, None] * stride_in + cols[None, :]
        gate = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(base + F, mask=mask, other=0.0).to(tl.float32)
        hidden = gate / (1.0 + tl.exp(-gate)) * up * weight[:, None]
        out = out_ptr + rows[:, None] * stride_out + cols[None, :]
        tl.store(out, hidden.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def combine_kernel(
    y_ptr,  # [M, D]: weighted expert outputs in expert-sorted order
    pos_ptr,  # int64[N, K]: sorted row of each (token, slot), -1 where the slot is inactive
    nonfinite_ptr,  # bool[N]: tokens whose output is NaN
    out_ptr,  # [N, D]: sum over the token's active slots, in float32, rounded once
    N,
    D,
    stride_y,
    stride_out,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    live = tokens < N
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_live = cols < D
    acc = tl.full([BLOCK_T, BLOCK_D], 0.0, dtype=tl.float32)
    for j in tl.static_range(K):
        pos = tl.load(pos_ptr + tokens * K + j, mask=live, other=-1)
        used = live & (pos >= 0)  # inactive slots are not read: traffic follows the pairs
        mask = used[:, None] & col_live[None, :]
        row = y_ptr + pos[:, None] * stride_y + cols[None, :]
        acc += tl.load(row, mask=mask, other=0.0).to(tl.float32)
    bad = tl.load(nonfinite_ptr + tokens, mask=live, other=0).to(tl.int1)
    acc = tl.where(bad[:, None], float("nan"), acc)
    out = out_ptr + tokens[:, None] * stride_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=live[:, None] & col_live[None, :])


@triton.jit
def _block_one_hot(idx_ptr, dropped_ptr, block, NK, BLOCK_P: tl.constexpr, E_PAD: tl.constexpr):
    """Block ``block`` of BLOCK_P pairs in pair order (token-major): pair numbers, their
    active one-hot rows over the experts [BLOCK_P, E_PAD], and the active flags."""
    pairs = block.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    live = pairs < NK
    expert = tl.load(idx_ptr + pairs, mask=live, other=-1)
    dropped = tl.load(dropped_ptr + pairs, mask=live, other=1).to(tl.int1)
    active = (expert >= 0) & ~dropped
    one_hot = (expert[:, None] == tl.arange(0, E_PAD)[None, :]) & active[:, None]
    return pairs, one_hot.to(tl.int32), active


@triton.jit
def plan_count_kernel(
    idx_ptr,  # int64[N, K]: expert of each slot, -1 where unused
    dropped_ptr,  # bool[N, K]: slots dropped by the capacity limit
    counts_ptr,  # int32[B, E_PAD] (out): active pairs of each expert in each pair block
    NK,
    BLOCK_P: tl.constexpr,
    E_PAD: tl.constexpr,
):
    block = tl.program_id(0)
    _, one_hot, _ = _block_one_hot(idx_ptr, dropped_ptr, block, NK, BLOCK_P, E_PAD)
    counts = tl.reduce(one_hot, 0, _add)
    tl.store(counts_ptr + block.to(tl.int64) * E_PAD + tl.arange(0, E_PAD), counts)


@triton.jit
def plan_offsets_kernel(
    counts_ptr,  # int32[B, E_PAD]: plan_count_kernel's per-block counts
    starts_ptr,  # int32[B, E_PAD] (out): first sorted row of each block's pairs per expert
    offs_ptr,  # int32[E] (out): end row of each expert's group
    B,
    E,
    E_PAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """One program: per-expert totals, group offsets, and each block's first row per expert
    (the expert's group start plus the pairs of earlier blocks): a stable counting sort."""
    experts = tl.arange(0, E_PAD)
    totals = tl.full([E_PAD], 0, dtype=tl.int32)
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        counts = tl.load(counts_ptr + rows.to(tl.int64)[:, None] * E_PAD + experts[None, :],
                         mask=(rows < B)[:, None], other=0)  # fmt: skip
        totals += tl.reduce(counts, 0, _add)
    ends = tl.associative_scan(totals, 0, _add)
    tl.store(offs_ptr + experts, ends, mask=experts < E)
    carry = ends - totals  # group start of each expert
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        ptrs = rows.to(tl.int64)[:, None] * E_PAD + experts[None, :]
        counts = tl.load(counts_ptr + ptrs, mask=(rows < B)[:, None], other=0)
        before = tl.associative_scan(counts, 0, _add) - counts  # earlier blocks of this chunk
        tl.store(starts_ptr + ptrs, carry[None, :] + before, mask=(rows < B)[:, None])
        carry += tl.reduce(counts, 0, _add)


@triton.jit
def plan_scatter_kernel(
    idx_ptr,  # int64[N, K]
    dropped_ptr,  # bool[N, K]
    weight_ptr,  # float32[N, K]: routing weight of each slot
    starts_ptr,  # int32[B, E_PAD]: plan_offsets_kernel's first rows
    src_ptr,  # int64[N * K] (out): token of each sorted row (active rows only)
    row_weight_ptr,  # float32[N * K] (out): routing weight of each sorted row (active rows)
    pos_ptr,  # int64[N, K] (out): sorted row of each slot, -1 where inactive
    NK,
    K,
    BLOCK_P: tl.constexpr,
    E_PAD: tl.constexpr,
):
    """Each active pair goes to its expert's block start plus its rank among the block's
    pairs of that expert (pair order): the rows a stable sort by expert would give."""
    block = tl.program_id(0)
    pairs, one_hot, active = _block_one_hot(idx_ptr, dropped_ptr, block, NK, BLOCK_P, E_PAD)
    rank = tl.associative_scan(one_hot, 0, _add) - one_hot  # earlier pairs, same expert
    starts = tl.load(starts_ptr + block.to(tl.int64) * E_PAD + tl.arange(0, E_PAD))
    row = tl.reduce(one_hot * (starts[None, :] + rank), 1, _add).to(tl.int64)
    live = pairs < NK
    tl.store(pos_ptr + pairs, tl.where(active, row, -1), mask=live)
    weight = tl.load(weight_ptr + pairs, mask=live & active, other=0.0)
    tl.store(src_ptr + row, pairs // K, mask=live & active)
    tl.store(row_weight_ptr + row, weight, mask=live & active)


@triton.jit
def swiglu_rows_backward_kernel(
    gate_up_ptr,  # [M, 2F]: the forward's input, gate in [0, F), up in [F, 2F)
    weight_ptr,  # float32[M]: routing weight of each row
    grad_ptr,  # [M, F]: gradient of the forward's output
    grad_gate_up_ptr,  # [M, 2F] (out): gradient of gate_up (rows < active)
    grad_weight_ptr,  # float32[M] (out): gradient of each row's weight (rows < active)
    active_ptr,  # int32[1]
    F,
    stride_in,
    stride_grad,
    stride_out,
    BLOCK_R: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    # Program i: rows [i * BLOCK_R, ...), a loop over the F columns in BLOCK_F steps, so
    # that the weight's gradient (a sum over F) is reduced in registers, with no atomics.
    # d hidden/d gate = w * up * s * (1 + gate * (1 - s)), s = sigmoid(gate);
    # d hidden/d up = w * silu(gate); d hidden/d w = silu(gate) * up.
    first = tl.program_id(0).to(tl.int64) * BLOCK_R
    active = tl.load(active_ptr).to(tl.int64)
    if first < active:
        rows = first + tl.arange(0, BLOCK_R)
        live = rows < active
        weight = tl.load(weight_ptr + rows, mask=live, other=0.0).to(tl.float32)
        grad_weight = tl.full([BLOCK_R], 0.0, dtype=tl.float32)
        for start in range(0, F, BLOCK_F):
            cols = start + tl.arange(0, BLOCK_F)
            mask = live[:, None] & (cols[None, :] < F)
            base = gate_up_ptr + rows[:, None] * stride_in + cols[None, :]
            gate = tl.load(base, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(base + F, mask=mask, other=0.0).to(tl.float32)
            grad_ptrs = grad_ptr + rows[:, None] * stride_grad + cols[None, :]
            grad = tl.load(grad_ptrs, mask=mask, other=0.0).to(tl.float32)
            sig = 1.0 / (1.0 + tl.exp(-gate))
            silu = gate * sig
            grad_weight += tl.reduce(grad * silu * up, 1, _add)
            scaled = grad * weight[:, None]
            grad_gate = scaled * up * sig * (1.0 + gate * (1.0 - sig))
            grad_up = scaled * silu
            out = grad_gate_up_ptr + rows[:, None] * stride_out + cols[None, :]
            element = grad_gate_up_ptr.dtype.element_ty
            tl.store(out, grad_gate.to(element), mask=mask)
            tl.store(out + F, grad_up.to(element), mask=mask)
        tl.store(grad_weight_ptr + rows, grad_weight, mask=live)
