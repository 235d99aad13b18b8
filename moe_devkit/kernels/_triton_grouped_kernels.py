"""Triton kernels behind ``triton_grouped``; imported only once Triton is known to be there.

Kept apart from ``triton_grouped`` so that ``@triton.jit`` runs at first use, not at package
import: Triton picks compiled or interpreted (``TRITON_INTERPRET=1``) kernels when the
decorator runs, and a test must be able to choose after other modules imported the router.

Row, group and tile numbers travel as int64 inside the kernels: M * K and G * K * N pass 2^31
elements at MoE sizes.
"""

# mypy: disable-error-code="misc, no-untyped-def, untyped-decorator"
# (Triton kernels are untyped by nature: their arguments are pointers, scalars and constexprs.)

from __future__ import annotations

import triton  # type: ignore[import-not-found, import-untyped, unused-ignore]
import triton.language as tl  # type: ignore[import-not-found, import-untyped, unused-ignore]


@triton.jit
def _add(x, y):
    # tl.sum, tl.cdiv, tl.zeros are @triton.jit functions made when triton is imported: compiled
    # ones if that was before TRITON_INTERPRET=1 was set, which the interpreter cannot call.
    # The kernels use builtins and their own helpers only.
    return x + y


@triton.jit
def grouped_mm_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    offs_ptr,
    tile_end_ptr,
    M,
    N,
    K,
    G,
    num_pid_m,
    stride_am,
    stride_ak,
    stride_bg,
    stride_bk,
    stride_bn,
    stride_om,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[rows of group g] = a[rows of g] @ b[g]; part G (rows past offs[-1]) gets zeros.

    Program (t, n) owns m-tile t and n-tile n. tile_end[p] (p <= G) is the cumulative number
    of BLOCK_M tiles of parts 0..p, part G being the padding rows; t finds its part by counting
    the tile ends at or below it. Programs past tile_end[G] find part G + 1 and store nothing.
    The 1-D launch runs the n-tiles of GROUP_M m-tiles together, so that a's rows and b[g]
    are read from L2 rather than from memory once per n-tile (Triton's matmul tutorial).
    """
    pid = tl.program_id(0)
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    pids_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_in_group) % group_size_m
    pid_n = (pid % pids_in_group) // group_size_m
    parts = tl.arange(0, BLOCK_G)
    ends = tl.load(tile_end_ptr + parts, mask=parts <= G, other=2147483647)
    part = tl.reduce((ends <= pid_m).to(tl.int32), 0, _add)
    is_group = part < G
    tile_first = tl.load(tile_end_ptr + part - 1, mask=(part > 0) & (part <= G), other=0)
    row_first = tl.load(offs_ptr + part - 1, mask=(part > 0) & (part <= G), other=0)
    row_end = tl.load(offs_ptr + part, mask=is_group, other=M)
    row_end = tl.where(part <= G, tl.minimum(row_end, M), 0)

    rows = row_first + (pid_m - tile_first) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = rows.to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = (rows < row_end) & (rows >= 0)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + part.to(tl.int64) * stride_bg + ks[:, None] * stride_bk
    b_ptrs = b_ptrs + cols[None, :] * stride_bn

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    k_tiles = tl.where(is_group, (K + BLOCK_K - 1) // BLOCK_K, 0)
    for k_tile in range(0, k_tiles):
        k_mask = ks < K - k_tile * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptrs, out, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def grouped_weight_grad_kernel(
    a_ptr,
    dout_ptr,
    db_ptr,
    offs_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_dm,
    stride_dn,
    stride_bg,
    stride_bk,
    stride_bn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """db[g, k-tile, n-tile] = a[rows of g, k-tile]^T @ dout[rows of g, n-tile].

    Program (n, k, g) loops over its group's rows, read from offs on the device; an empty
    group runs no iteration and stores zeros. n varies fastest, so the programs that run
    together share a's columns of one group.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    group = tl.program_id(2)
    row_first = tl.load(offs_ptr + group - 1, mask=group > 0, other=0)
    row_end = tl.minimum(tl.load(offs_ptr + group), M)
    ks = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k_mask = ks < K
    col_mask = cols < N

    acc = tl.full((BLOCK_K, BLOCK_N), 0.0, dtype=tl.float32)
    for start in range(row_first, row_end, BLOCK_M):
        rows = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < row_end
        a_t = tl.load(
            a_ptr + ks[:, None] * stride_ak + rows[None, :] * stride_am,
            mask=k_mask[:, None] & row_mask[None, :],
            other=0.0,
        )
        dout = tl.load(
            dout_ptr + rows[:, None] * stride_dm + cols[None, :] * stride_dn,
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(a_t, dout, acc, input_precision=PRECISION)

    db_ptrs = db_ptr + group.to(tl.int64) * stride_bg + ks[:, None] * stride_bk
    db_ptrs = db_ptrs + cols[None, :] * stride_bn
    tl.store(db_ptrs, acc.to(db_ptr.dtype.element_ty), mask=k_mask[:, None] & col_mask[None, :])
