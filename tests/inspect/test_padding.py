"""Pad tokens of an attention mask are left out of counts, k and the load-balancing loss."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from moe_devkit.inspect import RouterInspector
from moe_devkit.inspect.adapters import decision_from_router_outputs, exclude_tokens
from moe_devkit.inspect.padding import TokenMasks
from moe_devkit.routers.torch_router import expert_counts, load_balancing_loss

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402


def _mixtral() -> nn.Module:
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=6,
        num_experts_per_tok=2, max_position_embeddings=64, output_router_logits=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config).eval()


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(1, 64, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, 5:] = 0  # right padding
    return ids, mask


def _experts_inputs(model: nn.Module) -> tuple[dict[str, list[torch.Tensor]], list[Any]]:
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if type(module).__name__ == "MixtralExperts":

            def hook(mod: nn.Module, args: Any, name: str = name) -> None:
                seen.setdefault(name.rsplit(".", 1)[0], []).append(args[1].detach().clone())

            handles.append(module.register_forward_pre_hook(hook))
    return seen, handles


def test_counts_k_and_loss_leave_out_pad_tokens_as_transformers_does() -> None:
    model = _mixtral()
    ids, mask = _padded_batch()
    received, handles = _experts_inputs(model)
    inspector = RouterInspector(model).attach()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    inspector.detach()
    for handle in handles:
        handle.remove()
    summary = inspector.summary()
    keep = mask.reshape(-1).bool()
    real = int(keep.sum())
    assert real == 16
    for layer, (name, logits) in enumerate(
        zip(sorted(summary.layers), out.router_logits, strict=True)
    ):
        stats = summary.layers[name]
        assert stats["tokens"] == real
        assert stats["k"]["histogram"] == [0, 0, real]
        indices = received[name.rsplit(".", 1)[0]][0]
        assert stats["utilization"]["counts"] == expert_counts(indices[keep], 6).tolist()
        theirs = load_balancing_loss_func((logits,), 6, 2, mask)
        assert stats["losses"]["load_balancing_mean"] == pytest.approx(float(theirs), rel=1e-5)
        unmasked = load_balancing_loss_func((logits,), 6, 2, None)
        assert float(unmasked) != pytest.approx(float(theirs), rel=1e-4), layer


def test_without_a_mask_every_token_counts() -> None:
    model = _mixtral()
    ids, _ = _padded_batch()
    inspector = RouterInspector(model).attach()
    with torch.no_grad():
        out = model(input_ids=ids)
    summary = inspector.summary()
    for name, logits in zip(sorted(summary.layers), out.router_logits, strict=True):
        assert summary.layers[name]["tokens"] == 21
        theirs = load_balancing_loss_func((logits,), 6, 2, None)
        assert summary.layers[name]["losses"]["load_balancing_mean"] == pytest.approx(
            float(theirs), rel=1e-5
        )


def test_generate_with_left_padding_counts_real_tokens_only() -> None:
    model = _mixtral()
    ids, mask = _padded_batch()
    ids, mask = ids[:1], mask[:1]  # 3 pad tokens, 4 real prompt tokens
    inspector = RouterInspector(model).attach()
    with torch.no_grad():
        generated = model.generate(
            ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0
        )
    assert generated.shape[1] == 10
    for stats in inspector.summary().layers.values():
        # 4 real prompt tokens, then one token per new step (the last new token is not fed back)
        assert stats["tokens"] == 4 + 2
        assert stats["steps"] == 3


def test_exclude_tokens_keeps_the_kept_tokens_and_recomputes_the_loss() -> None:
    logits = torch.randn(4, 5)
    indices = logits.topk(2).indices
    decision = decision_from_router_outputs(logits, indices)
    keep = torch.tensor([True, False, True, True])
    masked = exclude_tokens(decision, keep)
    assert masked.k_per_token.tolist() == [2, -1, 2, 2]
    assert (masked.expert_indices[1] == -1).all()
    assert masked.expert_indices[0].tolist() == indices[0].tolist()
    kept = keep.unsqueeze(-1)
    assert float(masked.load_balancing_loss) == pytest.approx(
        float(load_balancing_loss(decision.router_probs, indices, keep))
    )
    assert not bool((masked.expert_indices[~keep] >= 0).any()) and kept.shape == (4, 1)


def test_masks_apply_only_inside_a_model_call_with_a_mask() -> None:
    model = _mixtral()
    masks = TokenMasks()
    inspector = RouterInspector(model).attach()
    sites = [probe.site for probe in inspector.probes]
    handles = masks.attach(model, sites)
    assert masks.valid_tokens(sites[0], 14) is None  # no call in progress
    for handle in handles:
        handle.remove()
