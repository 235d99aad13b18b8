"""The reference training loop shared by the ``numerics``, ``gradients`` and ``memory`` commands."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from moe_devkit.cli import UsageError, positive_int
from moe_devkit.commands._torch import require_torch, resolve_device, resolve_dtype

if TYPE_CHECKING:
    import torch

    from moe_devkit.routers.torch_router import MoEModel


def add_training_arguments(parser: argparse.ArgumentParser, *, steps: int) -> None:
    """Options of the reference model and its synthetic training run."""
    model = parser.add_argument_group("reference model")
    model.add_argument("--hidden-size", type=positive_int, default=64)
    model.add_argument("--num-experts", type=positive_int, default=8)
    model.add_argument("--min-k", type=positive_int, default=1)
    model.add_argument("--max-k", type=positive_int, default=4)
    model.add_argument("--mode", choices=("complexity", "top_p"), default="complexity")
    model.add_argument("--layers", type=positive_int, default=2)
    work = parser.add_argument_group("training run")
    work.add_argument("--steps", type=positive_int, default=steps, help="training steps")
    work.add_argument("--batch", type=positive_int, default=4)
    work.add_argument("--seq", type=positive_int, default=32)
    work.add_argument("--lr", type=float, default=1e-3)
    work.add_argument("--seed", type=int, default=0)
    work.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    work.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    work.add_argument("--out", default=None, help="write the JSON report to this path")


def build_model(args: argparse.Namespace) -> tuple[MoEModel, torch.device, torch.dtype]:
    """The reference MoEModel on the requested device and dtype (UsageError on bad options)."""
    require_torch()
    import torch

    from moe_devkit.config import RouterConfig
    from moe_devkit.routers.torch_router import MoEModel

    try:
        config = RouterConfig(
            hidden_size=args.hidden_size,
            num_experts=args.num_experts,
            min_k=args.min_k,
            max_k=args.max_k,
            mode=args.mode,
            expert_hidden_size=2 * args.hidden_size,
            complexity_hidden_size=max(args.hidden_size // 4, 1),
        )
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    torch.manual_seed(args.seed)
    model = MoEModel(config, num_layers=args.layers).to(device=device, dtype=dtype)
    return model, device, dtype


def training_step(
    model: MoEModel,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
) -> Callable[[int], Any]:
    """A function running one SGD step on a fresh synthetic batch; returns the loss tensor.

    The gradients stay on the parameters after the step (cleared at the next one).
    """
    import torch

    from moe_devkit.workloads import mixed_difficulty_batch

    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0; got {args.lr}")
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)

    def step(_: int) -> torch.Tensor:
        batch = mixed_difficulty_batch(
            args.batch, args.seq, model.config.hidden_size, generator=generator
        )
        optimizer.zero_grad(set_to_none=True)
        out = model(batch.hidden_states.to(device=device, dtype=dtype))
        loss = out.hidden_states.float().square().mean() + out.aux_loss
        loss.backward()
        optimizer.step()
        return loss.detach()  # type: ignore[no-any-return]

    return step
