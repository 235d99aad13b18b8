"""Jitted JAX MoE layer forward vs the PyTorch MoELayer, same size, dtype and weights.

The contenders are timed alternately in each round (so machine load hits all alike):
PyTorch eager ``MoELayer`` under ``no_grad``, and the jitted JAX ``MoELayer`` with its
experts as ``ragged_dot`` and, with ``--dense``, as the masked loop over experts. Compilation
is excluded (warm-up calls); each JAX call ends with ``block_until_ready``, each CUDA torch
call with a synchronize.

    python benchmarks/bench_jax_router.py --device cpu --tokens 512 --hidden 128 --ffn 256
    python benchmarks/bench_jax_router.py --device cuda --preset olmoe --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from _args import check_device, check_output_path, cpu_model, positive_int

try:
    import jax
    import jax.numpy as jnp
except ModuleNotFoundError:  # the jax extra is optional
    raise SystemExit("bench_jax_router: needs JAX: pip install 'moe-devkit[jax]'") from None

from moe_devkit.config import RouterConfig
from moe_devkit.reporting import write_atomic
from moe_devkit.routers import jax_router, torch_router
from moe_devkit.routers.convert import tensor_to_jax, torch_to_jax

PRESETS = {
    # tokens, hidden, expert FFN, experts, max_k
    "small": (512, 128, 256, 8, 4),
    "cpu": (2048, 512, 1024, 16, 4),
    "olmoe": (8192, 2048, 1024, 64, 8),
}
DTYPES = {"float32": (torch.float32, jnp.float32), "bfloat16": (torch.bfloat16, jnp.bfloat16)}


def machine_name(device: str) -> str:
    jax_device = jax.devices("gpu" if device == "cuda" else "cpu")[0]
    versions = f"torch {torch.__version__}, jax {jax.__version__}"
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} / JAX {jax_device.device_kind} ({versions})"
    cpu = cpu_model()
    return f"{cpu}, torch {torch.get_num_threads()} threads ({versions})"


def timed(fn: Callable[[], object], sync: Callable[[object], object]) -> float:
    """Milliseconds of one call, waited for."""
    t0 = time.perf_counter()
    sync(fn())
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--tokens", type=positive_int)
    parser.add_argument("--hidden", type=positive_int)
    parser.add_argument("--ffn", type=positive_int)
    parser.add_argument("--experts", type=positive_int)
    parser.add_argument("--max-k", type=positive_int)
    parser.add_argument("--mode", choices=("complexity", "top_p"), default="complexity")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--rounds", type=positive_int, default=30, help=">= 2 (an IQR is given)")
    parser.add_argument(
        "--warmup", type=positive_int, default=3, help="untimed calls (compilation) first"
    )
    parser.add_argument("--dense", action="store_true", help="also time the dense JAX experts")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    tokens, hidden, ffn, experts, max_k = PRESETS[args.preset]
    tokens, hidden = args.tokens or tokens, args.hidden or hidden
    ffn, experts, max_k = args.ffn or ffn, args.experts or experts, args.max_k or max_k
    if max_k > experts:
        parser.error(
            f"--max-k must be <= --experts; got --max-k {max_k}, --experts {experts} "
            f"(preset {args.preset} gives those not passed)"
        )
    if args.rounds < 2:
        parser.error(f"--rounds must be >= 2 (the IQR needs two rounds); got {args.rounds}")
    check_device(parser, args.device)
    if args.device == "cuda" and not _jax_has_gpu():
        parser.error("--device 'cuda': JAX sees no GPU (install jax[cuda12])")
    check_output_path(parser, args.json, "--json")  # before the run, not after it
    torch_dtype, jax_dtype = DTYPES[args.dtype]
    config = RouterConfig(
        hidden_size=hidden, num_experts=experts, max_k=max_k, expert_hidden_size=ffn,
        mode=args.mode,
    )  # fmt: skip
    torch.manual_seed(0)
    device = torch.device(args.device)
    jax_device = jax.devices("gpu" if args.device == "cuda" else "cpu")[0]
    layer = torch_router.MoELayer(config).to(device=device, dtype=torch_dtype).eval()
    params = jax.device_put(torch_to_jax(layer), jax_device)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1))
    x_torch = x.to(device=device, dtype=torch_dtype)
    x_jax = jax.device_put(tensor_to_jax(x, jax_dtype), jax_device)

    def run_torch() -> object:
        with torch.no_grad():
            return layer(x_torch).hidden_states

    def sync_torch(_: object) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    contenders: dict[str, tuple[Callable[[], object], Callable[[object], object]]] = {
        "torch MoELayer": (run_torch, sync_torch)
    }
    impls = ["ragged_dot", "dense"] if args.dense else ["ragged_dot"]
    for impl in impls:
        fn = jax.jit(lambda p, h, impl=impl: jax_router.MoELayer(config, implementation=impl)(p, h))
        contenders[f"jax MoELayer ({impl})"] = (
            lambda fn=fn: fn(params, x_jax).hidden_states,
            jax.block_until_ready,
        )
    for run, sync in contenders.values():
        for _ in range(args.warmup):
            sync(run())
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, (run, sync) in contenders.items():
            times[name].append(timed(run, sync))
    base = statistics.median(times["torch MoELayer"])
    results = {
        "machine": machine_name(args.device),
        "size": dict(tokens=tokens, hidden=hidden, ffn=ffn, experts=experts, max_k=max_k),
        "dtype": args.dtype,
        "mode": args.mode,
        "rounds": args.rounds,
        "median_ms": {name: statistics.median(t) for name, t in times.items()},
        "iqr_ms": {name: _iqr(t) for name, t in times.items()},
    }
    print(results["machine"])
    print(f"size {results['size']}, {args.dtype}, mode {args.mode}, {args.rounds} rounds")
    for name, t in times.items():
        median = statistics.median(t)
        print(f"{name:28s} median {median:8.3f} ms  IQR {_iqr(t):7.3f}  x{median / base:.2f}")
    if args.json:
        write_atomic(args.json, json.dumps(results, indent=2) + "\n")


def _jax_has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def _iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


if __name__ == "__main__":
    main()
