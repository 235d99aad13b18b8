"""The inspector across ranks (NCCL on GPUs, gloo on CPU), and under torch.compile.

Run with torchrun, one process per GPU:

    torchrun --standalone --nproc-per-node 2 benchmarks/run_distributed.py               # ok
    torchrun --standalone --nproc-per-node 2 benchmarks/run_distributed.py --compile     # + compile
    torchrun --standalone --nproc-per-node 2 benchmarks/run_distributed.py --scenario missing-rank

Scenario ``ok``: every rank runs a tiny transformers Mixtral (or the reference dynamic-k
router with ``--model router``) on its own, unevenly sized batches; ``distributed_summary``
must give global counts equal to the sum of the ranks' local counts, per-rank counts equal to
each rank's own, and the same summary on every rank. ``--compile`` runs the same steps through
``torch.compile(fullgraph=True)`` on a second inspector and checks it recorded the eager
statistics. The per-rank counts come with ``per_rank=True`` (gathered to rank 0 only), and an
``ExpertParallelLoad`` over all ranks (contiguous placement) adds each layer's overload
factors. Scenario ``missing-rank``: rank 1 never calls the reduction; rank 0 must raise
``RankTimeoutError`` within the timeout. Rank 0 prints one JSON line (and writes ``--json``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from _args import check_output_path, positive_float, positive_int
from torch import nn

from moe_devkit import RouterConfig
from moe_devkit.inspect import RouterInspector
from moe_devkit.integrations.distributed import (
    RankTimeoutError,
    control_group,
    distributed_summary,
)
from moe_devkit.integrations.expert_parallel import ExpertParallelLoad
from moe_devkit.reporting import write_atomic
from moe_devkit.routers.torch_router import DynamicMoERouter


def build(kind: str, device: torch.device) -> tuple[nn.Module, Any]:
    """The model and a function making rank ``r``'s batch for step ``s``."""
    torch.manual_seed(0)  # same weights on every rank (data parallel)
    if kind == "router":
        model: nn.Module = DynamicMoERouter(
            RouterConfig(hidden_size=64, num_experts=8, min_k=1, max_k=4)
        )

        def batch(rank: int, step: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(1000 * rank + step)
            return torch.randn(256 * (1 + rank), 64, generator=g).to(device)

        return model.to(device).eval(), batch
    import transformers

    config = transformers.MixtralConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
        num_local_experts=8, num_experts_per_tok=2,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    for module in model.modules():
        if type(module).__name__ == "MixtralTopKRouter":
            nn.init.normal_(module.weight, std=0.5)

    def tokens(rank: int, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * rank + step)
        return torch.randint(0, 128, (2 * (1 + rank), 64), generator=g).to(device)

    return model.to(device).eval(), tokens


def run_steps(model: Any, batch: Any, rank: int, steps: int) -> None:
    with torch.no_grad():
        for step in range(steps):
            model(batch(rank, step))


def counts_of(summary: Any) -> dict[str, list[int]]:
    return {name: lay["utilization"]["counts"] for name, lay in summary.layers.items()}


def scenario_ok(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict:
    model, batch = build(args.model, device)
    inspector = RouterInspector().attach(model)
    load = ExpertParallelLoad().attach(inspector)
    run_steps(model, batch, rank, args.steps)
    inspector.detach()
    load.detach()
    local = counts_of(inspector.summary())
    start = time.perf_counter()
    merged = distributed_summary(inspector, timeout=args.timeout, per_rank=True)
    reduce_ms = 1e3 * (time.perf_counter() - start)
    ep = distributed_summary(inspector, timeout=args.timeout, expert_parallel=load)
    every_local: list[Any] = [None] * world
    dist.all_gather_object(every_local, local)
    every_merged: list[Any] = [None] * world
    global_view = {
        n: {k: v for k, v in lay.items() if not k.startswith("per_rank_")}
        for n, lay in merged.layers.items()
    }
    dist.all_gather_object(every_merged, json.dumps(global_view, sort_keys=True, default=str))
    checks = {
        "global_is_sum_of_ranks": all(
            lay["utilization"]["counts"]
            == [sum(c) for c in zip(*(r[n] for r in every_local), strict=True)]
            for n, lay in merged.layers.items()
        ),
        "per_rank_counts_are_each_ranks_own": rank != 0  # only rank 0 has them
        or all(
            lay["per_rank_counts"] == [r[n] for r in every_local]
            for n, lay in merged.layers.items()
        ),
        "same_summary_on_every_rank": len(set(every_merged)) == 1,
    }
    result: dict[str, Any] = {"checks": checks, "reduce_ms": round(reduce_ms, 2)}
    keys = ("tokens", "per_rank_tokens", "per_rank_counts", "rank_imbalance")
    result["layers"] = {
        n: {k: lay.get(k) for k in keys} | {"expert_parallel": ep.layers[n]["expert_parallel"]}
        for n, lay in merged.layers.items()
    }
    if args.compile:
        result["compile"] = compile_check(model, batch, rank, args.steps, inspector)
    return result


def compile_check(model: nn.Module, batch: Any, rank: int, steps: int, eager: Any) -> dict:
    compiled_inspector = RouterInspector().attach(model)
    compiled = torch.compile(model, fullgraph=True)
    start = time.perf_counter()
    run_steps(compiled, batch, rank, steps)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    mine, theirs = compiled_inspector.summary().layers, eager.summary().layers
    same = all(
        mine[n][key] == theirs[n][key]
        for n in theirs
        for key in ("steps", "tokens", "utilization", "k", "coactivation")
    )
    return {"fullgraph": True, "first_steps_s": round(seconds, 2), "same_as_eager": same}


def scenario_missing_rank(args: argparse.Namespace, rank: int, world: int, device: Any) -> dict:
    model, batch = build(args.model, device)
    inspector = RouterInspector().attach(model)
    run_steps(model, batch, rank, 2)
    if rank == 1:
        time.sleep(args.timeout + 10)  # alive, but never joins the reduction
        return {}
    start = time.perf_counter()
    try:
        distributed_summary(inspector, timeout=args.timeout)
        return {"raised": False}
    except RankTimeoutError as err:
        return {"raised": True, "after_s": round(time.perf_counter() - start, 2), "error": str(err)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", choices=("ok", "missing-rank"), default="ok")
    parser.add_argument("--model", choices=("mixtral", "router"), default="mixtral")
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--timeout", type=positive_float, default=10.0, help="seconds")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", help="rank 0 writes the result here")
    args = parser.parse_args()
    if args.model == "mixtral" and importlib.util.find_spec("transformers") is None:
        parser.error("--model 'mixtral' needs transformers (pip install 'moe-devkit[hf]')")
    # every rank checks (same path, same host), so all stop at once instead of waiting for
    # rank 0 in the rendezvous
    check_output_path(parser, args.json, "--json")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        parser.error(
            "not started by torchrun (RANK and WORLD_SIZE unset); run e.g. "
            "torchrun --standalone --nproc-per-node 2 benchmarks/run_distributed.py"
        )
    if args.scenario == "missing-rank" and int(os.environ["WORLD_SIZE"]) < 2:
        parser.error(
            f"--scenario 'missing-rank' needs >= 2 ranks; got WORLD_SIZE={os.environ['WORLD_SIZE']}"
        )
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    dist.init_process_group(backend, timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    control_group(timeout=args.timeout)  # the gloo metadata group, while every rank is alive
    run = scenario_ok if args.scenario == "ok" else scenario_missing_rank
    result = run(args, rank, world, device)
    if rank == 0:
        result = {
            "scenario": args.scenario,
            "model": args.model,
            "backend": backend,
            "world_size": world,
            "device": torch.cuda.get_device_name(device)
            if use_cuda
            else f"cpu ({platform.machine()})",
            "torch": torch.__version__,
            **result,
        }
        line = json.dumps(result)
        print(line)
        if args.json:
            write_atomic(args.json, line + "\n")
    if args.scenario == "ok":
        dist.destroy_process_group()
    else:
        os._exit(0)  # rank 1 is still asleep; the group cannot be destroyed cleanly


if __name__ == "__main__":
    main()
