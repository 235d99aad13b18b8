"""RouterInspector: hooks that change nothing, exact statistics, the manual API, no host sync."""

from __future__ import annotations

import pytest
import torch

from moe_devkit import MoELayer, MoEModel, RouterConfig
from moe_devkit.inspect import InspectorConfig, RouterInspector
from moe_devkit.routers.torch_router import expert_counts


def small_model(layers: int = 2, **overrides: object) -> MoEModel:
    base: dict[str, object] = dict(hidden_size=16, num_experts=6, max_k=3, expert_hidden_size=16)
    base.update(overrides)
    torch.manual_seed(0)
    return MoEModel(RouterConfig(**base), num_layers=layers)  # type: ignore[arg-type]


def test_attach_and_detach_leave_outputs_bit_identical() -> None:
    model = small_model()
    x = torch.randn(3, 8, 16)
    before = model(x).hidden_states
    inspector = RouterInspector().attach(model)
    during = model(x).hidden_states
    inspector.detach()
    after = model(x).hidden_states
    assert torch.equal(before, during) and torch.equal(before, after)
    assert inspector.layers["layers.0.moe.router"].steps == 1
    assert all(not m._forward_hooks for m in model.modules())


def test_statistics_equal_direct_computation() -> None:
    model = small_model()
    decisions: list = []
    config = InspectorConfig(coactivation_every=1)
    with torch.no_grad(), RouterInspector(model, config) as inspector:
        for step in range(7):
            decisions.append(model(torch.randn(2, 10, 16) * (1 + step)).routings)
    summary = inspector.summary()
    for layer_index, name in enumerate(["layers.0.moe.router", "layers.1.moe.router"]):
        layer = summary.layers[name]
        mine = [step[layer_index] for step in decisions]
        counts = sum(expert_counts(d.expert_indices, 6) for d in mine)
        assert layer["utilization"]["counts"] == counts.tolist()
        ks = torch.cat([d.k_per_token for d in mine])
        assert layer["k"]["histogram"] == [int((ks == k).sum()) for k in range(4)]
        assert layer["k"]["mean"] == pytest.approx(float(ks.float().mean()))
        c = torch.cat([d.complexity for d in mine]).double()
        assert layer["complexity"]["mean"] == pytest.approx(float(c.mean()))
        assert layer["complexity"]["std"] == pytest.approx(float(c.std()))
        assert layer["complexity"]["min"] == pytest.approx(float(c.min()))
        lb = sum(float(d.load_balancing_loss) for d in mine) / 7
        assert layer["losses"]["load_balancing_mean"] == pytest.approx(lb)
        co = torch.zeros(6, 6)
        for d in mine:
            for row in d.expert_indices.tolist():
                chosen = [e for e in row if e >= 0]
                for a in chosen:
                    for b in chosen:
                        co[a, b] += 1
        assert layer["coactivation"]["matrix"] == co.long().tolist()
        assert layer["tokens"] == 140 and layer["steps"] == 7


def test_manual_api_returns_the_decision_statistics() -> None:
    inspector = RouterInspector()
    info = inspector.inspect_routing_decision(
        torch.zeros(2, 3, 8),
        torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.4, 0.6]]),
        torch.tensor([[1, 2, 3], [1, 1, 2]]),
        torch.tensor(
            [[[0, -1, -1], [1, 2, -1], [0, 1, 3]], [[2, -1, -1], [3, -1, -1], [0, 3, -1]]]
        ),
    )
    assert info["input_shape"] == (2, 3, 8)
    assert info["k_stats"]["max"] == 3.0 and info["k_stats"]["min"] == 1.0
    assert info["complexity_stats"]["mean"] == pytest.approx(0.45)
    assert inspector.summary().layers["manual"]["utilization"]["counts"] == [3, 2, 2, 3]


@pytest.mark.parametrize(
    ("model", "error", "pattern"),
    [
        ("not a model", TypeError, r"model must be a torch.nn.Module; got str"),
        (
            torch.nn.Linear(2, 2),
            ValueError,
            r"must contain a moe_devkit router .* found none in Linear",
        ),
    ],
)
def test_attach_bad_models(model: object, error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        RouterInspector().attach(model)  # type: ignore[arg-type]


def test_attach_twice_and_bad_manual_shapes() -> None:
    layer = MoELayer(RouterConfig(hidden_size=8, num_experts=4, max_k=2, expert_hidden_size=8))
    inspector = RouterInspector().attach(layer)
    with pytest.raises(ValueError, match="already attached"):
        inspector.attach(layer)
    inspector.detach()
    with pytest.raises(ValueError, match=r"one value per token of expert_indices \(3\)"):
        inspector.inspect_routing_decision(
            torch.zeros(3, 8), torch.rand(2), torch.ones(3), torch.zeros(3, 2, dtype=torch.long)
        )
    with pytest.raises(
        ValueError, match=r"must be in \[-1, num_experts=4\); got values in \[-1, 4\]"
    ):
        inspector.inspect_routing_decision(
            torch.zeros(1, 8), torch.rand(1), torch.ones(1), torch.tensor([[4, -1]]), num_experts=4
        )
    with pytest.raises(ValueError, match="at least one token"):
        inspector.inspect_routing_decision(
            torch.zeros(0, 8), torch.rand(0), torch.ones(0), torch.zeros(0, 2, dtype=torch.long)
        )


@pytest.mark.gpu
def test_cuda_recording_makes_no_host_sync() -> None:
    config = RouterConfig(hidden_size=256, num_experts=16, max_k=4, expert_hidden_size=256)
    model = MoEModel(config, num_layers=2).to("cuda", torch.bfloat16)
    x = torch.randn(4, 256, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), RouterInspector(model, InspectorConfig(window=2)) as inspector:
        model(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(5):
                model(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    layer = inspector.summary().layers["layers.0.moe.router"]
    assert layer["steps"] == 6 and layer["tokens"] == 6 * 1024
