"""Active-pair dispatch (Triton gather, SwiGLU and combine) against MoELayer's PyTorch path.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before the
kernels are first built) on CPU tensors; with CUDA the compiled kernels run on the GPU, and
the `gpu` test checks that the no-grad forward, which takes this path, never synchronises.
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
from moe_devkit.kernels import moe_layer, triton_dispatch
from moe_devkit.routers.torch_router import DynamicMoERouter, MoELayer, StaticTopKRouter

pytestmark = needs_triton


def test_kernels_skip_rows_past_the_active_count() -> None:
    x = torch.arange(12.0, device=DEVICE).view(4, 3)
    src = torch.tensor([3, 0, 2, 1, 1], device=DEVICE)
    active = torch.tensor([3], dtype=torch.int32, device=DEVICE)
    out = triton_dispatch.gather_rows(x, src, active)
    torch.testing.assert_close(out[:3], x[src[:3]])
    gate_up = torch.randn(5, 8, device=DEVICE)
    weights = torch.rand(5, device=DEVICE)
    hidden = triton_dispatch.swiglu_rows(gate_up, weights, active)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up * weights[:, None]
    torch.testing.assert_close(hidden[:3], expected[:3])
    y = torch.randn(5, 3, device=DEVICE)
    pos = torch.tensor([[0, -1], [4, 2], [-1, -1]], device=DEVICE)
    nonfinite = torch.tensor([False, False, True], device=DEVICE)
    out = triton_dispatch.combine(y, pos, nonfinite)
    torch.testing.assert_close(out[0], y[0])
    torch.testing.assert_close(out[1], y[4] + y[2])
    assert out[2].isnan().all()


def test_gather_and_swiglu_cover_columns_past_one_block() -> None:
    # widths of several column blocks and a partial last one (the kernels run a 2-D grid)
    torch.manual_seed(0)
    rows, width, active_rows = 40, 600, 37
    x = torch.randn(rows, width, device=DEVICE)
    src = torch.randperm(rows, device=DEVICE)
    active = torch.tensor([active_rows], dtype=torch.int32, device=DEVICE)
    out = triton_dispatch.gather_rows(x, src, active)
    torch.testing.assert_close(out[:active_rows], x[src[:active_rows]])
    gate_up = torch.randn(rows, 2 * width, device=DEVICE)
    weights = torch.rand(rows, device=DEVICE)
    hidden = triton_dispatch.swiglu_rows(gate_up, weights, active)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up * weights[:, None]
    torch.testing.assert_close(hidden[:active_rows], expected[:active_rows])


def sorted_by_expert(
    indices: torch.Tensor, dropped: torch.Tensor, weights: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, ...]:
    """The plan a stable torch.sort by expert gives: (src, row_weights, offsets, pos)."""
    num_tokens, max_k = indices.shape
    key = torch.where((indices >= 0) & ~dropped, indices, num_experts).reshape(-1)
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.arange(1, num_experts + 1, device=key.device)
    offsets = torch.searchsorted(sorted_key, bounds).to(torch.int32)
    rows = torch.arange(order.numel(), device=key.device)
    pos = torch.empty_like(order).index_copy_(
        0, order, torch.where(sorted_key < num_experts, rows, -1)
    )
    return order // max_k, weights.reshape(-1)[order], offsets, pos.view(num_tokens, max_k)


@pytest.mark.parametrize(
    ("tokens", "max_k", "experts"),
    [(37, 3, 6), (300, 8, 64), (5, 1, 2), (130, 4, 200), (1, 2, 256), (64, 2, 16)],
)
@pytest.mark.parametrize("small_blocks", [False, True])
def test_plan_gives_the_rows_of_a_stable_sort(
    tokens: int, max_k: int, experts: int, small_blocks: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if small_blocks:  # many pair blocks, several steps (and a carry) in the offsets kernel
        monkeypatch.setattr(triton_dispatch, "_PLAN_PAIRS", 16)
        monkeypatch.setattr(triton_dispatch, "_PLAN_BLOCKS", 4)
    generator = torch.Generator().manual_seed(tokens)
    indices = torch.randint(0, experts, (tokens, max_k), generator=generator)
    indices[torch.rand(tokens, max_k, generator=generator) < 0.3] = -1  # unused slots
    indices[0] = -1  # a token routed nowhere
    dropped = torch.rand(tokens, max_k, generator=generator) < 0.1  # capacity drops
    weights = torch.rand(tokens, max_k, generator=generator)
    indices, dropped, weights = indices.to(DEVICE), dropped.to(DEVICE), weights.to(DEVICE)
    plan = triton_dispatch.plan(indices, dropped, weights, experts)
    src, row_weights, offsets, pos = sorted_by_expert(indices, dropped, weights, experts)
    active = int(offsets[-1])
    assert torch.equal(plan.offsets, offsets)
    assert torch.equal(plan.src[:active], src[:active])
    assert torch.equal(plan.row_weights[:active], row_weights[:active])
    assert torch.equal(plan.pos, pos)


@pytest.mark.skipif(HAS_CUDA, reason="interpreter only")
def test_plan_works_when_triton_was_imported_first() -> None:
    run_interpreted_after_triton_import(
        "from moe_devkit.kernels import triton_dispatch\n"
        "indices = torch.tensor([[1, -1], [0, 1]])\n"
        "plan = triton_dispatch.plan(indices, indices < -1, torch.ones(2, 2), 2)\n"
        "assert plan.offsets.tolist() == [1, 3], plan\n"
        "assert plan.pos.tolist() == [[1, -1], [0, 2]], plan\n"
    )


def test_plan_with_no_active_pair() -> None:
    indices = torch.full((9, 2), -1, device=DEVICE)
    dropped = torch.zeros(9, 2, dtype=torch.bool, device=DEVICE)
    plan = triton_dispatch.plan(indices, dropped, torch.zeros(9, 2, device=DEVICE), 4)
    assert plan.offsets.tolist() == [0, 0, 0, 0]
    assert (plan.pos == -1).all()


@pytest.mark.parametrize(
    "config",
    [
        RouterConfig(hidden_size=24, num_experts=6, max_k=3, expert_hidden_size=20),
        RouterConfig(
            hidden_size=16, num_experts=4, max_k=2, expert_hidden_size=8, capacity_factor=0.5
        ),
        RouterConfig(hidden_size=16, num_experts=5, max_k=4, mode="top_p", top_p=0.6),
    ],
)
@pytest.mark.parametrize("plan_max_experts", [256, 2])  # 2: the sort-based dispatch
def test_active_pair_forward_equals_the_pytorch_forward(
    config: RouterConfig, plan_max_experts: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The no-grad forward of implementation "triton" against "reference", one router."""
    monkeypatch.setattr(triton_dispatch, "PLAN_MAX_EXPERTS", plan_max_experts)
    calls = spy_on_dispatch(monkeypatch)
    torch.manual_seed(0)
    router = DynamicMoERouter(config, implementation="reference").to(DEVICE)
    layer = MoELayer(config, router=router, implementation="triton").to(DEVICE)
    reference = MoELayer(config, router=router, implementation="reference").to(DEVICE)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, 37, config.hidden_size, device=DEVICE)
    x[0, 5, 0] = float("nan")  # a non-finite token: routed nowhere, NaN output
    with torch.no_grad():
        fused = layer(x)
        assert calls == [config.num_experts]
        expected = reference(x)
        assert calls == [config.num_experts]
    routing = fused.routing
    assert int(routing.active.sum()) < routing.active.numel()  # some slots are inactive
    torch.testing.assert_close(
        fused.hidden_states, expected.hidden_states, rtol=1e-5, atol=1e-5, equal_nan=True
    )


def spy_on_dispatch(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the number of experts of every call of the layer's Triton dispatch."""
    calls: list[int] = []
    original = moe_layer.dispatch

    def spy(*args: object) -> moe_layer.ActivePairs:
        calls.append(int(args[-1]))  # type: ignore[call-overload]
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(moe_layer, "dispatch", spy)
    return calls


@pytest.mark.gpu
def test_no_grad_forward_on_cuda_takes_the_active_pair_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = spy_on_dispatch(monkeypatch)
    config = RouterConfig(hidden_size=8, num_experts=4, max_k=2, expert_hidden_size=8)
    layer = MoELayer(config, router=StaticTopKRouter(config)).cuda()  # implementation "auto"
    x = torch.randn(5, 8, device="cuda")
    with torch.no_grad():
        layer(x)
    layer(x)  # autograd on: the training path (train_dispatch), not this forward
    assert calls == [4]


@pytest.mark.gpu
def test_no_grad_forward_makes_no_host_sync_on_cuda() -> None:
    config = RouterConfig(hidden_size=64, num_experts=8, max_k=4, expert_hidden_size=64)
    layer = MoELayer(config).cuda().to(torch.bfloat16)
    x = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = layer(x).hidden_states  # warm-up: kernels compiled, caches filled
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = layer(x).hidden_states
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(out, expected)
    with torch.enable_grad():
        reference = layer(x).hidden_states.detach()
    torch.testing.assert_close(out.float(), reference.float(), rtol=2e-2, atol=2e-2)
