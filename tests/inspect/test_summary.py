"""The inspector's summary: load-balance metrics, rank correlation, alarms."""

from __future__ import annotations

import math

import pytest
import torch

from moe_devkit import MoEModel, RouterConfig, StaticTopKRouter
from moe_devkit.inspect import InspectorConfig, RouterInspector
from moe_devkit.inspect.summary import balance_metrics, binned_spearman


def test_balance_metrics_hand_computed() -> None:
    m = balance_metrics(torch.tensor([6, 2, 0, 0]).numpy())
    assert m["shares"] == pytest.approx([0.75, 0.25, 0.0, 0.0])
    assert m["max_over_mean"] == pytest.approx(3.0)
    assert m["max_vio"] == pytest.approx(2.0)
    assert m["cv"] == pytest.approx(math.sqrt(((6 - 2) ** 2 + 0 + 4 + 4) / 4) / 2)
    assert m["dead_experts"] == [2, 3]
    # Gini of (0, 0, 2, 6): sum_i (2i - n - 1) x_i / (n sum x) = (3*2 + 5*... ) computed directly:
    xs = [0, 0, 2, 6]
    gini = sum(abs(a - b) for a in xs for b in xs) / (2 * 4 * sum(xs))
    assert m["gini"] == pytest.approx(gini)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4)
    assert m["entropy"] == pytest.approx(entropy)


def test_binned_spearman_matches_rank_correlation() -> None:
    joint = torch.tensor([[3, 1, 0], [0, 2, 2], [0, 0, 4]]).numpy()
    xs, ys = [], []
    for i in range(3):
        for j in range(3):
            xs += [i] * int(joint[i, j])
            ys += [j] * int(joint[i, j])

    def ranks(v: list[int]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        return torch.tensor([(t < x).sum() + ((t == x).sum() + 1) / 2 for x in t])

    rx, ry = ranks(xs), ranks(ys)
    expected = float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])
    assert binned_spearman(joint) == pytest.approx(expected)
    assert math.isnan(binned_spearman(torch.tensor([[5, 0], [0, 0]]).numpy()))


def test_collapse_dead_experts_and_nonfinite_alarms() -> None:
    config = RouterConfig(hidden_size=4, num_experts=4, min_k=1, max_k=1)
    router = StaticTopKRouter(config, k=1)
    with torch.no_grad():
        router.router_network.weight.copy_(
            torch.tensor([[5.0] * 4, [0.0] * 4, [0.0] * 4, [0.0] * 4])
        )
    x = torch.rand(32, 4) + 0.1
    x[0, 0] = float("nan")
    inspector = RouterInspector(config=InspectorConfig(window=2, dead_window_steps=2))
    with inspector.attach(router):
        for _ in range(4):
            router(x)
    codes = {f.code: f for f in inspector.summary().findings}
    assert codes["routing-collapse"].severity == "error"
    assert "expert 0" in codes["routing-collapse"].message
    assert codes["dead-experts"].details["experts"] == [1, 2, 3]
    assert "3 of 4 experts got no token in the last 2 steps" in codes["dead-experts"].message
    assert codes["nonfinite-tokens"].details["tokens"] == 4


def test_dead_experts_of_a_short_run_name_the_steps_seen() -> None:
    config = RouterConfig(hidden_size=4, num_experts=4, min_k=1, max_k=1)
    router = StaticTopKRouter(config, k=1)
    with torch.no_grad():
        router.router_network.weight.copy_(torch.tensor([[5.0] * 4] + [[0.0] * 4] * 3))
    inspector = RouterInspector()  # dead_window_steps=50, more than the run
    with inspector.attach(router):
        router(torch.rand(8, 4) + 0.1)
    (dead,) = [f for f in inspector.summary().findings if f.code == "dead-experts"]
    assert "3 of 4 experts got no token in all 1 step(s)" in dead.message


def test_k_drift_alarm() -> None:
    inspector = RouterInspector(config=InspectorConfig(window=2, drift_k=0.5))
    indices = torch.tensor([[0, 1, 2], [1, 2, 3]])
    for k in (1, 1, 1, 1, 3, 3):
        ks = torch.full((2,), k)
        idx = torch.where(torch.arange(3) < k, indices, -1)
        inspector.inspect_routing_decision(torch.zeros(2, 8), torch.rand(2), ks, idx, num_experts=4)
    drift = [f for f in inspector.summary().findings if f.code == "mean-k-drift"]
    assert len(drift) == 1
    assert drift[0].details["first"] == 1.0 and drift[0].details["last"] == 3.0


def test_clean_balanced_run_raises_no_alarm() -> None:
    torch.manual_seed(0)
    config = RouterConfig(hidden_size=16, num_experts=4, max_k=2, expert_hidden_size=16)
    model = MoEModel(config, num_layers=2)
    with torch.no_grad(), RouterInspector(model, InspectorConfig(window=5)) as inspector:
        for _ in range(10):
            model(torch.randn(4, 32, 16))
    assert inspector.summary().findings == ()
