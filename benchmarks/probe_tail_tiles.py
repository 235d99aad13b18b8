"""Probe: do 64-row tiles for the expert groups' last rows make the dynamic experts cheaper?

The dynamic MoELayer's time should follow its work. What keeps the ratio
above the goal is the expert GEMMs: with 128-row tiles a dynamic group (~514 rows) pads its
last tile far more often than a static one (~1024 rows). This script tests the obvious fix
with a kernel where it can be expressed: a persistent Hopper grouped GEMM written in Gluon
(Triton's explicit-layout language), software-pipelined by hand (TMA loads into a ring of
shared-memory stages, asynchronous warpgroup MMAs), that runs a tile holding 64 or fewer
rows of its group as a 64-row MMA instead of a 128-row one. Plain Triton cannot mix the two
tile shapes in one pipelined loop; here the loads run ahead across tiles of either shape.

It also runs diagnostic variants that compute wrong results on purpose, to see what a
tile's time is made of: every MMA at half size, A loads at half size, and every group
reading expert 0's weights (all weight loads then hit L2).

All variants run the experts' two projections with the SwiGLU kernel between them, on the
rows that the static top-8 and the dynamic (mean k 4) routers of the OLMoE-like preset send,
captured in CUDA graphs and replayed alternately. Needs a Hopper GPU and a Triton with Gluon
(3.6 was used). Figures: docs/performance.md (Design notes).

    python benchmarks/probe_tail_tiles.py [--reps 40] [--rounds 2]
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable
from typing import Any

import torch
from bench_expert_gemm import experts_path, graphed
from bench_moe_layer import build_layers, machine_name

from moe_devkit.kernels import triton_experts
from moe_devkit.routers.torch_router import _sort_pairs

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise SystemExit(f"probe_tail_tiles: needs Triton with Gluon (>= 3.5): {exc}") from exc

# Triton 3.6 names the TMA load async_copy_global_to_shared; later versions async_load.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # 3.6: thread_barrier

NORMAL, HALF_MMA, HALF_A, ONE_EXPERT, HALF_W = 0, 1, 2, 3, 4  # PROBE values; all but 0 wrong


@gluon.constexpr_function
def _mma_layout(rows: Any, cols: Any, num_warps: Any) -> Any:
    """The warpgroup-MMA accumulator layout: warps along M while they fit, then along N."""
    warps = [4, 1]
    while warps[0] * warps[1] != num_warps:
        if rows > 16 * warps[0]:
            warps[0] *= 2
        else:
            warps[1] *= 2
    n = min(cols // warps[1], 256)
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=warps, instr_shape=[16, n, 16])


@gluon.jit
def _add(x, y):
    return x + y


@gluon.jit
def _locate(tile, parts, search, tile_starts, row_starts, row_ends, num_n,
            BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):  # fmt: skip
    """Group, first row, first column and group end of a tile (row tiles x column panels,
    column panels fastest)."""
    g = gl.sum((search <= tile).to(gl.int32), 0)
    here = parts == g
    local = tile - gl.sum(gl.where(here, tile_starts, 0), 0)
    row0 = gl.sum(gl.where(here, row_starts, 0), 0) + (local // num_n) * BLOCK_M
    row_end = gl.sum(gl.where(here, row_ends, 0), 0)
    return g, row0, (local % num_n) * BLOCK_N, row_end


@gluon.jit
def _load(produced, a_desc, w_desc, row0, w_row, k, bars, a_bufs, w_bufs,
          STAGES: gl.constexpr, pred):  # fmt: skip
    """TMA loads of one K step of a and the weights into the next stage of the ring."""
    stage = produced % STAGES
    bar = bars.index(stage)
    mbarrier.expect(bar, a_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=pred)
    a_dst = a_bufs.index(stage)
    if a_desc.block_type.shape[0] < a_dst.shape[0]:  # HALF_A probe
        a_dst = a_dst.slice(0, a_desc.block_type.shape[0])
    _tma_load(a_desc, [row0, k], bar, a_dst, pred)
    w_dst = w_bufs.index(stage)
    if w_desc.block_type.shape[0] < w_dst.shape[0]:  # HALF_W probe
        w_dst = w_dst.slice(0, w_desc.block_type.shape[0])
    _tma_load(w_desc, [w_row, k], bar, w_dst, pred)
    return produced + 1


@gluon.jit
def _mma(consumed, acc, bars, a_bufs, w_bufs, STAGES: gl.constexpr, ROWS: gl.constexpr,
         BLOCK_M: gl.constexpr):  # fmt: skip
    """Waits for a stage's loads, issues its MMA and waits for the previous MMA, whose
    stage the next load may then overwrite."""
    stage = consumed % STAGES
    mbarrier.wait(bars.index(stage), (consumed // STAGES) & 1)
    a = a_bufs.index(stage)
    if ROWS < BLOCK_M:
        a = a.slice(0, ROWS)
    acc = warpgroup_mma(a, w_bufs.index(stage).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
    # Each warpgroup waited for its own part of the previous MMA; all must have, before one
    # thread's TMA load overwrites that MMA's stage.
    _cta_barrier()
    return consumed + 1, acc


@gluon.jit
def _run_tile(produced, consumed, a_desc, w_desc, out_ptr, stride_out, bars, a_bufs, w_bufs,
              row0, w_row, col0, row_end, next_row0, next_w_row, has_next, num_k,
              ROWS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              BLOCK_K: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """One tile as a ROWS-row MMA chain. Its loads were issued STAGES - 1 steps ahead; its
    last steps issue the next tile's first loads, so they overlap this tile's epilogue."""
    layout: gl.constexpr = _mma_layout(ROWS, BLOCK_N, num_warps)
    acc = gl.zeros((ROWS, BLOCK_N), dtype=gl.float32, layout=layout)
    for kk in range(0, num_k - (STAGES - 1)):
        consumed, acc = _mma(consumed, acc, bars, a_bufs, w_bufs, STAGES, ROWS, BLOCK_M)
        produced = _load(produced, a_desc, w_desc, row0, w_row, (kk + STAGES - 1) * BLOCK_K,
                         bars, a_bufs, w_bufs, STAGES, True)  # fmt: skip
    for step in gl.static_range(STAGES - 1):
        consumed, acc = _mma(consumed, acc, bars, a_bufs, w_bufs, STAGES, ROWS, BLOCK_M)
        produced = _load(produced, a_desc, w_desc, next_row0, next_w_row, step * BLOCK_K,
                         bars, a_bufs, w_bufs, STAGES, has_next)  # fmt: skip
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    # 16-byte stores along the rows (storing from the MMA layout was 17% slower)
    out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])
    c = gl.convert_layout(acc.to(out_ptr.dtype.element_ty), out_layout)
    rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, out_layout))
    cols = col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_layout))
    ptrs = out_ptr + rows.to(gl.int64)[:, None] * stride_out + cols.to(gl.int64)[None, :]
    gl.store(ptrs, c, mask=(rows < row_end)[:, None] & (cols >= 0)[None, :])
    return produced, consumed


@gluon.jit
def grouped_gemm_kernel(a_desc, a_load_desc, w_desc, w_load_desc, out_ptr, offs_ptr, G, K, N,
                        stride_out,
                        NUM_PROGRAMS: gl.constexpr, BLOCK_G: gl.constexpr,
                        STAGES: gl.constexpr, TAIL_M: gl.constexpr, PROBE: gl.constexpr,
                        num_warps: gl.constexpr):  # fmt: skip
    """out[rows of g] = a[rows of g] @ w[g]^T, persistent: program p runs tiles p, p + P, ...

    Same tiles as ``triton_experts`` (BLOCK_M-row tiles from each group's first row); with
    TAIL_M > 0 a tile holding TAIL_M or fewer rows of its group runs a TAIL_M-row MMA.
    """
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    dtype: gl.constexpr = a_desc.dtype
    parts = gl.arange(0, BLOCK_G, layout=gl.BlockedLayout([1], [32], [num_warps], [0]))
    in_range = parts < G
    row_ends = gl.load(offs_ptr + parts, mask=in_range, other=0)
    row_starts = gl.load(offs_ptr + parts - 1, mask=in_range & (parts > 0), other=0)
    num_n = N // BLOCK_N
    counts = (row_ends - row_starts + BLOCK_M - 1) // BLOCK_M * num_n
    tile_ends = gl.associative_scan(counts, 0, _add)
    total = gl.sum(counts, 0)
    search = gl.where(in_range, tile_ends, 2147483647)
    tile_starts = tile_ends - counts

    a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)  # noqa: RUF005
    w_bufs = gl.allocate_shared_memory(dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)  # noqa: RUF005
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)

    num_k = K // BLOCK_K
    pid = gl.program_id(0)
    g, row0, col0, row_end = _locate(pid, parts, search, tile_starts, row_starts, row_ends,
                                     num_n, BLOCK_M, BLOCK_N)  # fmt: skip
    if PROBE == 3:
        g = g * 0
    produced = 0
    consumed = 0
    for step in gl.static_range(STAGES - 1):
        produced = _load(produced, a_load_desc, w_load_desc, row0, g * N + col0, step * BLOCK_K,
                         bars, a_bufs, w_bufs, STAGES, pid < total)  # fmt: skip
    for tile in range(pid, total, NUM_PROGRAMS):
        nxt = tile + NUM_PROGRAMS
        ng, nrow0, ncol0, nrow_end = _locate(nxt, parts, search, tile_starts, row_starts,
                                             row_ends, num_n, BLOCK_M, BLOCK_N)  # fmt: skip
        if PROBE == 3:
            ng = ng * 0
        if PROBE == 1 or (TAIL_M > 0 and row_end - row0 <= TAIL_M):
            produced, consumed = _run_tile(
                produced, consumed, a_load_desc, w_load_desc, out_ptr, stride_out, bars, a_bufs,
                w_bufs, row0, g * N + col0, col0, row_end, nrow0, ng * N + ncol0, nxt < total,
                num_k, BLOCK_M // 2 if PROBE == 1 else (TAIL_M if TAIL_M > 0 else BLOCK_M), BLOCK_M,
                BLOCK_N, BLOCK_K,
                STAGES, num_warps,
            )  # fmt: skip
        else:
            produced, consumed = _run_tile(
                produced, consumed, a_load_desc, w_load_desc, out_ptr, stride_out, bars, a_bufs,
                w_bufs, row0, g * N + col0, col0, row_end, nrow0, ng * N + ncol0, nxt < total,
                num_k, BLOCK_M, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, num_warps,
            )  # fmt: skip
        g, row0, col0, row_end = ng, nrow0, ncol0, nrow_end


def grouped_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    offs: torch.Tensor,
    *,
    tail: int = 64,
    probe: int = NORMAL,
    block: tuple[int, int, int] = (128, 256, 64),
    stages: int = 4,
) -> torch.Tensor:
    """``triton_experts.grouped_mm``'s contract, through the Gluon kernel above."""
    (rows, k_dim), (groups, _, n_dim) = a.shape, b.shape
    block_m, block_n, block_k = block
    out = a.new_empty(rows, n_dim)
    weights = b.transpose(-2, -1).reshape(groups * n_dim, k_dim)
    dtype = gl.bfloat16 if a.dtype == torch.bfloat16 else gl.float16

    def descriptor(t: torch.Tensor, shape: list[int]) -> Any:
        return TensorDescriptor.from_tensor(
            t, shape, gl.NVMMASharedLayout.get_default_for(shape, dtype)
        )

    a_desc = descriptor(a, [block_m, block_k])
    a_load = descriptor(a, [block_m // 2, block_k]) if probe == HALF_A else a_desc
    w_desc = descriptor(weights, [block_n, block_k])
    w_load = descriptor(weights, [block_n // 2, block_k]) if probe == HALF_W else w_desc
    programs = torch.cuda.get_device_properties(a.device).multi_processor_count
    grouped_gemm_kernel[(programs,)](
        a_desc, a_load, w_desc, w_load, out, offs, groups, k_dim,
        n_dim, out.stride(0), NUM_PROGRAMS=programs,
        BLOCK_G=triton.next_power_of_2(groups), STAGES=stages, TAIL_M=tail, PROBE=probe,
        num_warps=8,
    )  # fmt: skip
    return out


VARIANTS: dict[str, tuple[Callable[..., torch.Tensor], bool]] = {  # name: matmul, exact?
    "triton (package)": (triton_experts.grouped_mm, True),
    "gluon, 128-row tiles": (functools.partial(grouped_mm, tail=0), True),
    "gluon, 64-row tails": (functools.partial(grouped_mm, tail=64), True),
    **{
        f"probe: {name}": (functools.partial(grouped_mm, tail=0, probe=probe), False)
        for name, probe in (
            ("every MMA half", HALF_MMA),
            ("A loads half", HALF_A),
            ("weight loads half", HALF_W),
            ("one expert's weights", ONE_EXPERT),
        )
    },
}


def check_exact(counts: list[int], k_dim: int, n_dim: int, tail: int) -> None:
    """The kernel against torch._grouped_mm on random groups, bit for bit."""
    offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    a = torch.randn(sum(counts) + 7, k_dim, device="cuda").bfloat16()
    b = (torch.randn(len(counts), n_dim, k_dim, device="cuda") / k_dim**0.5).bfloat16()
    b = b.transpose(-2, -1)
    active = sum(counts)
    out = grouped_mm(a, b, offs, tail=tail)[:active]
    expected = torch._grouped_mm(a, b, offs=offs)[:active]
    if not torch.equal(out, expected):
        raise SystemExit(f"probe_tail_tiles: kernel differs from torch._grouped_mm on {counts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    device = torch.device("cuda")
    if not triton_experts.is_available(device):
        raise SystemExit("probe_tail_tiles: needs a Hopper GPU")
    for tail in (0, 64):
        check_exact([5, 0, 37, 9], 256, 256, tail)
        check_exact([130, 64, 65, 1, 256, 200], 512, 512, tail)
    static, dynamic, x = build_layers("olmoe", device, torch.bfloat16, 4.0)
    experts = dynamic.experts
    timers: dict[tuple[str, str], Callable[[], float]] = {}
    with torch.inference_mode():
        inputs = {}  # every layer's rows first: capture only once all eager work is done
        for layer_name, layer in (("static", static), ("dynamic", dynamic)):
            routing = layer.router(x)
            _, order, offsets = _sort_pairs(routing, routing.num_experts)
            weights = routing.expert_weights.reshape(-1)[order]
            inputs[layer_name] = x[order // routing.max_k], offsets, weights
        for layer_name, (rows, offsets, weights) in inputs.items():
            active = int(offsets[-1])
            reference = experts_path(triton_experts.grouped_mm, experts, rows, offsets, weights)
            for name, (matmul, exact) in VARIANTS.items():
                out = experts_path(matmul, experts, rows, offsets, weights)
                if exact and not torch.equal(out[:active], reference[:active]):
                    raise SystemExit(f"probe_tail_tiles: {name} differs on the {layer_name} rows")
                timers[name, layer_name] = graphed(
                    lambda m=matmul, r=rows, o=offsets, w=weights: experts_path(m, experts, r, o, w)
                )
        print(f"machine: {machine_name(device)}, triton {triton.__version__}")
        print("experts path (2 GEMMs + SwiGLU), CUDA graphs, ms; relative to the package's kernel")
        for _ in range(args.rounds):
            samples: dict[tuple[str, str], list[float]] = {key: [] for key in timers}
            for _ in range(args.reps):
                for key, timer in timers.items():
                    samples[key].append(timer())
            median = {key: statistics.median(values) for key, values in samples.items()}
            base = median["triton (package)", "static"], median["triton (package)", "dynamic"]
            for name in VARIANTS:
                s, d = median[name, "static"], median[name, "dynamic"]
                print(
                    f"  {name:28} static {s:.4f} ({s / base[0]:.3f}) dynamic {d:.4f} "
                    f"({d / base[1]:.3f}) dynamic/static {d / s:.4f}"
                )


if __name__ == "__main__":
    main()
