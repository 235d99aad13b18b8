"""Four CPU processes (gloo) on a 2 x 2 DeviceMesh ("dp", "ep"): the expert-parallel overload
factors equal a direct computation from every rank's per-step (token, expert) assignments,
with an uneven placement and a planted hot expert that moves between the EP ranks."""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moe_devkit import RouterConfig
from moe_devkit.inspect import RouterInspector
from moe_devkit.integrations.distributed import (
    RankTimeoutError,
    distributed_summary,
    resolve_group,
)
from moe_devkit.integrations.expert_parallel import ExpertParallelLoad, contiguous_placement
from moe_devkit.routers.torch_router import DynamicMoERouter

WORLD, EP, EXPERTS, STEPS = 4, 2, 8, 6
PLACEMENT = [0, 0, 0, 0, 0, 0, 1, 1]  # EP rank 0 hosts six experts, EP rank 1 two
JOIN_TIMEOUT_S = 90.0


def _router() -> DynamicMoERouter:
    torch.manual_seed(0)
    router = DynamicMoERouter(RouterConfig(hidden_size=8, num_experts=EXPERTS, min_k=1, max_k=3))
    with torch.no_grad():  # the planted hot expert: 7 for a positive input, 0 for a negative
        weight = router.router_network.weight
        weight.mul_(0.1)
        weight[7] = 1.0
        weight[0] = -1.0
    return router


def _batch(rank: int, step: int) -> torch.Tensor:
    """8, 12 or 16 tokens; on even steps expert 7 (EP rank 1) is hot, on odd ones expert 0."""
    g = torch.Generator().manual_seed(100 * rank + step)
    tokens = 8 + 4 * ((rank + step) % 3)
    sign = 1.0 if step % 2 == 0 else -1.0
    return torch.randn(tokens, 8, generator=g) + sign * 0.6


def _worker(rank: int, init_file: str, results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD // EP, EP), mesh_dim_names=("dp", "ep"))
    model = _router()
    inspector = RouterInspector().attach(model)
    load = ExpertParallelLoad(mesh, mesh_dim="ep", placement=PLACEMENT).attach(inspector)
    strided = ExpertParallelLoad(mesh, mesh_dim="ep", placement=PLACEMENT, capacity=2)
    strided.attach(model)
    assignments: list[list[list[int]]] = []
    model.register_forward_hook(lambda _m, _i, out: assignments.append(out.expert_indices.tolist()))
    with torch.no_grad():
        for step in range(STEPS):
            model(_batch(rank, step))
    summary = distributed_summary(inspector, timeout=30, expert_parallel=load)
    entry = summary.layers["router"]["expert_parallel"]
    strided_entry = strided.reduce(timeout=30)[0]["router"]
    codes = [f.code for f in summary.findings]
    # layouts that differ: gathered once and merged over their union, or a ValueError
    layouts = RouterInspector()
    pairs = torch.tensor([[rank % EXPERTS, -1]] * 3)
    ones, k = torch.full((3,), 0.5), torch.ones(3, dtype=torch.int64)
    layouts.inspect_routing_decision(ones, ones, k, pairs, layer="everywhere", num_experts=8)
    if rank == 0:
        layouts.inspect_routing_decision(ones, ones, k, pairs, layer="rank0_only", num_experts=8)
    union = distributed_summary(layouts, timeout=30).layers
    union_counts = {n: lay["utilization"]["counts"] for n, lay in union.items()}
    clash = RouterInspector()
    clash.inspect_routing_decision(
        ones, ones, k, pairs, layer="clash", num_experts=4 if rank == 1 else 8
    )
    try:
        distributed_summary(clash, timeout=30)
        clash_error = "no error"
    except ValueError as err:
        clash_error = str(err)
    # the EP dimension of the mesh as the reduced group; rank 3 never calls: its EP peer,
    # rank 2, gets a RankTimeoutError, the other EP group (ranks 0 and 1) merges
    outcome = "skipped"
    if rank != 3:
        try:
            part = distributed_summary(inspector, group=mesh, mesh_dim="ep", timeout=2)
            outcome = f"tokens {part.layers['router']['tokens']}"
        except RankTimeoutError as err:
            outcome = str(err)
    # and the load's own reduction over the world, which rank 3 never joins
    alone = "skipped"
    if rank != 3:
        try:
            load.reduce(timeout=2)
            alone = "no error"
        except RankTimeoutError as err:
            alone = str(err)
    results.put(
        (rank, assignments, entry, strided_entry, codes, outcome, alone, union_counts, clash_error)
    )
    if rank == 3:
        time.sleep(6)  # the others are done waiting before rank 3 leaves the store
    dist.destroy_process_group()


def _loads(assignments: dict[int, list[list[list[int]]]], ranks: list[int], step: int) -> list:
    loads = [0] * EP
    for rank in ranks:
        for token in assignments[rank][step]:
            for expert in token:
                if expert >= 0:
                    loads[PLACEMENT[expert]] += 1
    return loads


def _expected(assignments: dict[int, Any], steps: list[int]) -> dict[str, Any]:
    """The factors computed directly: per step and EP group, the busiest rank over the
    balanced count; the mean and max over steps and groups; the cumulative overload."""
    factors = []
    for group in ([0, 1], [2, 3]):
        for step in steps:
            loads = _loads(assignments, group, step)
            factors.append(max(loads) / (sum(loads) / EP))
    totals = [0] * EP
    for step in range(STEPS):
        for j, value in enumerate(_loads(assignments, list(range(WORLD)), step)):
            totals[j] += value
    return {
        "overload_factor_mean": sum(factors) / len(factors),
        "overload_factor_max": max(factors),
        "tokens_per_ep_rank": totals,
        "cumulative_overload": max(totals) / (sum(totals) / EP),
    }


def test_overload_factors_equal_a_direct_computation(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_file = str(tmp_path / "init")
    procs = [ctx.Process(target=_worker, args=(r, init_file, results)) for r in range(WORLD)]
    for proc in procs:
        proc.start()
    got: list[Any] = []
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while len(got) < WORLD:
            got.append(results.get(timeout=max(deadline - time.monotonic(), 0.1)))
    except queue.Empty:
        pytest.fail(f"only {len(got)} of {WORLD} results within {JOIN_TIMEOUT_S} s (a hang)")
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    got.sort(key=lambda item: item[0])
    assignments = {rank: item[1] for rank, item in enumerate(got)}
    entry = got[0][2]
    assert all(item[2] == entry for item in got)
    expected = _expected(assignments, list(range(STEPS)))
    assert entry["tokens_per_ep_rank"] == expected["tokens_per_ep_rank"]
    for key in ("overload_factor_mean", "overload_factor_max", "cumulative_overload"):
        assert entry[key] == pytest.approx(expected[key], rel=1e-12), key
    assert (entry["ep_size"], entry["placement"], entry["steps"]) == (EP, PLACEMENT, STEPS)
    # the hot rank moves, so averaging first would misstate the peak
    assert entry["overload_factor_mean"] > expected["cumulative_overload"] + 0.3
    assert entry["overload_factor_mean"] > 1.5 and "ep-hot-rank" in got[0][4]
    # capacity 2 over 6 steps: rows for steps 0 and 4 stay (the stride doubled twice)
    strided = got[0][3]
    assert strided["step_stride"] == 4
    sub = _expected(assignments, [0, 4])
    assert strided["overload_factor_mean"] == pytest.approx(sub["overload_factor_mean"])
    assert strided["tokens_per_ep_rank"] == expected["tokens_per_ep_rank"]  # totals: exact
    outcomes = {rank: item[5] for rank, item in enumerate(got)}
    tokens = [sum(len(step) for step in assignments[r]) for r in range(WORLD)]
    assert outcomes[0] == outcomes[1] == f"tokens {tokens[0] + tokens[1]}"
    assert "not every rank reached the inspector's reduction within 2 s" in outcomes[2]
    assert "missing: rank 3" in outcomes[2]
    for rank in range(3):
        assert "not every rank reached the inspector's reduction within 2 s" in got[rank][6]
    expected_union = {
        "everywhere": [3 if e < WORLD else 0 for e in range(EXPERTS)],
        "rank0_only": [3] + [0] * (EXPERTS - 1),
    }
    assert all(item[7] == expected_union for item in got)
    assert all("layer 'clash' must have the same num_experts" in item[8] for item in got)


def test_contiguous_placement_is_blocks_of_experts() -> None:
    assert contiguous_placement(8, 2) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert contiguous_placement(8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert contiguous_placement(5, 2) == [0, 0, 0, 1, 1]


def test_needs_an_initialised_process_group_and_a_mesh_for_mesh_dim() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelLoad()
    with pytest.raises(ValueError, match="mesh_dim='ep' needs group to be a DeviceMesh"):
        resolve_group(None, "ep")
