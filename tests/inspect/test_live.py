"""Live metrics (``RouterInspector.metrics``) and alarms (``check_alarms``) over windows."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import hf_zoo

from moe_devkit import MoEModel, RouterConfig
from moe_devkit.diagnostics.findings import Finding
from moe_devkit.inspect import InspectorConfig, RouterInspector
from moe_devkit.inspect.live import (
    LAYER_METRIC_KEYS,
    METRIC_KEYS,
    RoutingAlarm,
    RoutingAlarmError,
)
from moe_devkit.routers.torch_router import RoutingDecision

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(layers: int = 2, experts: int = 8, **kwargs: Any) -> MoEModel:
    torch.manual_seed(0)
    config = RouterConfig(
        hidden_size=16,
        num_experts=experts,
        min_k=1,
        max_k=2,
        expert_hidden_size=16,
        complexity_hidden_size=8,
        **kwargs,
    )
    return MoEModel(config, num_layers=layers).eval()


def _tiny_mixtral(layers: int = 2) -> torch.nn.Module:
    config = hf_zoo.tiny_config("mixtral")
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model: torch.nn.Module = hf_zoo.model_class(config)(config).float().eval()
    return model


def _tokens(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (2, 16), generator=generator)


def _hidden(seed: int) -> torch.Tensor:
    return torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- keys


def test_the_key_set_is_fixed_whatever_the_layers_and_experts() -> None:
    small = _tiny_mixtral(layers=2)  # 2 layers x 8 experts
    big = _reference(layers=24, experts=64)  # 24 layers x 64 experts
    before = RouterInspector().metrics()  # nothing recorded yet
    assert list(before) == [f"moe/{key}" for key in METRIC_KEYS]
    assert before["moe/steps"] == 0.0 and math.isnan(before["moe/tokens"])
    keys = []
    with torch.no_grad():
        with RouterInspector().attach(small) as inspector:
            small(_tokens(0))
            assert len(inspector.layers) == 2
            assert {s.num_experts for s in inspector.layers.values()} == {8}
            keys.append(list(inspector.metrics()))
            small(_tokens(1))
            keys.append(list(inspector.metrics()))
        with RouterInspector().attach(big) as inspector:
            big(_hidden(0))
            assert len(inspector.layers) == 24
            assert {s.num_experts for s in inspector.layers.values()} == {64}
            keys.append(list(inspector.metrics()))
            empty = inspector.metrics()  # a window with no step
    expected = [f"moe/{key}" for key in METRIC_KEYS]
    assert keys == [expected] * 3
    assert list(empty) == expected
    assert empty["moe/steps"] == 0.0
    assert math.isnan(empty["moe/mean_k"]) and math.isnan(empty["moe/cv_p50"])
    assert all(type(v) is float for v in empty.values())


def test_opt_in_keys_are_bounded() -> None:
    model = _reference(layers=3, experts=8)
    with torch.no_grad(), RouterInspector().attach(model) as inspector:
        model(_hidden(0))
        values = inspector.metrics("x/", per_layer=True, top_experts=4)
    layer_keys = [k for k in values if k.startswith("x/layer/")]
    assert len(layer_keys) == 3 * len(LAYER_METRIC_KEYS)
    assert "x/layer/layers.0.moe.router/cv" in values
    experts = {k: v for k, v in values.items() if k.startswith("x/expert_share/")}
    assert len(experts) == 8  # the 4 most and the 4 least loaded of the 24 (layer, expert)
    shares = sorted(experts.values())
    assert len(values) == len(METRIC_KEYS) + len(layer_keys) + 8
    with pytest.raises(ValueError, match="top_experts"):
        inspector.metrics(top_experts=-1)
    summary = inspector.summary()
    all_shares = sorted(
        s for layer in summary.layers.values() for s in layer["utilization"]["shares"]
    )
    assert shares[:4] == pytest.approx(all_shares[:4], rel=1e-5)
    assert shares[4:] == pytest.approx(all_shares[-4:], rel=1e-5)


# ----------------------------------------------------------------------------- values


def _expected(decisions: list[list[RoutingDecision]]) -> dict[str, float]:
    """The window's metrics from the model's own outputs (decisions[step][layer])."""
    layers = len(decisions[0])
    counts, ks, tokens, selected, dropped, nonfinite = [], [], [], [], [], []
    for layer in range(layers):
        ds = [step[layer] for step in decisions]
        indices = torch.cat([d.expert_indices for d in ds])
        drop = torch.cat([d.dropped for d in ds])
        experts = ds[0].num_experts
        ran = (indices >= 0) & ~drop
        counts.append(torch.bincount(indices[ran], minlength=experts).double().numpy())
        ks.append(ran.sum(dim=1).double().numpy())
        tokens.append(indices.shape[0])
        selected.append(int((indices >= 0).sum()))
        dropped.append(int((drop & (indices >= 0)).sum()))
        nonfinite.append(int(torch.cat([d.nonfinite for d in ds]).sum()))

    def entropy(c: np.ndarray) -> float:
        p = c[c > 0] / c.sum()
        return float(-(p * np.log(p)).sum() / math.log(len(c)))

    entropies = [entropy(c) for c in counts]
    shares = [float(c.max() / c.sum()) for c in counts]
    cvs = [float(c.std() / c.mean()) for c in counts]
    vios = [float(c.max() / c.mean() - 1) for c in counts]
    all_k = np.concatenate(ks)
    lb = [float(step[i].load_balancing_loss) for step in decisions for i in range(layers)]
    z = [float(step[i].z_loss) for step in decisions for i in range(layers)]
    experts_total = sum(len(c) for c in counts)
    return {
        "steps": float(len(decisions)),
        "tokens": float(np.mean(tokens)),
        "routing_entropy_mean": float(np.mean(entropies)),
        "routing_entropy_min": min(entropies),
        "max_expert_share_mean": float(np.mean(shares)),
        "max_expert_share_max": max(shares),
        "active_expert_fraction": sum(int((c / c.sum() >= 0.5 / len(c)).sum()) for c in counts)
        / experts_total,
        "dead_expert_fraction": sum(int((c == 0).sum()) for c in counts) / experts_total,
        "mean_k": float(all_k.mean()),
        "k_std": float(all_k.std()),
        "load_balancing_loss": float(np.mean(lb)),
        "z_loss": float(np.mean(z)),
        "dropped_pair_rate": sum(dropped) / sum(selected),
        "nonfinite_token_rate": sum(nonfinite) / len(all_k),
        "cv_p50": float(np.percentile(cvs, 50)),
        "cv_p90": float(np.percentile(cvs, 90)),
        "max_vio_p50": float(np.percentile(vios, 50)),
        "max_vio_p90": float(np.percentile(vios, 90)),
    }


def test_values_equal_the_model_outputs_of_the_window_steps() -> None:
    """Each window's values equal those computed from the routing decisions the model
    returned in the window's steps (a capacity limit, so pairs are dropped, and a NaN)."""
    model = _reference(layers=5, experts=8, capacity_factor=1.0)
    inspector = RouterInspector().attach(model)
    windows: list[list[list[RoutingDecision]]] = [[], [], []]
    with torch.no_grad():
        for window, steps in zip(windows, (3, 4, 2), strict=True):
            for _ in range(steps):
                x = _hidden(len(window) + 10 * steps)
                if window is windows[1]:
                    x[0, 0, 0] = math.nan
                window.append(list(model(x).routings))
            got = inspector.metrics(prefix="")
            want = _expected(window)
            first = _expected(windows[0])["mean_k"]
            want["k_drift"] = want["mean_k"] - first
            assert set(got) == set(want)
            assert all(type(v) is float for v in got.values())
            for key, value in want.items():
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    inspector.detach()
    assert _expected(windows[1])["dropped_pair_rate"] > 0
    assert _expected(windows[1])["nonfinite_token_rate"] > 0
    assert _expected(windows[2])["nonfinite_token_rate"] == 0


def test_values_equal_a_summary_of_only_the_window_steps() -> None:
    """On a transformers MoE model: the window's balance figures and k equal the summary
    of a second inspector attached for the window's steps only."""
    model = _tiny_mixtral(layers=3)
    inspector = RouterInspector().attach(model)
    with torch.no_grad():
        for step in range(3):
            model(_tokens(step))
        inspector.metrics()
        fresh = RouterInspector().attach(model)
        for step in range(3, 7):
            model(_tokens(step))
        got = inspector.metrics(per_layer=True)
    fresh.detach()
    inspector.detach()
    summary = fresh.summary()
    assert got["moe/steps"] == 4.0
    cvs, vios = [], []
    for name, layer in summary.layers.items():
        util = layer["utilization"]
        assert got[f"moe/layer/{name}/cv"] == pytest.approx(util["cv"], rel=1e-5)
        assert got[f"moe/layer/{name}/max_vio"] == pytest.approx(util["max_vio"], rel=1e-5)
        assert got[f"moe/layer/{name}/routing_entropy"] == pytest.approx(util["entropy"], rel=1e-5)
        assert got[f"moe/layer/{name}/mean_k"] == pytest.approx(layer["k"]["mean"])
        assert got[f"moe/layer/{name}/tokens"] == layer["tokens"]
        cvs.append(util["cv"])
        vios.append(util["max_vio"])
    assert got["moe/cv_p50"] == pytest.approx(float(np.percentile(cvs, 50)), rel=1e-5)
    assert got["moe/max_vio_p90"] == pytest.approx(float(np.percentile(vios, 90)), rel=1e-5)
    lb = [layer["losses"]["load_balancing_mean"] for layer in summary.layers.values()]
    assert got["moe/load_balancing_loss"] == pytest.approx(float(np.mean(lb)), rel=1e-6)


# ----------------------------------------------------------------------------- host reads


@contextlib.contextmanager
def _counting(names: tuple[str, ...] = ("cpu", "item", "tolist")) -> Iterator[dict[str, int]]:
    calls = dict.fromkeys(names, 0)
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def counted(name: str) -> Any:
        def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return saved[name](self, *args, **kwargs)

        return method

    try:
        for name in names:
            setattr(torch.Tensor, name, counted(name))
        yield calls
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@contextlib.contextmanager
def _no_host_reads() -> Iterator[None]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a tensor value was read on the host")

    names = ("item", "tolist", "cpu", "numpy")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, refuse)
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_one_host_transfer_per_call_and_none_during_the_forwards() -> None:
    model = _reference(layers=6, experts=16)
    inspector = RouterInspector().attach(model)
    with torch.no_grad():
        model(_hidden(0))  # the first decision of each layer is checked once on the host
        for call in range(3):
            with _no_host_reads():
                for step in range(2):
                    model(_hidden(10 * call + step))
            with _counting() as calls:
                values = inspector.metrics(per_layer=True, top_experts=3)
            assert calls == {"cpu": 1, "item": 0, "tolist": 0}
            assert values["moe/steps"] == (3.0 if call == 0 else 2.0)
            with _counting() as calls:
                inspector.signals.host_state()
            signals_reads = dict(calls)
            with _counting() as calls:
                inspector.check_alarms(on_alarm=lambda found: None)
            assert calls == signals_reads  # the layers' window is the one metrics() read
    with _counting() as calls:
        inspector.check_alarms(on_alarm=lambda found: None)  # no metrics() before: one read
    assert calls["cpu"] == signals_reads["cpu"] + 1
    inspector.detach()


# ----------------------------------------------------------------------------- alarms


def _collapse(gate: torch.nn.Module) -> None:
    """Every token gets the same router logits: each picks the same experts."""
    with torch.no_grad():
        gate.weight.zero_()


def test_a_planted_collapse_raises_at_the_first_check_after_it() -> None:
    """A transformers model run for 20 steps, checked every 5 (a logging step): the router
    of layer 1 is forced at step 10; the check at step 15 raises, those before do not."""
    model = _tiny_mixtral(layers=3)
    gate = model.model.layers[1].mlp.gate  # type: ignore[union-attr,index]
    inspector = RouterInspector().attach(model)
    raised_at = []
    with torch.no_grad():
        for step in range(1, 21):
            if step == 11:
                _collapse(gate)
            model(_tokens(step))
            if step % 5 == 0:
                try:
                    inspector.check_alarms(on_alarm="raise")
                except RoutingAlarmError as error:
                    raised_at.append(step)
                    codes = {(f.code, f.location) for f in error.findings}
                    assert ("routing-collapse", "model.layers.1.mlp.gate") in codes
                    assert all(f.step == 15 for f in error.findings)
                    assert "routing-collapse" in str(error)
    inspector.detach()
    assert raised_at == [15]  # at 20 the collapse goes on: the same episode, no second alarm
    # over all 20 steps, half of them healthy, the run's summary does not see it
    assert "routing-collapse" not in {f.code for f in inspector.summary().findings}


def test_each_finding_fires_once_per_episode() -> None:
    model = _reference(layers=2, experts=8)
    router = model.layers[0].moe.router
    weights = router.router_network.weight.detach().clone()
    inspector = RouterInspector().attach(model)
    fired: list[list[Finding]] = []

    def run(steps: int, seed: int) -> list[Finding]:
        with torch.no_grad():
            for step in range(steps):
                model(_hidden(seed + step))
        found = inspector.check_alarms(on_alarm=fired.append)
        return [f for f in found if f.code == "routing-collapse"]

    assert run(3, 0) == []  # healthy
    _collapse(router.router_network)
    first = run(3, 10)
    assert [f.location for f in first] == ["layers.0.moe.router"]
    assert run(3, 20) == []  # still collapsed: quiet
    assert run(3, 30) == []
    with torch.no_grad():
        router.router_network.weight.copy_(weights)
    assert run(3, 40) == []  # recovered
    _collapse(router.router_network)
    again = run(3, 50)
    assert [f.location for f in again] == ["layers.0.moe.router"]  # a new episode
    assert [f.code for found in fired for f in found].count("routing-collapse") == 2
    inspector.detach()


def test_warn_is_the_default_and_bad_modes_are_refused() -> None:
    model = _reference(layers=1, experts=4)
    _collapse(model.layers[0].moe.router.router_network)
    inspector = RouterInspector().attach(model)
    with torch.no_grad():
        model(_hidden(0))
    with pytest.raises(ValueError, match="on_alarm"):
        inspector.check_alarms(on_alarm="print")  # type: ignore[arg-type]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = inspector.check_alarms()
    assert "routing-collapse" in {f.code for f in found}
    alarms = [w for w in caught if issubclass(w.category, RoutingAlarm)]
    assert len(alarms) == len(found)
    assert any("routing-collapse" in str(w.message) for w in alarms)
    inspector.detach()


def test_drift_dead_experts_and_drops_are_checked_per_window() -> None:
    config = InspectorConfig(dead_window_steps=4, drift_k=0.3)
    model = _reference(layers=1, experts=8, capacity_factor=0.5)
    inspector = RouterInspector(config=config).attach(model)
    router = model.layers[0].moe.router
    with torch.no_grad():
        for step in range(4):
            model(_hidden(step))
        codes = {f.code for f in inspector.check_alarms(on_alarm=lambda found: None)}
        assert "dropped-pairs" in codes
        assert "mean-k-drift" not in codes  # the first window is the baseline
        router.router_network.weight.zero_()  # the same experts for every token
        for step in range(4, 9):
            model(_hidden(step))
        found = inspector.check_alarms(on_alarm=lambda found: None)
    inspector.detach()
    codes = {f.code for f in found}
    assert "dead-experts" in codes
    dead = next(f for f in found if f.code == "dead-experts")
    assert "the last" in dead.message and "steps" in dead.message


def test_mean_k_drift_fires_against_the_first_window() -> None:
    config = InspectorConfig(drift_k=0.3)
    model = _reference(layers=1, experts=8)
    estimator = model.layers[0].moe.router.complexity_estimator
    assert estimator is not None
    inspector = RouterInspector(config=config).attach(model)
    with torch.no_grad():
        for step in range(3):
            model(_hidden(step))
        first = inspector.metrics()
        assert first["moe/k_drift"] == 0.0
        assert "mean-k-drift" not in {
            f.code for f in inspector.check_alarms(on_alarm=lambda found: None)
        }
        estimator.fc2.bias.fill_(30.0)  # complexity 1: every token takes max_k = 2 experts
        for step in range(3, 6):
            model(_hidden(step))
        later = inspector.metrics()
        found = inspector.check_alarms(on_alarm=lambda found: None)
    inspector.detach()
    assert later["moe/mean_k"] == 2.0
    assert later["moe/k_drift"] == pytest.approx(2.0 - first["moe/mean_k"])
    assert later["moe/k_drift"] > 0.3
    drift = [f for f in found if f.code == "mean-k-drift"]
    assert [f.location for f in drift] == ["layers.0.moe.router"]
    assert drift[0].details["last"] == 2.0


def test_the_aux_loss_liveness_check_fires_once() -> None:
    """A transformers model trained without output_router_logits returns no aux loss: the
    model-signal finding fires at the first check and stays quiet at the next ones."""
    model = _tiny_mixtral(layers=2).train()
    inspector = RouterInspector().attach(model)
    fired: list[str] = []
    with torch.no_grad():
        for step in range(6):
            model(_tokens(step))
            if step % 2 == 1:
                found = inspector.check_alarms(on_alarm=lambda found: None)
                fired += [f.code for f in found if f.code.startswith("aux-loss")]
    inspector.detach()
    assert fired == ["aux-loss-missing"]
