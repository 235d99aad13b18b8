"""The routers' fused no-autograd path (two Triton kernels) against their PyTorch ops.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before the
kernels are first built) on CPU tensors; with CUDA the compiled kernels run on the GPU, and
the `gpu` test checks that the fused path never synchronises. A router called under
``torch.no_grad()`` takes the fused path; the same router with autograd on is the reference.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from triton_support import (  # sets TRITON_INTERPRET first
    DEVICE,
    HAS_CUDA,
    needs_triton,
    run_interpreted_after_triton_import,
)

from moe_devkit.config import RouterConfig
from moe_devkit.routers import triton_router
from moe_devkit.routers.torch_router import (
    DynamicMoERouter,
    RoutingDecision,
    StaticTopKRouter,
    span_name,
)

pytestmark = [needs_triton, pytest.mark.filterwarnings("error::RuntimeWarning")]

EXACT = ("expert_indices", "k_per_token", "nonfinite", "dropped")
CLOSE = (
    "expert_weights",
    "router_probs",
    "router_logits",
    "complexity",
    "load_balancing_loss",
    "z_loss",
    "compute_loss",
    "aux_loss",
)
# (N, E, max_k, min_k): one block or several, the last one partial; E = 1, E a power of two
# or not, max_k = E, E padded to 256
SHAPES = [
    (37, 6, 3, 1),
    (150, 8, 2, 1),
    (9, 1, 1, 1),
    (70, 64, 8, 3),
    (33, 5, 5, 2),
    (40, 130, 4, 2),
]


def config(num_experts: int, max_k: int, min_k: int, **overrides: object) -> RouterConfig:
    return RouterConfig(  # type: ignore[arg-type]
        hidden_size=12,
        num_experts=num_experts,
        max_k=max_k,
        min_k=min_k,
        complexity_hidden_size=8,
        **overrides,
    )


def tokens(num_tokens: int, seed: int = 0) -> torch.Tensor:
    """float32[N, 12] hidden states with one NaN token and one +Inf token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, 12, generator=g) * 2
    x[min(1, num_tokens - 1), 3] = float("nan")
    x[num_tokens // 2, 0] = float("inf")
    return x.to(DEVICE)


def route_both_ways(
    router: DynamicMoERouter | StaticTopKRouter, x: torch.Tensor
) -> tuple[RoutingDecision, RoutingDecision]:
    """(fused: autograd off, reference: autograd on, detached)."""
    with torch.no_grad():
        fused = router(x)
    with torch.enable_grad():
        reference = router(x)
    return fused, reference


def assert_same_decision(fused: RoutingDecision, reference: RoutingDecision) -> None:
    assert fused.batch_shape == reference.batch_shape
    for name in EXACT + CLOSE:
        got, expected = getattr(fused, name), getattr(reference, name).detach()
        assert (got.dtype, got.shape) == (expected.dtype, expected.shape), name
        if name in EXACT:
            assert torch.equal(got, expected), name
        else:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.fixture(autouse=True)
def interpret_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The routers take the fused path for CPU tensors too (in Triton's interpreter)."""
    monkeypatch.setattr(triton_router, "INTERPRET_ON_CPU", True)


@pytest.fixture
def route_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Records the rule of every ``triton_router.route`` call."""
    calls: list[str] = []
    original = triton_router.route

    def spy(*args: object, **kwargs: object) -> triton_router.FusedRouting:
        calls.append(str(kwargs["rule"]))
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_router, "route", spy)
    yield calls


@pytest.mark.parametrize(("n", "experts", "max_k", "min_k"), SHAPES)
def test_top_p_mode_equals_the_pytorch_path(
    n: int, experts: int, max_k: int, min_k: int, route_calls: list[str]
) -> None:
    torch.manual_seed(0)
    router = DynamicMoERouter(config(experts, max_k, min_k, mode="top_p", top_p=0.55)).to(DEVICE)
    with torch.no_grad():  # peakier distributions: k varies more
        router.router_network.weight.mul_(2.0)
    fused, reference = route_both_ways(router, tokens(n))
    assert route_calls == ["top_p"]
    assert fused.nonfinite.sum() == 2 and (fused.k_per_token[fused.nonfinite] == 0).all()
    assert_same_decision(fused, reference)


@pytest.mark.parametrize(("n", "experts", "max_k", "min_k"), SHAPES)
def test_complexity_mode_equals_the_pytorch_path(
    n: int, experts: int, max_k: int, min_k: int, route_calls: list[str]
) -> None:
    torch.manual_seed(1)
    router = DynamicMoERouter(config(experts, max_k, min_k, k_temperature=0.3)).to(DEVICE)
    assert router.complexity_estimator is not None
    with torch.no_grad():  # scores spread over [0, 1]: k takes several values
        router.complexity_estimator.fc2.weight.mul_(30.0)
    fused, reference = route_both_ways(router, tokens(n, seed=1))
    assert route_calls == ["complexity"]
    assert_same_decision(fused, reference)


@pytest.mark.parametrize(("n", "experts", "max_k", "min_k"), SHAPES)
def test_static_router_equals_the_pytorch_path(
    n: int, experts: int, max_k: int, min_k: int, route_calls: list[str]
) -> None:
    torch.manual_seed(2)
    for k in sorted({1, max_k, experts}):
        router = StaticTopKRouter(config(experts, max_k, min_k), k=k).to(DEVICE)
        fused, reference = route_both_ways(router, tokens(n, seed=2))
        assert_same_decision(fused, reference)
    assert route_calls == ["static"] * len({1, max_k, experts})


def test_losses_add_many_partial_rows_in_order(
    monkeypatch: pytest.MonkeyPatch, route_calls: list[str]
) -> None:
    monkeypatch.setattr(triton_router, "_BLOCK_PARTIALS", 2)  # several steps of the 2nd pass
    torch.manual_seed(3)
    int_coefs = dict(load_balance_coef=1, z_loss_coef=0, compute_cost_coef=2)
    router = DynamicMoERouter(config(6, 3, 1, mode="top_p", **int_coefs)).to(DEVICE)
    x = tokens(900, seed=3).view(5, 180, 12)  # 15 blocks of 64 tokens, the last partial
    fused, reference = route_both_ways(router, x)
    assert route_calls == ["top_p"]
    assert fused.batch_shape == (5, 180)
    assert_same_decision(fused, reference)
    with torch.no_grad():
        again = router(x)
    for name in ("load_balancing_loss", "z_loss", "compute_loss", "aux_loss"):
        assert torch.equal(getattr(again, name), getattr(fused, name))  # deterministic


def test_inference_mode_takes_the_fused_path_in_the_routing_spans(route_calls: list[str]) -> None:
    router = DynamicMoERouter(config(6, 3, 1)).to(DEVICE)
    with (
        torch.inference_mode(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
    ):
        router(tokens(10))
    assert route_calls == ["complexity"]
    names = {event.key for event in prof.key_averages()}
    assert {span_name("complexity"), span_name("gating"), span_name("select_k")} <= names


def test_all_tokens_nonfinite_gives_zero_losses() -> None:
    router = DynamicMoERouter(config(4, 2, 1, mode="top_p")).to(DEVICE)
    x = torch.full((3, 12), float("nan"), device=DEVICE)
    fused, reference = route_both_ways(router, x)
    assert_same_decision(fused, reference)
    assert (fused.expert_indices == -1).all() and float(fused.aux_loss) == 0.0


@pytest.mark.parametrize(
    "overrides",
    [{"capacity_factor": 1.0}, {"nonfinite_policy": "raise"}],
    ids=["capacity", "raise"],
)
def test_capacity_and_raise_policy_take_the_pytorch_path(
    overrides: dict[str, object], route_calls: list[str]
) -> None:
    cfg = config(6, 3, 1, **overrides)
    x = torch.randn(10, 12, device=DEVICE)
    with torch.no_grad():
        DynamicMoERouter(cfg).to(DEVICE)(x)
        StaticTopKRouter(cfg).to(DEVICE)(x)
    assert route_calls == []


def test_grad_enabled_and_too_many_experts_take_the_pytorch_path(route_calls: list[str]) -> None:
    x = torch.randn(4, 12, device=DEVICE)
    DynamicMoERouter(config(6, 3, 1)).to(DEVICE)(x)
    StaticTopKRouter(config(6, 3, 1)).to(DEVICE)(x)
    with torch.no_grad():
        DynamicMoERouter(config(triton_router.MAX_EXPERTS + 1, 2, 1)).to(DEVICE)(x)
    assert route_calls == []


@pytest.mark.skipif(HAS_CUDA, reason="interpreter only")
def test_interpreter_works_when_triton_was_imported_first() -> None:
    run_interpreted_after_triton_import(
        "from moe_devkit.config import RouterConfig\n"
        "from moe_devkit.routers import triton_router\n"
        "from moe_devkit.routers.torch_router import DynamicMoERouter\n"
        "triton_router.INTERPRET_ON_CPU = True\n"
        "calls = []\n"
        "route = triton_router.route\n"
        "triton_router.route = lambda *a, **k: calls.append(1) or route(*a, **k)\n"
        "router = DynamicMoERouter(RouterConfig(hidden_size=4, num_experts=3, max_k=2))\n"
        "with torch.no_grad():\n"
        "    decision = router(torch.ones(2, 4))\n"
        "assert calls == [1], calls\n"
        "assert decision.expert_indices.shape == (2, 2) and decision.aux_loss.isfinite()\n"
    )


def test_route_rejects_what_the_kernels_do_not_take() -> None:
    cfg = config(6, 3, 1)
    logits = torch.randn(5, 6, device=DEVICE)
    with pytest.raises(TypeError, match="float32"):
        triton_router.route(logits.double(), cfg, rule="top_p", max_k=3)
    with pytest.raises(ValueError, match="experts"):
        triton_router.route(torch.randn(5, 300), cfg, rule="top_p", max_k=3)
    with pytest.raises(ValueError, match="max_k"):
        triton_router.route(logits, cfg, rule="static", max_k=7)
    with pytest.raises(ValueError, match="complexity"):
        triton_router.route(logits, cfg, rule="complexity", max_k=3)
    with pytest.raises(ValueError, match="rule"):
        triton_router.route(logits, cfg, rule="top_k", max_k=3)  # type: ignore[arg-type]


@pytest.mark.gpu
def test_fused_path_makes_no_host_sync_on_cuda() -> None:
    torch.manual_seed(4)
    sizes: dict[str, object] = dict(
        hidden_size=64, num_experts=64, max_k=8, min_k=2, complexity_hidden_size=32
    )
    top_p = RouterConfig(**sizes, mode="top_p", top_p=0.5)  # type: ignore[arg-type]
    complexity = RouterConfig(**sizes)  # type: ignore[arg-type]
    routers = [
        (DynamicMoERouter(top_p), 0.5),
        (DynamicMoERouter(complexity), None),
        (StaticTopKRouter(complexity, k=6), None),
    ]
    x = torch.randn(2048, 64, device="cuda")
    x[3, 5], x[700, 0] = float("nan"), float("-inf")
    for router, threshold in routers:
        router.cuda()
        with torch.no_grad():
            router(x)  # warm-up: kernels compiled
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.no_grad():
                fused = router(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        with torch.enable_grad():
            reference = router(x)
        assert_same_on_gpu(fused, reference, top_p=threshold)


def assert_same_on_gpu(
    fused: RoutingDecision, reference: RoutingDecision, *, top_p: float | None
) -> None:
    """``assert_same_decision``, except that indices and k may differ on tokens with a near-tie
    (the GPU's exp and summation orders round differently from torch's kernels)."""
    for name in CLOSE:
        got, expected = getattr(fused, name), getattr(reference, name).detach()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    for name in EXACT:
        got, expected = getattr(fused, name), getattr(reference, name)
        assert (got.dtype, got.shape) == (expected.dtype, expected.shape), name
    assert torch.equal(fused.nonfinite, reference.nonfinite)
    assert torch.equal(fused.dropped, reference.dropped)
    probs = reference.router_probs.detach().nan_to_num(0.0)
    top = probs.topk(min(reference.max_k + 1, probs.shape[-1]), dim=-1).values  # decreasing
    near = ((top[:, :-1] - top[:, 1:]) <= 1e-5 * top[:, :-1]).any(dim=-1)
    if top_p is not None:
        near |= ((top.cumsum(dim=-1) - top - top_p).abs() <= 1e-5).any(dim=-1)
    same = (fused.expert_indices == reference.expert_indices).all(dim=-1)
    same &= fused.k_per_token == reference.k_per_token
    assert bool((same | near).all())
    assert int(same.sum()) >= 0.99 * same.numel()


@pytest.mark.skipif(DEVICE.type == "cuda", reason="about CPU tensors")
def test_cpu_tensors_keep_the_pytorch_path_by_default(
    monkeypatch: pytest.MonkeyPatch, route_calls: list[str]
) -> None:
    """TRITON_INTERPRET=1 alone does not move no-grad CPU routing into the interpreter."""
    monkeypatch.setattr(triton_router, "INTERPRET_ON_CPU", False)
    router = DynamicMoERouter(config(6, 3, 1, mode="top_p")).to(DEVICE)
    with torch.no_grad():
        router(tokens(10))
    assert route_calls == []
