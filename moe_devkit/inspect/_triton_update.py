"""Triton kernel behind ``fused_update``; imported only once Triton is known to be there.

Kept apart so that ``@triton.jit`` runs at first use (compiled, or interpreted when
``TRITON_INTERPRET=1`` was set before), as in ``moe_devkit.routers._triton_grouped_kernels``.
"""

# mypy: disable-error-code="misc, no-untyped-def, untyped-decorator"
# (Triton kernels are untyped by nature: their arguments are pointers, scalars and constexprs.)

from __future__ import annotations

import triton  # type: ignore[import-not-found, import-untyped, unused-ignore]
import triton.language as tl  # type: ignore[import-not-found, import-untyped, unused-ignore]


@triton.jit
def _add(x, y):
    # tl.sum, tl.min, tl.zeros are @triton.jit functions made when triton is imported, which
    # the interpreter cannot call if that was before TRITON_INTERPRET=1 was set: the kernel
    # uses builtins and these helpers only.
    return x + y


@triton.jit
def _min(x, y):
    return tl.minimum(x, y)


@triton.jit
def _max(x, y):
    return tl.maximum(x, y)


@triton.jit
def token_stats_kernel(
    idx_ptr,  # int64[N, K] expert indices, -1 padded
    cplx_ptr,  # float32[N] complexity
    nonfinite_ptr,  # bool[N]
    k_ptr,  # int64[N]
    dropped_ptr,  # bool[N * K]
    lb_ptr,  # float[1]: load-balancing loss
    z_ptr,  # float[1]: z-loss
    counts_ptr,  # int64[E] (state, updated in place)
    joint_ptr,  # int64[(BINS + 1) * KK] (state)
    dropped_total_ptr,  # int64[] (state)
    loss_sums_ptr,  # float64[2] (state)
    sums_ptr,  # float64[3] (state): n, sum, sum of squares of the finite complexity scores
    extrema_ptr,  # float64[2] (state): min, max
    N,
    K: tl.constexpr,
    E: tl.constexpr,
    BINS: tl.constexpr,
    KK: tl.constexpr,
    E_BINS: tl.constexpr,  # power of two > E: the last bin takes padding and stray indices
    J_BINS: tl.constexpr,  # power of two > (BINS + 1) * KK: the last bin takes masked rows
    BLOCK: tl.constexpr,
):
    # One program walks all tokens: registers hold the histograms and sums, and the state
    # is read, added to and written once at the end (deterministic; no atomics).
    counts = tl.full([E_BINS], 0, dtype=tl.int32)
    joint = tl.full([J_BINS], 0, dtype=tl.int32)
    n_sum = tl.full([BLOCK], 0.0, dtype=tl.float64)
    c_sum = tl.full([BLOCK], 0.0, dtype=tl.float64)
    sq_sum = tl.full([BLOCK], 0.0, dtype=tl.float64)
    low = tl.full([BLOCK], float("inf"), dtype=tl.float64)
    high = tl.full([BLOCK], float("-inf"), dtype=tl.float64)
    dropped = tl.full([BLOCK], 0, dtype=tl.int64)
    for start in range(0, N, BLOCK):
        rows = start + tl.arange(0, BLOCK).to(tl.int64)
        live = rows < N
        for j in tl.static_range(K):
            e = tl.load(idx_ptr + rows * K + j, mask=live, other=-1)
            e = tl.where((e >= 0) & (e < E), e, E_BINS - 1).to(tl.int32)
            counts += tl.histogram(e, E_BINS)
            d = tl.load(dropped_ptr + rows * K + j, mask=live, other=0)
            dropped += d.to(tl.int64)
        c = tl.load(cplx_ptr + rows, mask=live, other=0.0).to(tl.float64)
        bad = tl.load(nonfinite_ptr + rows, mask=live, other=1).to(tl.int1)
        finite = live & (bad == 0) & (c == c) & (tl.abs(c) < float("inf"))
        scaled = tl.minimum(tl.maximum(c, 0.0), 1.0) * BINS
        cbin = tl.minimum(scaled.to(tl.int32), BINS - 1)  # truncation: scaled >= 0
        cbin = tl.where(finite, cbin, BINS)
        kk = tl.load(k_ptr + rows, mask=live, other=0)
        kk = tl.minimum(tl.maximum(kk, 0), KK - 1).to(tl.int32)
        code = tl.where(live, cbin * KK + kk, J_BINS - 1)
        joint += tl.histogram(code, J_BINS)
        value = tl.where(finite, c, 0.0)
        n_sum += finite.to(tl.float64)
        c_sum += value
        sq_sum += value * value
        low = tl.minimum(low, tl.where(finite, c, float("inf")))
        high = tl.maximum(high, tl.where(finite, c, float("-inf")))

    e_offs = tl.arange(0, E_BINS)
    e_live = e_offs < E
    old = tl.load(counts_ptr + e_offs, mask=e_live, other=0)
    tl.store(counts_ptr + e_offs, old + counts.to(tl.int64), mask=e_live)
    j_offs = tl.arange(0, J_BINS)
    j_live = j_offs < (BINS + 1) * KK
    old_joint = tl.load(joint_ptr + j_offs, mask=j_live, other=0)
    tl.store(joint_ptr + j_offs, old_joint + joint.to(tl.int64), mask=j_live)
    tl.store(dropped_total_ptr, tl.load(dropped_total_ptr) + tl.reduce(dropped, 0, _add))
    tl.store(loss_sums_ptr, tl.load(loss_sums_ptr) + tl.load(lb_ptr).to(tl.float64))
    tl.store(loss_sums_ptr + 1, tl.load(loss_sums_ptr + 1) + tl.load(z_ptr).to(tl.float64))
    tl.store(sums_ptr, tl.load(sums_ptr) + tl.reduce(n_sum, 0, _add))
    tl.store(sums_ptr + 1, tl.load(sums_ptr + 1) + tl.reduce(c_sum, 0, _add))
    tl.store(sums_ptr + 2, tl.load(sums_ptr + 2) + tl.reduce(sq_sum, 0, _add))
    tl.store(extrema_ptr, tl.minimum(tl.load(extrema_ptr), tl.reduce(low, 0, _min)))
    tl.store(extrema_ptr + 1, tl.maximum(tl.load(extrema_ptr + 1), tl.reduce(high, 0, _max)))
