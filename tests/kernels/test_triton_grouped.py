"""Triton grouped matmul: forward and both gradients against a per-group loop.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before the
first kernel is built) on CPU tensors, with tiny blocks; with CUDA the same tests run the
compiled kernels on the GPU with 16-wide blocks (tl.dot's minimum there). The `gpu` tests
check that nothing synchronises with the host, under sync-debug mode "error".
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # before the kernels are first built (they are built lazily)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triton_support import run_interpreted_after_triton_import  # noqa: E402

from moe_devkit.config import RouterConfig  # noqa: E402
from moe_devkit.kernels import triton_grouped  # noqa: E402
from moe_devkit.kernels.triton_grouped import BlockSizes, grouped_mm  # noqa: E402
from moe_devkit.routers import torch_router  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if HAS_CUDA else "cpu"
# Interpreter: blocks smaller than the groups, so tiles straddle group ends. GPU: tl.dot
# needs every block dimension >= 16.
BLOCKS = (
    [BlockSizes(16, 16, 16, num_warps=4, num_stages=2), BlockSizes(32, 16, 32, num_warps=4)]
    if HAS_CUDA
    else [BlockSizes(4, 4, 4, num_warps=1, num_stages=1), BlockSizes(8, 4, 2, num_warps=1)]
)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (M, K, N, offs): empty groups, one-row groups, M not a multiple of any block, padding rows
# past offs[-1], all rows in one group, all rows padding.
CASES = [
    (23, 10, 7, [3, 3, 4, 12, 19]),
    (9, 5, 3, [0, 0, 9]),
    (17, 6, 5, [17, 17, 17, 17]),
    (6, 3, 4, [0, 0]),
    (1, 4, 2, [1]),
    (37, 19, 21, [1, 2, 2, 20, 31, 31]),
]


def reference(a: torch.Tensor, b: torch.Tensor, offs: list[int]) -> torch.Tensor:
    """float64[M, N]: per-group products in float64, zeros past offs[-1]; differentiable."""
    parts, start = [], 0
    for group, end in enumerate(offs):
        parts.append(a[start:end].double() @ b[group].double())
        start = end
    parts.append(a.new_zeros(a.shape[0] - start, b.shape[2], dtype=torch.float64))
    return torch.cat(parts)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Relative to the largest magnitude: float32 within ~1e-5 of an exact product."""
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual.double() - expected).abs().max() / scale
    assert err <= TOLERANCE[dtype], f"relative error {float(err):.3g} for {dtype}"


def make_inputs(
    case: tuple[int, int, int, list[int]], dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """a: [M, K] strided (a column slice), w: [G, N, K] (read transposed), offs: int32[G]."""
    num_rows, k_dim, n_dim, offs = case
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(num_rows, k_dim + 3, generator=gen)[:, 1 : k_dim + 1]
    w = torch.randn(len(offs), n_dim, k_dim, generator=gen)
    a = a.to(DEVICE, dtype).requires_grad_()
    w = w.to(DEVICE, dtype).requires_grad_()
    return a, w, torch.tensor(offs, dtype=torch.int32, device=DEVICE)


@needs_triton
@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: f"{b.m}x{b.n}x{b.k}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}K{c[1]}N{c[2]}G{len(c[3])}")
def test_forward_and_gradients_match_loop(
    case: tuple[int, int, int, list[int]], dtype: torch.dtype, blocks: BlockSizes
) -> None:
    a, w, offs = make_inputs(case, dtype, seed=len(case[3]) + case[0])
    out = grouped_mm(a, w.transpose(-2, -1), offs, blocks=blocks)
    assert out.dtype == dtype and out.shape == (case[0], case[2])
    a_ref = a.detach().double().requires_grad_()
    w_ref = w.detach().double().requires_grad_()
    expected = reference(a_ref, w_ref.transpose(-2, -1), case[3])
    assert_close(out, expected, dtype)

    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out.double())
    assert a.grad is not None and w.grad is not None
    assert a_ref.grad is not None and w_ref.grad is not None
    assert_close(a.grad, a_ref.grad, dtype)
    assert_close(w.grad, w_ref.grad, dtype)


@needs_triton
def test_padding_rows_are_zero_forward_and_backward() -> None:
    a, w, offs = make_inputs((23, 10, 7, [3, 3, 4, 12, 19]), torch.float32, seed=3)
    with torch.no_grad():
        a[19:] = torch.nan  # padding rows: must never be read
    out = grouped_mm(a, w.transpose(-2, -1), offs, blocks=BLOCKS[0])
    assert torch.equal(out[19:], torch.zeros_like(out[19:]))
    out.backward(torch.ones_like(out))
    assert a.grad is not None and w.grad is not None
    assert torch.equal(a.grad[19:], torch.zeros_like(a.grad[19:]))
    assert bool(torch.isfinite(w.grad).all())
    assert torch.equal(w.grad[1], torch.zeros_like(w.grad[1]))  # the empty group


@needs_triton
def test_contiguous_b_and_default_blocks() -> None:
    a, w, offs = make_inputs((70, 33, 40, [10, 10, 45, 69]), torch.float32, seed=5)
    b = w.detach().transpose(-2, -1).contiguous()
    expected = reference(a.detach(), b, [10, 10, 45, 69])
    assert_close(grouped_mm(a.detach(), b, offs), expected, torch.float32)


@needs_triton
def test_triton_experts_match_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """SwiGLUExperts' forward and gradients, implementation "triton" (this grouped matmul)
    against "reference" (``torch._grouped_mm`` or the loop over experts)."""
    monkeypatch.setattr(triton_grouped, "_default_blocks", lambda dtype: BLOCKS[0])
    torch.manual_seed(7)
    sizes = dict(num_experts=4, hidden_size=8, inner_size=6)
    experts = torch_router.SwiGLUExperts(**sizes, implementation="triton").to(DEVICE)
    reference = torch_router.SwiGLUExperts(**sizes, implementation="reference").to(DEVICE)
    reference.load_state_dict(experts.state_dict())
    offsets = torch.tensor([2, 2, 9, 13], dtype=torch.int32, device=DEVICE)
    weights = torch.rand(16, device=DEVICE)
    x = torch.randn(16, 8, device=DEVICE)
    outputs, grads = [], []
    for module in (experts, reference):
        rows = x.clone().requires_grad_()
        out = module(rows, offsets, weights)
        out[:13].square().sum().backward()
        outputs.append(out[:13].detach())
        grads.append([t.grad for t in (rows, module.w_gate_up, module.w_down)])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for got, want in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.skipif(HAS_CUDA, reason="interpreter only")
def test_interpreter_works_when_triton_was_imported_first() -> None:
    run_interpreted_after_triton_import(
        "from moe_devkit.kernels.triton_grouped import BlockSizes, grouped_mm\n"
        "a, b = torch.ones(5, 3), torch.ones(2, 3, 4)\n"
        "offs = torch.tensor([2, 4], dtype=torch.int32)\n"
        "out = grouped_mm(a, b, offs, blocks=BlockSizes(2, 2, 2, num_warps=1))\n"
        "assert out.tolist() == [[3.0] * 4] * 4 + [[0.0] * 4], out\n"
    )


def test_unavailable_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_grouped, "_triton_installed", lambda: False)
    assert not triton_grouped.is_available()
    a, b = torch.zeros(4, 3), torch.zeros(2, 3, 5)
    with pytest.raises(RuntimeError, match="grouped_mm needs Triton"):
        grouped_mm(a, b, torch.tensor([1, 4], dtype=torch.int32))


@pytest.mark.parametrize(
    ("a", "b", "offs", "error", "match"),
    [
        ((4, 3), (2, 3, 5), torch.int64, TypeError, r"offs of dtype int32; got torch\.int64"),
        ((4, 3), (2, 4, 5), torch.int32, ValueError, r"got shapes \(4, 3\), \(2, 4, 5\)"),
        ((4, 3), (3, 3, 5), torch.int32, ValueError, "G >= 1"),
    ],
)
def test_bad_arguments_raise(
    a: tuple[int, int],
    b: tuple[int, int, int],
    offs: torch.dtype,
    error: type[Exception],
    match: str,
) -> None:
    with pytest.raises(error, match=match):
        grouped_mm(torch.zeros(a), torch.zeros(b), torch.tensor([1, 4], dtype=offs))


def test_mixed_dtypes_raise() -> None:
    a, b = torch.zeros(4, 3), torch.zeros(2, 3, 5, dtype=torch.float16)
    with pytest.raises(TypeError, match=r"one floating dtype; got torch\.float32 and"):
        grouped_mm(a, b, torch.tensor([1, 4], dtype=torch.int32))


# --------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_grouped_mm_makes_no_host_sync(dtype: torch.dtype) -> None:
    offs_list = [0, 130, 131, 131, 700, 1000, 1000, 1500]  # empty, one-row, 100 padding rows
    a, w, offs = make_inputs((1600, 256, 384, offs_list), dtype, seed=1)
    grad_out = torch.randn(1600, 384, device="cuda", dtype=dtype)
    grouped_mm(a, w.transpose(-2, -1), offs).backward(grad_out)  # warm-up: compiles
    a.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = grouped_mm(a, w.transpose(-2, -1), offs)
        out.backward(grad_out)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    a_ref = a.detach().double().requires_grad_()
    w_ref = w.detach().double().requires_grad_()
    expected = reference(a_ref, w_ref.transpose(-2, -1), offs_list)
    expected.backward(grad_out.double())
    assert a.grad is not None and w.grad is not None
    assert a_ref.grad is not None and w_ref.grad is not None
    assert_close(out, expected, dtype)
    assert_close(a.grad, a_ref.grad, dtype)
    assert_close(w.grad, w_ref.grad, dtype)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_layer_forward_and_backward_make_no_host_sync(dtype: torch.dtype) -> None:
    cfg = RouterConfig(
        hidden_size=256, num_experts=16, min_k=1, max_k=4, expert_hidden_size=512,
        capacity_factor=1.25,
    )  # fmt: skip
    layer = torch_router.MoELayer(cfg).to("cuda", dtype)
    x = torch.randn(4, 128, 256, device="cuda", dtype=dtype, requires_grad=True)
    layer(x).hidden_states.sum().backward()  # warm-up: compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x)
        (out.hidden_states.float().square().mean() + out.routing.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert bool(torch.isfinite(out.hidden_states).all())
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
