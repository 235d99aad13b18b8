"""MoELayer's active-pair training path (``triton_train``) against its padded PyTorch path.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors
under implementation "triton"; with CUDA the compiled kernels run on the GPU under "auto",
in bfloat16 against the padded path, and under ``set_sync_debug_mode("error")``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from triton_support import DEVICE, HAS_CUDA, needs_triton  # sets TRITON_INTERPRET first

from moe_devkit.config import RouterConfig
from moe_devkit.kernels import moe_layer, triton_dispatch
from moe_devkit.routers.torch_router import MoELayer, StaticTopKRouter

pytestmark = needs_triton


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def spy_on_train_path(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the token count of every call of the layer's training path."""
    calls: list[int] = []
    original = moe_layer.train_dispatch

    def spy(flat: torch.Tensor, *args: object) -> object:
        calls.append(flat.shape[0])
        return original(flat, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(moe_layer, "train_dispatch", spy)
    return calls


def one_step(layer: MoELayer, x: torch.Tensor, probe: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output, input gradient and parameter gradients of ``sum(out * probe) + aux_loss``."""
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    finite = torch.nan_to_num(out.hidden_states.float(), nan=0.0)
    ((finite * probe).sum() + out.routing.aux_loss).backward()
    assert x.grad is not None
    got = {"output": out.hidden_states.detach(), "grad input": x.grad}
    for name, param in layer.named_parameters():
        assert param.grad is not None, name
        got[f"grad {name}"] = param.grad
    return got


def pair(config: RouterConfig, static: bool, implementation: str) -> tuple[MoELayer, MoELayer]:
    """A layer on the training path and a copy on the padded PyTorch path."""
    router = StaticTopKRouter(config) if static else None
    layer = MoELayer(config, router=router, implementation=implementation).to(DEVICE)
    router = StaticTopKRouter(config) if static else None
    reference = MoELayer(config, router=router, implementation="reference").to(DEVICE)
    reference.load_state_dict(layer.state_dict())
    return layer, reference


TOP_P = RouterConfig(
    hidden_size=16, num_experts=5, max_k=3, expert_hidden_size=24, mode="top_p", top_p=0.6
)
COMPLEXITY = RouterConfig(hidden_size=16, num_experts=4, max_k=3, expert_hidden_size=8)
CAPACITY = RouterConfig(  # F over one column block of the kernels, drops
    hidden_size=16, num_experts=4, max_k=2, expert_hidden_size=300, capacity_factor=0.5
)
STATIC = RouterConfig(hidden_size=16, num_experts=6, max_k=2, expert_hidden_size=16)
CONFIGS = [
    pytest.param(TOP_P, False, id="top_p"),
    pytest.param(COMPLEXITY, False, id="complexity"),
    pytest.param(CAPACITY, False, id="capacity, F over a block"),
    pytest.param(STATIC, True, id="static top-2"),
]


@pytest.mark.parametrize(("config", "static"), CONFIGS)
@pytest.mark.parametrize("plan_max_experts", [256, 2])  # 2: the sort-based plan
def test_training_path_equals_the_padded_path(
    config: RouterConfig,
    static: bool,
    plan_max_experts: int,
    poisoned_allocator: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Output and every gradient (input, router, experts) of one step equal the padded
    path's, float32, a non-finite token included; fresh buffers read as NaN, so a row the
    kernels leave unwritten and then read would show."""
    monkeypatch.setattr(triton_dispatch, "PLAN_MAX_EXPERTS", plan_max_experts)
    calls = spy_on_train_path(monkeypatch)
    torch.manual_seed(0)
    layer, reference = pair(config, static, "auto" if HAS_CUDA else "triton")
    x = torch.randn(41, config.hidden_size, device=DEVICE)
    x[5, 0] = float("nan")  # routed nowhere: NaN output, NaN router gradient on both paths
    probe = torch.randn(41, config.hidden_size, device=DEVICE)
    got = one_step(layer, x, probe)
    assert calls == [41]
    expected = one_step(reference, x, probe)
    assert calls == [41]  # the reference did not take the training path
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=2e-5, atol=2e-5, equal_nan=True, msg=name)
    finite = torch.ones(41, dtype=torch.bool, device=DEVICE)
    finite[5] = False
    assert bool(torch.isfinite(got["grad input"][finite]).all())
    assert bool(torch.isfinite(got["grad experts.w_down"]).all())


def test_training_path_skips_inactive_pairs(
    poisoned_allocator: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows the kernels process stop at the active count: the SwiGLU backward writes
    nothing past it (those rows keep the poisoned allocator's NaN)."""
    torch.manual_seed(1)
    config = RouterConfig(
        hidden_size=16, num_experts=4, max_k=4, expert_hidden_size=8, mode="top_p", top_p=0.5
    )
    layer, _ = pair(config, False, "auto" if HAS_CUDA else "triton")
    seen: dict[str, torch.Tensor] = {}
    original = triton_dispatch.swiglu_rows_backward

    def spy(gate_up, weights, grad, active):  # type: ignore[no-untyped-def]
        grad_gate_up, grad_weights = original(gate_up, weights, grad, active)
        seen["grad"], seen["active"] = grad_gate_up, active
        return grad_gate_up, grad_weights

    monkeypatch.setattr(triton_dispatch, "swiglu_rows_backward", spy)
    x = torch.randn(30, 16, device=DEVICE, requires_grad=True)
    out = layer(x)
    out.hidden_states.square().sum().backward()
    active = int(seen["active"][0])
    assert active == int(out.routing.active.sum()) < 30 * 4  # fewer rows than slots
    assert seen["grad"].shape[0] == 30 * 4
    assert bool(torch.isfinite(seen["grad"][:active]).all())
    assert bool(torch.isnan(seen["grad"][active:]).all())


def test_swiglu_backward_equals_autograd() -> None:
    torch.manual_seed(2)
    gate_up = torch.randn(37, 2 * 300, device=DEVICE, requires_grad=True)
    weights = torch.rand(37, device=DEVICE, requires_grad=True)
    grad = torch.randn(37, 300, device=DEVICE)
    active = torch.tensor([29], dtype=torch.int32, device=DEVICE)
    gate, up = gate_up.chunk(2, dim=-1)
    (torch.nn.functional.silu(gate) * up * weights[:, None] * grad)[:29].sum().backward()
    got_gate_up, got_weights = triton_dispatch.swiglu_rows_backward(
        gate_up.detach(), weights.detach(), grad, active
    )
    assert gate_up.grad is not None and weights.grad is not None
    torch.testing.assert_close(got_gate_up[:29], gate_up.grad[:29], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_weights[:29], weights.grad[:29], rtol=1e-5, atol=1e-5)


def test_no_grad_and_reference_do_not_take_the_training_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = spy_on_train_path(monkeypatch)
    config = RouterConfig(hidden_size=8, num_experts=4, max_k=2, expert_hidden_size=8)
    layer = MoELayer(config, implementation="triton").to(DEVICE)
    reference = MoELayer(config, implementation="reference").to(DEVICE)
    x = torch.randn(5, 8, device=DEVICE)
    with torch.no_grad():
        layer(x)  # the no-grad Triton forward
    reference(x)
    assert calls == []
    layer(x)
    assert calls == [5]


# --------------------------------------------------------------------- CUDA


def _bf16_pair(mode: str) -> tuple[MoELayer, MoELayer, torch.Tensor, torch.Tensor]:
    config = RouterConfig(
        hidden_size=256, num_experts=16, min_k=1, max_k=4, expert_hidden_size=512,
        mode=mode, top_p=0.7, capacity_factor=1.25,
    )  # fmt: skip
    torch.manual_seed(3)
    layer = MoELayer(config).to("cuda", torch.bfloat16)
    reference = MoELayer(config, implementation="reference").to("cuda", torch.bfloat16)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)
    probe = torch.randn(1024, 256, device="cuda")
    return layer, reference, x, probe


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["complexity", "top_p"])
def test_cuda_bfloat16_gradients_equal_the_padded_path(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bfloat16 on CUDA: the same grouped matmuls on the same rows; the two paths differ in
    the SwiGLU (float32 math, one rounding, against bfloat16 ops) and in the order of the
    float32 sums, so the tolerance is bfloat16's (rtol 2e-2, atol 2e-2 relative to each
    tensor's largest value)."""
    calls = spy_on_train_path(monkeypatch)
    layer, reference, x, probe = _bf16_pair(mode)
    got = one_step(layer, x, probe)
    expected = one_step(reference, x, probe)
    assert calls == [1024]
    for name, value in expected.items():
        scale = float(value.float().abs().max())
        torch.testing.assert_close(
            got[name].float(), value.float(), rtol=2e-2, atol=2e-2 * scale, msg=name
        )


@pytest.mark.gpu
def test_cuda_training_step_makes_no_host_sync() -> None:
    layer, _, x, probe = _bf16_pair("top_p")
    one_step(layer, x, probe)  # warm-up: kernels compiled, caches filled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        xg = x.detach().clone().requires_grad_(True)
        out = layer(xg)
        ((out.hidden_states.float() * probe).sum() + out.routing.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert xg.grad is not None and bool(torch.isfinite(xg.grad).all())
