"""Triton kernel behind ``inspector_update``; imported only once Triton is known to be there.

Kept apart so that ``@triton.jit`` runs at first use (compiled, or interpreted when
``TRITON_INTERPRET=1`` was set before), as in ``moe_devkit.kernels._triton_grouped_kernels``.
"""

# mypy: disable-error-code="misc, no-untyped-def, untyped-decorator"
# (Triton kernels are untyped by nature: their arguments are pointers, scalars and constexprs.)

from __future__ import annotations

import triton  # type: ignore[import-not-found, import-untyped, unused-ignore]
import triton.language as tl  # type: ignore[import-not-found, import-untyped, unused-ignore]

# Combine functions for tl.reduce: the interpreter runs them with numpy, and they are not
# triton.language's own @jit helpers (tl.sum, tl.min...), which the interpreter cannot call
# when triton was imported before TRITON_INTERPRET=1 was set.
from moe_devkit.kernels._triton_combine import _add, _max, _min


@triton.jit
def token_stats_kernel(
    idx_ptr,  # int64[N, K] expert indices, -1 padded
    cplx_ptr,  # float32[N] complexity
    nonfinite_ptr,  # bool[N]
    k_ptr,  # int64[N]
    dropped_ptr,  # bool[N * K]
    hist_ptr,  # int32[P, E_BINS + J_BINS] (out): expert counts, then joint histogram
    moments_ptr,  # float64[P, 5] (out): n, sum, sum of squares, min, max
    dropped_out_ptr,  # int64[P] (out)
    N,
    TOKENS_PER_PROGRAM,
    K: tl.constexpr,
    E: tl.constexpr,
    BINS: tl.constexpr,
    KK: tl.constexpr,
    E_BINS: tl.constexpr,  # power of two > E: the last bin takes padding and stray indices
    J_BINS: tl.constexpr,  # power of two > (BINS + 1) * KK: the last bin takes masked rows
    BLOCK: tl.constexpr,
):
    # Pass 1: program p folds tokens [p * TOKENS_PER_PROGRAM, ...) into its own partial row.
    # No atomics: ``reduce_kernel`` adds the rows in a fixed order (deterministic sums).
    pid = tl.program_id(0).to(tl.int64)
    first = pid * TOKENS_PER_PROGRAM
    last = tl.minimum(first + TOKENS_PER_PROGRAM, N)
    counts = tl.full([E_BINS], 0, dtype=tl.int32)
    joint = tl.full([J_BINS], 0, dtype=tl.int32)
    n_sum = tl.full([BLOCK], 0.0, dtype=tl.float64)
    c_sum = tl.full([BLOCK], 0.0, dtype=tl.float64)
    sq_sum = tl.full([BLOCK], 0.0, dtype=tl.float64)
    low = tl.full([BLOCK], float("inf"), dtype=tl.float64)
    high = tl.full([BLOCK], float("-inf"), dtype=tl.float64)
    dropped = tl.full([BLOCK], 0, dtype=tl.int64)
    for start in range(first, last, BLOCK):
        rows = start + tl.arange(0, BLOCK).to(tl.int64)
        live = rows < last
        for j in tl.static_range(K):
            e = tl.load(idx_ptr + rows * K + j, mask=live, other=-1)
            e = tl.where((e >= 0) & (e < E), e, E_BINS - 1).to(tl.int32)
            counts += tl.histogram(e, E_BINS)
            d = tl.load(dropped_ptr + rows * K + j, mask=live, other=0)
            dropped += d.to(tl.int64)
        c = tl.load(cplx_ptr + rows, mask=live, other=0.0).to(tl.float64)
        bad = tl.load(nonfinite_ptr + rows, mask=live, other=1).to(tl.int1)
        kk = tl.load(k_ptr + rows, mask=live, other=0)
        included = live & (kk >= 0)  # k = -1: a token left out of every statistic
        finite = included & (bad == 0) & (c == c) & (tl.abs(c) < float("inf"))
        scaled = tl.minimum(tl.maximum(c, 0.0), 1.0) * BINS
        cbin = tl.minimum(scaled.to(tl.int32), BINS - 1)  # truncation: scaled >= 0
        cbin = tl.where(finite, cbin, BINS)
        kk = tl.minimum(tl.maximum(kk, 0), KK - 1).to(tl.int32)
        code = tl.where(included, cbin * KK + kk, J_BINS - 1)
        joint += tl.histogram(code, J_BINS)
        value = tl.where(finite, c, 0.0)
        n_sum += finite.to(tl.float64)
        c_sum += value
        sq_sum += value * value
        low = tl.minimum(low, tl.where(finite, c, float("inf")))
        high = tl.maximum(high, tl.where(finite, c, float("-inf")))
    row = hist_ptr + pid * (E_BINS + J_BINS)
    tl.store(row + tl.arange(0, E_BINS), counts)
    tl.store(row + E_BINS + tl.arange(0, J_BINS), joint)
    out = moments_ptr + pid * 5
    tl.store(out, tl.reduce(n_sum, 0, _add))
    tl.store(out + 1, tl.reduce(c_sum, 0, _add))
    tl.store(out + 2, tl.reduce(sq_sum, 0, _add))
    tl.store(out + 3, tl.reduce(low, 0, _min))
    tl.store(out + 4, tl.reduce(high, 0, _max))
    tl.store(dropped_out_ptr + pid, tl.reduce(dropped, 0, _add))


@triton.jit
def reduce_kernel(
    hist_ptr,  # int32[P, E_BINS + J_BINS] (pass 1's rows)
    moments_ptr,  # float64[P, 5]
    dropped_in_ptr,  # int64[P]
    lb_ptr,  # float[1]: load-balancing loss
    z_ptr,  # float[1]: z-loss
    counts_ptr,  # int64[E] (state, updated in place)
    joint_ptr,  # int64[(BINS + 1) * KK] (state)
    dropped_total_ptr,  # int64[] (state)
    loss_sums_ptr,  # float64[2] (state)
    sums_ptr,  # float64[3] (state): n, sum, sum of squares of the finite complexity scores
    extrema_ptr,  # float64[2] (state): min, max
    P,
    E: tl.constexpr,
    JOINT: tl.constexpr,  # (BINS + 1) * KK
    E_BINS: tl.constexpr,
    J_BINS: tl.constexpr,
    P_BINS: tl.constexpr,  # power of two >= P
):
    # Pass 2, one program: adds pass 1's rows and this step's losses into the state.
    p = tl.arange(0, P_BINS)
    p_live = p < P
    width = E_BINS + J_BINS
    e = tl.arange(0, E_BINS)
    rows = tl.load(hist_ptr + p[:, None] * width + e[None, :], mask=p_live[:, None], other=0).to(
        tl.int64
    )
    e_live = e < E
    old = tl.load(counts_ptr + e, mask=e_live, other=0)
    tl.store(counts_ptr + e, old + tl.reduce(rows, 0, _add), mask=e_live)
    j = tl.arange(0, J_BINS)
    rows_j = tl.load(
        hist_ptr + p[:, None] * width + E_BINS + j[None, :], mask=p_live[:, None], other=0
    ).to(tl.int64)
    j_live = j < JOINT
    old_joint = tl.load(joint_ptr + j, mask=j_live, other=0)
    tl.store(joint_ptr + j, old_joint + tl.reduce(rows_j, 0, _add), mask=j_live)
    drops = tl.load(dropped_in_ptr + p, mask=p_live, other=0)
    tl.store(dropped_total_ptr, tl.load(dropped_total_ptr) + tl.reduce(drops, 0, _add))
    for i in tl.static_range(3):
        part = tl.load(moments_ptr + p * 5 + i, mask=p_live, other=0.0)
        tl.store(sums_ptr + i, tl.load(sums_ptr + i) + tl.reduce(part, 0, _add))
    lows = tl.load(moments_ptr + p * 5 + 3, mask=p_live, other=float("inf"))
    highs = tl.load(moments_ptr + p * 5 + 4, mask=p_live, other=float("-inf"))
    tl.store(extrema_ptr, tl.minimum(tl.load(extrema_ptr), tl.reduce(lows, 0, _min)))
    tl.store(extrema_ptr + 1, tl.maximum(tl.load(extrema_ptr + 1), tl.reduce(highs, 0, _max)))
    tl.store(loss_sums_ptr, tl.load(loss_sums_ptr) + tl.load(lb_ptr).to(tl.float64))
    tl.store(loss_sums_ptr + 1, tl.load(loss_sums_ptr + 1) + tl.load(z_ptr).to(tl.float64))
