"""The persistent TMA grouped GEMM of ``triton_experts`` against a loop over experts.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
triton_support before the kernels are first built) on CPU tensors in float16 (the
interpreter's bfloat16 loads through tensor descriptors are not faithful); on a Hopper GPU
they run compiled, in bfloat16 too, and the `gpu` tests check that they never synchronise.
"""

from __future__ import annotations

import pytest
import torch
from triton_support import (  # sets TRITON_INTERPRET first
    DEVICE,
    HAS_CUDA,
    needs_triton,
    run_interpreted_after_triton_import,
)

from moe_devkit.config import RouterConfig
from moe_devkit.kernels import moe_layer, triton_experts
from moe_devkit.routers.torch_router import MoELayer, StaticTopKRouter

pytestmark = [
    needs_triton,
    pytest.mark.skipif(
        not triton_experts.is_available(DEVICE), reason="needs Hopper + Triton with TMA"
    ),
]

SMALL = triton_experts.ExpertBlocks(m=16, n=32, k=16, num_warps=4, num_stages=2, programs=3)
BLOCKS = SMALL if not HAS_CUDA else triton_experts.ExpertBlocks(m=64, n=128, k=64)
DTYPES = [torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def make_inputs(
    counts: list[int], k_dim: int, n_dim: int, dtype: torch.dtype, spare_rows: int = 5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """a with NaN rows past the last group, weights as the transpose of an [G, N, K] stack."""
    torch.manual_seed(0)
    offsets = torch.tensor(counts, device=DEVICE).cumsum(0).to(torch.int32)
    a = torch.randn(sum(counts) + spare_rows, k_dim, device=DEVICE).to(dtype)
    a[sum(counts) :] = float("nan")  # rows past the last group must not reach any output
    weights = torch.randn(len(counts), n_dim, k_dim, device=DEVICE) / k_dim**0.5
    return a, weights.to(dtype).transpose(-2, -1), offsets


def loop_over_groups(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(a.shape[0], b.shape[2], device=a.device)
    start = 0
    for group, end in enumerate(offsets.tolist()):
        out[start:end] = a[start:end].float() @ b[group].float()
        start = end
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "counts",
    [
        [5, 0, 37, 9],  # an empty expert, groups that end inside a tile
        [16, 16, 32],  # groups that fill whole tiles
        [0, 0, 3],  # one row tile in all
        [0, 0, 0],  # nothing to do: no tile runs
    ],
)
def test_matches_a_loop_over_groups(counts: list[int], dtype: torch.dtype) -> None:
    k_dim, n_dim = (256, 256) if HAS_CUDA else (32, 64)
    a, b, offsets = make_inputs(counts, k_dim, n_dim, dtype)
    assert triton_experts.supports(a, b, BLOCKS)
    out = triton_experts.grouped_mm(a, b, offsets, BLOCKS)
    assert out.shape == (a.shape[0], n_dim) and out.dtype == dtype
    active = sum(counts)
    expected = loop_over_groups(a, b, offsets)[:active]
    torch.testing.assert_close(out[:active].float(), expected, rtol=1e-2, atol=1e-2)
    if HAS_CUDA:  # same contract as torch._grouped_mm
        torch.testing.assert_close(
            out[:active], torch._grouped_mm(a, b, offs=offsets)[:active], rtol=1e-2, atol=1e-2
        )


def test_supports_only_16_bit_tile_aligned_weight_stacks() -> None:
    a, b, offsets = make_inputs([4, 4], 32, 64, torch.float16)
    assert triton_experts.supports(a, b, SMALL)
    assert not triton_experts.supports(a.float(), b.float(), SMALL)  # 16-bit only
    assert not triton_experts.supports(a, b.bfloat16(), SMALL)  # one dtype
    wide = triton_experts.ExpertBlocks(m=16, n=128, k=16)
    assert not triton_experts.supports(a, b, wide)  # N = 64 is not a multiple of 128
    assert not triton_experts.supports(a.t().contiguous().t(), b, SMALL)  # a column-major
    assert not triton_experts.supports(a, b.contiguous(), SMALL)  # b not a weight transpose
    with pytest.raises(ValueError, match=r"triton_experts.grouped_mm expects .* got a \(13, 32\)"):
        triton_experts.grouped_mm(a, b.contiguous(), offsets, SMALL)


@pytest.mark.skipif(HAS_CUDA, reason="interpreter only")
def test_kernel_works_when_triton_was_imported_first() -> None:
    run_interpreted_after_triton_import(
        "from moe_devkit.kernels import triton_experts\n"
        "blocks = triton_experts.ExpertBlocks(m=16, n=16, k=16, programs=2)\n"
        "a, w = torch.ones(5, 16).half(), torch.ones(2, 16, 16).half()\n"
        "offs = torch.tensor([2, 3], dtype=torch.int32)\n"
        "out = triton_experts.grouped_mm(a, w.transpose(-2, -1), offs, blocks)\n"
        "assert (out[:3] == 16).all(), out\n"
    )


def test_block_sizes_must_be_powers_of_two() -> None:
    with pytest.raises(ValueError, match=r"ExpertBlocks.n must be a power of two; got n=96"):
        triton_experts.ExpertBlocks(n=96)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_no_grad_layer_uses_the_kernel_without_syncing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bfloat16 MoELayer without autograd runs its experts through the kernel: same output
    as the autograd path within bfloat16 rounding, and no host synchronisation."""
    config = RouterConfig(
        hidden_size=512, num_experts=16, max_k=4, expert_hidden_size=256, mode="top_p", top_p=0.7
    )
    calls = []
    kernel = triton_experts.grouped_mm

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return kernel(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_experts, "grouped_mm", counted)
    torch.manual_seed(0)
    for router in (None, StaticTopKRouter(config)):
        layer = MoELayer(config, router=router).to(DEVICE, torch.bfloat16)
        x = torch.randn(4, 300, config.hidden_size, device=DEVICE, dtype=torch.bfloat16)
        with torch.no_grad():
            layer(x)  # compile outside the sync check
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                fused = layer(x).hidden_states
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert len(calls) == 4  # two projections, two forwards
        calls.clear()
        expected = layer(x).hidden_states  # autograd on: the PyTorch path
        assert not calls
        torch.testing.assert_close(fused.float(), expected.float(), rtol=3e-2, atol=3e-2)


def test_expert_matmul_uses_the_kernel_only_where_it_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton forward's expert matmul: the TMA kernel for tile-aligned 16-bit operands,
    else the grouped matmul it was given (e.g. float32, or sizes off the tiles)."""
    used: list[str] = []

    def fallback(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        used.append("fallback")
        return a.new_zeros(a.shape[0], b.shape[2])

    def kernel(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        used.append("kernel")
        return a.new_zeros(a.shape[0], b.shape[2])

    monkeypatch.setattr(triton_experts, "grouped_mm", kernel)
    a, b, offsets = make_inputs([3, 5], 256, 256, torch.float16)  # fits the default tiles
    moe_layer.expert_matmul(a, b, offsets, fallback)
    moe_layer.expert_matmul(a.float(), b.float(), offsets, fallback)
    small_a, small_b, _ = make_inputs([3, 5], 32, 64, torch.float16)  # N = 64 < 256
    moe_layer.expert_matmul(small_a, small_b, offsets, fallback)
    assert used == ["kernel", "fallback", "fallback"]
