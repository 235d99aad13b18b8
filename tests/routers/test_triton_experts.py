"""The fused SwiGLU expert GEMMs (``triton_experts``) against a per-expert loop.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
triton_support before the kernels are first built) on CPU tensors in float16 (the
interpreter's bfloat16 loads through tensor descriptors are not faithful); on a Hopper GPU
they run compiled, in bfloat16 too, and the `gpu` tests check that they never synchronise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_support import DEVICE, HAS_CUDA, needs_triton  # sets TRITON_INTERPRET first

from moe_devkit.config import RouterConfig
from moe_devkit.routers import triton_experts
from moe_devkit.routers.torch_router import MoELayer, StaticTopKRouter

pytestmark = [
    needs_triton,
    pytest.mark.skipif(
        not triton_experts.is_available(DEVICE), reason="needs Hopper + Triton with TMA"
    ),
]

SMALL = triton_experts.ExpertBlocks(m=16, n=32, k=16, num_warps=4, num_stages=2, programs=3)
BLOCKS = SMALL if not HAS_CUDA else triton_experts.ExpertBlocks(m=64, n=128, k=64)


def reference(
    x: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """float32 loop over experts; the activation rounded to x's dtype, as the kernel does."""
    out = torch.zeros(x.shape[0], w_down.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        gate, up = (x[start:end].float() @ w_gate_up[expert].float().T).chunk(2, dim=-1)
        hidden = (F.silu(gate) * up * weights[start:end, None]).to(x.dtype).float()
        out[start:end] = hidden @ w_down[expert].float().T
        start = end
    return out


def make_inputs(
    counts: list[int], hidden: int, inner: int, dtype: torch.dtype, spare_rows: int = 5
) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    offsets = torch.tensor(counts, device=DEVICE).cumsum(0).to(torch.int32)
    rows = sum(counts) + spare_rows
    x = torch.randn(rows, hidden, device=DEVICE).to(dtype)
    x[sum(counts) :] = float("nan")  # rows past the last group must not reach any output
    experts = len(counts)
    w_gate_up = (torch.randn(experts, 2 * inner, hidden, device=DEVICE) / hidden**0.5).to(dtype)
    w_down = (torch.randn(experts, hidden, inner, device=DEVICE) / inner**0.5).to(dtype)
    weights = torch.rand(rows, device=DEVICE)
    return x, offsets, weights, w_gate_up, w_down


DTYPES = [torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


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
def test_matches_a_loop_over_experts(counts: list[int], dtype: torch.dtype) -> None:
    hidden, inner = (256, 128) if HAS_CUDA else (32, 16)
    x, offsets, weights, w_gate_up, w_down = make_inputs(counts, hidden, inner, dtype)
    assert triton_experts.supports(x, w_gate_up, w_down, BLOCKS)
    out = triton_experts.swiglu_experts(x, offsets, weights, w_gate_up, w_down, BLOCKS)
    assert out.shape == (x.shape[0], hidden) and out.dtype == dtype
    active = sum(counts)
    expected = reference(x, offsets, weights, w_gate_up, w_down)[:active]
    torch.testing.assert_close(out[:active].float(), expected, rtol=2e-2, atol=2e-2)
    assert out[:active].isfinite().all()


def test_supports_only_16_bit_tiled_shapes() -> None:
    x, _, _, w_gate_up, w_down = make_inputs([4, 4], 32, 16, torch.float16)
    assert triton_experts.supports(x, w_gate_up, w_down, SMALL)
    assert not triton_experts.supports(x.float(), w_gate_up.float(), w_down.float(), SMALL)
    assert not triton_experts.supports(x, w_gate_up.bfloat16(), w_down, SMALL)
    bigger = triton_experts.ExpertBlocks(m=16, n=64, k=16)  # hidden 32 is not a multiple of 64
    assert not triton_experts.supports(x, w_gate_up, w_down, bigger)
    assert not triton_experts.supports(x.t().contiguous().t(), w_gate_up, w_down, SMALL)


def test_block_sizes_must_be_powers_of_two() -> None:
    with pytest.raises(ValueError, match=r"ExpertBlocks.n must be a power of two >= 2; got n=96"):
        triton_experts.ExpertBlocks(n=96)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_no_grad_layer_uses_the_kernels_without_syncing() -> None:
    """A bfloat16 MoELayer without autograd takes the fused path: same output as the
    grouped_mm path within bfloat16 rounding, and no host synchronisation."""
    config = RouterConfig(
        hidden_size=512, num_experts=16, max_k=4, expert_hidden_size=256, mode="top_p", top_p=0.7
    )
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
        expected = layer(x).hidden_states  # autograd on: the PyTorch path
        torch.testing.assert_close(fused.float(), expected.float(), rtol=3e-2, atol=3e-2)
