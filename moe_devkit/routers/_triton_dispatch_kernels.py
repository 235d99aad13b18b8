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
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    active = tl.load(active_ptr).to(tl.int64)
    if tl.program_id(0).to(tl.int64) * BLOCK_R < active:
        live = rows < active
        src = tl.load(src_ptr + rows, mask=live, other=0)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
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
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    active = tl.load(active_ptr).to(tl.int64)
    if tl.program_id(0).to(tl.int64) * BLOCK_R < active:
        live = rows < active
        weight = tl.load(weight_ptr + rows, mask=live, other=0.0).to(tl.float32)
        for start in range(0, F, BLOCK_F):
            cols = start + tl.arange(0, BLOCK_F)
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
