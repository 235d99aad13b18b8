"""RouterInspector: hooks that change nothing, exact statistics, bounded memory, alarms."""

from __future__ import annotations

import gc
import math

import pytest
import torch

from moe_devkit import MoELayer, MoEModel, RouterConfig, StaticTopKRouter
from moe_devkit.inspect import InspectorConfig, RouterInspector
from moe_devkit.inspect.inspector import decision_from_tensors
from moe_devkit.inspect.report import balance_metrics, binned_spearman
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


def test_memory_stays_bounded_over_100k_steps() -> None:
    config = InspectorConfig(window=4, max_windows=8, reservoir_size=16, coactivation_every=0)
    inspector = RouterInspector(config=config)
    decision = decision_from_tensors(
        torch.rand(4), torch.tensor([1, 2, 1, 2]), torch.tensor([[0, -1], [1, 2], [3, -1], [0, 1]])
    )

    def footprint() -> int:
        state = inspector.layers["manual"]
        tensors = [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    for _ in range(1000):
        inspector.record(decision, layer="manual")
    size_1k = footprint()
    gc.collect()
    objects_1k = len(gc.get_objects())
    for _ in range(99_000):
        inspector.record(decision, layer="manual")
    gc.collect()
    assert footprint() == size_1k
    assert len(gc.get_objects()) - objects_1k < 100  # no per-step Python objects retained
    state = inspector.layers["manual"]
    assert state.steps == 100_000 and len(state.snapshot_steps) <= 8
    summary = inspector.summary().layers["manual"]
    assert summary["k"]["histogram"] == [0, 200_000, 200_000]


def test_reservoir_samples_the_tokens_of_every_nth_step() -> None:
    config = InspectorConfig(reservoir_every=3, reservoir_size=64, coactivation_every=0)
    inspector = RouterInspector(config=config)
    for step in range(7):
        complexity = torch.full((4,), step / 10)
        indices = torch.tensor([[0, -1], [1, 2], [3, -1], [0, 1]])
        decision = decision_from_tensors(complexity, torch.tensor([1, 2, 1, 2]), indices)
        inspector.record(decision, layer="manual")
    sample = inspector.summary().layers["manual"]["sample"]
    assert sorted(sample["complexity"]) == [0.0] * 4 + [0.3] * 4 + [0.6] * 4  # steps 0, 3, 6
    with pytest.raises(ValueError, match="reservoir_every"):
        InspectorConfig(reservoir_every=0)


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
    model = small_model(num_experts=4, max_k=2)
    with torch.no_grad(), RouterInspector(model, InspectorConfig(window=5)) as inspector:
        for _ in range(10):
            model(torch.randn(4, 32, 16))
    assert inspector.summary().findings == ()


def test_manual_api_returns_the_seed_statistics() -> None:
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


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager_updates() -> None:
    config = RouterConfig(hidden_size=64, num_experts=8, max_k=4, expert_hidden_size=64)
    model = MoEModel(config, num_layers=1).to("cuda")
    graphed = RouterInspector(config=InspectorConfig(window=3, coactivation_every=2))
    eager = RouterInspector(  # PyTorch ops, no graph, no Triton kernel
        config=InspectorConfig(window=3, coactivation_every=2, cuda_graphs=False, triton=False)
    )
    same_stream = RouterInspector(  # graphs replayed on the model's stream
        config=InspectorConfig(window=3, coactivation_every=2, side_stream=False)
    )
    for inspector in (graphed, eager, same_stream):
        inspector.attach(model)
    with torch.no_grad():
        for step in range(9):
            tokens = 128 if step % 3 else 96  # two shapes: two captured graphs
            model(torch.randn(tokens, 64, device="cuda") * (1 + step))
    b = eager.summary().layers["layers.0.moe.router"]
    for other in (graphed, same_stream):
        a = other.summary().layers["layers.0.moe.router"]
        for key in ("utilization", "k", "coactivation", "windows", "sample", "tokens", "steps"):
            assert a[key] == b[key], key
        assert a["complexity"]["mean"] == pytest.approx(b["complexity"]["mean"])
        assert a["complexity"]["std"] == pytest.approx(b["complexity"]["std"])


def test_deferred_steps_fold_to_the_same_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """With defer_steps=16, hooks defer up to 16 steps on CUDA and fold them in one pass; the
    CPU run here forces that path (graph replays run eagerly) and compares with step-by-step
    folding."""
    from moe_devkit.inspect.inspector import LayerState

    def eager_replay(self: LayerState, inputs: tuple, flags: tuple) -> None:
        self._update_tensors(*inputs, coactivation=flags[0], sample=flags[1])

    monkeypatch.setattr(LayerState, "_replay", eager_replay)
    config = InspectorConfig(window=5, coactivation_every=3, reservoir_every=4, defer_steps=16)
    deferred, direct = RouterInspector(config=config), RouterInspector(config=config)
    generator = torch.Generator().manual_seed(0)
    for step in range(23):
        n = 6 + step % 3  # steps of different sizes are concatenated
        k = torch.randint(0, 3, (n,), generator=generator)
        indices = torch.randint(0, 5, (n, 2), generator=generator)
        indices = torch.where(torch.arange(2) < k[:, None], indices, -1)
        decision = decision_from_tensors(torch.rand(n, generator=generator), k, indices, 5)
        for inspector, defer in ((deferred, True), (direct, False)):
            inspector.record(decision, layer="l", defer=defer)
            inspector.layers["l"].graphed = True  # the CUDA path, on the CPU
        if step == 10:
            assert 0 < len(deferred.layers["l"]._deferred) <= 16  # steps wait to be folded
    a, b = deferred.summary().layers["l"], direct.summary().layers["l"]
    assert deferred.layers["l"]._deferred == []  # summary() folded the rest
    for key in ("utilization", "k", "coactivation", "windows", "sample", "tokens", "steps"):
        assert a[key] == b[key], key
    assert a["complexity"]["mean"] == pytest.approx(b["complexity"]["mean"])
    assert a["losses"] == pytest.approx(b["losses"])


@pytest.mark.parametrize("name", ["reservoir_every", "defer_steps"])
@pytest.mark.parametrize("value", [0, True, 1.5])
def test_config_rejects_bad_step_counts(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be an int >= 1; got {name}={value!r}"):
        InspectorConfig(**{name: value})  # type: ignore[arg-type]


def test_decision_from_tensors_checks_its_values() -> None:
    c = torch.rand(2)
    with pytest.raises(ValueError, match=r"expert_indices must hold whole numbers; got 0\.7"):
        decision_from_tensors(c, torch.tensor([1, 1]), torch.tensor([[0.7], [1.0]]))
    with pytest.raises(TypeError, match=r"expert_indices must be an integer tensor; got dtype"):
        decision_from_tensors(c, torch.tensor([1, 1]), torch.tensor([[True], [False]]))
    with pytest.raises(ValueError, match=r"k_values must hold whole numbers; got 1\.5"):
        decision_from_tensors(c, torch.tensor([1.5, 1.0]), torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match=r"got k=2 for token 1, which has 1"):
        decision_from_tensors(c, torch.tensor([2, 2]), torch.tensor([[0, 1], [2, -1]]))
    with pytest.raises(ValueError, match=r"got k=-1 for token 0"):
        decision_from_tensors(c, torch.tensor([-1, 1]), torch.tensor([[0, 1], [2, -1]]))
    whole = decision_from_tensors(
        c, torch.tensor([1.0, 2.0]), torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    )
    assert whole.expert_indices.tolist() == [[0, -1], [2, 3]]  # token 0 keeps its first choice
    assert whole.k_per_token.tolist() == [1, 2]
