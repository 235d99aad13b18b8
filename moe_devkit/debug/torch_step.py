"""One training step of the reference PyTorch MoEModel, laid out for a debugger.

``python -m moe_devkit.debug.torch_step --device cpu|cuda`` (the "PyTorch model"
configuration of ``.vscode/launch.json``). Before torch loads, the debugging environment is
set (``CUDA_LAUNCH_BLOCKING=1``, ``TORCH_SHOW_CPP_STACKTRACES=1``, ``TORCHDYNAMO_DISABLE=1``;
values already set win); the step then runs under anomaly detection and, on CUDA, sync-debug
mode (``moe_devkit.debug.switches.torch_debug_mode``).

Each phase is its own statement with its result in a named local, so a breakpoint on any
line of ``train_step`` sees the batch, the routing decisions, the losses or the gradients.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from moe_devkit.debug.switches import (
    TORCH_DEBUG_ENV,
    Anomaly,
    SyncDebug,
    add_model_arguments,
    apply_env,
    torch_debug_mode,
)

if TYPE_CHECKING:
    import torch

    from moe_devkit.routers.torch_router import MoEModel, RoutingDecision

logger = logging.getLogger(__name__)


class StepResult(NamedTuple):
    """What one training step produced (tensors detached, on the model's device)."""

    loss: torch.Tensor
    task_loss: torch.Tensor
    aux_loss: torch.Tensor
    grad_norm: torch.Tensor
    routings: tuple[RoutingDecision, ...]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Options of the debug step (a tiny model by default, so each line is quick to step)."""
    parser = argparse.ArgumentParser(prog="python -m moe_devkit.debug.torch_step")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sync-debug", choices=("warn", "error", "off"), default="warn")
    parser.add_argument(
        "--anomaly", choices=("on", "nan", "off"), default="on",
        help="autograd anomaly detection: forward tracebacks (on), also NaN checks (nan)",
    )  # fmt: skip
    add_model_arguments(parser)
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace) -> MoEModel:
    """The reference MoEModel of ``args``' sizes on ``args.device``.

    Raises:
        ValueError: CUDA was asked for where torch sees none, or a bad size.
    """
    import torch

    from moe_devkit.config import RouterConfig
    from moe_devkit.routers.torch_router import MoEModel

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA device; torch sees none (use --device cpu)")
    config = RouterConfig(
        hidden_size=args.hidden_size,
        num_experts=args.num_experts,
        max_k=args.max_k,
        expert_hidden_size=2 * args.hidden_size,
        complexity_hidden_size=max(args.hidden_size // 4, 1),
    )
    torch.manual_seed(args.seed)
    return MoEModel(config, num_layers=args.layers).to(args.device)


def train_step(
    model: MoEModel, optimizer: torch.optim.Optimizer, hidden_states: torch.Tensor
) -> StepResult:
    """Forward, loss, backward and update, one named phase per statement."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    output = model(hidden_states)
    routings = output.routings  # one RoutingDecision per layer: k_per_token, expert_indices
    task_loss = output.hidden_states.float().square().mean()
    loss = task_loss + output.aux_loss
    loss.backward()  # anomaly detection names the forward op of a NaN gradient
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    optimizer.step()
    return StepResult(
        loss.detach(), task_loss.detach(), output.aux_loss.detach(), grad_norm, routings
    )


def run(args: argparse.Namespace) -> StepResult:
    """Builds the model and a synthetic batch and runs one step under the debug switches."""
    import torch

    from moe_devkit.workloads import mixed_difficulty_batch

    model = build_model(args)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(args.seed)
    batch = mixed_difficulty_batch(args.batch, args.seq, args.hidden_size, generator=generator)
    hidden_states = batch.hidden_states.to(args.device)  # [batch, seq, D]
    sync_debug: SyncDebug = args.sync_debug
    anomaly: Anomaly = args.anomaly
    with torch_debug_mode(args.device, sync_debug, anomaly):
        result = train_step(model, optimizer, hidden_states)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one debug step; returns 0, or 2 for a usage error (logged)."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    apply_env(TORCH_DEBUG_ENV)  # before the first torch import
    try:
        result = run(args)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    if not bool(result.grad_norm.isfinite()):
        logger.warning("the gradient holds NaN/Inf: rerun with --anomaly nan to find the op")
    mean_k = [float(r.k_per_token.float().mean()) for r in result.routings]
    logger.info("loss %.6f, grad norm %.4f, mean k per layer %s",
                float(result.loss), float(result.grad_norm), mean_k)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
