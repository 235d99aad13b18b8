"""The routers' fused no-autograd path (two Triton kernels) against their PyTorch ops.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before the
kernels are first built) on CPU tensors; with CUDA the compiled kernels run on the GPU, and
the `gpu` tests check that the fused path never synchronises. A router called under
``torch.no_grad()`` takes the fused path; the same router with autograd on is the reference.
16-bit hidden states take ``route_hidden`` (the gating matmul in the routing kernel); its
tests use float16 on the CPU, since the interpreter's tl.dot multiplies bfloat16 (stored as
uint16) as integers, and bfloat16 on a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from triton_support import (  # sets TRITON_INTERPRET first
    DEVICE,
    HAS_CUDA,
    needs_triton,
    run_interpreted_after_triton_import,
)

from moe_devkit.config import RouterConfig
from moe_devkit.kernels import triton_router
from moe_devkit.routers.torch_router import (
    DynamicMoERouter,
    MoELayer,
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


def config(
    num_experts: int, max_k: int, min_k: int, *, hidden_size: int = 12, **overrides: object
) -> RouterConfig:
    return RouterConfig(  # type: ignore[arg-type]
        hidden_size=hidden_size,
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


@pytest.fixture
def route_hidden_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Records the rule of every ``triton_router.route_hidden`` call."""
    calls: list[str] = []
    original = triton_router.route_hidden

    def spy(*args: object, **kwargs: object) -> tuple[torch.Tensor, triton_router.FusedRouting]:
        calls.append(str(kwargs["rule"]))
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_router, "route_hidden", spy)
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
        "from moe_devkit.kernels import triton_router\n"
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


# ------------------------------------------------------- route_hidden: the matmul in the kernel

HIDDEN_DTYPE = torch.bfloat16 if HAS_CUDA else torch.float16  # see the module docstring
# (N, E, max_k, min_k, D): N not a multiple of the 64-token block (16 tokens at E = 130), E not
# a power of two (6: below tl.dot's 16), D one partial step of the 64-wide D loop, two, or one
HIDDEN_SHAPES = [(37, 6, 3, 1, 48), (70, 20, 4, 2, 80), (40, 130, 4, 2, 64)]


@pytest.fixture
def nan_in_matmul() -> Iterator[None]:
    """Silences numpy's warning where NaN and Inf tokens give NaN logits (NaN * w, Inf - Inf).

    The interpreter's tl.dot is numpy's matmul, which warns; the compiled kernel and torch
    do the same arithmetic silently. (A filterwarnings mark would not do: the module's
    "error" filter, applied after the test's own, wins.)
    """
    with np.errstate(invalid="ignore"):
        yield


def hidden_operands(
    n: int, experts: int, d: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """16-bit hidden[N, D] with a NaN token and an +Inf element, and weight[E, D]."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    hidden[1] = float("nan")
    hidden[n // 2, 0] = float("inf")
    weight = torch.randn(experts, d, generator=g) * (3 / d**0.5)  # peaky: k varies
    return hidden.to(DEVICE, HIDDEN_DTYPE), weight.to(DEVICE, HIDDEN_DTYPE)


@pytest.mark.usefixtures("nan_in_matmul")
@pytest.mark.parametrize("rule", ["static", "top_p", "complexity"])
@pytest.mark.parametrize(("n", "experts", "max_k", "min_k", "d"), HIDDEN_SHAPES)
def test_route_hidden_routes_its_logits_as_route_does(
    rule: triton_router.KRule, n: int, experts: int, max_k: int, min_k: int, d: int
) -> None:
    hidden, weight = hidden_operands(n, experts, d)
    cfg = config(experts, max_k, min_k, hidden_size=d, top_p=0.6, k_temperature=0.3)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    complexity = scores if rule == "complexity" else None
    logits, fused = triton_router.route_hidden(
        hidden, weight, cfg, rule=rule, max_k=max_k, complexity=complexity
    )
    expected = hidden.float() @ weight.float().t()
    assert (logits.dtype, logits.shape) == (torch.float32, (n, experts))
    torch.testing.assert_close(logits, expected, rtol=1e-3, atol=1e-5, equal_nan=True)
    assert fused.nonfinite[1] and fused.nonfinite[n // 2] and int(fused.nonfinite.sum()) == 2
    reference = triton_router.route(logits, cfg, rule=rule, max_k=max_k, complexity=complexity)
    for name, got in fused._asdict().items():
        expected = getattr(reference, name)
        assert (got.dtype, got.shape) == (expected.dtype, expected.shape), name
        if got.is_floating_point():  # the losses add other blocks (E padded to 16 or more)
            torch.testing.assert_close(got, expected, equal_nan=True, msg=name)
        else:
            assert torch.equal(got, expected), name
    if rule == "top_p":
        assert len(set(fused.k_per_token.tolist())) > 2  # k varies (and 0 on non-finite)


def fp16_router(kind: str, experts: int = 20, d: int = 48) -> DynamicMoERouter | StaticTopKRouter:
    torch.manual_seed(5)
    cfg = config(experts, 4, 2, hidden_size=d, mode="top_p" if kind == "top_p" else "complexity")
    router = StaticTopKRouter(cfg, k=3) if kind == "static" else DynamicMoERouter(cfg)
    with torch.no_grad():
        router.router_network.weight.mul_(3.0)
        if isinstance(router, DynamicMoERouter) and router.complexity_estimator is not None:
            router.complexity_estimator.fc2.weight.mul_(30.0)
    return router.to(DEVICE, HIDDEN_DTYPE)


@pytest.mark.usefixtures("nan_in_matmul")
@pytest.mark.parametrize("kind", ["static", "top_p", "complexity"])
def test_router_takes_route_hidden_for_16_bit_inputs(
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
    route_calls: list[str],
    route_hidden_calls: list[str],
) -> None:
    """Same decision as the fused path with the matmul apart (cuBLAS, or F.linear in float32
    on the CPU), up to the logits' rounding: another summation order."""
    router = fp16_router(kind)
    x = hidden_operands(70, 20, 48, seed=6)[0].view(2, 35, 48)
    with torch.no_grad():
        fused = router(x)
        assert (route_hidden_calls, route_calls) == ([kind], [])
        monkeypatch.setattr(triton_router, "supports_hidden", lambda *_: False)
        apart = router(x)
        assert route_calls == [kind]
    assert fused.batch_shape == (2, 35) and int(fused.nonfinite.sum()) == 2
    top_p = router.config.top_p if kind == "top_p" else None
    assert_same_on_gpu(fused, apart, top_p=top_p, rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("nan_in_matmul")
def test_layer_output_with_route_hidden_matches(
    monkeypatch: pytest.MonkeyPatch, route_hidden_calls: list[str]
) -> None:
    torch.manual_seed(7)
    cfg = config(6, 3, 1, hidden_size=32, mode="top_p", expert_hidden_size=16)
    layer = MoELayer(cfg).to(DEVICE, HIDDEN_DTYPE)
    x = hidden_operands(45, 6, 32, seed=7)[0]
    with torch.no_grad():
        fused = layer(x)
        monkeypatch.setattr(triton_router, "supports_hidden", lambda *_: False)
        apart = layer(x)
    assert route_hidden_calls == ["top_p"]
    assert_same_on_gpu(fused.routing, apart.routing, top_p=cfg.top_p, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.hidden_states, apart.hidden_states, equal_nan=True)


def test_float32_inputs_keep_the_matmul_apart(
    route_calls: list[str], route_hidden_calls: list[str]
) -> None:
    router = fp16_router("top_p").float()
    with torch.no_grad():
        router(torch.randn(10, 48, device=DEVICE))
    assert (route_calls, route_hidden_calls) == (["top_p"], [])


def test_supports_hidden_only_16_bit_operands_of_one_dtype_and_16_aligned_d() -> None:
    h = torch.randn(8, 32, device=DEVICE, dtype=HIDDEN_DTYPE)
    w = torch.randn(6, 32, device=DEVICE, dtype=HIDDEN_DTYPE)
    other = torch.float16 if HAS_CUDA else torch.bfloat16  # the other 16-bit dtype
    assert triton_router.supports_hidden(h, w)
    assert not triton_router.supports_hidden(h.float(), w.float())
    assert not triton_router.supports_hidden(h, w.to(other))
    assert not triton_router.supports_hidden(h[:, :24], w[:, :24])  # D % 16 != 0
    assert not triton_router.supports_hidden(h[:, :16], w)  # D differs
    assert not triton_router.supports_hidden(h[:, ::2], w[:, :16])  # column stride 2
    assert not triton_router.supports_hidden(h[0], w)  # not [N, D]
    many = torch.randn(triton_router.MAX_EXPERTS + 1, 32, dtype=HIDDEN_DTYPE, device=DEVICE)
    assert not triton_router.supports_hidden(h, many)
    if not HAS_CUDA:  # the interpreter's tl.dot multiplies bfloat16 bits as integers
        assert not triton_router.supports_hidden(h.bfloat16(), w.bfloat16())


def test_route_hidden_rejects_what_the_kernel_does_not_take() -> None:
    cfg = config(6, 3, 1, hidden_size=32)
    h = torch.randn(5, 32, device=DEVICE, dtype=HIDDEN_DTYPE)
    w = torch.randn(6, 32, device=DEVICE, dtype=HIDDEN_DTYPE)

    def call(hidden: torch.Tensor, weight: torch.Tensor, **kwargs: object) -> None:
        args: dict[str, object] = {"rule": "top_p", "max_k": 3, **kwargs}
        triton_router.route_hidden(hidden, weight, cfg, **args)  # type: ignore[arg-type]

    with pytest.raises(TypeError, match=r"hidden and weight .*got hidden=torch.float32"):
        call(h.float(), w.float())
    with pytest.raises(TypeError, match=r"weight=torch.float32"):
        call(h, w.float())
    with pytest.raises(ValueError, match=r"weight \[E, D\] with the same D; got hidden \[5, 32\]"):
        call(h, w[:, :16])
    with pytest.raises(ValueError, match=r"D must be a multiple of 16; got D=24"):
        call(h[:, :24], w[:, :24])
    with pytest.raises(ValueError, match=r"weight must have 1 to 256 rows .*got 257"):
        call(h, torch.randn(257, 32, device=DEVICE, dtype=HIDDEN_DTYPE))
    with pytest.raises(ValueError, match=r"unit column stride"):
        call(h.t().contiguous().t(), w)
    with pytest.raises(ValueError, match=r"max_k must be in \[1, num_experts=6\]; got max_k=7"):
        call(h, w, max_k=7)
    with pytest.raises(ValueError, match=r"rule must be one of"):
        call(h, w, rule="top_k")
    with pytest.raises(ValueError, match=r"complexity must be given"):
        call(h, w, rule="complexity")
    with pytest.raises(ValueError, match=r"complexity must have shape \[N\]=\[5\]"):
        call(h, w, rule="complexity", complexity=torch.rand(4, device=DEVICE))
    if not HAS_CUDA:
        with pytest.raises(TypeError, match=r"hidden must be float16 off CUDA"):
            call(h.bfloat16(), w.bfloat16())


def sync_test_routers() -> list[tuple[DynamicMoERouter | StaticTopKRouter, float | None]]:
    """The three rules at E = 64 for the no-sync tests, each with its top_p (or None)."""
    torch.manual_seed(4)
    sizes: dict[str, object] = dict(
        hidden_size=64, num_experts=64, max_k=8, min_k=2, complexity_hidden_size=32
    )
    top_p = RouterConfig(**sizes, mode="top_p", top_p=0.5)  # type: ignore[arg-type]
    complexity = RouterConfig(**sizes)  # type: ignore[arg-type]
    return [
        (DynamicMoERouter(top_p), 0.5),
        (DynamicMoERouter(complexity), None),
        (StaticTopKRouter(complexity, k=6), None),
    ]


def routed_without_sync(router: torch.nn.Module, x: torch.Tensor) -> RoutingDecision:
    """router(x) without autograd, after a warm-up (kernels compiled), under
    ``set_sync_debug_mode("error")``: raises if the call synchronises with the host."""
    with torch.no_grad():
        router(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            decision: RoutingDecision = router(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return decision


@pytest.mark.gpu
def test_fused_path_makes_no_host_sync_on_cuda() -> None:
    routers = sync_test_routers()
    x = torch.randn(2048, 64, device="cuda")
    x[3, 5], x[700, 0] = float("nan"), float("-inf")
    for router, threshold in routers:
        router.cuda()
        fused = routed_without_sync(router, x)
        with torch.enable_grad():
            reference = router(x)
        assert_same_on_gpu(fused, reference, top_p=threshold)


@pytest.mark.gpu
def test_route_hidden_path_makes_no_host_sync_on_cuda(
    monkeypatch: pytest.MonkeyPatch, route_hidden_calls: list[str]
) -> None:
    routers = sync_test_routers()
    x = torch.randn(2048, 64, device="cuda", dtype=torch.bfloat16)
    x[3, 5], x[700, 0] = float("nan"), float("-inf")
    for router, threshold in routers:
        router.to("cuda", torch.bfloat16)
        fused = routed_without_sync(router, x)
        with monkeypatch.context() as patch, torch.no_grad():
            patch.setattr(triton_router, "supports_hidden", lambda *_: False)
            apart = router(x)  # cuBLAS's float32-result matmul, then route
        # the two matmuls sum in different orders: logits equal up to float32 rounding
        assert_same_on_gpu(fused, apart, top_p=threshold, rtol=1e-4, atol=1e-5)
    calls = ["top_p", "top_p", "complexity", "complexity", "static", "static"]  # warm-up, run
    assert route_hidden_calls == calls


def assert_same_on_gpu(
    fused: RoutingDecision,
    reference: RoutingDecision,
    *,
    top_p: float | None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """``assert_same_decision``, except that indices and k may differ on tokens with a near-tie
    (the GPU's exp and summation orders round differently from torch's kernels, and
    ``route_hidden``'s matmul sums in another order than the reference's)."""
    for name in CLOSE:
        got, expected = getattr(fused, name), getattr(reference, name).detach()
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, equal_nan=True)
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
