"""Tests of the reference PyTorch router and MoE layer against plain per-token references."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from moe_devkit import (
    DynamicMoERouter,
    MoELayer,
    MoEModel,
    RouterConfig,
    RoutingDecision,
    StaticTopKRouter,
)
from moe_devkit.routers import torch_router
from moe_devkit.routers.torch_router import STAGES, span_name


def tiny_config(**overrides: object) -> RouterConfig:
    base: dict[str, object] = dict(
        hidden_size=16, num_experts=6, min_k=1, max_k=3, expert_hidden_size=24
    )
    base.update(overrides)
    return RouterConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(params=["active rows", "padded"])
def layer_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test on both MoELayer paths: the CPU's (only the active pairs' rows) and the
    padded one CUDA takes (every token x max_k row, no host read), forced on the CPU."""
    if request.param == "padded":
        force_padded_path(monkeypatch)
    return str(request.param)


def force_padded_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """MoELayer takes its CUDA path (every token x max_k row, no host read) on the CPU too."""
    monkeypatch.setattr(torch_router, "_host_reads_are_free", lambda device: False)


# --------------------------------------------------------------------- per-token references


def reference_route(router: DynamicMoERouter | StaticTopKRouter, x: torch.Tensor) -> dict:
    """Routes token by token with Python control flow: the specification of a decision."""
    cfg = router.config
    max_k = router.k if isinstance(router, StaticTopKRouter) else cfg.max_k
    indices, weights, ks = [], [], []
    for token in x.reshape(-1, cfg.hidden_size):
        logits = token.float() @ router.router_network.weight.float().t()
        probs = torch.softmax(logits, dim=-1)
        order = torch.argsort(probs, descending=True).tolist()
        if isinstance(router, StaticTopKRouter):
            k = router.k
        elif cfg.mode == "complexity":
            c = float(router.complexity_estimator(token.unsqueeze(0))[0])
            k = min(cfg.max_k, cfg.min_k + math.floor(c * (cfg.max_k - cfg.min_k + 1)))
        else:
            k, mass = 0, 0.0
            while k < cfg.max_k and (mass < cfg.top_p or k < cfg.min_k):
                mass += float(probs[order[k]])
                k += 1
        chosen = order[:k]
        total = sum(float(probs[e]) for e in chosen)
        indices.append(chosen + [-1] * (max_k - k))
        weights.append([float(probs[e]) / total for e in chosen] + [0.0] * (max_k - k))
        ks.append(k)
    return {"indices": indices, "weights": weights, "k": ks}


def reference_layer(layer: MoELayer, x: torch.Tensor, decision: RoutingDecision) -> torch.Tensor:
    """Runs each token's selected experts one by one: the specification of the layer."""
    flat = x.reshape(-1, layer.config.hidden_size).double()
    out = torch.zeros_like(flat)
    w1, w2 = layer.experts.w_gate_up.double(), layer.experts.w_down.double()
    for n in range(flat.shape[0]):
        for slot in range(decision.max_k):
            e = int(decision.expert_indices[n, slot])
            if e < 0 or bool(decision.dropped[n, slot]):
                continue
            gate, up = (w1[e] @ flat[n]).chunk(2)
            out[n] += float(decision.expert_weights[n, slot]) * (w2[e] @ (F.silu(gate) * up))
    return out.reshape(x.shape)


def assert_matches_reference(decision: RoutingDecision, ref: dict) -> None:
    assert decision.expert_indices.tolist() == ref["indices"]
    assert decision.k_per_token.tolist() == ref["k"]
    torch.testing.assert_close(
        decision.expert_weights, torch.tensor(ref["weights"]), rtol=1e-5, atol=1e-6
    )


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_experts=st.integers(2, 9),
    data=st.data(),
    mode=st.sampled_from(["complexity", "top_p"]),
)
def test_router_equals_per_token_reference(seed: int, num_experts: int, data, mode: str) -> None:
    max_k = data.draw(st.integers(1, num_experts))
    min_k = data.draw(st.integers(1, max_k))
    top_p = data.draw(st.floats(0.05, 1.0))
    torch.manual_seed(seed)
    cfg = tiny_config(num_experts=num_experts, min_k=min_k, max_k=max_k, mode=mode, top_p=top_p)
    router = DynamicMoERouter(cfg)
    x = torch.randn(3, 5, cfg.hidden_size) * 2
    with torch.no_grad():
        decision = router(x)
        ref = reference_route(router, x)
    assert_matches_reference(decision, ref)
    assert decision.batch_shape == (3, 5)
    assert bool(((decision.k_per_token >= min_k) & (decision.k_per_token <= max_k)).all())


def test_complexity_mode_spans_every_k() -> None:
    cfg = tiny_config(min_k=1, max_k=3)
    router = DynamicMoERouter(cfg)
    scores = torch.tensor([0.0, 0.2, 0.34, 0.5, 0.67, 0.9, 1.0])
    assert router.compute_k(scores).tolist() == [1, 1, 2, 2, 3, 3, 3]


def test_dynamic_with_fixed_k_equals_static_top_k() -> None:
    torch.manual_seed(1)
    cfg = tiny_config(min_k=2, max_k=2)
    dynamic, static = DynamicMoERouter(cfg), StaticTopKRouter(cfg, k=2)
    static.router_network.load_state_dict(dynamic.router_network.state_dict())
    x = torch.randn(40, cfg.hidden_size)
    a, b = dynamic(x), static(x)
    assert torch.equal(a.expert_indices, b.expert_indices)
    assert torch.equal(a.k_per_token, b.k_per_token)
    torch.testing.assert_close(a.expert_weights, b.expert_weights)
    torch.testing.assert_close(a.load_balancing_loss, b.load_balancing_loss)
    torch.testing.assert_close(a.z_loss, b.z_loss)


def test_static_router_equals_reference() -> None:
    torch.manual_seed(2)
    router = StaticTopKRouter(tiny_config(), k=2)
    x = torch.randn(4, 7, 16)
    with torch.no_grad():
        assert_matches_reference(router(x), reference_route(router, x))


@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.25])
@pytest.mark.parametrize("mode", ["complexity", "top_p"])
def test_layer_equals_dense_per_token_loop(
    capacity_factor: float | None, mode: str, layer_path: str
) -> None:
    torch.manual_seed(3)
    layer = MoELayer(tiny_config(capacity_factor=capacity_factor, mode=mode, top_p=0.5))
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        out = layer(x)
        expected = reference_layer(layer, x, out.routing)
    torch.testing.assert_close(out.hidden_states.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("mode", ["complexity", "top_p"])
def test_layer_gradients_equal_the_per_token_loop(
    capacity_factor: float | None, mode: str, layer_path: str
) -> None:
    """Gradients of the input, the router and the experts equal those of a differentiable
    per-token loop over the same routing (float64 weights; the layer's combine sums in
    float32, hence the tolerance; padded slots and drops included)."""
    torch.manual_seed(5)
    layer = MoELayer(tiny_config(capacity_factor=capacity_factor, mode=mode, top_p=0.5)).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, 9, 16, dtype=torch.float64)
    out = layer(x)
    assert bool((out.routing.k_per_token < layer.config.max_k).any())  # padded slots exist
    (out.hidden_states * probe).sum().backward()
    params = [p for p in layer.parameters() if p.grad is not None]
    assert layer.experts.w_down.grad is not None and len(params) >= 3
    got = [x.grad.clone(), *(p.grad.clone() for p in params)]
    layer.zero_grad()

    x_ref = x.detach().clone().requires_grad_(True)
    decision = layer.router(x_ref)
    assert torch.equal(decision.expert_indices, out.routing.expert_indices)
    flat = x_ref.reshape(-1, 16)
    w1, w2 = layer.experts.w_gate_up, layer.experts.w_down
    rows = []
    for n in range(flat.shape[0]):
        row = torch.zeros(16, dtype=torch.float64)
        for slot in range(decision.max_k):
            e = int(decision.expert_indices[n, slot])
            if e < 0 or bool(decision.dropped[n, slot]):
                continue
            gate, up = (w1[e] @ flat[n]).chunk(2)
            row = row + decision.expert_weights[n, slot] * (w2[e] @ (F.silu(gate) * up))
        rows.append(row)
    (torch.stack(rows).reshape(x.shape) * probe).sum().backward()
    expected = [x_ref.grad, *(p.grad for p in params)]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)  # the combine sums in float32


def test_capacity_drops_are_counted_and_respect_the_limit() -> None:
    torch.manual_seed(4)
    cfg = tiny_config(capacity_factor=0.5, num_experts=4, max_k=3)
    decision = DynamicMoERouter(cfg)(torch.randn(64, 16))
    active = decision.active
    selected = int((decision.expert_indices >= 0).sum())
    capacity = math.ceil(0.5 * selected / 4)
    executed = torch.zeros(4, dtype=torch.int64)
    executed.scatter_add_(
        0, decision.expert_indices[active], torch.ones(int(active.sum()), dtype=torch.int64)
    )
    assert int(executed.max()) <= capacity
    assert int(decision.dropped.sum()) == selected - int(active.sum()) > 0
    assert float(decision.expert_weights.detach()[decision.dropped].abs().sum()) == 0.0


def test_capacity_prefers_first_choices() -> None:
    # Every token picks expert 0 first; with capacity 1 pair per expert the first token's
    # first choice survives, and no second choice of expert 0 displaces it.
    cfg = tiny_config(num_experts=2, min_k=2, max_k=2, capacity_factor=0.5)
    router = StaticTopKRouter(cfg, k=2)
    with torch.no_grad():
        router.router_network.weight.copy_(torch.tensor([[1.0] * 16, [0.0] * 16]))
    decision = router(torch.ones(3, 16))
    # 6 selections, capacity ceil(0.5 * 6 / 2) = 2 per expert.
    assert decision.dropped.tolist() == [[False, False], [False, False], [True, True]]


def test_gradients_reach_router_estimator_and_experts() -> None:
    torch.manual_seed(5)
    layer = MoELayer(tiny_config(max_k=4, min_k=1))
    out = layer(torch.randn(2, 8, 16))
    (out.hidden_states.square().mean() + out.routing.aux_loss).backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None, name
        assert float(param.grad.abs().sum()) > 0, name


def test_compute_cost_term_pulls_k_down() -> None:
    torch.manual_seed(6)
    cfg = tiny_config(max_k=4, compute_cost_coef=1.0)
    router = DynamicMoERouter(cfg)
    x = torch.randn(64, 16)
    opt = torch.optim.SGD(router.parameters(), lr=1.0)
    before = float(router(x).k_per_token.float().mean())
    for _ in range(50):
        opt.zero_grad()
        router(x).compute_loss.backward()
        opt.step()
    assert float(router(x).k_per_token.float().mean()) < before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_dtype(dtype: torch.dtype) -> None:
    torch.manual_seed(7)
    layer32 = MoELayer(tiny_config(hidden_size=32, expert_hidden_size=32))
    layer = MoELayer(layer32.config)
    layer.load_state_dict(layer32.state_dict())
    layer = layer.to(dtype)
    x = torch.randn(3, 8, 32)
    out = layer(x.to(dtype))
    assert out.hidden_states.dtype == dtype
    assert out.routing.router_logits.dtype == torch.float32
    assert bool(torch.isfinite(out.hidden_states).all())
    ref = layer32(x.to(dtype).float())
    agree = (out.routing.expert_indices == ref.routing.expert_indices).float().mean()
    assert float(agree) > 0.8
    with torch.no_grad():
        expected = reference_layer(layer, x.to(dtype), out.routing)
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(out.hidden_states.double(), expected, rtol=tol, atol=tol)


def test_losses_on_hand_computed_case() -> None:
    cfg = tiny_config(num_experts=2, min_k=1, max_k=1, hidden_size=2)
    router = StaticTopKRouter(cfg, k=1)
    with torch.no_grad():
        router.router_network.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    d = router(x)
    # probs: token0 [3/4, 1/4] -> expert 0; token1 [1/2, 1/2] -> expert 0 (tie, lowest index).
    # f = [2/2, 0/2] = [1, 0]; P = [(3/4 + 1/2)/2, (1/4 + 1/2)/2] = [5/8, 3/8]; loss = 2 * 5/8.
    torch.testing.assert_close(d.load_balancing_loss, torch.tensor(1.25))
    z = (math.log(4.0) ** 2 + math.log(2.0) ** 2) / 2  # logsumexp = log(3+1), log(1+1)
    torch.testing.assert_close(d.z_loss, torch.tensor(z))
    torch.testing.assert_close(d.compute_loss, torch.tensor(1.0))
    aux = 1e-2 * 1.25 + 1e-3 * z + 1e-2 * 1.0
    torch.testing.assert_close(d.aux_loss, torch.tensor(aux))


def test_balanced_load_balancing_loss_equals_mean_k() -> None:
    cfg = tiny_config(num_experts=4, min_k=2, max_k=2, hidden_size=4)
    router = StaticTopKRouter(cfg, k=2)
    with torch.no_grad():
        router.router_network.weight.copy_(torch.eye(4) * 10)
    d = router(torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]]))
    assert d.expert_indices.sort(dim=-1).values.tolist() == [[0, 1], [2, 3]]
    torch.testing.assert_close(d.load_balancing_loss, torch.tensor(2.0), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------- non-finite input


def test_nonfinite_tokens_are_masked_and_poison_only_their_output() -> None:
    torch.manual_seed(8)
    layer = MoELayer(tiny_config())
    x = torch.randn(10, 16)
    x[3, 2] = float("nan")
    x[7, 0] = float("inf")
    out = layer(x)
    r = out.routing
    assert r.nonfinite.tolist() == [i in (3, 7) for i in range(10)]
    assert r.k_per_token[3] == 0 and r.k_per_token[7] == 0
    assert r.expert_indices[3].tolist() == [-1, -1, -1]
    assert bool(torch.isnan(out.hidden_states[[3, 7]]).all())
    clean = [i for i in range(10) if i not in (3, 7)]
    assert bool(torch.isfinite(out.hidden_states[clean]).all())
    assert math.isfinite(float(r.load_balancing_loss.detach()))
    assert math.isfinite(float(r.z_loss.detach()))
    torch.testing.assert_close(out.hidden_states[clean], layer(x[clean]).hidden_states)


def test_nonfinite_policy_raise_names_the_token() -> None:
    router = DynamicMoERouter(tiny_config(nonfinite_policy="raise"))
    x = torch.randn(5, 16)
    x[4, 1] = float("nan")
    with pytest.raises(ValueError, match=r"hidden_states must be finite; got 1 token.*index 4"):
        router(x)


# --------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(min_k=3, max_k=2), ValueError, r"min_k must be <= max_k; got min_k=3, max_k=2"),
        (dict(max_k=7), ValueError, r"max_k must be <= num_experts; got max_k=7, num_experts=6"),
        (dict(top_p=0.0), ValueError, r"top_p must be in \(0.0, 1.0\]; got top_p=0.0"),
        (dict(top_p=1.5), ValueError, r"top_p must be in \(0.0, 1.0\]; got top_p=1.5"),
        (dict(mode="greedy"), ValueError, r"mode must be one of .*got mode='greedy'"),
        (dict(min_k=0), ValueError, r"min_k must be >= 1; got min_k=0"),
        (dict(num_experts=2.5), TypeError, r"num_experts must be an int; got 2.5"),
        (dict(capacity_factor=-1.0), ValueError, r"capacity_factor must be in"),
        (dict(nonfinite_policy="ignore"), ValueError, r"nonfinite_policy must be one of"),
    ],
)
def test_bad_config(kwargs: dict, error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        tiny_config(**kwargs)


@pytest.mark.parametrize(
    ("x", "error", "pattern"),
    [
        (
            torch.randn(2, 3, 4, 16),
            ValueError,
            r"\[batch, seq, hidden\] or \[tokens, hidden\]; got shape \(2, 3, 4, 16\)",
        ),
        (torch.randn(16), ValueError, r"got shape \(16,\)"),
        (torch.randn(4, 15), ValueError, r"hidden_size=16; got shape \(4, 15\)"),
        (
            torch.ones(4, 16, dtype=torch.int64),
            TypeError,
            r"floating-point tensor .*got dtype=torch.int64",
        ),
        (torch.randn(0, 16), ValueError, r"at least one token; got shape \(0, 16\)"),
        (torch.randn(2, 0, 16), ValueError, r"at least one token; got shape \(2, 0, 16\)"),
        ([[0.0] * 16], TypeError, r"must be a torch.Tensor; got list"),
    ],
)
def test_bad_input(x: object, error: type[Exception], pattern: str) -> None:
    for module in (DynamicMoERouter(tiny_config()), MoELayer(tiny_config())):
        with pytest.raises(error, match=pattern):
            module(x)


def test_layer_rejects_dtype_mismatch() -> None:
    layer = MoELayer(tiny_config())
    with pytest.raises(
        TypeError,
        match=r"dtype must match the experts' dtype torch.float32; got dtype=torch.bfloat16",
    ):
        layer(torch.randn(4, 16, dtype=torch.bfloat16))


def test_layer_rejects_a_router_that_does_not_fit() -> None:
    with pytest.raises(
        ValueError,
        match=r"router\.config\.num_experts must equal the layer's config\.num_experts=4; "
        r"got router\.config\.num_experts=3",
    ):
        MoELayer(
            RouterConfig(num_experts=4, max_k=2),
            router=StaticTopKRouter(RouterConfig(num_experts=3, max_k=2)),
        )
    with pytest.raises(ValueError, match=r"router\.config\.hidden_size must equal"):
        MoELayer(tiny_config(), router=StaticTopKRouter(tiny_config(hidden_size=8)))
    with pytest.raises(TypeError, match=r"config must be a RouterConfig; got NoneType"):
        MoELayer(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"router must be an nn\.Module .*; got str"):
        MoELayer(tiny_config(), router="top2")  # type: ignore[arg-type]


def test_layer_checks_the_decision_of_a_router_of_ones_own() -> None:
    class OwnRouter(nn.Module):  # no RouterConfig: the decision is checked instead
        def __init__(self) -> None:
            super().__init__()
            self.inner = StaticTopKRouter(tiny_config(num_experts=5))

        def forward(self, x: torch.Tensor) -> RoutingDecision:
            return self.inner(x)

    layer = MoELayer(tiny_config(), router=OwnRouter())
    with pytest.raises(ValueError, match=r"num_experts=6; got router_logits over 5"):
        layer(torch.randn(4, 16))
    fits = MoELayer(tiny_config(num_experts=5), router=OwnRouter())
    assert fits(torch.randn(4, 16)).hidden_states.shape == (4, 16)


def test_static_router_rejects_bad_k() -> None:
    with pytest.raises(ValueError, match=r"k must be an int in \[1, num_experts=6\]; got k=7"):
        StaticTopKRouter(tiny_config(), k=7)


# --------------------------------------------------------------------- profiling spans, model


def test_record_function_spans_name_every_stage() -> None:
    layer = MoELayer(tiny_config())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        layer(torch.randn(8, 16))
    names = {event.key for event in prof.key_averages()}
    assert {span_name(stage) for stage in STAGES} <= names


def test_model_stacks_layers_and_sums_aux_losses() -> None:
    torch.manual_seed(9)
    model = MoEModel(tiny_config(), num_layers=3)
    out = model(torch.randn(2, 4, 16))
    assert out.hidden_states.shape == (2, 4, 16)
    assert len(out.routings) == 3
    torch.testing.assert_close(out.aux_loss, sum(r.aux_loss for r in out.routings))
    with pytest.raises(ValueError, match=r"num_layers must be an int >= 1; got num_layers=0"):
        MoEModel(tiny_config(), num_layers=0)


def test_looped_experts_equal_grouped() -> None:
    torch.manual_seed(10)
    layer = MoELayer(tiny_config())
    x = torch.randn(12, 16)
    out = layer(x)
    d = out.routing
    active = d.active.reshape(-1)
    key = torch.where(active, d.expert_indices.reshape(-1), 6)
    order = torch.argsort(key, stable=True)
    offsets = torch.bincount(key, minlength=7)[:6].cumsum(0).to(torch.int32)
    rows = x[order // d.max_k]
    weights = torch.rand(rows.shape[0])
    n = int(offsets[-1])
    torch.testing.assert_close(
        layer.experts._looped(rows, offsets, weights)[:n],
        layer.experts._grouped(rows, offsets, weights)[:n],
    )


@pytest.mark.parametrize("implementation", ["fast", "Reference", None])
def test_implementation_must_be_auto_reference_or_triton(implementation: object) -> None:
    expected = "implementation must be 'auto', 'reference' or 'triton'; "
    expected += f"got implementation={implementation!r}"
    config = tiny_config()
    for make in (
        lambda: MoELayer(config, implementation=implementation),  # type: ignore[arg-type]
        lambda: MoEModel(config, implementation=implementation),  # type: ignore[arg-type]
        lambda: DynamicMoERouter(config, implementation=implementation),  # type: ignore[arg-type]
        lambda: StaticTopKRouter(config, implementation=implementation),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError, match=re.escape(expected)):
            make()


def test_auto_is_the_reference_on_the_cpu() -> None:
    torch.manual_seed(13)
    config = tiny_config(mode="top_p", top_p=0.6)
    auto = MoELayer(config)
    reference = MoELayer(config, implementation="reference")
    reference.load_state_dict(auto.state_dict())
    assert (auto.implementation, reference.implementation) == ("auto", "reference")
    assert reference.router.implementation == reference.experts.implementation == "reference"
    x = torch.randn(2, 9, 16)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            got, expected = auto(x), reference(x)
        assert torch.equal(got.hidden_states, expected.hidden_states)
        assert torch.equal(got.routing.expert_weights, expected.routing.expert_weights)


def test_triton_raises_where_triton_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors: no kernel runs them
    layer = MoELayer(tiny_config(), implementation="triton")
    match = r"implementation='triton' needs Triton and a CUDA device .*got device=cpu"
    for grad in (True, False):
        with pytest.raises(RuntimeError, match=match), torch.set_grad_enabled(grad):
            layer(torch.randn(4, 16))


class _PoisonPadding(torch.autograd.Function):
    """Sets rows past offsets[-1] to NaN in the forward output and in the backward gradient,
    and appends (direction, number of rows poisoned) to ``log``."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, offsets: torch.Tensor, log: list) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(offsets)
        ctx.log = log
        return _poison(out, offsets, log, "forward")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (offsets,) = ctx.saved_tensors
        return _poison(grad, offsets, ctx.log, "backward"), None, None


def _poison(t: torch.Tensor, offsets: torch.Tensor, log: list, direction: str) -> torch.Tensor:
    pad = torch.arange(t.shape[0]).unsqueeze(-1) >= offsets[-1]
    log.append((direction, int(pad.sum())))
    return torch.where(pad, torch.nan, t)


def test_padding_rows_never_poison_outputs_or_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    # The grouped matmul leaves rows past the last group undefined, forward and backward:
    # make them NaN both ways and check that no real output or gradient sees them.
    real = torch._grouped_mm
    poisoned: list[tuple[str, int]] = []

    def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return _PoisonPadding.apply(real(a, b, offs=offs), offs, poisoned)

    monkeypatch.setattr(torch, "_grouped_mm", grouped_mm)
    force_padded_path(monkeypatch)  # the path with rows past the last group
    torch.manual_seed(12)
    layer = MoELayer(tiny_config(min_k=1, max_k=3, capacity_factor=1.0), implementation="reference")
    x = torch.randn(40, 16, requires_grad=True)
    out = layer(x)
    assert int((out.routing.k_per_token < 3).sum()) > 0
    dead = x.shape[0] * out.routing.max_k - int(out.routing.active.sum())
    # the grouped path ran (not the loop over experts), both projections, and poisoned rows
    assert poisoned == [("forward", dead)] * 2 and dead > 0
    (out.hidden_states.square().sum() + out.routing.aux_loss).backward()
    assert poisoned[2:] == [("backward", dead)] * 2
    assert bool(torch.isfinite(out.hidden_states).all())
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    for name, param in layer.named_parameters():
        assert param.grad is not None and bool(torch.isfinite(param.grad).all()), name


def _experts_hand_on(layer: MoELayer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the experts module hands on in one training step: its output, the gradients it
    returns to its inputs, and its group offsets."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            seen[name] = grad.detach().clone()

        return hook

    def forward_hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        x_sorted, offsets, row_weights = args
        seen["output"], seen["offsets"] = out.detach().clone(), offsets.clone()
        x_sorted.register_hook(keep("grad x_sorted"))
        row_weights.register_hook(keep("grad row_weights"))

    handle = layer.experts.register_forward_hook(forward_hook)
    try:
        out = layer(x)
        (out.hidden_states.square().sum() + out.routing.aux_loss).backward()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mode", ["complexity", "top_p"])
def test_experts_hand_on_no_uninitialised_rows(
    poisoned_allocator: None, device: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fresh buffers read as NaN: a row the grouped matmul leaves unwritten shows up.
    force_padded_path(monkeypatch)  # CUDA's path, with rows past the last group, on the CPU too
    torch.manual_seed(13)
    # "reference": on CUDA, "auto" trains on the active-pair kernels (tests/kernels).
    config = tiny_config(min_k=1, max_k=3, mode=mode, top_p=0.6)
    layer = MoELayer(config, implementation="reference").to(device)
    x = torch.randn(48, 16, device=device, requires_grad=True)
    seen = _experts_hand_on(layer, x)
    end = int(seen["offsets"][-1])
    assert end < seen["output"].shape[0]  # padding rows exist
    for name in ("output", "grad x_sorted", "grad row_weights"):
        tensor = seen[name]
        assert bool(torch.isfinite(tensor).all()), name
        assert bool((tensor[end:] == 0).all()), name
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    for name, param in layer.named_parameters():
        assert param.grad is not None and bool(torch.isfinite(param.grad).all()), name


# --------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", ["complexity", "top_p"])
def test_cuda_forward_makes_no_host_sync(dtype: torch.dtype, mode: str) -> None:
    cfg = RouterConfig(
        hidden_size=256,
        num_experts=16,
        min_k=1,
        max_k=4,
        expert_hidden_size=512,
        mode=mode,
        capacity_factor=1.25,
    )
    layer = MoELayer(cfg).to("cuda", dtype)
    x = torch.randn(4, 128, 256, device="cuda", dtype=dtype)
    layer(x)  # warm-up: first-call probes (grouped-mm support) may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x)
        routing = layer.router(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.hidden_states.shape == x.shape
    assert routing.expert_indices.is_cuda
    assert bool(torch.isfinite(out.hidden_states).all())


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    torch.manual_seed(11)
    layer = MoELayer(tiny_config(hidden_size=64, expert_hidden_size=64))
    x = torch.randn(32, 64)
    cpu = layer(x)
    gpu = layer.to("cuda")(x.cuda())
    assert torch.equal(cpu.routing.expert_indices, gpu.routing.expert_indices.cpu())
    torch.testing.assert_close(cpu.hidden_states, gpu.hidden_states.cpu(), rtol=1e-3, atol=1e-3)
