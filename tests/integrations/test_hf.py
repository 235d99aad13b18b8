"""transformers MoE models: the inspector records what each router selected, nothing else."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from moe_devkit.inspect import RouterInspector  # noqa: E402
from moe_devkit.inspect.inspector import in_backward_recompute  # noqa: E402
from moe_devkit.integrations import hf  # noqa: E402
from moe_devkit.routers.torch_router import expert_counts, load_balancing_loss  # noqa: E402

COMMON: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=64,
    max_position_embeddings=64,
)


def tiny_config(arch: str) -> Any:
    t = transformers
    if arch == "mixtral":
        return t.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen2_moe":
        return t.Qwen2MoeConfig(
            **COMMON,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
        )
    if arch == "qwen3_moe":
        return t.Qwen3MoeConfig(
            **COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=16
        )
    if arch == "olmoe":
        return t.OlmoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2)
    if arch == "deepseek_v3":
        return t.DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 2},
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            moe_intermediate_size=16,
            first_k_dense_replace=0,
            n_shared_experts=1,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        )
    if arch == "gpt_oss":
        return t.GptOssConfig(
            **COMMON,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
            layer_types=["full_attention"] * 2,
        )
    raise AssertionError(arch)


ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]
STATIC_SOFTMAX = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"}


def tiny_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    for module in model.modules():  # some routers start at zero: all ties
        if hf.adapter_for(module) is not None:
            nn.init.normal_(module.weight, std=0.5)
            if isinstance(getattr(module, "bias", None), nn.Parameter):
                nn.init.normal_(module.bias, std=0.5)
            if hasattr(module, "e_score_correction_bias"):  # DeepSeek-V3: bias changes choice
                module.e_score_correction_bias.copy_(torch.randn(module.num_experts) * 0.5)
    return model


def experts_inputs(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """The expert indices each experts module was called with, keyed by its router's name."""
    seen: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if name.endswith(".experts"):
            router = (
                "gate"
                if hasattr(model.get_submodule(name[: -len(".experts")]), "gate")
                else "router"
            )
            layer = f"{name[: -len('experts')]}{router}"

            def pre_hook(module: nn.Module, args: Any, layer: str = layer) -> None:
                if not in_backward_recompute():
                    seen.setdefault(layer, []).append(args[1].detach().clone())

            module.register_forward_pre_hook(pre_hook)
    return seen


@pytest.mark.parametrize("arch", ARCHS)
def test_counts_equal_the_models_own_dispatch(arch: str) -> None:
    model = tiny_model(arch)
    dispatched = experts_inputs(model)
    inspector = RouterInspector().attach(model)
    logits_per_step = []
    with torch.no_grad():
        for step in range(2):
            ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(step))
            logits_per_step.append(model(ids, output_router_logits=True).router_logits)
    summary = inspector.summary()
    assert sorted(summary.layers) == sorted(dispatched) and len(dispatched) == 2
    for layer_index, (layer, indices) in enumerate(sorted(dispatched.items())):
        num_experts = summary.layers[layer]["num_experts"]
        expected = sum(expert_counts(i, num_experts) for i in indices)
        assert summary.layers[layer]["utilization"]["counts"] == expected.tolist()
        assert summary.layers[layer]["steps"] == 2 and summary.layers[layer]["tokens"] == 24
        if arch in STATIC_SOFTMAX:  # the model's returned logits give the same selection
            top = [
                torch.softmax(s[layer_index].float(), -1).topk(2).indices for s in logits_per_step
            ]
            assert expected.tolist() == sum(expert_counts(t, num_experts) for t in top).tolist()


def test_deepseek_records_the_grouped_biased_choice_not_softmax_topk() -> None:
    model = tiny_model("deepseek_v3")
    dispatched = experts_inputs(model)
    inspector = RouterInspector().attach(model)
    with torch.no_grad():
        logits = model(torch.randint(0, 64, (4, 8)), output_router_logits=True).router_logits
    layer = "model.layers.0.mlp.gate"
    chosen = dispatched[layer][0].sort(dim=-1).values
    naive = torch.softmax(logits[0], -1).topk(2).indices.sort(dim=-1).values
    assert not torch.equal(chosen, naive)  # the recomputation would be wrong
    counts = inspector.summary().layers[layer]["utilization"]["counts"]
    assert counts == expert_counts(chosen, 8).tolist()


def test_hooks_leave_outputs_bit_identical() -> None:
    model = tiny_model("qwen2_moe")
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        before = model(ids).logits
        with RouterInspector(model):
            during = model(ids).logits
    assert torch.equal(before, during)
    assert all(not m._forward_hooks for m in model.modules())


def test_load_balancing_loss_equals_transformers_for_static_topk() -> None:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = tiny_model("mixtral")
    inspector = RouterInspector().attach(model)
    with torch.no_grad():
        out = model(torch.randint(0, 64, (3, 7)), output_router_logits=True)
    summary = inspector.summary()
    for index, logits in enumerate(out.router_logits):
        theirs = load_balancing_loss_func((logits,), 4, 2)
        mine = summary.layers[f"model.layers.{index}.mlp.gate"]["losses"]["load_balancing_mean"]
        assert mine == pytest.approx(float(theirs), rel=1e-6)
    every = torch.cat(out.router_logits).float()
    probs = torch.softmax(every, -1)
    ours = load_balancing_loss(probs, probs.topk(2).indices)
    assert float(ours) == pytest.approx(float(out.aux_loss), rel=1e-6)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_records_each_step_once(use_reentrant: bool) -> None:
    model = tiny_model("mixtral")
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad(), RouterInspector(model) as reference:
        model(ids)
    model.train()
    model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
    inspector = RouterInspector().attach(model)
    model(ids, labels=ids).loss.backward()
    assert all(state.steps == 1 for state in inspector)
    mine, theirs = inspector.summary(), reference.summary()
    for layer in theirs.layers:
        assert mine.layers[layer]["utilization"] == theirs.layers[layer]["utilization"]


def test_unknown_moe_model_says_how_to_register_an_adapter() -> None:
    class FooRouter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 8))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = x @ self.weight.t()
            return logits, logits.topk(2).indices

    class FooSparseMoeBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = FooRouter()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.router(x)[0]

    model = FooSparseMoeBlock()
    with pytest.raises(ValueError, match=r"register_adapter\('FooRouter', adapter\)"):
        RouterInspector().attach(model)

    def adapter(module: nn.Module, args: Any, output: Any) -> Any:
        return hf.decision_from_router_outputs(output[0], output[1])

    hf.register_adapter(FooRouter, adapter)
    try:
        with pytest.raises(ValueError, match="already registered"):
            hf.register_adapter("FooRouter", adapter)
        inspector = RouterInspector().attach(model)
        x = torch.randn(5, 8)
        model(x)
        inspector.detach()
        expected = expert_counts(model.router(x)[1], 4)
        assert inspector.summary().layers["router"]["utilization"]["counts"] == expected.tolist()
    finally:
        hf.unregister_adapter(FooRouter)


def test_switch_transformers_one_hot_mask_with_capacity_drops() -> None:
    config = transformers.SwitchTransformersConfig(
        d_model=32, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=16,
        num_experts=4, expert_capacity=3, encoder_sparse_step=1, vocab_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.SwitchTransformersEncoderModel(config).eval()
    masks: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "SwitchTransformersTop1Router":
            nn.init.normal_(module.classifier.weight, std=0.5)
            module.register_forward_hook(
                lambda m, a, out, name=name: masks.__setitem__(name, out[0].detach().clone())
            )
    inspector = RouterInspector().attach(model)
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 8)))
    summary = inspector.summary()
    assert sorted(summary.layers) == sorted(masks) and masks
    for name, mask in masks.items():
        layer = summary.layers[name]
        executed = mask.reshape(-1, 4).sum(0)
        assert layer["dropped_pairs"] == 16 - int(executed.sum())
        # Headline counts are what each expert ran; the selections keep the dropped pairs.
        assert layer["utilization"]["counts"] == executed.tolist()
        selected = torch.tensor(layer["utilization"]["selected_counts"])
        assert (selected >= executed).all() and int(selected.sum()) == layer["selections"] == 16
        k_hist = layer["k"]["histogram"]
        assert k_hist == [16 - int(executed.sum()), int(executed.sum())] and layer["tokens"] == 16


def test_dense_scores_builder() -> None:
    logits = torch.randn(3, 4)
    dense = torch.tensor([[0.0, 0.7, 0.3, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    d = hf.decision_from_dense_scores(logits, dense, max_k=2)
    assert d.expert_indices.tolist() == [[1, 2], [0, -1], [-1, -1]]
    assert d.k_per_token.tolist() == [2, 1, 0]
    want = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(d.expert_weights, want)


class _Config:
    num_local_experts = 4
    hidden_size = 8


class _OddRouter(nn.Module):
    """A router whose output discovery cannot read (a dict), beside a norm and a forget gate."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4, bias=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": self.proj(x)}


class _ForgetGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(x)) * x


class _OddMoeModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = _Config()
        self.norm = nn.LayerNorm(8)
        self.forget = _ForgetGate()
        self.attn = nn.MultiheadAttention(8, 2)
        self.router = _OddRouter()
        self.experts = nn.Parameter(torch.randn(4, 8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.router(self.forget(self.norm(x)))["scores"]
        top = scores.topk(1).indices[:, 0]
        return torch.einsum("nd,nde->ne", x, self.experts[top])


def test_unknown_moe_error_names_the_real_router_class() -> None:
    with pytest.raises(ValueError) as error:
        RouterInspector().attach(_OddMoeModel())
    message = str(error.value)
    assert "_OddRouter at 'router'" in message
    assert "register_adapter('_OddRouter', adapter)" in message
    for wrong in ("LayerNorm", "_ForgetGate", "MultiheadAttention"):
        assert wrong not in message


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ("float", TypeError, "expert_indices must be an integer tensor; got dtype=torch.float32"),
        ("shape", ValueError, r"expert_indices of shape \(3, 1\); expected \[N, K\] with N = 5"),
        ("range", ValueError, r"indices in \[3, 6\]; expected values in \[-1, num_experts=4"),
    ],
)
def test_a_wrong_adapter_fails_at_the_first_step(bad: str, error: type, match: str) -> None:
    model = _OddMoeModel()

    def adapter(module: nn.Module, args: Any, output: Any) -> Any:
        logits = output["scores"]
        indices = logits.topk(2).indices
        if bad == "float":
            return hf.decision_from_router_outputs(logits, indices.float())
        decision = hf.decision_from_router_outputs(logits, indices)
        if bad == "shape":
            return dataclasses.replace(decision, expert_indices=indices[:3, :1])
        return dataclasses.replace(decision, expert_indices=indices + 3)

    hf.register_adapter(_OddRouter, adapter)
    try:
        inspector = RouterInspector().attach(model)
        with pytest.raises(error, match=match):
            model(torch.randn(5, 8))
        assert inspector.layers == {}  # nothing counted
    finally:
        hf.unregister_adapter(_OddRouter)


def test_nllb_moe_records_the_selection_and_what_its_experts_ran() -> None:
    config = transformers.NllbMoeConfig(
        vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=1, encoder_ffn_dim=16,
        decoder_ffn_dim=16, encoder_attention_heads=2, decoder_attention_heads=2,
        num_experts=4, moe_eval_capacity_token_fraction=0.2, encoder_sparse_step=1,
        decoder_sparse_step=0,
        max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.NllbMoeModel(config).eval()
    rows: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "NllbMoeExperts":
            for e in range(4):
                module[f"expert_{e}"].register_forward_pre_hook(
                    lambda m, a, key=(name, e): rows.__setitem__(key, a[0].shape[0])
                )
    inspector = RouterInspector().attach(model)
    ids = torch.randint(3, 64, (1, 10))
    with torch.no_grad():
        model(input_ids=ids, decoder_input_ids=ids[:, :3])
    layers = inspector.summary().layers
    assert layers
    for name, layer in layers.items():
        block = name.rsplit(".", 1)[0]
        ran = [rows.get((block + ".experts", e), 0) for e in range(4)]
        assert layer["utilization"]["counts"] == ran  # what each expert module computed
        # the router's own choice, the top-2 of the 10 tokens; capacity 2 keeps 8 pairs at most
        assert layer["selections"] == 20 and sum(layer["utilization"]["selected_counts"]) == 20
        assert layer["dropped_pairs"] >= 20 - 4 * 2
