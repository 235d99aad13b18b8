"""The reference training loop shared by the ``numerics``, ``gradients`` and ``memory`` commands."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from moe_devkit.commands._torch import (
    add_device_arguments,
    add_router_arguments,
    require_torch,
    resolve_device,
    resolve_dtype,
    router_config,
)
from moe_devkit.commands.common import check_output, positive_float, positive_int, writing

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    import torch

    from moe_devkit.diagnostics.findings import Finding
    from moe_devkit.routers.torch_router import MoEModel


def add_training_arguments(parser: argparse.ArgumentParser, *, steps: int) -> None:
    """Options of the reference model and its synthetic training run."""
    model = add_router_arguments(parser, hidden_size=64, num_experts=8, title="reference model")
    model.add_argument("--layers", type=positive_int, default=2)
    work = parser.add_argument_group("training run")
    work.add_argument("--steps", type=positive_int, default=steps, help="training steps")
    work.add_argument("--batch", type=positive_int, default=4)
    work.add_argument("--seq", type=positive_int, default=32)
    work.add_argument("--lr", type=positive_float, default=1e-3)
    add_device_arguments(work)
    work.add_argument("--out", default=None, help="write the JSON report to this path")


def build_model(args: argparse.Namespace) -> tuple[MoEModel, torch.device, torch.dtype]:
    """The reference MoEModel on the requested device and dtype (UsageError on bad options,
    an unwritable --out included, before any work runs)."""
    require_torch()
    import torch

    from moe_devkit.routers.torch_router import MoEModel

    config = router_config(args)
    if args.out:
        check_output(args.out, directory=False)
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


def write_report(
    args: argparse.Namespace, sections: Mapping[str, Mapping[str, Any]], findings: Iterable[Finding]
) -> None:
    """Writes the command's JSON report to --out, when given (a failed write is a UsageError)."""
    from moe_devkit.reporting import make_report, write_report_json

    if args.out:
        with writing(args.out):
            write_report_json(args.out, make_report(sections, findings))
