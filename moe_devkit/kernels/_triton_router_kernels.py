"""Triton kernels behind ``triton_router``; imported only once Triton is known to be there.

Kept apart so that ``@triton.jit`` runs at first use (compiled, or interpreted when
``TRITON_INTERPRET=1`` was set before), as in ``_triton_dispatch_kernels``.
"""

# mypy: disable-error-code="misc, no-untyped-def, untyped-decorator"
# (Triton kernels are untyped by nature: their arguments are pointers, scalars and constexprs.)

from __future__ import annotations

import triton  # type: ignore[import-not-found, import-untyped, unused-ignore]
import triton.language as tl  # type: ignore[import-not-found, import-untyped, unused-ignore]

from moe_devkit.kernels._triton_combine import _add, _max, _min


@triton.jit
def route_kernel(
    logits_ptr,  # float32[N, E], unit column stride
    stride_l,
    cplx_ptr,  # float32[N]: complexity scores (RULE 2 only; not read otherwise)
    probs_ptr,  # float32[N, E] (out): softmax
    entropy_ptr,  # float32[N] (out, RULE 0 and 1): normalised entropy
    idx_ptr,  # int64[N, K] (out): expert_indices, -1 on unused slots
    w_ptr,  # float32[N, K] (out): expert_weights
    k_ptr,  # int64[N] (out): k_per_token
    nonfinite_ptr,  # bool[N] (out)
    dropped_ptr,  # bool[N, K] (out): all False (no capacity limit on this path)
    part_ptr,  # float64[P, 2 * E_PAD + 4] (out): this program's partial sums, see _route_block
    N,
    top_p,
    temperature,
    log_e,
    E: tl.constexpr,
    E_PAD: tl.constexpr,  # power of two >= E
    K: tl.constexpr,  # slots: max_k (dynamic) or k (static)
    K_PAD: tl.constexpr,  # power of two >= K
    MIN_K: tl.constexpr,
    RULE: tl.constexpr,  # 0: k = K (static), 1: "top_p", 2: "complexity"
    BLOCK_T: tl.constexpr,
):
    # Pass 1 from logits in memory: program p routes tokens [p * BLOCK_T, (p + 1) * BLOCK_T).
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    live = rows < N
    cols = tl.arange(0, E_PAD)
    mask = live[:, None] & (cols < E)[None, :]
    x = tl.load(logits_ptr + rows[:, None] * stride_l + cols[None, :], mask=mask, other=0.0)
    _route_block(
        x, rows, live, pid, cplx_ptr, probs_ptr, entropy_ptr, idx_ptr, w_ptr, k_ptr,
        nonfinite_ptr, dropped_ptr, part_ptr, top_p, temperature, log_e,
        E, E_PAD, K, K_PAD, MIN_K, RULE, BLOCK_T,
    )  # fmt: skip


@triton.jit
def route_hidden_kernel(
    h_ptr,  # 16-bit[N, D], unit column stride
    stride_h,
    gate_ptr,  # 16-bit[E, D] (same dtype): the gate weight, unit column stride
    stride_g,
    logits_ptr,  # float32[N, E] (out, contiguous): router_logits
    cplx_ptr,  # from here on as in route_kernel
    probs_ptr,
    entropy_ptr,
    idx_ptr,
    w_ptr,
    k_ptr,
    nonfinite_ptr,
    dropped_ptr,
    part_ptr,
    N,
    top_p,
    temperature,
    log_e,
    D,  # hidden size, a multiple of 16
    E: tl.constexpr,
    E_PAD: tl.constexpr,  # power of two >= max(E, 16): tl.dot takes no dimension below 16
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    MIN_K: tl.constexpr,
    RULE: tl.constexpr,
    BLOCK_T: tl.constexpr,  # >= 16
    BLOCK_D: tl.constexpr,  # >= 16
    STAGES: tl.constexpr,  # software-pipeline depth of the D loop
):
    # Pass 1 with the gating matmul: program p computes the float32 logits of its tokens,
    # h[rows] @ W^T (16-bit products are exact in float32, accumulated in float32 as cuBLAS
    # does with out_dtype=float32), writes them out as router_logits and routes them from
    # registers: no separate matmul launch and no logits round trip through memory.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    live = rows < N
    cols = tl.arange(0, E_PAD)
    col_ok = cols < E
    depth = tl.arange(0, BLOCK_D)
    h_rows = h_ptr + rows[:, None] * stride_h  # [BLOCK_T, 1]
    g_cols = gate_ptr + cols.to(tl.int64)[None, :] * stride_g  # [1, E_PAD]: W^T's columns
    acc = tl.full([BLOCK_T, E_PAD], 0.0, dtype=tl.float32)
    for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
        d_ok = (d0 + depth) < D
        h = tl.load(h_rows + (d0 + depth)[None, :], mask=live[:, None] & d_ok[None, :], other=0.0)
        g = tl.load(g_cols + (d0 + depth)[:, None], mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(h, g, acc)
    mask = live[:, None] & col_ok[None, :]
    tl.store(logits_ptr + rows[:, None] * E + cols[None, :], acc, mask=mask)
    # The block route_kernel would load from these logits: 0 outside [N, E]. (A NaN or Inf
    # token has NaN in its padded columns, NaN * 0; _route_block masks them out anyway.)
    x = tl.where(mask, acc, 0.0)
    _route_block(
        x, rows, live, pid, cplx_ptr, probs_ptr, entropy_ptr, idx_ptr, w_ptr, k_ptr,
        nonfinite_ptr, dropped_ptr, part_ptr, top_p, temperature, log_e,
        E, E_PAD, K, K_PAD, MIN_K, RULE, BLOCK_T,
    )  # fmt: skip


@triton.jit
def _route_block(
    x,  # float32[BLOCK_T, E_PAD]: the block's logits, 0 past E and on rows past N
    rows,  # int64[BLOCK_T]: token indices
    live,  # bool[BLOCK_T]: rows < N
    pid,  # int64: the program, i.e. this block's partial row
    cplx_ptr,
    probs_ptr,
    entropy_ptr,
    idx_ptr,
    w_ptr,
    k_ptr,
    nonfinite_ptr,
    dropped_ptr,
    part_ptr,
    top_p,
    temperature,
    log_e,
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    MIN_K: tl.constexpr,
    RULE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # Routes one block of tokens and writes one partial row: selections per expert,
    # probability sums per expert (finite tokens), then the sum of z^2, the finite-token
    # count and the sum of expected k. Summed over the block's few tokens in float32 (counts
    # in int32), stored as float64 so that the second pass adds many blocks without rounding
    # (counts stay exact).
    cols = tl.arange(0, E_PAD)
    col_ok = cols < E
    mask = live[:, None] & col_ok[None, :]
    bad = ((x != x) | (tl.abs(x) == float("inf"))) & col_ok[None, :]
    nonfinite = tl.reduce(bad.to(tl.int32), 1, _max) > 0
    finite = live & (nonfinite == 0)

    # Softmax as torch's CUDA kernel writes it (exp(x - max) / sum). As in torch.softmax, a
    # NaN or +Inf logit, or a row of -Inf, gives a row of NaN, and -Inf logits otherwise a
    # zero probability; such rows are shifted by 0 instead (no inf - inf, no NaN maxima).
    poison = ((x != x) | (x == float("inf"))) & col_ok[None, :]
    x = tl.where(col_ok[None, :] & (x == x), x, float("-inf"))
    row_max = tl.reduce(x, 1, _max)
    poison = (tl.reduce(poison.to(tl.int32), 1, _max) > 0) | (row_max == float("-inf"))
    x = tl.where(poison[:, None] & col_ok[None, :], 0.0, x)
    row_max = tl.where(poison, 0.0, row_max)
    exps = tl.where(col_ok[None, :], tl.exp(x - row_max[:, None]), 0.0)
    total = tl.reduce(exps, 1, _add)
    probs = tl.where(poison[:, None], float("nan"), exps / total[:, None])
    tl.store(probs_ptr + rows[:, None] * E + cols[None, :], probs, mask=mask)
    lse = row_max + tl.log(total)  # logsumexp, for the z-loss
    if RULE != 2:
        if E == 1:
            entropy = tl.full([BLOCK_T], 0.0, dtype=tl.float32)
        else:
            plogp = tl.where(col_ok[None, :], probs * tl.log(tl.maximum(probs, 1e-30)), 0.0)
            entropy = -tl.reduce(plogp, 1, _add) / log_e
        tl.store(entropy_ptr + rows, entropy, mask=live)
    part = part_ptr + pid * (2 * E_PAD + 4)
    prob_sum = tl.reduce(tl.where(finite[:, None] & col_ok[None, :], probs, 0.0), 0, _add)
    tl.store(part + E_PAD + cols, prob_sum.to(tl.float64))
    z_sq = tl.reduce(tl.where(finite, lse * lse, 0.0), 0, _add)
    tl.store(part + 2 * E_PAD, z_sq.to(tl.float64))

    # Top-K by K rounds of arg-max (lowest index on exact ties), in a loop rather than
    # unrolled (the static router's k may be E). rank[t, e] = the slot of expert e, K where
    # unselected.
    slots = tl.arange(0, K_PAD)
    work = tl.where(col_ok[None, :] & finite[:, None], probs, -1.0)  # unused where non-finite
    top_vals = tl.full([BLOCK_T, K_PAD], 0.0, dtype=tl.float32)
    top_idx = tl.full([BLOCK_T, K_PAD], 0, dtype=tl.int32)
    rank = tl.full([BLOCK_T, E_PAD], K, dtype=tl.int32)
    mass = tl.full([BLOCK_T], 0.0, dtype=tl.float64)
    reach = tl.full([BLOCK_T], 0, dtype=tl.int32)
    for j in range(K):
        best = tl.reduce(work, 1, _max)
        pick = tl.reduce(tl.where(work == best[:, None], cols[None, :], E_PAD), 1, _min)
        hit = cols[None, :] == pick[:, None]
        work = tl.where(hit, -2.0, work)
        rank = tl.where(hit, j, rank)
        top_vals = tl.where(slots[None, :] == j, best[:, None], top_vals)
        top_idx = tl.where(slots[None, :] == j, pick[:, None], top_idx)
        if RULE == 1:
            # k_from_top_p's cumsum(p) - p: torch's CPU cumsum adds in float64 and rounds
            # each prefix to float32; the exclusive mass is that minus p, in float32.
            mass += best.to(tl.float64)
            before = mass.to(tl.float32) - best
            reach += (before < top_p).to(tl.int32)

    if RULE == 0:
        k = tl.full([BLOCK_T], K, dtype=tl.int32)
    elif RULE == 1:
        k = tl.minimum(tl.maximum(reach, MIN_K), K)
    else:
        c = tl.load(cplx_ptr + rows, mask=live, other=0.0)
        # k_from_complexity: floor(nan_to_num(c) * span); clamped before the integer cast,
        # so +Inf saturates to max_k instead of overflowing.
        scaled = tl.where(c != c, 0.0, c) * (K - MIN_K + 1)
        steps = tl.floor(tl.minimum(tl.maximum(scaled, -1.0), K - MIN_K + 1.0)).to(tl.int32)
        k = tl.minimum(tl.maximum(MIN_K + steps, MIN_K), K)
    k = tl.where(finite, k, 0)
    hard = slots[None, :] < k[:, None]  # [BLOCK_T, K_PAD]
    if RULE == 2:
        # soft_slot_mask and the straight-through (hard + soft) - soft, rounded as in torch
        margin = c[:, None] * (K - MIN_K + 1) - (slots - MIN_K + 1).to(tl.float32)[None, :]
        soft = 1.0 / (1.0 + tl.exp(-(margin / temperature)))
        soft = tl.where(slots[None, :] < MIN_K, 1.0, soft)
        gate = tl.where(hard, (1.0 + soft) - soft, 0.0)
    else:
        gate = tl.where(hard, 1.0, 0.0)
    masked = tl.where(finite[:, None], top_vals, 0.0) * gate
    weights = masked / tl.maximum(tl.reduce(masked, 1, _add), 1e-20)[:, None]

    out = rows[:, None] * K + slots[None, :]
    slot_mask = live[:, None] & (slots[None, :] < K)
    tl.store(idx_ptr + out, tl.where(hard, top_idx, -1).to(tl.int64), mask=slot_mask)
    tl.store(w_ptr + out, weights, mask=slot_mask)
    tl.store(dropped_ptr + out, slots[None, :] < 0, mask=slot_mask)
    tl.store(k_ptr + rows, k.to(tl.int64), mask=live)
    tl.store(nonfinite_ptr + rows, nonfinite, mask=live)

    selected = (rank < k[:, None]) & finite[:, None]
    tl.store(part + cols, tl.reduce(selected.to(tl.int32), 0, _add).to(tl.float64))
    tl.store(part + 2 * E_PAD + 1, tl.reduce(finite.to(tl.int32), 0, _add).to(tl.float64))
    expected_k = tl.reduce(tl.where(finite, tl.reduce(gate, 1, _add), 0.0), 0, _add)
    tl.store(part + 2 * E_PAD + 2, expected_k.to(tl.float64))
    tl.store(part + 2 * E_PAD + 3, 0.0)


@triton.jit
def losses_kernel(
    part_ptr,  # float64[P, 2 * E_PAD + 4]: route_kernel's partial rows
    out_ptr,  # float32[4] (out): load-balancing, z, compute and aux loss
    P,
    load_balance_coef,
    z_loss_coef,
    compute_cost_coef,
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # Pass 2, one program: adds the partial rows in a fixed order (no atomics: the losses do
    # not depend on timing), then the formulas of load_balancing_loss, router_z_loss and
    # _decide's compute_loss, in float64, each rounded once to float32.
    width = 2 * E_PAD + 4
    cols = tl.arange(0, E_PAD)
    tail = tl.arange(0, 4)
    counts = tl.full([E_PAD], 0.0, dtype=tl.float64)
    prob_sums = tl.full([E_PAD], 0.0, dtype=tl.float64)
    scalars = tl.full([4], 0.0, dtype=tl.float64)
    for start in range(0, P, BLOCK_P):
        prow = start + tl.arange(0, BLOCK_P)
        base = part_ptr + prow.to(tl.int64)[:, None] * width
        live = (prow < P)[:, None]
        counts += tl.reduce(tl.load(base + cols[None, :], mask=live, other=0.0), 0, _add)
        probs = tl.load(base + E_PAD + cols[None, :], mask=live, other=0.0)
        prob_sums += tl.reduce(probs, 0, _add)
        scalars += tl.reduce(
            tl.load(base + 2 * E_PAD + tail[None, :], mask=live, other=0.0), 0, _add
        )
    z_sq = tl.reduce(tl.where(tail == 0, scalars, 0.0), 0, _add)
    num_valid = tl.maximum(tl.reduce(tl.where(tail == 1, scalars, 0.0), 0, _add), 1.0)
    expected_k = tl.reduce(tl.where(tail == 2, scalars, 0.0), 0, _add)
    balance = tl.reduce((counts / num_valid) * (prob_sums / num_valid), 0, _add) * E
    lb_loss = balance.to(tl.float32)
    z_loss = (z_sq / num_valid).to(tl.float32)
    compute_loss = (expected_k / num_valid / K).to(tl.float32)
    aux = load_balance_coef * lb_loss + z_loss_coef * z_loss + compute_cost_coef * compute_loss
    tl.store(out_ptr, lb_loss)
    tl.store(out_ptr + 1, z_loss)
    tl.store(out_ptr + 2, compute_loss)
    tl.store(out_ptr + 3, aux)
