"""Training-step cost of watching the routing live: the inspector attached, with
``metrics()`` and ``check_alarms()`` every ``--log-every`` steps (what the Trainer callback
does at each logging step), against the same training steps with no inspector.

Two copies of the model, built from the same seed (same weights, same batch, so the same
routing and the same work), train side by side: one with the inspector attached once for the
whole run, as a training callback does, one without. They run in alternating blocks of
``--log-every`` optimizer steps, so machine load hits both alike, in two arms: the copy
built second watched, then two new copies with the one built first watched (two copies of a
model need not run alike; the arms carry that bias opposite ways). The ratio is the median
of the paired block ratios of both arms, with a distribution-free 95% interval (order
statistics of the paired ratios), and each arm's median beside it. Beside it, the time
spent inside the inspector's own hooks and in
``metrics()`` + ``check_alarms()``, as a share of the watched step time (a direct reading,
far less sensitive to machine load than the ratio of two step times).

``--size tiny`` (the default) builds models of hidden size 256 on 1024 tokens: on a GPU their
steps are bound by kernel launches, so every microsecond of host time in a hook lands on the
critical path (the worst case for a watcher). ``--size base`` builds models of hidden size
1024 on 4096 tokens, whose steps keep an H100 busy, as training steps do.

    python benchmarks/bench_training_overhead.py                      # CPU, both models
    python benchmarks/bench_training_overhead.py --device cuda --model hf --size base
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable

import torch
from _args import check_device, check_output_path, positive_int  # type: ignore[import-not-found]
from bench_moe_layer import machine_name  # type: ignore[import-not-found]
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moe_devkit import RouterConfig
from moe_devkit.inspect import RouterInspector
from moe_devkit.reporting import write_atomic
from moe_devkit.routers.torch_router import MoEModel

#: size -> (hidden size, batch, sequence length)
SIZES = {"tiny": (256, 8, 128), "base": (1024, 8, 512)}


def reference_model(
    device: torch.device, size: str = "tiny"
) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    """moe-devkit's reference model (2 MoE layers, 16 experts, dynamic k) and its loss."""
    hidden, batch, length = SIZES[size]
    config = RouterConfig(hidden_size=hidden, num_experts=16, max_k=4, expert_hidden_size=hidden)
    model = MoEModel(config, num_layers=2).to(device)
    x = torch.randn(batch, length, hidden, device=device)

    def loss() -> torch.Tensor:
        out = model(x)
        hidden = out[0] if isinstance(out, tuple) else getattr(out, "hidden_states", out)
        aux = getattr(out, "aux_loss", None)
        value = hidden.float().square().mean()
        return value + aux if isinstance(aux, torch.Tensor) else value

    return model, loss


def transformers_model(
    device: torch.device, size: str = "tiny"
) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    """A small Mixtral (4 layers, 8 experts, top-2) built from its config, LM loss + aux."""
    import transformers

    hidden, batch, length = SIZES[size]
    config = transformers.MixtralConfig(
        vocab_size=512 if size == "tiny" else 8192, hidden_size=hidden,
        intermediate_size=hidden, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=max(256, length), output_router_logits=True,
    )  # fmt: skip
    model = transformers.MixtralForCausalLM(config).to(device)
    ids = torch.randint(0, config.vocab_size, (batch, length), device=device)

    def loss() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss  # includes the router aux loss

    return model, loss


MODELS = {"reference": reference_model, "hf": transformers_model}


def paired_interval(ratios: list[float]) -> tuple[float, float]:
    """A distribution-free 95% interval of the median of ``ratios`` (order statistics)."""
    values, n = sorted(ratios), len(ratios)
    half = 1.96 * math.sqrt(n) / 2
    low, high = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    return values[low], values[high]


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while it is on (``counting``), into ``ops[key]``.

    The proxy of the hooks' cost on a launch-bound GPU: each op is host time on the critical
    path (about 5-10 us on CUDA, a kernel launch for most). Views and metadata ops count too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops = {"hooks": 0, "metrics": 0}
        self.key: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if self.key is not None:
            self.ops[self.key] += 1
        return func(*args, **(kwargs or {}))


def time_hooks(inspector: RouterInspector, spent: dict[str, float], counter: OpCounter) -> None:
    """Wraps each hook the attached ``inspector`` registered so that the time spent in it is
    added to ``spent["hooks"]`` (host time: on CUDA, the time to issue its work), and the
    aten ops it issues to ``counter.ops["hooks"]`` while ``counter`` is on."""
    for handle in inspector._handles:
        hooks = handle.hooks_dict_ref()
        if hooks is None or handle.id not in hooks:
            continue
        hook = hooks[handle.id]

        def timed(*args: object, _hook: Callable[..., object] = hook, **kwargs: object) -> object:
            start = time.perf_counter()
            outer, counter.key = counter.key, "hooks"
            try:
                return _hook(*args, **kwargs)
            finally:
                counter.key = outer
                spent["hooks"] += time.perf_counter() - start

        hooks[handle.id] = timed


def measure(
    name: str,
    device: torch.device,
    blocks: int,
    log_every: int,
    size: str = "tiny",
    warmup: int = 3,
    control: bool = False,
) -> dict[str, object]:
    """Times the watched copy against the plain one in two arms: the copy built second
    watched, then (two new copies) the copy built first. Two copies of one model need not
    run alike (allocation and cache placement: on the CPU VM the copy built second ran
    3.6% faster in a control run), so each arm carries that bias one way and the pooled
    ratios cancel it. ``control``: neither copy is watched (the harness's own ratio)."""
    spent = {"hooks": 0.0, "metrics": 0.0}
    counter = OpCounter()
    layers = 0

    def trainer(inspector: RouterInspector | None) -> Callable[[], float]:
        torch.manual_seed(0)  # the same weights and batch for both copies
        model, loss_fn = MODELS[name](device, size)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if inspector is not None:
            inspector.attach(model)
            time_hooks(inspector, spent, counter)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss_fn().backward()
            optimizer.step()

        def block() -> float:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(log_every):
                step()
            if inspector is not None:
                read = time.perf_counter()
                counter.key = "metrics"
                inspector.metrics()
                inspector.check_alarms(on_alarm=lambda findings: None)
                counter.key = None
                spent["metrics"] += time.perf_counter() - read
            if device.type == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - start) / log_every * 1e3

        return block

    plain: list[float] = []
    watched: list[float] = []
    arms: list[float] = []
    for watch_second in (True, False):
        inspector = None if control else RouterInspector()
        if watch_second:
            plain_block, watched_block = trainer(None), trainer(inspector)
        else:
            watched_block, plain_block = trainer(inspector), trainer(None)
        timed = dict(spent)  # what the warm-up and the op counting add stays out
        for _ in range(warmup):  # first-step checks, lazy set-up, the captured graphs' layouts
            plain_block(), watched_block()
        spent.update(timed)
        arm_plain: list[float] = []
        arm_watched: list[float] = []
        for i in range(blocks):
            if i % 2 == 0:  # flip the order each pair
                arm_plain.append(plain_block())
                arm_watched.append(watched_block())
            else:
                arm_watched.append(watched_block())
                arm_plain.append(plain_block())
        plain += arm_plain
        watched += arm_watched
        arms.append(statistics.median(w / p for w, p in zip(arm_watched, arm_plain, strict=True)))
        if inspector is not None:
            layers = len(inspector.layers)
            if not watch_second:
                # The aten ops inside the inspector, counted over two more watched blocks
                # (the counting mode's own cost stays out of the timings above)
                timed = dict(spent)
                with counter:
                    watched_block(), watched_block()
                spent.update(timed)
            inspector.detach()
        del plain_block, watched_block
    ratios = [w / p for w, p in zip(watched, plain, strict=True)]
    low, high = paired_interval(ratios)
    watched_s = sum(watched) * log_every / 1e3
    return {
        "model": name,
        "size": size,
        "control": control,
        "plain_ms_per_step": statistics.median(plain),
        "watched_ms_per_step": statistics.median(watched),
        "ratio": statistics.median(ratios),
        "ratio_95": [low, high],
        "arm_ratios": arms,
        "blocks": 2 * blocks,
        "steps_per_block": log_every,
        "layers": layers,
        "hook_share": spent["hooks"] / watched_s,
        "metrics_share": spent["metrics"] / watched_s,
        "hook_ops_per_step": counter.ops["hooks"] / (2 * log_every),
        "metrics_ops_per_read": counter.ops["metrics"] / 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=("reference", "hf", "both"), default="both")
    parser.add_argument(
        "--blocks", type=positive_int, default=12, help="block pairs in each of the two arms"
    )
    parser.add_argument("--log-every", type=positive_int, default=10, help="steps per block")
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny", help="model size")
    parser.add_argument(
        "--warmup", type=positive_int, default=3, help="untimed block pairs before the timing"
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="attach nothing to either copy: the ratio of two identical runs (the harness's floor)",
    )
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    check_device(parser, args.device)
    check_output_path(parser, args.json, "--json")
    device = torch.device(args.device)
    names = ("reference", "hf") if args.model == "both" else (args.model,)
    results = [
        measure(name, device, args.blocks, args.log_every, args.size, args.warmup, args.control)
        for name in names
    ]
    print(f"machine: {machine_name(device)}")
    for r in results:
        low, high = r["ratio_95"]  # type: ignore[misc]
        print(
            f"{r['model']} ({r['size']}{', control' if r['control'] else ''}): plain "
            f"{r['plain_ms_per_step']:.2f} ms/step, watched "
            f"{r['watched_ms_per_step']:.2f} ms/step, ratio {r['ratio']:.4f} "
            f"(95% {low:.4f}-{high:.4f}; arms {r['arm_ratios'][0]:.4f} / {r['arm_ratios'][1]:.4f}; "
            f"{r['blocks']} block pairs of {r['steps_per_block']} "
            f"steps, metrics() + check_alarms() once a block); inside the inspector: hooks "
            f"{100 * r['hook_share']:.2f}% + metrics/alarms {100 * r['metrics_share']:.2f}% "
            f"of the watched time; hook ops per step {r['hook_ops_per_step']:.1f} "
            f"(aten ops, drains included), metrics/alarms ops per read "
            f"{r['metrics_ops_per_read']:.0f}"
        )
    if args.json:
        payload = {"machine": machine_name(device), "results": results}
        write_atomic(args.json, json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
