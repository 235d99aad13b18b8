"""Routing replay on real tiny transformers MoE models and the reference MoEModel: a trace
replayed on a model whose routers were perturbed routes every token as recorded and gives the
recorded model's outputs; balanced and forced-k routing checked against the routers' own
inputs; the replay-output-differs finding; the errors."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hf_zoo import build_tiny
from torch import nn

from moe_devkit.inspect.replay import (
    FINDING_CODE,
    RoutingReplay,
    compare_with_replay,
    output_difference,
    replay_finding,
)
from moe_devkit.inspect.trace import RoutingTrace, RoutingTraceRecorder, compare_traces
from moe_devkit.routers.torch_router import (
    MoELayer,
    MoEModel,
    RouterConfig,
    StaticTopKRouter,
)

HF_MODELS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mixtral() -> nn.Module:
    return build_tiny("mixtral").eval()


def _inputs(batch: int = 3, length: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, :3] = 0  # a left-padded row: its pads are not in a trace
    return {"input_ids": ids, "attention_mask": mask}


def _gates(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: m
        for name, m in model.named_modules()
        if type(m).__name__.endswith("TopKRouter") or isinstance(m, StaticTopKRouter)
    }


def _perturb_routers(model: nn.Module, scale: float = 2.0, seed: int = 5) -> nn.Module:
    perturbed = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in _gates(perturbed).values():
            noise = torch.randn(gate.weight.shape, generator=generator)
            gate.weight.add_(scale * gate.weight.std() * noise)
    return perturbed


def _perturb_experts(model: nn.Module, scale: float = 0.05, seed: int = 6) -> nn.Module:
    perturbed = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in perturbed.named_parameters():
            if ".experts." in f".{name}" or name.startswith("experts."):
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(scale * parameter.std() * noise)
    return perturbed


def _run(
    model: nn.Module, inputs: Any, replay: Any = None, **recorder: Any
) -> tuple[Any, RoutingTrace]:
    """(output, trace) of one forward, replayed from ``replay`` (a RoutingReplay's source, or
    a dict of its arguments) when given."""
    args = replay if isinstance(replay, dict) else {"source": replay}
    with torch.no_grad():
        if replay is None:
            with RoutingTraceRecorder(model, **recorder) as rec:
                output = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        else:
            with RoutingReplay(model, **args), RoutingTraceRecorder(model, **recorder) as rec:
                output = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return output, rec.trace()


def _assert_same_routing(a: RoutingTrace, b: RoutingTrace) -> None:
    assert a.layers == b.layers
    assert np.array_equal(a.sequence, b.sequence) and np.array_equal(a.positions, b.positions)
    assert np.array_equal(a.token_ids, b.token_ids)
    assert np.array_equal(a.expert_ids, b.expert_ids)  # every token, every layer, every slot


# ----------------------------------------------------------------------------- trace replay


@pytest.mark.parametrize("model_type", HF_MODELS)
def test_trace_replay_on_perturbed_transformers_router(model_type: str) -> None:
    model = build_tiny(model_type).eval()
    inputs = _inputs()
    base_out, base = _run(model, inputs, weights=True)
    assert base.weights is not None and base.num_tokens == 3 * 9 - 3
    perturbed = _perturb_routers(model)
    own_out, own = _run(perturbed, inputs, weights=True)
    assert compare_traces(base, own).any_layer_differs > 0.3  # the routing moved
    real = inputs["attention_mask"].bool()
    assert not torch.allclose(own_out.logits[real], base_out.logits[real], atol=1e-4)

    out, replayed = _run(perturbed, inputs, base, weights=True)
    _assert_same_routing(base, replayed)
    assert replayed.weights is not None
    np.testing.assert_allclose(replayed.weights, base.weights, rtol=0, atol=1e-7)
    # only the routers differ, and their routing is the reference's: the same outputs
    torch.testing.assert_close(out.logits[real], base_out.logits[real], rtol=0, atol=1e-6)


def test_trace_replay_without_weights_uses_the_models_probabilities(mixtral: nn.Module) -> None:
    inputs = _inputs()
    _, base = _run(mixtral, inputs, weights=True)
    perturbed = _perturb_routers(mixtral)
    probs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            hidden = args[0].reshape(-1, args[0].shape[-1])
            probs[name] = F.softmax(F.linear(hidden, mod.weight).float(), dim=-1)

        return hook

    handles = [g.register_forward_pre_hook(keep(n)) for n, g in _gates(perturbed).items()]
    try:
        _, replayed = _run(perturbed, inputs, {"source": base, "weights": False}, weights=True)
    finally:
        for handle in handles:
            handle.remove()
    _assert_same_routing(base, replayed)
    assert replayed.weights is not None
    keep_rows = inputs["attention_mask"].reshape(-1).bool().numpy()
    for j, name in enumerate(replayed.layers):
        p = probs[name].numpy()[keep_rows]
        ids = replayed.expert_ids[:, j]
        chosen = np.take_along_axis(p, ids, axis=1)
        expected = chosen / chosen.sum(axis=1, keepdims=True)  # Mixtral renormalises
        np.testing.assert_allclose(replayed.weights[:, j], expected, rtol=1e-5, atol=1e-7)
        assert base.weights is not None
        assert not np.allclose(replayed.weights[:, j], base.weights[:, j], atol=1e-3)


def test_trace_replay_through_generate(mixtral: nn.Module) -> None:
    prompt = _inputs(batch=2, length=5, seed=3)
    settings = {
        "max_new_tokens": 4,
        "do_sample": False,
        "pad_token_id": 0,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    with torch.no_grad(), RoutingTraceRecorder(mixtral, weights=True) as rec:
        base_run = mixtral.generate(**prompt, **settings)
    base = rec.trace()
    assert base.num_tokens == 2 * 5 - 3 + 2 * 3  # the prompts' tokens and 3 decode steps
    perturbed = _perturb_routers(mixtral)
    with torch.no_grad():
        own = perturbed.generate(**prompt, **settings)
        with RoutingReplay(perturbed, base), RoutingTraceRecorder(perturbed) as again:
            replayed = perturbed.generate(**prompt, **settings)
    assert not torch.allclose(torch.stack(own.scores), torch.stack(base_run.scores), atol=1e-4)
    assert torch.equal(replayed.sequences, base_run.sequences)
    torch.testing.assert_close(
        torch.stack(replayed.scores), torch.stack(base_run.scores), rtol=0, atol=1e-6
    )
    _assert_same_routing(base, again.trace())


@pytest.mark.parametrize("router", ["dynamic", "static"])
def test_trace_replay_on_reference_model(router: str) -> None:
    torch.manual_seed(0)
    config = RouterConfig(
        hidden_size=16, num_experts=6, max_k=3, expert_hidden_size=16, capacity_factor=1.5
    )
    model: nn.Module = MoEModel(config, num_layers=2).eval()
    if router == "static":
        for block in model.layers:  # type: ignore[union-attr]
            block.moe = MoELayer(config, router=StaticTopKRouter(config, k=2))
    x = torch.randn(2, 5, 16)
    base_out, base = _run(model, x, weights=True)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in perturbed.named_parameters():
            if "router" in name and parameter.numel() > 1:
                parameter.add_(1.0 * parameter.std() * torch.randn_like(parameter))
            elif "router" in name:  # the complexity estimator's output bias: k moves
                parameter.add_(2.0)
    own_out, own = _run(perturbed, x)
    assert compare_traces(base, own).any_layer_differs > 0.3
    assert not torch.allclose(own_out.hidden_states, base_out.hidden_states, atol=1e-4)

    out, replayed = _run(perturbed, x, base, weights=True)
    _assert_same_routing(base, replayed)
    torch.testing.assert_close(out.hidden_states, base_out.hidden_states, rtol=0, atol=1e-6)
    for r, b in zip(out.routings, base_out.routings, strict=True):
        assert torch.equal(r.k_per_token, b.k_per_token)
        assert torch.equal(r.dropped, b.dropped)  # the capacity limit re-applied

    _, by_keyword = _run(perturbed, {"hidden_states": x}, base)  # MoEModel(hidden_states=x)
    _assert_same_routing(base, by_keyword)

    comparison = compare_with_replay(model, perturbed, x)
    assert not comparison.normal.within_tolerance and comparison.replayed.within_tolerance
    assert comparison.findings() == []

    experts_changed = copy.deepcopy(perturbed)
    with torch.no_grad():
        experts_changed.layers[1].moe.experts.w_down.mul_(1.1)
        with RoutingReplay(experts_changed, base):
            replayed_out = experts_changed(x).hidden_states
    (finding,) = compare_with_replay(model, experts_changed, x).findings()
    gap = (replayed_out.double() - base_out.hidden_states.double()).abs()
    assert finding.code == FINDING_CODE
    assert finding.details["max_abs_error"] == pytest.approx(float(gap.max()), rel=1e-12)
    scale = float(base_out.hidden_states.abs().max())
    assert finding.details["relative_error"] == pytest.approx(float(gap.max()) / scale, rel=1e-12)


def _training_step(
    model: nn.Module, ids: torch.Tensor, source: Any
) -> tuple[dict[str, Any], RoutingTrace, dict[str, int]]:
    """(gradients, trace, forced router calls) of one replayed training step."""
    model.train()
    replay = RoutingReplay(model, source)
    with replay, RoutingTraceRecorder(model) as rec:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, rec.trace(), replay.forced_calls


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("source", ["trace", "balanced"])
def test_replay_in_training_with_activation_checkpointing(
    mixtral: nn.Module, source: str, use_reentrant: bool
) -> None:
    ids = _inputs(batch=2, length=5)["input_ids"]  # 10 tokens x 2 pairs: not a multiple of 8
    _, base = _run(mixtral, {"input_ids": ids})
    replayed = base if source == "trace" else source
    plain = _perturb_routers(mixtral)
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable({"use_reentrant": use_reentrant})
    grads, trace, calls = _training_step(plain, ids, replayed)
    grads_ckpt, trace_ckpt, calls_ckpt = _training_step(checkpointed, ids, replayed)
    assert set(calls.values()) == {1} and set(calls_ckpt.values()) == {2}  # the recompute
    # the recompute in the backward pass routes as the forward did: the same gradients
    assert grads.keys() == grads_ckpt.keys() and any("experts" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    _assert_same_routing(trace, trace_ckpt)
    if source == "trace":
        _assert_same_routing(base, trace)
    else:  # the model's own probabilities weigh the forced experts: the routers learn
        gates = [n for n in grads if n.endswith("mlp.gate.weight")]
        assert len(gates) == 3 and all(grads[n].abs().sum() > 0 for n in gates)


@pytest.mark.gpu
def test_replay_makes_no_host_sync_on_cuda() -> None:
    torch.manual_seed(0)
    config = RouterConfig(
        hidden_size=64, num_experts=8, max_k=3, expert_hidden_size=64, capacity_factor=1.25
    )
    model = MoEModel(config, num_layers=2).cuda().eval()
    x = torch.randn(2, 16, 64, device="cuda")
    with torch.no_grad(), RoutingTraceRecorder(model, weights=True) as rec:
        model(x)
        model(x)
    trace = rec.trace()
    for source in (trace, "balanced", "top_k"):
        replay = RoutingReplay(model, source, k=2 if source == "top_k" else None)
        with replay, torch.no_grad():
            model(x)  # the first call copies the trace to the device
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = model(x)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        assert replay.forced_calls == {name: 2 for name in trace.layers}
        assert bool(torch.isfinite(out.hidden_states).all())


# ----------------------------------------------------------------------------- the finding


def test_finding_only_when_the_difference_is_not_routing(mixtral: nn.Module) -> None:
    inputs = _inputs()
    routers_only = _perturb_routers(mixtral)
    comparison = compare_with_replay(mixtral, routers_only, inputs)
    assert comparison.routing.any_layer_differs > 0.3
    assert comparison.normal.mismatched > 0 and comparison.normal.max_abs_error > 1e-3
    assert comparison.replayed.max_abs_error < 1e-6 and comparison.findings() == []

    both = _perturb_experts(routers_only)
    comparison = compare_with_replay(mixtral, both, inputs)
    (finding,) = comparison.findings()
    assert finding.code == FINDING_CODE == "replay-output-differs"
    # the numbers, recomputed from the two runs' logits
    real = inputs["attention_mask"].bool()  # pads keep the model's own routing
    with torch.no_grad():
        reference = mixtral(**inputs).logits[real].double()
        with RoutingReplay(both, comparison.trace):
            replayed = both(**inputs).logits[real].double()
    gap = (replayed - reference).abs()
    assert finding.details["max_abs_error"] == pytest.approx(float(gap.max()), rel=1e-12)
    scale = float(reference.abs().max())
    assert finding.details["relative_error"] == pytest.approx(float(gap.max()) / scale, rel=1e-12)
    over = int((gap > 1e-5 + 1e-4 * reference.abs()).sum())
    assert finding.details["mismatched"] == over > 0
    assert finding.details["elements"] == reference.numel()
    assert str(round(finding.details["max_abs_error"], 3))[:4] in finding.message

    ids_only = compare_with_replay(mixtral, routers_only, inputs, weights=False)
    assert ids_only.findings()  # the perturbed routers' weights change the outputs


def test_output_difference_checks() -> None:
    a = torch.tensor([1.0, -2.0, 4.0])
    same = output_difference(a, a.clone())
    assert same.within_tolerance and same.max_abs_error == 0.0
    diff = output_difference(a, torch.tensor([1.0, -2.5, 4.0]), atol=0.1, rtol=0.0)
    assert (diff.max_abs_error, diff.relative_error, diff.mismatched) == (0.5, 0.125, 1)
    nan = output_difference(a, torch.tensor([1.0, float("nan"), 4.0]))
    assert nan.mismatched == 1 and not nan.within_tolerance
    finding = replay_finding(nan)
    assert finding is not None and finding.details["max_abs_error"] is None
    assert json.loads(json.dumps(finding.to_dict(), allow_nan=False))["code"] == FINDING_CODE
    assert replay_finding(same) is None
    with pytest.raises(ValueError, match=r"same shape; got \(3,\) \(reference\) and \(2,\)"):
        output_difference(a, a[:2])
    with pytest.raises(ValueError, match="atol must be a number >= 0; got atol=-1"):
        output_difference(a, a, atol=-1)


# ----------------------------------------------------------------------------- balanced, k


def _gate_probs(model: nn.Module, store: dict[str, torch.Tensor]) -> list[Any]:
    """Pre-hooks keeping, per gate, softmax of its logits recomputed from its input."""

    def keep(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            hidden = args[0].reshape(-1, args[0].shape[-1])
            weight = mod.weight if hasattr(mod, "weight") else mod.router_network.weight
            store[name] = F.softmax(F.linear(hidden.float(), weight.float()), dim=-1)

        return hook

    gates = {
        n: m
        for n, m in model.named_modules()
        if type(m).__name__.endswith("TopKRouter") or type(m).__name__.endswith("MoERouter")
    }
    return [g.register_forward_pre_hook(keep(n)) for n, g in gates.items()]


def test_balanced_gives_every_expert_the_same_load(mixtral: nn.Module) -> None:
    inputs = {"input_ids": _inputs(batch=2, length=7)["input_ids"]}
    probs: dict[str, torch.Tensor] = {}
    handles = _gate_probs(mixtral, probs)
    try:
        _, trace = _run(mixtral, inputs, "balanced", weights=True)
    finally:
        for handle in handles:
            handle.remove()
    tokens, k, experts = 14, 2, 8
    for j, name in enumerate(trace.layers):
        ids = trace.expert_ids[:, j]
        counts = np.bincount(ids.reshape(-1), minlength=experts)
        assert counts.sum() == tokens * k
        assert np.all(np.abs(counts - tokens * k / experts) <= 1), counts
        assert all(len(set(row)) == k for row in ids.tolist())  # k distinct experts
        chosen = np.take_along_axis(probs[name].numpy(), ids, axis=1)
        assert trace.weights is not None
        expected = chosen / chosen.sum(1, keepdims=True)
        np.testing.assert_allclose(trace.weights[:, j], expected, rtol=1e-5, atol=1e-7)


def test_balanced_on_reference_model_over_several_calls() -> None:
    torch.manual_seed(0)
    config = RouterConfig(hidden_size=16, num_experts=6, max_k=3, expert_hidden_size=16)
    model = MoEModel(config, num_layers=2).eval()
    replay = RoutingReplay(model, "balanced", k=2)
    with replay, RoutingTraceRecorder(model) as rec, torch.no_grad():
        for seed in range(3):  # 3 calls of 7 tokens: the load is balanced over the run
            model(torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(seed)))
    trace = rec.trace()
    for j in range(2):
        counts = np.bincount(trace.expert_ids[:, j].reshape(-1), minlength=6)
        assert np.all(np.abs(counts - 21 * 2 / 6) <= 1), counts
        assert (trace.expert_ids[:, j] >= 0).all()  # every token takes exactly k = 2


@pytest.mark.parametrize("k", [1, 3, 7])
def test_forced_k_is_the_models_own_top_k(mixtral: nn.Module, k: int) -> None:
    inputs = {"input_ids": _inputs(batch=2, length=6)["input_ids"]}
    probs: dict[str, torch.Tensor] = {}
    handles = _gate_probs(mixtral, probs)
    try:
        _, trace = _run(mixtral, inputs, {"k": k}, weights=True)
    finally:
        for handle in handles:
            handle.remove()
    assert trace.expert_ids.shape == (12, 3, k)
    for j, name in enumerate(trace.layers):
        ids = trace.expert_ids[:, j]
        top = probs[name].topk(k, dim=-1).indices.numpy()
        assert [set(row) for row in ids.tolist()] == [set(row) for row in top.tolist()]
        chosen = np.take_along_axis(probs[name].numpy(), ids, axis=1)
        assert trace.weights is not None
        expected = chosen / chosen.sum(1, keepdims=True)
        np.testing.assert_allclose(trace.weights[:, j], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_forced_weights_follow_the_routers_renormalisation(norm_topk_prob: bool) -> None:
    model = build_tiny("qwen2_moe").eval()
    for gate in _gates(model).values():
        gate.norm_topk_prob = norm_topk_prob  # Qwen2-MoE renormalises only when it is set
    inputs = {"input_ids": _inputs(batch=2, length=6)["input_ids"]}
    probs: dict[str, torch.Tensor] = {}
    handles = _gate_probs(model, probs)
    try:
        _, own = _run(model, inputs, weights=True)
        _, forced = _run(model, inputs, {"k": 3}, weights=True)
    finally:
        for handle in handles:
            handle.remove()
    assert own.weights is not None and forced.weights is not None
    for j, name in enumerate(forced.layers):
        chosen = np.take_along_axis(probs[name].numpy(), forced.expert_ids[:, j], axis=1)
        expected = chosen / chosen.sum(1, keepdims=True) if norm_topk_prob else chosen
        np.testing.assert_allclose(forced.weights[:, j], expected, rtol=1e-5, atol=1e-7)
    sums = own.weights.sum(axis=2)  # the model's own weights follow the same rule
    assert np.allclose(sums, 1.0, atol=1e-5) == norm_topk_prob


def test_forced_k_on_reference_dynamic_router() -> None:
    torch.manual_seed(0)
    config = RouterConfig(hidden_size=16, num_experts=6, max_k=3, expert_hidden_size=16)
    model = MoEModel(config, num_layers=2).eval()
    probs: dict[str, torch.Tensor] = {}
    handles = _gate_probs(model, probs)
    try:
        out, trace = _run(model, torch.randn(2, 4, 16), {"source": "top_k", "k": 5})
    finally:
        for handle in handles:
            handle.remove()
    for j, name in enumerate(trace.layers):
        top = probs[name].topk(5, dim=-1).indices.numpy()
        assert [set(r) for r in trace.expert_ids[:, j].tolist()] == [set(r) for r in top.tolist()]
    assert all(bool((r.k_per_token == 5).all()) for r in out.routings)


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_name_the_argument(mixtral: nn.Module) -> None:
    inputs = _inputs(batch=2, length=5)
    _, trace = _run(mixtral, inputs)
    with pytest.raises(ValueError, match=r"k must be an int >= 1; got k=0"):
        RoutingReplay(mixtral, k=0)
    with pytest.raises(ValueError, match=r"k must be in \[1, num_experts=8\] .*got k=9"):
        RoutingReplay(mixtral, "balanced", k=9).attach()
    with pytest.raises(ValueError, match=r"source='top_k' needs k"):
        RoutingReplay(mixtral, "top_k")
    with pytest.raises(TypeError, match=r"source must be a RoutingTrace, 'balanced' or 'top_k'"):
        RoutingReplay(mixtral, "uniform")
    with pytest.raises(ValueError, match=r"weights=True needs a trace with weights"):
        RoutingReplay(mixtral, trace, weights=True)
    with pytest.raises(ValueError, match=r"k applies to 'balanced' and 'top_k'"):
        RoutingReplay(mixtral, trace, k=2)

    two = RoutingTrace(
        trace.expert_ids[:, :2],
        trace.token_ids,
        trace.positions,
        trace.sequence,
        trace.layers[:2],
        trace.num_experts[:2],
    )
    with pytest.raises(ValueError, match=r"the model has 3 MoE layers .* got a trace of 2 layers"):
        RoutingReplay(mixtral, two).attach()
    six = copy.deepcopy(trace)
    six.num_experts[1] = 6
    with pytest.raises(
        ValueError, match=r"layer 'model.layers.1.mlp.gate' has num_experts=8; got num_experts=6"
    ):
        RoutingReplay(mixtral, six).attach()
    renamed = copy.deepcopy(trace)
    renamed.layers[0] = "layers.0.mlp.gate"
    with pytest.raises(ValueError, match=r"layers must be the model's \['model.layers.0"):
        RoutingReplay(mixtral, renamed).attach()


def test_trace_shorter_than_the_run_or_of_other_inputs(mixtral: nn.Module) -> None:
    inputs = {"input_ids": _inputs(batch=2, length=5)["input_ids"]}
    _, trace = _run(mixtral, inputs)
    longer = {"input_ids": _inputs(batch=3, length=5)["input_ids"]}
    longer["input_ids"][:2] = inputs["input_ids"]
    short = (
        r"5 token\(s\) of model call 1 are not in the trace, the first at sequence 2, "
        r"position 0; the trace holds 10 tokens of 2 sequences: it is shorter than the run"
    )
    with pytest.raises(ValueError, match=short), RoutingReplay(mixtral, trace), torch.no_grad():
        mixtral(**longer)
    other = {"input_ids": inputs["input_ids"].clone()}
    other["input_ids"][1, 3] = (other["input_ids"][1, 3] + 1) % 128
    expected = int(inputs["input_ids"][1, 3])
    with (
        pytest.raises(
            ValueError,
            match=rf"1 token\(s\) .* other token ids .* sequence 1, position 3: expected token id "
            rf"{expected} \(the trace's\), got {(expected + 1) % 128}",
        ),
        RoutingReplay(mixtral, trace),
        torch.no_grad(),
    ):
        mixtral(**other)
    # counted on the device instead (as on CUDA), raised when the replay is detached
    replay = RoutingReplay(mixtral, trace, sync_checks=False)
    deferred = r"trace: 15 token\(s\) of the run are not in the trace"
    with pytest.raises(ValueError, match=deferred), replay, torch.no_grad():
        mixtral(**longer)
        mixtral(**inputs)  # a second call: sequences 3 and 4, not in the trace either
    assert replay.calls == 2


def test_a_router_that_cannot_be_forced_is_named() -> None:
    model = build_tiny("gpt_oss")
    with pytest.raises(ValueError, match=r"cannot force the routing of layer .*GptOssTopKRouter"):
        RoutingReplay(model, "balanced").attach()
    assert not any(m._forward_hooks for m in model.modules())  # nothing left attached
