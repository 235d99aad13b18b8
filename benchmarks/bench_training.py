"""Training cost of moe-devkit's MoE layer and reference model against peers, in one run.

Two groups of cases, each timed side by side (interleaved: every rep times every case of the
group once, in an order rotated from rep to rep, so machine load hits all alike):

* ``layer``: forward + backward of one MoE layer (router + experts) on [tokens, hidden]
  inputs that need their gradient. moe-devkit's ``MoELayer`` backpropagates
  ``sum(out * g) + aux_loss`` (its router's losses are part of its step); transformers'
  ``OlmoeSparseMoeBlock`` (softmax top-k router + ``OlmoeExperts``) and Liger-Kernel's
  fused MoE experts behind the same router backpropagate ``sum(out * g)`` (OLMoE adds its
  load-balancing loss outside the block).
* ``model``: a whole training step (zero_grad, forward, backward, ``AdamW.step``) of the
  reference 2-layer ``MoEModel`` (each layer ``x + MoE(RMSNorm(x))``, no attention, no
  embedding), against the same 2-layer stack with OLMoE's sparse MoE block (and Liger's
  experts) in place of the MoE, so the steps hold the same work but for the MoE itself.

moe-devkit runs static top-max_k (``StaticTopKRouter``) and dynamic k (``DynamicMoERouter``
in top_p mode, the threshold bisected per layer on the run's own input to each mean k of
``--mean-k``: a per-token spread of k, as a confident router gives). The peers route the
same top-max_k as the static router (same router and expert weights). The table gives ms
(median, p10, p90 over the reps), the active token-expert pairs against static top-max_k's,
dynamic/static time, and each case's time against the fastest peer of its group.

    python benchmarks/bench_training.py                                 # CPU, small shape
    python benchmarks/bench_training.py --device cuda --preset h100 --json build/train.json
    python benchmarks/bench_training.py --device cuda --preset h100 --check-sync
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import statistics
from collections.abc import Callable
from typing import Any

import torch
from _args import check_device, check_output_path, check_range, non_negative_int, positive_int
from bench_moe_layer import calibrate_top_p, machine_name, timer
from torch import nn

from moe_devkit import MoELayer, RouterConfig, StaticTopKRouter
from moe_devkit.reporting import write_atomic
from moe_devkit.routers.torch_router import MoEModel, RoutingDecision


@dataclasses.dataclass(frozen=True)
class Preset:
    tokens: int
    hidden: int
    ffn: int
    experts: int
    max_k: int
    mean_k: tuple[float, ...]
    dtype: str


PRESETS = {
    "cpu": Preset(512, 64, 128, 16, 8, (2.0, 4.0, 6.0), "float32"),
    "h100": Preset(8192, 2048, 1024, 64, 8, (2.0, 4.0, 6.0), "bfloat16"),
}
NUM_LAYERS = 2
ROUTER_SCALE = 4.0  # router weights x4: logits with std ~2, a confident (trained) router
STEPS = {
    "layer": "forward + backward of one MoE layer (router + experts), input gradient included",
    "model": f"zero_grad + forward + backward + AdamW.step of {NUM_LAYERS} pre-norm residual "
    "MoE layers (x + MoE(RMSNorm(x))), no attention",
}
PEERS = ("olmoe grouped_mm", "olmoe eager", "liger fused_moe")


@dataclasses.dataclass
class Case:
    """One timed case: ``step`` runs it once; ``pairs`` reads the last step's active pairs."""

    name: str
    step: Callable[[], object]
    peer: bool
    pairs: Callable[[], int] | None = None
    routing_stats: Callable[[], dict[str, float]] | None = None
    target_mean_k: float | None = None
    top_p: list[float] | None = None


def _k_stats(routings: list[RoutingDecision]) -> dict[str, float]:
    k = torch.cat([r.k_per_token.detach().reshape(-1) for r in routings]).float()
    return dict(
        mean_k=float(k.mean()), k_std=float(k.std()), k_min=float(k.min()), k_max=float(k.max())
    )


def _active_pairs(routings: list[RoutingDecision]) -> int:
    return sum(int(r.active.sum()) for r in routings)


# ----------------------------------------------------------------------------- moe-devkit


def _config(p: Preset) -> RouterConfig:
    return RouterConfig(
        hidden_size=p.hidden, num_experts=p.experts, min_k=1, max_k=p.max_k,
        expert_hidden_size=p.ffn, mode="top_p",
    )  # fmt: skip


def devkit_model(p: Preset, device: torch.device, dtype: torch.dtype) -> MoEModel:
    """The reference model with top_p routers whose weights are scaled ``ROUTER_SCALE``."""
    torch.manual_seed(0)
    with device:  # initialised where it runs (the h100 shape has 0.8 G parameters)
        model = MoEModel(_config(p), num_layers=NUM_LAYERS).to(dtype)
    with torch.no_grad():
        for block in model.layers:
            block.moe.router.router_network.weight.mul_(ROUTER_SCALE)
    return model


def make_static(model: MoEModel, device: torch.device, dtype: torch.dtype) -> MoEModel:
    """A copy of ``model`` with a StaticTopKRouter (k = max_k, same router weights) per layer."""
    with device:
        static = MoEModel(model.config, num_layers=len(model.layers)).to(dtype)
        for block in static.layers:
            block.moe.router = StaticTopKRouter(model.config).to(dtype)
    static.load_state_dict(model.state_dict(), strict=False)  # norms, gates, experts
    return static


def make_dynamic(model: MoEModel, x: torch.Tensor, mean_k: float) -> tuple[MoEModel, list[float]]:
    """A copy of ``model`` whose layers' top_p are bisected to mean k ``mean_k`` on the input
    each layer sees when the model runs on ``x``; returns it and the thresholds."""
    with x.device:
        dynamic = MoEModel(model.config, num_layers=len(model.layers)).to(x.dtype)
    dynamic.load_state_dict(model.state_dict())
    thresholds = []
    h = x.detach()
    with torch.no_grad():
        for block in dynamic.layers:
            thresholds.append(calibrate_top_p(block.moe, block.norm(h), mean_k).top_p)
            h = block(h).hidden_states
    return dynamic, thresholds


def devkit_layer_case(
    name: str, layer: MoELayer, x: torch.Tensor, g: torch.Tensor, **kw: Any
) -> Case:
    last: list[RoutingDecision] = []

    def step() -> object:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out = layer(x)
        ((out.hidden_states.float() * g).sum() + out.routing.aux_loss).backward()
        last[:] = [out.routing]
        return out

    return Case(
        name, step, peer=False, pairs=lambda: _active_pairs(last),
        routing_stats=lambda: _k_stats(last), **kw,
    )  # fmt: skip


def devkit_model_case(
    name: str, model: MoEModel, x: torch.Tensor, g: torch.Tensor, **kw: Any
) -> Case:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)  # k stays put over the reps
    last: list[RoutingDecision] = []

    def step() -> object:
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        ((out.hidden_states.float() * g).sum() + out.aux_loss).backward()
        optimizer.step()
        last[:] = list(out.routings)
        return out

    return Case(
        name, step, peer=False, pairs=lambda: _active_pairs(last),
        routing_stats=lambda: _k_stats(last), **kw,
    )  # fmt: skip


# ----------------------------------------------------------------------------- peers


def olmoe_block(layer: MoELayer, implementation: str, liger: bool = False) -> nn.Module:
    """transformers' OlmoeSparseMoeBlock with ``layer``'s router and expert weights, its
    experts run by ``implementation`` ("grouped_mm", "eager"); with ``liger`` the experts
    are Liger-Kernel's ``LigerExperts`` (its fused MoE, Triton) instead."""
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    c = layer.config
    config = OlmoeConfig(
        hidden_size=c.hidden_size, intermediate_size=c.expert_hidden_size,
        num_experts=c.num_experts, num_experts_per_tok=c.max_k, norm_topk_prob=True,
        experts_implementation=implementation,
    )  # fmt: skip
    weight = layer.experts.w_down
    block = OlmoeSparseMoeBlock(config).to(weight.device, weight.dtype)
    if liger:
        from liger_kernel.transformers import LigerExperts

        block.experts = LigerExperts(config).to(weight.device, weight.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.router_network.weight)
        block.experts.gate_up_proj.copy_(layer.experts.w_gate_up)
        block.experts.down_proj.copy_(layer.experts.w_down)
    return block


class PeerModel(nn.Module):
    """The reference model's structure (x + MoE(RMSNorm(x)) per layer) around peer blocks."""

    def __init__(self, model: MoEModel, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.RMSNorm(model.config.hidden_size) for _ in blocks)
        self.norms.load_state_dict(_norms(model))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(0)  # OLMoE's block takes [batch, seq, hidden]
        for norm, block in zip(self.norms, self.blocks, strict=True):
            h = h + block(norm(h))
        return h.squeeze(0)


def _norms(model: MoEModel) -> dict[str, torch.Tensor]:
    return {f"{i}.weight": block.norm.weight for i, block in enumerate(model.layers)}


def peer_skip_reason(name: str, device: torch.device) -> str | None:
    """Why peer ``name`` cannot run here, or None."""
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install 'moe-devkit[hf]')"
    if name.startswith("liger"):
        if device.type != "cuda":
            return "Liger-Kernel's fused MoE (LigerExperts) is Triton kernels: needs a CUDA device"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel is not installed (pip install liger-kernel: 0.8.5 has it)"
    return None


def peer_block(name: str, layer: MoELayer) -> nn.Module:
    if name == "liger fused_moe":
        return olmoe_block(layer, "eager", liger=True)
    return olmoe_block(layer, name.split()[1])


def peer_layer_case(name: str, block: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Case:
    def step() -> object:
        block.zero_grad(set_to_none=True)
        x.grad = None
        out = block(x.unsqueeze(0)).squeeze(0)
        (out.float() * g).sum().backward()
        return out

    return Case(name, step, peer=True)


def peer_model_case(name: str, model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Case:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step() -> object:
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        (out.float() * g).sum().backward()
        optimizer.step()
        return out

    return Case(name, step, peer=True)


# ----------------------------------------------------------------------------- the groups


def build_group(
    group: str, p: Preset, mean_ks: tuple[float, ...], device: torch.device, dtype: torch.dtype
) -> tuple[list[Case], dict[str, str]]:
    """The cases of ``group`` ("layer" or "model") and the peers skipped, with the reason."""
    reference = devkit_model(p, device, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(p.tokens, p.hidden, generator=gen).to(device, dtype)
    g = torch.randn(p.tokens, p.hidden, generator=gen).to(device) / p.tokens
    static = make_static(reference, device, dtype)
    dynamics = {k: make_dynamic(reference, x, k) for k in mean_ks}
    del reference
    cases: list[Case] = []
    skipped: dict[str, str] = {}
    if group == "layer":  # the first layer's own input, on which its top_p was bisected
        with torch.no_grad():
            x = static.layers[0].norm(x)
        x.requires_grad_(True)
        cases.append(devkit_layer_case("devkit static", static.layers[0].moe, x, g))
        for k, (model, top_p) in dynamics.items():
            name = f"devkit dynamic k~{k:g}"
            layer = model.layers[0].moe
            cases.append(devkit_layer_case(name, layer, x, g, target_mean_k=k, top_p=top_p[:1]))
    else:
        cases.append(devkit_model_case("devkit static", static, x, g))
        for k, (model, top_p) in dynamics.items():
            name = f"devkit dynamic k~{k:g}"
            cases.append(devkit_model_case(name, model, x, g, target_mean_k=k, top_p=top_p))
    for name in PEERS:
        reason = peer_skip_reason(name, device)
        if reason is not None:
            skipped[name] = reason
            continue
        try:
            if group == "layer":
                cases.append(peer_layer_case(name, peer_block(name, static.layers[0].moe), x, g))
            else:
                blocks = [peer_block(name, block.moe) for block in static.layers]
                peer = PeerModel(static, blocks).to(device, dtype)
                cases.append(peer_model_case(name, peer, x, g))
        except Exception as exc:  # an installed peer that cannot build here
            skipped[name] = f"cannot build: {type(exc).__name__}: {exc}"
    return cases, skipped


def check_sync(cases: list[Case]) -> dict[str, str | None]:
    """Each moe-devkit case run once under ``set_sync_debug_mode("error")``: None where it
    does not synchronise, else the first line of the error at its first sync."""
    found: dict[str, str | None] = {}
    for case in cases:
        if case.peer:
            continue
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            case.step()
            found[case.name] = None
        except RuntimeError as exc:
            found[case.name] = str(exc).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    return found


def run_group(
    group: str, cases: list[Case], device: torch.device, reps: int, warmup: int, static_pairs: int
) -> dict[str, Any]:
    """Times ``cases`` interleaved; returns each case's figures by name."""
    time_ms = timer(device)
    for _ in range(warmup):
        for case in cases:
            case.step()
    pairs_before = {c.name: c.pairs() for c in cases if c.pairs is not None}
    samples: dict[str, list[float]] = {c.name: [] for c in cases}
    for rep in range(reps):
        shift = rep % len(cases)
        for case in cases[shift:] + cases[:shift]:
            samples[case.name].append(time_ms(case.step))
    out: dict[str, Any] = {}
    for case in cases:
        s = sorted(samples[case.name])
        row: dict[str, Any] = dict(
            median_ms=statistics.median(s), p10_ms=s[len(s) // 10], p90_ms=s[(9 * len(s)) // 10],
            samples_ms=samples[case.name],
        )  # fmt: skip
        if case.pairs is not None and case.routing_stats is not None:
            after = case.pairs()
            row.update(
                active_pairs=after,
                active_pairs_first=pairs_before[case.name],
                pair_ratio=after / static_pairs,
                target_mean_k=case.target_mean_k,
                top_p=case.top_p,
                **case.routing_stats(),
            )
        out[case.name] = row
    static_ms = out["devkit static"]["median_ms"]
    peer_ms = {c.name: out[c.name]["median_ms"] for c in cases if c.peer}
    fastest = min(peer_ms, key=peer_ms.__getitem__) if peer_ms else None
    for row in out.values():
        row["time_ratio_vs_static"] = row["median_ms"] / static_ms
        row["vs_fastest_peer"] = row["median_ms"] / peer_ms[fastest] if fastest else None
    return {"step": STEPS[group], "fastest_peer": fastest, "cases": out}


def print_group(group: str, result: dict[str, Any], skipped: dict[str, str]) -> None:
    print(f"\n{group}: {result['step']}")
    fastest = result["fastest_peer"]
    vs = f"vs {fastest}" if fastest else "vs peer"
    head = f"{'case':20} {'median ms':>10} {'p10':>8} {'p90':>8} {'mean k':>7} {'k std':>6}"
    print(f"{head} {'pairs/static':>12} {'time/static':>11} {vs:>22}")
    for name, row in result["cases"].items():
        mean_k = f"{row['mean_k']:7.2f}" if "mean_k" in row else f"{'':7}"
        k_std = f"{row['k_std']:6.2f}" if "k_std" in row else f"{'':6}"
        pr = f"{row['pair_ratio']:12.3f}" if "pair_ratio" in row else f"{'':12}"
        peer = f"{row['vs_fastest_peer']:22.3f}" if row["vs_fastest_peer"] else f"{'':22}"
        print(
            f"{name:20} {row['median_ms']:10.3f} {row['p10_ms']:8.3f} {row['p90_ms']:8.3f} "
            f"{mean_k} {k_std} {pr} {row['time_ratio_vs_static']:11.3f} {peer}"
        )
    for name, reason in skipped.items():
        print(f"{name:20} skipped: {reason}")


def parse_mean_k(parser: argparse.ArgumentParser, text: str, max_k: int) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        parser.error(f"--mean-k: expected comma-separated numbers such as 2,4,6; got {text!r}")
    for value in values:
        check_range(parser, "--mean-k", value, 1, max_k, why=" (min_k to the preset's max_k)")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="default: the preset's (cpu float32, h100 bfloat16)")  # fmt: skip
    parser.add_argument("--mean-k", help="dynamic mean k values, comma-separated (default 2,4,6)")
    parser.add_argument("--groups", default="layer,model", help="layer, model or both")
    parser.add_argument("--reps", type=positive_int, default=15)
    parser.add_argument("--warmup", type=non_negative_int, default=3)
    parser.add_argument("--threads", type=non_negative_int, default=0,
                        help="torch CPU threads (0: torch's default)")  # fmt: skip
    parser.add_argument(
        "--check-sync", action="store_true",
        help="CUDA only: also run each moe-devkit case once under "
        "torch.cuda.set_sync_debug_mode('error') and report whether it synchronises",
    )  # fmt: skip
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    mean_ks = parse_mean_k(parser, args.mean_k, preset.max_k) if args.mean_k else preset.mean_k
    groups = [g for g in args.groups.split(",") if g]
    if not groups or set(groups) - set(STEPS):
        parser.error(f"--groups: expected layer, model or layer,model; got {args.groups!r}")
    check_device(parser, args.device)
    device = torch.device(args.device)
    if args.check_sync and device.type != "cuda":
        parser.error(f"--check-sync needs a CUDA --device; got --device {args.device!r}")
    check_output_path(parser, args.json, "--json")  # before the run, not after it
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or preset.dtype
    dtype = getattr(torch, dtype_name)

    result: dict[str, Any] = {
        "machine": machine_name(device),
        "preset": args.preset,
        "shape": dict(
            tokens=preset.tokens, hidden=preset.hidden, ffn=preset.ffn,
            experts=preset.experts, max_k=preset.max_k, layers=NUM_LAYERS,
        ),
        "dtype": dtype_name, "reps": args.reps, "warmup": args.warmup,
        "mean_k": list(mean_ks), "torch": torch.__version__,
    }  # fmt: skip
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:
        result["transformers"] = None
    print(f"machine: {result['machine']}")
    print(f"preset {args.preset}: {result['shape']}, {dtype_name}, {args.reps} reps interleaved")
    for group in groups:
        cases, skipped = build_group(group, preset, mean_ks, device, dtype)
        layers = 1 if group == "layer" else NUM_LAYERS
        static_pairs = preset.tokens * preset.max_k * layers
        if args.check_sync:
            result.setdefault("check_sync", {})[group] = check_sync(cases)
        result[group] = run_group(group, cases, device, args.reps, args.warmup, static_pairs)
        result[group]["skipped"] = skipped
        print_group(group, result[group], skipped)
        if args.check_sync:
            for name, error in result["check_sync"][group].items():
                print(f"  check-sync {name}: {'no sync' if error is None else error}")
        del cases
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
