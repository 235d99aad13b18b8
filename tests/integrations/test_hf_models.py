"""Every MoE architecture of the installed transformers: the inspector counts what the
experts received.

For a tiny model of each architecture (``hf_zoo``), the inspector's per-layer expert
counts, k histogram and token count must equal what hooks on the experts themselves
recorded in the same forward (``hf_zoo.record_expert_inputs``, which does not use the
inspector's adapters), and the model's outputs must not change when the inspector is
attached: in a forward, in ``generate`` and in a training step with gradient
checkpointing.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from hf_zoo import (  # noqa: E402
    SKIPPED,
    ExpertInputs,
    build_tiny,
    model_class,
    moe_architectures,
    record_expert_inputs,
    tiny_config,
)

from moe_devkit.inspect import RouterInspector  # noqa: E402

ARCHITECTURES = moe_architectures()
INPUT_IDS = torch.randint(3, 120, (2, 9), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")


def _params(archs: list[str]) -> list[Any]:
    return [
        pytest.param(a, marks=pytest.mark.skip(reason=SKIPPED[a])) if a in SKIPPED else a
        for a in archs
    ]


@functools.cache
def _built(arch: str) -> nn.Module:
    return build_tiny(arch)


def _model(arch: str) -> Any:
    """A fresh copy of the tiny model (tests change its mode and weights): a transformers
    ``PreTrainedModel``."""
    return copy.deepcopy(_built(arch))


def _can_generate(arch: str) -> bool:
    try:
        return bool(model_class(tiny_config(arch)).can_generate())
    except Exception:  # a model that cannot be built fails in the forward test
        return False


def _inputs(model: Any) -> dict[str, torch.Tensor]:
    inputs = {"input_ids": INPUT_IDS}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = INPUT_IDS
    return inputs


def _output(out: Any) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise AssertionError(f"no logits or last_hidden_state in {type(out).__name__}")


def _trim(histogram: list[int]) -> list[int]:
    out = list(histogram)
    while out and out[-1] == 0:
        out.pop()
    return out


def assert_counts_match(summary: Any, truth: dict[str, ExpertInputs]) -> None:
    """Each MoE block that ran has exactly one inspector layer, the block or inside it,
    and that layer's counts, k histogram and tokens are what the block's experts received;
    every inspector layer is in a MoE block (one that never ran may have a layer, empty)."""
    assert any(t.forwards for t in truth.values()), "the experts of no MoE block ran"
    layers = summary.layers
    owner: dict[str, str] = {}
    for name in layers:
        blocks = [b for b in truth if name == b or name.startswith(b + ".")]
        assert blocks, f"inspector layer {name} is in no MoE block of {sorted(truth)}"
        owner[name] = max(blocks, key=len)
    for block, expected in truth.items():
        mine = [name for name, b in owner.items() if b == block]
        if not expected.forwards and not mine:
            continue
        assert len(mine) == 1, f"MoE block {block}: inspector layers {mine}, expected one"
        layer = layers[mine[0]]
        counts, width = layer["utilization"]["counts"], len(expected.counts)
        # A router may score more classes than its experts module holds (Zaya's skip
        # class: transformers sends those picks to expert 0 with weight 0); such a class
        # never reaches the experts, so its executed count must be 0.
        assert len(counts) >= width and not any(counts[width:]), (mine[0], counts, width)
        got = (counts[:width], _trim(layer["k"]["histogram"]), layer["tokens"])
        want = (expected.counts.tolist(), _trim(expected.k_histogram), expected.tokens)
        assert got == want, (
            f"{mine[0]}: (counts, k histogram, tokens) {got}, experts received {want}"
        )


@pytest.mark.parametrize("arch", _params(ARCHITECTURES))
def test_forward_counts_what_the_experts_received(arch: str) -> None:
    model = _model(arch)
    inputs = _inputs(model)
    with torch.no_grad():
        reference = _output(model(**inputs))
        with RouterInspector(model) as inspector, record_expert_inputs(model) as truth:
            observed = _output(model(**inputs))
    assert torch.equal(observed, reference), "the inspector changed the model's output"
    assert_counts_match(inspector.summary(), truth)


GENERATIVE = [a for a in ARCHITECTURES if a in SKIPPED or _can_generate(a)]


@pytest.mark.parametrize("arch", _params(GENERATIVE))
def test_generate_counts_what_the_experts_received(arch: str) -> None:
    model = _model(arch)
    settings = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with torch.no_grad():
        reference = model.generate(INPUT_IDS, **settings)
        with RouterInspector(model) as inspector, record_expert_inputs(model) as truth:
            observed = model.generate(INPUT_IDS, **settings)
    assert torch.equal(observed, reference), "the inspector changed what generate() returns"
    assert max(t.forwards for t in truth.values()) == 3, (
        "generate() ran other than three decoder steps"
    )
    assert_counts_match(inspector.summary(), truth)


@pytest.mark.parametrize("arch", _params(ARCHITECTURES))
def test_training_step_with_gradient_checkpointing_counts_each_forward_once(arch: str) -> None:
    model = _model(arch)
    inputs = _inputs(model)
    with torch.no_grad(), record_expert_inputs(model) as plain:
        model(**inputs)
    try:
        model.gradient_checkpointing_enable()
    except ValueError as error:  # an architecture without checkpointing: a plain training step
        assert "checkpointing" in str(error)
    model.train()
    with RouterInspector(model) as inspector, record_expert_inputs(model) as truth:
        _output(model(**inputs)).float().square().mean().backward()  # type: ignore[no-untyped-call]
    forwards = {block: t.forwards for block, t in truth.items()}
    assert forwards == {block: t.forwards for block, t in plain.items()}, "recomputes recorded"
    assert any(forwards.values())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert_counts_match(inspector.summary(), truth)


# The ground truth itself, against what it must be on models whose routing is known.


def test_ground_truth_is_the_top_k_of_the_router_logits() -> None:
    model = _model("mixtral")
    logits: dict[str, torch.Tensor] = {}
    handles = [
        layer.mlp.gate.register_forward_hook(
            lambda _m, _a, out, i=i: logits.__setitem__(f"model.layers.{i}.mlp", out[0])
        )
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad(), record_expert_inputs(model) as truth:
        model(input_ids=INPUT_IDS)
    for handle in handles:
        handle.remove()
    assert sorted(truth) == sorted(logits) and len(truth) == 3
    for block, expected in truth.items():
        top = logits[block].topk(2, dim=-1).indices
        assert expected.counts.tolist() == torch.bincount(top.flatten(), minlength=8).tolist()
        assert _trim(expected.k_histogram) == [0, 0, INPUT_IDS.numel()]
        assert (expected.tokens, expected.forwards) == (INPUT_IDS.numel(), 1)


def test_ground_truth_leaves_out_what_capacity_dropped() -> None:
    """Switch Transformers with an expert capacity of 2 per sequence: the experts get at
    most 2 tokens of each of the 2 sequences, the other tokens none (k = 0)."""
    model = _model("switch_transformers")
    with torch.no_grad(), record_expert_inputs(model) as truth:
        model(**_inputs(model))
    assert len(truth) == 6
    for expected in truth.values():
        assert max(expected.counts.tolist()) <= 2 * INPUT_IDS.shape[0]
        dropped, routed = expected.k_histogram
        assert dropped > 0 and routed == sum(expected.counts.tolist())
        assert dropped + routed == expected.tokens == INPUT_IDS.numel()


def test_ground_truth_skips_the_checkpointed_recompute() -> None:
    model = _model("olmoe")
    model.gradient_checkpointing_enable()
    model.train()
    calls = []
    handle = model.model.layers[0].mlp.experts.register_forward_pre_hook(lambda *_: calls.append(1))
    with record_expert_inputs(model) as truth:
        _output(model(input_ids=INPUT_IDS)).sum().backward()  # type: ignore[no-untyped-call]
    handle.remove()
    assert len(calls) == 2, "the experts ran once in the forward and once in the recompute"
    assert {t.forwards for t in truth.values()} == {1}
