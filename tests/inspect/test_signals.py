"""Model signals: the model's aux loss against the inspector's, and selection biases.

Tiny transformers models built offline from their config classes (Mixtral with
``output_router_logits``, DeepSeek-V3 with ``e_score_correction_bias``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from moe_devkit.inspect import InspectorConfig, RouterInspector
from moe_devkit.inspect.records import RouterSite
from moe_devkit.inspect.signals import (
    HISTORY,
    ModelSignals,
    model_aux_loss,
    selection_bias_candidates,
)
from moe_devkit.inspect.summary import InspectorSummary
from moe_devkit.routers.torch_router import RoutingDecision

transformers = pytest.importorskip("transformers")

VOCAB = 64


def _mixtral(**overrides: Any) -> Any:
    config = transformers.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        **overrides,
    )
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config)


def _deepseek() -> Any:
    config = transformers.DeepseekV3Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=0,
        n_shared_experts=1,
        kv_lora_rank=8,
        q_lora_rank=None,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=4,
    )
    torch.manual_seed(0)
    return transformers.DeepseekV3ForCausalLM(config)


def _tokens(step: int, batch: int = 2, seq: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    return torch.randint(0, VOCAB, (batch, seq), generator=generator)


def _codes(summary: InspectorSummary) -> dict[str, Any]:
    return {f.code: f for f in summary.findings}


# ----------------------------------------------------------------------------- aux loss


def test_mixtral_aux_loss_is_found_and_equals_the_inspectors() -> None:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = _mixtral(output_router_logits=True).train()
    inspector = RouterInspector().attach(model)
    expected = []
    for step in range(4):
        out = model(_tokens(step))
        expected.append(float(load_balancing_loss_func(out.router_logits, 4, 2).detach()))
        assert float(out.aux_loss.detach()) == pytest.approx(expected[-1], rel=1e-6)
    summary = inspector.summary()
    aux = summary.aux_loss
    assert aux is not None
    assert aux["status"] == {"value": 4, "none": 0, "absent": 0, "unreadable": 0}
    assert aux["definition"] == "transformers"
    assert aux["history"]["steps"] == [0, 1, 2, 3]
    assert aux["history"]["model"] == pytest.approx(expected, rel=1e-6)
    assert aux["history"]["inspector"] == pytest.approx(expected, rel=1e-5)
    assert aux["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert not [f for f in summary.findings if f.code.startswith("aux-loss")]
    assert summary.to_report()["sections"]["routing"]["aux_loss"]["compared_steps"] == 4


def test_mixtral_masked_aux_loss_equals_transformers_masked_loss() -> None:
    """With padding, the inspector leaves pad tokens out as transformers' loss does."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = _mixtral(output_router_logits=True).eval()
    inspector = RouterInspector().attach(model)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    with torch.no_grad():
        out = model(_tokens(0), attention_mask=mask)
    masked = float(load_balancing_loss_func(out.router_logits, 4, 2, mask))
    unmasked = float(load_balancing_loss_func(out.router_logits, 4, 2))
    assert masked != pytest.approx(unmasked, rel=1e-4)  # the padding matters here
    aux = inspector.summary().aux_loss
    assert aux is not None
    assert aux["history"]["model"] == pytest.approx([masked], rel=1e-6)
    assert aux["history"]["inspector"] == pytest.approx([masked], rel=1e-5)


class _Scaled(nn.Module):
    """A Mixtral whose aux_loss is multiplied by ``factor`` (as if summed over 4 ranks)."""

    def __init__(self, model: nn.Module, factor: float) -> None:
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, input_ids: torch.Tensor) -> Any:
        out = self.model(input_ids)
        out.aux_loss = out.aux_loss * self.factor
        return out


def test_a_scaled_aux_loss_is_reported_with_both_values() -> None:
    model = _Scaled(_mixtral(output_router_logits=True), 4.0).train()
    inspector = RouterInspector().attach(model)
    for step in range(3):
        model(_tokens(step))
    summary = inspector.summary()
    finding = _codes(summary)["aux-loss-mismatch"]
    assert finding.severity == "warning"
    details = finding.details
    assert details["ratio"] == pytest.approx(4.0, rel=1e-5)
    assert details["model"] == pytest.approx(4.0 * details["inspector"], rel=1e-5)
    assert 1.9 < details["inspector"] < 2.2  # top-2 routing, nearly balanced: about k
    assert f"{details['model']:.6g}" in finding.message
    assert f"{details['inspector']:.6g}" in finding.message
    assert "multiplied by 4" in finding.message and "world size" in finding.message


def test_a_loss_from_a_recomputed_top_k_disagrees_with_the_biased_routing() -> None:
    """Ernie-4.5-MoE's aux_loss takes the top-k of softmax(logits) again, without the
    selection bias its router executes: with a strong bias the two losses differ."""
    from hf_zoo import build_tiny

    ratios = []
    for bias_value in (0.0, 5.0):
        model = build_tiny("ernie4_5_moe")
        with torch.no_grad():
            for layer in model.model.layers:
                if not hasattr(layer.mlp, "gate"):
                    continue  # a dense layer
                layer.mlp.gate.weight.mul_(30.0)  # peaked router probabilities
                bias = layer.mlp.gate.moe_statics.e_score_correction_bias
                bias.zero_()
                bias[..., -2:] = bias_value  # the executed choice: the last two experts
        inspector = RouterInspector().attach(model)
        with torch.no_grad():
            model(_tokens(0), output_router_logits=True)
        summary = inspector.summary()
        assert summary.aux_loss is not None
        ratios.append(summary.aux_loss["ratio"])
    assert ratios[0] == pytest.approx(1.0, abs=1e-5)
    assert ratios[1] > 1.2
    finding = _codes(summary)["aux-loss-mismatch"]
    assert finding.details["ratio"] == ratios[1]
    assert "recomputed from the logits rather than the experts the router executed" in (
        finding.message
    )


class _Constant(nn.Module):
    """A Mixtral whose aux_loss is a fixed number (a cached, detached value)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> Any:
        out = self.model(input_ids)
        out.aux_loss = torch.tensor(1.5)
        return out


def test_a_constant_aux_loss_is_reported() -> None:
    model = _Constant(_mixtral(output_router_logits=True)).train()
    inspector = RouterInspector().attach(model)
    for step in range(4):
        model(_tokens(step))
    codes = _codes(inspector.summary())
    finding = codes["aux-loss-constant"]
    assert finding.details["value"] == 1.5 and finding.details["steps"] == 4
    low, high = finding.details["inspector"]
    assert low < high
    assert "1.5" in finding.message
    # The same constant with unchanging routing is not an alarm.
    model = _Constant(_mixtral(output_router_logits=True)).eval()
    inspector = RouterInspector().attach(model)
    with torch.no_grad():
        for _ in range(4):
            model(_tokens(0))
    assert "aux-loss-constant" not in _codes(inspector.summary())


def test_a_missing_aux_loss_says_what_to_set() -> None:
    model = _mixtral(output_router_logits=False).train()
    inspector = RouterInspector().attach(model)
    for step in range(2):
        assert model(_tokens(step)).aux_loss is None
    summary = inspector.summary()
    finding = _codes(summary)["aux-loss-missing"]
    assert finding.severity == "warning"
    assert "aux_loss=None on all 2 forwards" in finding.message
    assert "output_router_logits=True" in finding.message
    assert summary.aux_loss is not None and summary.aux_loss["status"]["none"] == 2
    # In eval mode the coefficient alone makes it an info, not a warning.
    model = _mixtral(output_router_logits=False).eval()
    inspector = RouterInspector().attach(model)
    with torch.no_grad():
        model(_tokens(0))
    finding = _codes(inspector.summary())["aux-loss-missing"]
    assert finding.severity == "info" and "router_aux_loss_coef=0.001" in finding.message


class _NoAuxLoss(nn.Module):
    """A model that computes no aux loss even when asked for router logits (as Llama-4)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, output_router_logits: bool = False) -> Any:
        out = self.model(input_ids, output_router_logits=output_router_logits)
        out.aux_loss = None
        return out


def test_a_model_asked_for_router_logits_without_aux_loss_gets_the_other_fix() -> None:
    model = _NoAuxLoss(_mixtral(output_router_logits=False)).eval()
    inspector = RouterInspector().attach(model)
    with torch.no_grad():
        model(_tokens(0), output_router_logits=True)
    finding = _codes(inspector.summary())["aux-loss-missing"]
    assert finding.severity == "warning"
    assert "1 of them passed output_router_logits=True" in finding.message
    assert "add the routers' load-balancing loss to the training loss" in finding.message


def test_aux_loss_free_models_get_an_info_not_a_missing_alarm() -> None:
    model = _deepseek().train()
    inspector = RouterInspector().attach(model)
    for step in range(2):
        model(_tokens(step))
    codes = _codes(inspector.summary())
    assert "aux-loss-missing" not in codes
    finding = codes["aux-loss-free"]
    assert finding.severity == "info"
    assert finding.details["layers"] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def test_model_aux_loss_reads_outputs() -> None:
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    value = torch.tensor(2.0)
    assert model_aux_loss(MoeCausalLMOutputWithPast(aux_loss=value)) == ("value", value)
    assert model_aux_loss(MoeCausalLMOutputWithPast(logits=value)) == ("none", None)
    assert model_aux_loss({"aux_loss": 0}) == ("value", 0.0)
    assert model_aux_loss({"logits": value}) == ("absent", None)
    assert model_aux_loss((value, value)) == ("unreadable", None)
    assert model_aux_loss(value) == ("absent", None)


def test_a_tuple_output_is_not_a_missing_aux_loss() -> None:
    model = _mixtral(output_router_logits=True).train()
    inspector = RouterInspector().attach(model)
    out = model(_tokens(0), return_dict=False)
    assert isinstance(out, tuple) and not hasattr(out, "aux_loss")
    codes = _codes(inspector.summary())
    assert "aux-loss-missing" not in codes
    assert codes["aux-loss-unreadable"].severity == "info"
    assert "return_dict=True" in codes["aux-loss-unreadable"].message


# ----------------------------------------------------------------------------- bias


BIASES = [
    [0.1, -0.1, 0.2, -0.2, 0.05, -0.05, 0.0, 0.3],
    [-0.1, -0.1, 0.2, 0.2, 0.05, 0.05, 0.1, 0.3],  # entries 0, 3, 5 flip: 3 of 8
    [-0.1, -0.1, 0.2, 0.2, 0.05, 0.05, 0.0, 0.3],  # 0.1 -> 0 is no flip
    [0.1, 0.1, -0.2, -0.2, -0.05, -0.05, 0.0, -0.3],  # 7 of 8 flip
]
FLIPS = [None, 3 / 8, 0.0, 7 / 8]


def _biased_run(steps: int = 4) -> tuple[RouterInspector, Any]:
    model = _deepseek().eval()
    inspector = RouterInspector().attach(model)
    gates = [layer.mlp.gate for layer in model.model.layers]
    with torch.no_grad():
        for step in range(steps):
            for i, gate in enumerate(gates):
                sign = 1.0 if i == 0 else 2.0  # layer 1 holds twice the values
                gate.e_score_correction_bias.copy_(sign * torch.tensor(BIASES[step % 4]))
            model(_tokens(step))
    return inspector, model


def test_selection_bias_stats_per_layer_are_exact() -> None:
    inspector, _ = _biased_run()
    summary = inspector.summary()
    for name, scale in (("model.layers.0.mlp.gate", 1.0), ("model.layers.1.mlp.gate", 2.0)):
        bias = summary.layers[name]["selection_bias"]
        assert bias["tensor"] == "gate.e_score_correction_bias"
        assert bias["num_experts"] == 8 and bias["steps"] == 4
        history = bias["history"]
        assert history["steps"] == [0, 1, 2, 3]
        values = [scale * torch.tensor(b, dtype=torch.float32).double() for b in BIASES]
        assert history["abs_max"] == pytest.approx([float(v.abs().max()) for v in values])
        assert history["mean"] == pytest.approx([float(v.mean()) for v in values])
        assert history["std"] == pytest.approx([float(v.std(correction=0)) for v in values])
        assert history["range"] == pytest.approx([float(v.max() - v.min()) for v in values])
        assert history["flip_fraction"] == FLIPS  # exact
        assert bias["max_flip_fraction"] == 7 / 8
        assert bias["last"]["abs_max"] == pytest.approx(scale * 0.3)
        assert bias["mean_flip_fraction"] == pytest.approx((3 / 8 + 0 + 7 / 8) / 3)


def test_selection_bias_is_in_the_json_html_and_plot(tmp_path: Path) -> None:
    from moe_devkit.inspect.plots import SIGNAL_TITLES, signals_figure

    inspector, _ = _biased_run()
    paths = inspector.report(tmp_path)
    report = json.loads(paths.json.read_text())
    section = report["sections"]["routing"]
    bias = section["layers"]["model.layers.1.mlp.gate"]["selection_bias"]
    assert bias["history"]["flip_fraction"] == FLIPS
    assert section["aux_loss"]["status"]["none"] == 4
    page = paths.html.read_text()
    assert "<h3>Selection bias</h3>" in page and "gate.e_score_correction_bias" in page
    image = re.search(r'alt="model signals" src="data:image/png;base64,([^"]+)"', page)
    assert image is not None and base64.b64decode(image.group(1))[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "report.html",
        "report.json",
        "routing_analysis.png",
    ]
    fig = signals_figure(section)
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert set(SIGNAL_TITLES) <= set(panels)
    bias_lines = panels[SIGNAL_TITLES[1]].get_lines()
    assert len(bias_lines) == 4  # abs max and std of two layers
    flips = panels[SIGNAL_TITLES[2]].get_lines()
    assert [list(line.get_ydata()) for line in flips] == [[3 / 8, 0.0, 7 / 8]] * 2
    inspector_loss = panels[SIGNAL_TITLES[0]].get_lines()
    assert len(inspector_loss) == 1 and len(inspector_loss[0].get_xdata()) == 4


def test_oscillating_and_saturated_biases_are_reported() -> None:
    inspector, _ = _biased_run(steps=8)  # steps 3 -> 4 and 7 flip 7 of 8 entries
    summary = inspector.summary()
    codes = {(f.code, f.location) for f in summary.findings}
    assert ("selection-bias-oscillating", "model.layers.0.mlp.gate") in codes
    model = _deepseek().eval()
    inspector = RouterInspector().attach(model)
    gate = model.model.layers[0].mlp.gate
    with torch.no_grad():
        for step in range(BIAS_STEPS := 12):
            gate.e_score_correction_bias.fill_(0.2 * (step + 1))  # grows, never flips
            model(_tokens(step))
    found = {f.code: f for f in inspector.summary().findings if f.location == gate_name(model)}
    assert "selection-bias-growing" in found and "selection-bias-saturated" in found
    assert "selection-bias-oscillating" not in found
    assert found["selection-bias-saturated"].details["abs_max"] == pytest.approx(0.2 * BIAS_STEPS)


def gate_name(model: Any) -> str:
    return next(n for n, m in model.named_modules() if m is model.model.layers[0].mlp.gate)


def test_a_bias_that_never_changes_in_training_is_reported() -> None:
    model = _deepseek().train()
    inspector = RouterInspector().attach(model)
    for step in range(3):
        model(_tokens(step))
    found = {(f.code, f.location) for f in inspector.summary().findings}
    assert ("selection-bias-frozen", "model.layers.0.mlp.gate") in found


def _biased_architectures() -> list[str]:
    """The MoE model types of the installed transformers whose modeling code declares a
    selection bias (``e_score_correction_bias`` or ``expert_bias``)."""
    from hf_zoo import _modeling_sources, moe_architectures

    pattern = re.compile(r"self\.(e_score_correction_bias|expert_bias) = ")
    return [a for a in moe_architectures() if pattern.search(_modeling_sources(a))]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", _biased_architectures())
def test_every_biased_architecture_has_its_bias_tracked(model_type: str) -> None:
    """Every layer of a tiny model that holds a selection bias reports it, with the values
    the bias holds (each set to its own pattern before the forward)."""
    from hf_zoo import build_tiny

    vocab = 120
    tokens = torch.randint(3, vocab, (1, 6), generator=torch.Generator().manual_seed(0))
    try:
        model = build_tiny(model_type)
        with torch.no_grad():
            model(tokens)  # the tiny model runs without the inspector
    except Exception as error:  # the skip reports the reason
        pytest.skip(f"tiny {model_type} cannot be built or run: {type(error).__name__}: {error}")
    biases = {
        name: tensor
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]
        if name.rsplit(".", 1)[-1] in ("e_score_correction_bias", "expert_bias")
    }
    assert biases, f"{model_type}: no bias tensor in the built model"
    with torch.no_grad():
        for i, tensor in enumerate(biases.values()):
            pattern = torch.linspace(-1.0, 1.0, tensor.numel()) * 0.01 * (i + 1)
            tensor.copy_(pattern.reshape(tensor.shape))
    inspector = RouterInspector().attach(model)
    with torch.no_grad():
        model(tokens)
    summary = inspector.summary()
    names = {id(module): name for name, module in model.named_modules()}
    blocks = {probe.site.layer: names[id(probe.site.block)] for probe in inspector.probes}
    # Each recorded layer (one that routed tokens in this forward) whose block holds a bias.
    expected = {
        layer: {n: t for n, t in biases.items() if n.startswith(f"{blocks[layer]}.")}
        for layer in summary.layers
    }
    expected = {layer: found for layer, found in expected.items() if found}
    assert expected, f"{model_type}: no recorded layer holds a bias"
    for layer, found in expected.items():
        assert len(found) == 1, (layer, sorted(found))
        ((full_name, tensor),) = found.items()
        bias = summary.layers[layer].get("selection_bias")
        assert bias is not None, (model_type, layer, full_name)
        assert f"{blocks[layer]}.{bias['tensor']}" == full_name
        assert bias["last"]["abs_max"] == pytest.approx(float(tensor.abs().max()), rel=1e-6)
    tracked = [name for name, layer in summary.layers.items() if "selection_bias" in layer]
    assert sorted(tracked) == sorted(expected)


def test_bias_candidates_follow_the_rule() -> None:
    block = nn.Module()
    block.gate = nn.Linear(4, 8)  # its bias is a Linear's: not a selection bias
    block.expert_bias = nn.Parameter(torch.zeros(8), requires_grad=False)
    block.register_buffer("bias_counts", torch.zeros(8, dtype=torch.long))  # not float
    block.register_buffer("score_bias", torch.zeros(2, 8))  # 2-D
    block.statics = nn.Module()
    block.statics.register_buffer("e_score_correction_bias", torch.zeros(1, 8))
    found = [name for name, _, _ in selection_bias_candidates(RouterSite("x", block, block.gate))]
    assert found == ["expert_bias", "statics.e_score_correction_bias"]


def test_history_is_bounded() -> None:
    signals = ModelSignals(InspectorConfig())
    block = nn.Module()
    block.register_buffer("expert_bias", torch.zeros(4))
    site = RouterSite("layer", block, None)
    signals.attach(nn.Identity(), [site])
    decision = _decision(4)
    for step in range(HISTORY + 10):
        block.expert_bias.fill_(float(step))
        signals.on_decision(site, decision)
    bias = signals.host_state()["selection_bias"]["layer"]
    assert bias["steps"] == HISTORY + 10
    assert bias["history"]["steps"] == list(range(10, HISTORY + 10))
    assert bias["history"]["abs_max"][-1] == HISTORY + 9
    assert bias["max_abs_max"] == HISTORY + 9


def _decision(num_experts: int) -> RoutingDecision:
    from moe_devkit.inspect.adapters import decision_from_router_outputs

    logits = torch.randn(6, num_experts, generator=torch.Generator().manual_seed(0))
    return decision_from_router_outputs(logits, logits.topk(2).indices)


# ----------------------------------------------------------------------------- host syncs


@contextlib.contextmanager
def _no_host_reads(device: str = "cpu") -> Iterator[None]:
    """Any read of a tensor's value on the host raises inside this block (on CUDA, any
    synchronisation with the device too: ``torch.cuda.set_sync_debug_mode("error")``)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a tensor value was read on the host")

    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, refuse)
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        yield
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_the_signal_hooks_read_no_value_on_the_host(
    device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ModelSignals' hooks run with every host read of a tensor value made to raise (and on
    CUDA under the sync debug mode that raises on any synchronisation). After a layer's
    first (eager) step, its decisions are deferred (``defer_decision``) and their sums
    delivered when the layer's batch is folded."""
    calls = {"on_decision": 0, "defer_decision": 0, "deliver": 0, "_begin_step": 0, "_end_step": 0}
    for name in calls:
        original = getattr(ModelSignals, name)

        def guarded(
            self: ModelSignals, *args: Any, _original: Any = original, _name: str = name
        ) -> Any:
            calls[_name] += 1
            with _no_host_reads(device):
                return _original(self, *args)

        monkeypatch.setattr(ModelSignals, name, guarded)
    with _no_host_reads(device), pytest.raises(AssertionError, match="read on the host"):
        bool(torch.ones(()))  # the guard works
    model = _mixtral(output_router_logits=True).to(device).train()
    inspector = RouterInspector().attach(model)
    for step in range(2):
        model(_tokens(step).to(device))
    assert calls == {
        "on_decision": 2,  # the first forward's two layers
        "defer_decision": 2,  # the second's, built later in a batch
        "deliver": 0,
        "_begin_step": 2,
        "_end_step": 2,
    }
    aux = inspector.summary().aux_loss
    assert calls["deliver"] == 2  # one batch per layer, folded by summary()
    assert aux is not None and aux["compared_steps"] == 2
    assert aux["ratio"] == pytest.approx(1.0, abs=1e-5)
    # A selection bias, changed between the steps.
    model = _deepseek().to(device).train()
    inspector = RouterInspector().attach(model)
    gates = [layer.mlp.gate for layer in model.model.layers]
    for step in range(3):
        with torch.no_grad():
            for gate in gates:
                gate.e_score_correction_bias.add_(0.01 * (step + 1))
        model(_tokens(step).to(device))
    bias = inspector.summary().layers["model.layers.0.mlp.gate"]["selection_bias"]
    assert bias["history"]["abs_max"] == pytest.approx([0.01, 0.03, 0.06])
    assert calls["on_decision"] == 2 + 2  # each model's first forward, eager
    assert calls["defer_decision"] == 2 + 4  # the later ones: the bias read at once


def test_decisions_without_router_probabilities_give_no_inspector_loss() -> None:
    """Decisions built from expert indices alone (no logits) have no load-balancing loss."""
    from moe_devkit.inspect.adapters import decision_from_tensors

    signals = ModelSignals(InspectorConfig())
    model = nn.Linear(2, 2)
    site = RouterSite("layer", model, None)

    def route(module: nn.Module, args: Any, output: Any) -> None:
        indices = torch.tensor([[0], [1], [2], [3]])
        signals.on_decision(site, decision_from_tensors(torch.rand(4), torch.ones(4), indices, 4))

    model.register_forward_hook(route)  # before the signals' hook, as a router's would be
    signals.attach(model, [site])
    for _ in range(2):
        model(torch.randn(3, 2))
    aux = signals.host_state()["aux_loss"]
    assert aux["status"]["absent"] == 2
    assert aux["history"] == {"steps": [0, 1], "model": [None, None], "inspector": [None, None]}


def test_reattaching_keeps_a_bias_history_and_another_model_starts_afresh() -> None:
    inspector, model = _biased_run(steps=2)
    inspector.detach()
    inspector.attach(model)
    with torch.no_grad():
        model(_tokens(5))
    bias = inspector.summary().layers["model.layers.0.mlp.gate"]["selection_bias"]
    assert bias["steps"] == 3  # the same model: one history
    other = _deepseek().eval()
    inspector.detach()
    inspector.attach(other)
    with torch.no_grad():
        other.model.layers[0].mlp.gate.e_score_correction_bias.fill_(0.5)
        other(_tokens(6))
    bias = inspector.summary().layers["model.layers.0.mlp.gate"]["selection_bias"]
    assert bias["steps"] == 1 and bias["history"]["abs_max"] == [0.5]


def test_the_reference_model_pays_for_the_aux_loss_comparison_only_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from moe_devkit.config import RouterConfig
    from moe_devkit.inspect import signals as signals_module
    from moe_devkit.routers.torch_router import MoEModel

    calls: list[int] = []
    add = signals_module._StepAccumulator.add

    def counted(self: Any, decision: RoutingDecision) -> None:
        calls.append(1)
        add(self, decision)

    monkeypatch.setattr(signals_module._StepAccumulator, "add", counted)
    config = RouterConfig(hidden_size=16, num_experts=4, max_k=2, expert_hidden_size=16)
    model = MoEModel(config, num_layers=2)
    inspector = RouterInspector(model).attach()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(2, 5, 16))
    assert len(calls) == 2  # the first forward's two layers; not a transformers output
    assert inspector.summary().layers["layers.0.moe.router"]["steps"] == 4
