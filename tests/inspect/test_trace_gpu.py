"""On CUDA, recording a routing trace makes no host synchronisation, chunk flushes included
(the held calls are copied without blocking into pinned host memory; only ``trace()``
waits), and the trace equals the one the same weights record on the CPU from the same
inputs. A recorded call issues under one aten op on average (its tensors are held and
copied in batches), and a router output modified in place after the recorder read it is
copied at each call from then on, without a synchronisation either.

The reference MoEModel runs whole under ``torch.cuda.set_sync_debug_mode("error")`` (any
synchronisation raises). transformers' Mixtral synchronises by itself (the causal-mask
construction reads the attention mask, the eager experts loop reads which experts were hit),
so its calls run under mode "warn", which reports every synchronising call with the Python
frame that made it, and none may come from moe-devkit. The ``cpu`` cases run the same checks
with the model on the CPU (the budget, the flushes, the pads, the model's own decisions).

Ties: the CUDA trace must equal the CUDA model's own decisions exactly. Against the CPU trace,
the expert sets (compared as sets: the order of two near-equal experts may swap) must be equal
for every token and layer except where the CPU router's decision is near-tied: the gap between
the last selected and the first unselected probability is below ``TIE``, or (top-p routing)
a cumulative probability lies within ``TIE`` of ``top_p``. A token with a tied layer is left
out of that layer and of the later ones (its hidden state legitimately differs after it);
at most ``MAX_TIED`` of the tokens may be left out, so the comparison cannot pass vacuously.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from recorder_ops import HookOps
from torch import nn

import moe_devkit
from moe_devkit.inspect.trace import RoutingTrace, RoutingTraceRecorder
from moe_devkit.routers.torch_router import MoEModel, RouterConfig

pytestmark = pytest.mark.usefixtures("one_thread")

PACKAGE = str(Path(moe_devkit.__file__).parent)
TIE = 1e-3  # float32 CPU and CUDA probabilities differ by far less (no TF32 on this path)
MAX_TIED = 0.1
CALLS = 5
BATCH, LENGTH = 2, 8  # 16 tokens a call
CHUNK = 2 * BATCH * LENGTH  # a chunk of two calls: flushed before the third and the fifth
BUDGET = 4 * BATCH * LENGTH + 8  # the fifth call keeps 8 of its 16 rows
TOP_P = 0.6
ROUTER_SCALE = 8.0


def _near_tied(probs: torch.Tensor, k: torch.Tensor, top_p: float | None) -> torch.Tensor:
    """bool [N]: the top-k (or top-p) selection of ``probs`` [N, E] is within TIE of a tie."""
    ordered = probs.float().sort(dim=1, descending=True).values
    experts = ordered.shape[1]
    last = (k.long() - 1).clamp(0, experts - 1)[:, None]
    after = k.long().clamp(0, experts - 1)[:, None]
    gap = ordered.gather(1, last) - ordered.gather(1, after)
    tied = (gap[:, 0] < TIE) & (k < experts)
    if top_p is not None:
        tied |= ((ordered.cumsum(1) - top_p).abs() < TIE).any(1)
    return tied


def _assert_traces_agree(cuda: RoutingTrace, cpu: RoutingTrace, tied: np.ndarray) -> None:
    """``tied`` bool [T, L]: the CPU decision of token t in layer l is near-tied."""
    for name in ("token_ids", "positions", "sequence"):
        np.testing.assert_array_equal(getattr(cuda, name), getattr(cpu, name), err_msg=name)
    assert (cuda.layers, cuda.num_experts) == (cpu.layers, cpu.num_experts)
    assert cuda.expert_ids.shape == cpu.expert_ids.shape
    left_out = np.logical_or.accumulate(tied, axis=1)  # a tied layer and every later one
    assert left_out.any(1).mean() <= MAX_TIED, f"{left_out.any(1).mean():.0%} tokens tied"
    sets_cuda = np.sort(cuda.expert_ids, axis=2)
    sets_cpu = np.sort(cpu.expert_ids, axis=2)
    same = (sets_cuda == sets_cpu).all(2)
    assert (same | left_out).all(), np.argwhere(~(same | left_out))
    if cuda.weights is not None and cpu.weights is not None:
        by_id_cuda = np.take_along_axis(cuda.weights, np.argsort(cuda.expert_ids, 2), 2)
        by_id_cpu = np.take_along_axis(cpu.weights, np.argsort(cpu.expert_ids, 2), 2)
        np.testing.assert_allclose(by_id_cuda[~left_out], by_id_cpu[~left_out], atol=1e-4)


def _record(
    model: nn.Module, calls: list[dict[str, torch.Tensor]], *, debug: str = "default"
) -> tuple[RoutingTrace, list[Any], list[str]]:
    """Records ``calls`` of ``model`` with chunk flushes and a budget that fills in the last
    call; on CUDA the calls run under sync-debug mode ``debug``. Returns (trace, outputs,
    the sync warnings raised inside moe-devkit)."""
    recorder = RoutingTraceRecorder(model, max_tokens=BUDGET, chunk_tokens=CHUNK, weights=True)
    outputs: list[Any] = []
    cuda = next(model.parameters()).is_cuda
    with recorder, torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(debug)
        try:
            outputs.extend(model(**call) for call in calls)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    ours = [
        f"{w.filename}:{w.lineno}: {w.message}"
        for w in caught
        if "synchroniz" in str(w.message) and w.filename.startswith(PACKAGE)
    ]
    assert recorder.rows_used == BUDGET
    return recorder.trace(), outputs, ours


def _reference_case(device: str) -> None:
    torch.manual_seed(0)
    config = RouterConfig(
        hidden_size=32, num_experts=8, min_k=1, max_k=3, mode="top_p", top_p=TOP_P,
        expert_hidden_size=32,
    )  # fmt: skip
    cpu_model = MoEModel(config, num_layers=2).eval()
    with torch.no_grad():  # peaked routing: k from 1 to 3, few near-ties
        for layer in cpu_model.layers:
            layer.moe.router.router_network.weight.mul_(ROUTER_SCALE)
    model = copy.deepcopy(cpu_model).to(device)
    generator = torch.Generator().manual_seed(1)
    xs = [torch.randn(BATCH, LENGTH, 32, generator=generator) for _ in range(CALLS)]
    with torch.no_grad():
        model(xs[0].to(device))  # first call: the layers' one-off probes may synchronise
    trace, outputs, ours = _record(
        model, [{"hidden_states": x.to(device)} for x in xs], debug="error"
    )
    assert not ours, ours
    cpu_trace, cpu_outputs, _ = _record(cpu_model, [{"hidden_states": x} for x in xs])
    assert trace.num_tokens == BUDGET and (trace.token_ids == -1).all()
    np.testing.assert_array_equal(trace.sequence, np.repeat(np.arange(2 * CALLS), LENGTH)[:BUDGET])
    np.testing.assert_array_equal(trace.positions, np.tile(np.arange(LENGTH), 2 * CALLS)[:BUDGET])
    assert trace.weights is not None
    tied = []
    for j in range(2):  # the trace holds exactly the model's own decisions
        routings = [out.routings[j] for out in outputs]
        ids = torch.cat([r.expert_indices.cpu() for r in routings])[:BUDGET]
        np.testing.assert_array_equal(trace.expert_ids[:, j], ids.numpy())
        weights = torch.cat([r.expert_weights.cpu() for r in routings])[:BUDGET]
        np.testing.assert_array_equal(trace.weights[:, j], weights.numpy())
        on_cpu = [out.routings[j] for out in cpu_outputs]
        tied.append(torch.cat([_near_tied(r.router_probs, r.k_per_token, TOP_P) for r in on_cpu]))
    _assert_traces_agree(trace, cpu_trace, torch.stack(tied, 1)[:BUDGET].numpy())


def _watch_gates(model: nn.Module, seen: list[list[Any]]) -> list[Any]:
    """Appends what each gate returns, (logits, scores, indices), to its list in ``seen``."""
    gates = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
    assert len(gates) == len(seen)
    return [
        gate.register_forward_hook(lambda mod, args, out, calls=calls: calls.append(out))
        for gate, calls in zip(gates, seen, strict=True)
    ]


def _mixtral_case(device: str) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=128, num_local_experts=8, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    cpu_model = transformers.MixtralForCausalLM(config).float().eval()
    with torch.no_grad():  # peaked routing: few near-ties
        for layer in cpu_model.model.layers:
            layer.mlp.gate.weight.mul_(ROUTER_SCALE)
    model = copy.deepcopy(cpu_model).to(device)
    generator = torch.Generator().manual_seed(1)
    calls = []
    for i in range(CALLS):
        ids = torch.randint(0, 128, (BATCH, LENGTH), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, : i % 3] = 0  # left padding in some calls: the mask path, pads dropped
        calls.append({"input_ids": ids, "attention_mask": mask})
    on_device = [{name: t.to(device) for name, t in call.items()} for call in calls]
    with torch.no_grad():
        model(**on_device[0])  # first call: lazy set-up outside the recorded calls
    # what each gate returned: (logits, scores, indices) per call, read by hooks
    seen: list[list[Any]] = [[], []]
    cpu_seen: list[list[Any]] = [[], []]
    handles = _watch_gates(model, seen) + _watch_gates(cpu_model, cpu_seen)
    try:
        trace, _, ours = _record(model, on_device, debug="warn")
        cpu_trace, _, _ = _record(cpu_model, calls)
    finally:
        for handle in handles:
            handle.remove()
    assert not ours, ours
    valid = torch.cat([call["attention_mask"].reshape(-1) for call in calls])[:BUDGET].bool()
    assert trace.num_tokens == int(valid.sum())  # pads of the kept rows dropped
    kept = torch.cat([call["input_ids"].reshape(-1) for call in calls])[:BUDGET][valid]
    np.testing.assert_array_equal(trace.token_ids, kept.numpy())
    assert trace.weights is not None
    tied = []
    for j in range(2):  # the trace holds exactly what the gates returned
        ids = torch.cat([out[2].cpu() for out in seen[j]])[:BUDGET][valid]
        np.testing.assert_array_equal(trace.expert_ids[:, j], ids.numpy())
        scores = torch.cat([out[1].cpu() for out in seen[j]])[:BUDGET][valid]
        np.testing.assert_array_equal(trace.weights[:, j], scores.numpy())
        probs = torch.cat([out[0].float().softmax(-1) for out in cpu_seen[j]])[:BUDGET][valid]
        tied.append(_near_tied(probs, torch.full((probs.shape[0],), 2), None))
    _assert_traces_agree(trace, cpu_trace, torch.stack(tied, 1).numpy())


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_reference_model_records_without_sync_what_the_cpu_records(device: str) -> None:
    _reference_case(device)


@pytest.mark.parametrize("device", DEVICES)
def test_mixtral_records_without_a_sync_of_its_own_what_the_cpu_records(device: str) -> None:
    _mixtral_case(device)


def _small_reference(device: str) -> MoEModel:
    torch.manual_seed(0)
    config = RouterConfig(hidden_size=32, num_experts=8, max_k=3, expert_hidden_size=32)
    return MoEModel(config, num_layers=2).to(device).eval()


def _sync_checked(device: str, calls: Callable[[], None]) -> None:
    """Runs ``calls`` under sync-debug mode "error" on CUDA (any synchronisation raises)."""
    if device != "cuda":
        calls()
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        calls()
    finally:
        torch.cuda.set_sync_debug_mode(0)


OP_CALLS = 32


@pytest.mark.parametrize("device", DEVICES)
def test_recorded_calls_issue_under_one_op_each_without_sync(device: str) -> None:
    """32 reference-model calls with weights and the copy ``trace()`` makes first: the first
    call's experts and weights are cloned (2 layers x 2), then two batches of 16 calls are
    copied on the device, one group each of experts and of weights: a ``torch.cat`` each;
    the copy to the host joins them (a ``torch.cat`` a group; on CUDA also the pinned host
    buffer and the non-blocking copy into it): under one op a call. Nothing synchronises."""
    model = _small_reference(device)
    x = torch.randn(BATCH, LENGTH, 32, device=device)
    with torch.no_grad():
        model(x)  # first call: the layers' one-off probes may synchronise
    recorder = RoutingTraceRecorder(model, weights=True, max_tokens=4096).attach()
    counter = HookOps(recorder)
    outputs: list[Any] = []

    def calls() -> None:
        with counter, torch.no_grad():
            outputs.extend(model(x) for _ in range(OP_CALLS))
            counter.counting = True
            recorder._flush()
            counter.counting = False

    _sync_checked(device, calls)
    to_host = 4 if device == "cuda" else 1  # on CUDA: cat, pinned buffer (one or two), copy
    assert counter.ops <= 2 * 2 + 2 * 2 + 2 * to_host
    assert counter.ops / OP_CALLS < 1
    trace = recorder.trace()
    recorder.detach()
    assert trace.num_tokens == OP_CALLS * BATCH * LENGTH and trace.weights is not None
    for j in range(2):
        ids = torch.cat([out.routings[j].expert_indices.cpu() for out in outputs])
        np.testing.assert_array_equal(trace.expert_ids[:, j], ids.numpy())
        weights = torch.cat([out.routings[j].expert_weights.cpu() for out in outputs])
        np.testing.assert_array_equal(trace.weights[:, j], weights.numpy())


@pytest.mark.parametrize("device", DEVICES)
def test_router_outputs_modified_in_place_are_copied_without_sync(device: str) -> None:
    """A hook after the recorder's scales the second router's weights in place at each call
    (by 1: the model's values stay what they were, their version counter moves). The
    recorder finds it at the second call, warns once naming the layer and copies that
    layer at each call from then on; the trace holds the model's decisions. Nothing
    synchronises."""
    model = _small_reference(device)
    generator = torch.Generator().manual_seed(2)
    xs = [torch.randn(BATCH, LENGTH, 32, generator=generator).to(device) for _ in range(CALLS)]
    with torch.no_grad():
        model(xs[0])  # first call: the layers' one-off probes may synchronise
    recorder = RoutingTraceRecorder(model, weights=True, chunk_tokens=CHUNK).attach()
    routers = [m for name, m in model.named_modules() if name.endswith("router")]
    layer = next(name for name, m in model.named_modules() if m is routers[1])

    def rescale(mod: nn.Module, args: Any, out: Any) -> None:
        out.expert_weights.mul_(1.0)

    handle = routers[1].register_forward_hook(rescale)
    outputs: list[Any] = []

    def calls() -> None:
        with torch.no_grad():
            outputs.extend(model(x) for x in xs)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _sync_checked(device, calls)
    finally:
        handle.remove()
    trace = recorder.trace()
    recorder.detach()
    refused = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(refused) == 1 and repr(layer) in str(refused[0].message)
    assert recorder.modified == {} and layer in recorder._copied
    assert trace.weights is not None and trace.num_tokens == CALLS * BATCH * LENGTH
    for j in range(2):
        ids = torch.cat([out.routings[j].expert_indices.cpu() for out in outputs])
        np.testing.assert_array_equal(trace.expert_ids[:, j], ids.numpy())
        weights = torch.cat([out.routings[j].expert_weights.cpu() for out in outputs])
        np.testing.assert_array_equal(trace.weights[:, j], weights.numpy())
