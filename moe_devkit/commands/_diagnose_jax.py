"""``moe-devkit diagnose --framework jax``: the JAX reference model on the built-in workload.

The model is initialised exactly as the PyTorch path does (``torch.manual_seed(seed)``, then
``MoEModel``) and converted, so the same seed routes with the same weights in both
frameworks. Each step is one jitted call returning the routing statistics as an auxiliary
output; ``JaxRouterInspector`` accumulates them and writes the same report.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from moe_devkit.commands._torch import step_progress
from moe_devkit.commands.common import UsageError

if TYPE_CHECKING:
    from rich.console import Console

    from moe_devkit.config import RouterConfig
    from moe_devkit.inspect import InspectorConfig
    from moe_devkit.inspect.summary import InspectorSummary


def require_jax() -> None:
    """Raises UsageError with the install hint if jax is not importable."""
    try:
        import jax  # noqa: F401
    except ImportError:
        raise UsageError(
            "--framework jax needs JAX; install it with `pip install 'moe-devkit[jax]'`"
        ) from None


def resolve_jax_device(name: str) -> Any:
    """'auto' is JAX's default device; 'cpu', 'cuda' or 'cuda:N' pick one, else UsageError."""
    import jax

    if name == "auto":
        return jax.devices()[0]
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N; got {name!r}")
    try:
        devices = jax.devices("cpu" if kind == "cpu" else "gpu")
    except RuntimeError:
        raise UsageError(f"--device {name} was asked for but JAX sees no such device") from None
    if int(index or 0) >= len(devices):
        raise UsageError(f"--device {name}: JAX sees only {len(devices)} {kind} device(s)")
    return devices[int(index or 0)]


def jax_device_name(device: Any) -> str:
    """``cpu:0``, ``gpu:0 (the GPU's name)``: the platform, index and kind of a JAX device."""
    name = f"{device.platform}:{device.id}"
    return name if device.platform == "cpu" else f"{name} ({device.device_kind})"


def run_jax(
    args: argparse.Namespace,
    config: RouterConfig,
    device: Any,
    inspector_config: InspectorConfig,
    console: Console,
) -> InspectorSummary:
    """Runs ``args.steps`` jitted forward passes on ``device``; returns the inspector's summary."""
    import jax
    import jax.numpy as jnp
    import torch

    from moe_devkit.inspect.jax_inspector import JaxRouterInspector, model_routing_stats
    from moe_devkit.routers import jax_router, torch_router
    from moe_devkit.routers.convert import tensor_to_jax, torch_to_jax
    from moe_devkit.workloads import mixed_difficulty_batch

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype]
    torch.manual_seed(args.seed)
    params = jax.device_put(torch_to_jax(torch_router.MoEModel(config, args.layers), dtype), device)
    model = jax_router.MoEModel(config, num_layers=args.layers)
    inspector = JaxRouterInspector(inspector_config)
    bins = inspector.config.complexity_bins

    @jax.jit
    def step(params: Any, hidden_states: Any, key: Any) -> Any:
        out = model(params, hidden_states)
        return model_routing_stats(out.routings, complexity_bins=bins, key=key)

    generator = torch.Generator().manual_seed(args.seed)
    key = jax.random.key(args.seed)
    with step_progress(console, "routing (jax)", args.steps) as advance:
        for i in range(args.steps):
            batch = mixed_difficulty_batch(
                args.batch, args.seq, config.hidden_size, generator=generator
            )
            hidden = jax.device_put(tensor_to_jax(batch.hidden_states, dtype), device)
            inspector.record_model(step(params, hidden, jax.random.fold_in(key, i)))
            advance()
    return inspector.summary()
