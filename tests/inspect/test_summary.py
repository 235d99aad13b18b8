"""The inspector's summary: load-balance metrics, rank correlation, alarms."""

from __future__ import annotations

import math
from typing import Any

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


# ----------------------------------------------------------------------------- model signals


def _aux_state(model: list[Any], inspector: list[Any], **over: Any) -> Any:
    """A ModelSignals aux-loss state (host_state()["aux_loss"]) over len(model) forwards."""
    values = [v for v in model if v is not None]
    mine = [v for v in inspector if v is not None]
    state = {
        "model_type": "Tiny",
        "router_aux_loss_coef": 0.01,
        "output_router_logits": True,
        "moe_layers": 2,
        "steps": len(model),
        "training_steps": len(model),
        "status": {"value": len(values), "none": len(model) - len(values), "absent": 0},
        "definition": "transformers",
        "output_type": "MoeCausalLMOutputWithPast",
        "min_max": {
            "model": [min(values, default=None), max(values, default=None)],
            "inspector": [min(mine, default=None), max(mine, default=None)],
        },
        "history": {"steps": list(range(len(model))), "model": model, "inspector": inspector},
    }
    state.update(over)
    return state


def _codes_of(signals: dict[str, Any]) -> dict[str, Any]:
    from moe_devkit.inspect.summary import summarize

    summary = summarize([], InspectorConfig(), signals=signals)
    return {f.code: f for f in summary.findings}


def test_aux_loss_mismatch_fires_beyond_the_tolerance_only() -> None:
    from moe_devkit.inspect.summary import AUX_LOSS_RTOL

    inspector = [2.0, 2.1, 2.2]
    close = [v * (1 + AUX_LOSS_RTOL / 2) for v in inspector]
    far = [v * (1 + 2 * AUX_LOSS_RTOL) for v in inspector]
    assert "aux-loss-mismatch" not in _codes_of({"aux_loss": _aux_state(close, inspector)})
    finding = _codes_of({"aux_loss": _aux_state(far, inspector)})["aux-loss-mismatch"]
    assert finding.details["ratio"] == pytest.approx(1 + 2 * AUX_LOSS_RTOL)
    assert finding.details["model"] == pytest.approx(sum(far) / 3)
    assert "multiplied by" not in finding.message  # 1.04 is no whole factor
    halved = _codes_of({"aux_loss": _aux_state([v / 2 for v in inspector], inspector)})
    assert "divided by 2" in halved["aux-loss-mismatch"].message
    zero = _codes_of({"aux_loss": _aux_state([0.0, 0.0, 0.0], inspector)})["aux-loss-mismatch"]
    assert zero.details["ratio"] == 0.0 and "the model's loss is 0" in zero.message
    # A loss of the model's own definition (not a transformers output) is not compared.
    own = _aux_state(far, inspector, definition="model")
    assert "aux-loss-mismatch" not in _codes_of({"aux_loss": own})


def test_summary_without_signals_has_no_signal_entries() -> None:
    from moe_devkit.inspect.summary import summarize

    cases: list[dict[str, Any] | None] = [None, {}, {"aux_loss": None, "selection_bias": {}}]
    for signals in cases:
        summary = summarize([], InspectorConfig(), signals=signals)
        assert summary.aux_loss is None and summary.findings == ()
        assert "aux_loss" not in summary.to_report()["sections"]["routing"]


def _bias_state(abs_max: list[Any], flips: list[Any], change: float = 0.1) -> Any:
    steps = list(range(len(abs_max)))
    return {
        "tensor": "gate.e_score_correction_bias",
        "num_experts": 8,
        "steps": len(steps),
        "first": {"abs_max": abs_max[0]},
        "max_abs_max": max(abs_max),
        "max_flip_fraction": max((f for f in flips if f is not None), default=None),
        "max_step_change": change,
        "history": {
            "steps": steps,
            "abs_max": abs_max,
            "mean": [0.0] * len(steps),
            "std": [0.0] * len(steps),
            "range": [0.0] * len(steps),
            "flip_fraction": flips,
        },
    }


def _bias_codes(bias: dict[str, Any], training: bool = True) -> set[str]:
    from moe_devkit.inspect.summary import _bias_summary, bias_alarms

    aux = {"training_steps": 3 if training else 0}
    return {f.code for f in bias_alarms("layer", _bias_summary(bias), {"aux_loss": aux})}


def test_bias_alarm_thresholds() -> None:
    from moe_devkit.inspect.summary import BIAS_FLIP_LIMIT, BIAS_SATURATION

    flat = [0.5] * 12
    assert _bias_codes(_bias_state(flat, [None] + [BIAS_FLIP_LIMIT - 0.05] * 11)) == set()
    oscillating = _bias_state(flat, [None] + [BIAS_FLIP_LIMIT + 0.05] * 11)
    assert _bias_codes(oscillating) == {"selection-bias-oscillating"}
    growing = _bias_state([0.1 * i for i in range(1, 13)], [None] + [0.0] * 11)
    assert _bias_codes(growing) == {"selection-bias-saturated", "selection-bias-growing"}
    below = _bias_state([BIAS_SATURATION * 0.99] * 12, [None] + [0.0] * 11)
    assert _bias_codes(below) == set()
    frozen = _bias_state(flat, [None] + [0.0] * 11, change=0.0)
    assert _bias_codes(frozen) == {"selection-bias-frozen"}
    assert _bias_codes(frozen, training=False) == set()  # an eval run never updates it
