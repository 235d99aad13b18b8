"""Triton kernels behind ``triton_experts``; imported only once Triton is known to be there.

Kept apart from ``triton_experts`` so that ``@triton.jit`` runs at first use (compiled, or
interpreted when ``TRITON_INTERPRET=1`` was set before).
"""

# mypy: disable-error-code="misc, no-untyped-def, untyped-decorator"
# (Triton kernels are untyped by nature: their arguments are pointers, scalars and constexprs.)

from __future__ import annotations

import triton  # type: ignore[import-not-found, import-untyped, unused-ignore]
import triton.language as tl  # type: ignore[import-not-found, import-untyped, unused-ignore]

from moe_devkit.kernels._triton_combine import _add


@triton.jit
def expert_gemm_kernel(
    a_desc,  # TMA descriptor of a: [M, K], rows grouped by expert, block [BLOCK_M, BLOCK_K]
    w_desc,  # TMA descriptor of the weights as [G * N, K], block [BLOCK_N, BLOCK_K]
    out_ptr,  # [M, N]
    offs_ptr,  # int32[G]: end row of each expert's group
    G,
    K,
    N,
    stride_out,
    NUM_PROGRAMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
    STAGES: tl.constexpr,
):
    """out[rows of g] = a[rows of g] @ w[g]^T: one persistent program per SM walks the
    (row tile, column panel) tiles of all groups.

    The tile count comes from the group offsets on the device, so the work follows the rows
    the groups hold and nothing is read on the host. A tile covers BLOCK_M rows from its
    group's first row; rows past the group's end belong to the next group (or are out of
    bounds, zero-filled by TMA): they are computed and not stored, since each output row
    depends on its own input row only. Column panels vary fastest, so the tiles that run
    together share their rows of a; the loop over tiles is flattened into the K loop, so one
    tile's loads overlap the previous tile's epilogue.
    """
    pid = tl.program_id(0)
    num_n = N // BLOCK_N
    parts = tl.arange(0, BLOCK_G)
    in_range = parts < G
    row_ends = tl.load(offs_ptr + parts, mask=in_range, other=0)
    row_starts = tl.load(offs_ptr + parts - 1, mask=in_range & (parts > 0), other=0)
    row_tiles = (row_ends - row_starts + BLOCK_M - 1) // BLOCK_M
    tile_ends = tl.associative_scan(row_tiles * num_n, 0, _add)  # cumulative, per group
    total = tl.reduce(row_tiles * num_n, 0, _add)
    search = tl.where(in_range, tile_ends, 2147483647)
    for tile in tl.range(pid, total, NUM_PROGRAMS, flatten=True):
        g = tl.reduce((search <= tile).to(tl.int32), 0, _add)
        before = parts == g - 1
        first_tile = tl.reduce(tl.where(before, tile_ends, 0), 0, _add)
        row_first = tl.reduce(tl.where(before, row_ends, 0), 0, _add)
        row_end = tl.reduce(tl.where(parts == g, row_ends, 0), 0, _add)
        local = tile - first_tile
        row0 = row_first + (local // num_n) * BLOCK_M
        col0 = (local % num_n) * BLOCK_N
        acc = tl.full(
            (BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32
        )  # builtins only: see _triton_combine
        for kk in tl.range(0, K // BLOCK_K, num_stages=STAGES):
            a = a_desc.load([row0, kk * BLOCK_K])
            w = w_desc.load([g * N + col0, kk * BLOCK_K])
            acc = tl.dot(a, w.T, acc)
        rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = (col0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        out = out_ptr + rows[:, None] * stride_out + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rows < row_end)[:, None])
