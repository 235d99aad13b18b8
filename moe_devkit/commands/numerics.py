"""``moe-devkit numerics``: train the reference model under the NaN/Inf guard and report."""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import TYPE_CHECKING

from moe_devkit.commands._training import (
    add_training_arguments,
    build_model,
    training_step,
    write_report,
)
from moe_devkit.commands.common import Command, UsageError, positive_int

if TYPE_CHECKING:
    import torch
    from rich.console import Console

    from moe_devkit.diagnostics.numerics import NumericsGuard


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares the options of ``moe-devkit numerics``."""
    add_training_arguments(parser, steps=5)
    guard = parser.add_argument_group("guard")
    guard.add_argument("--check-every", type=positive_int, default=None, help="check every N steps")
    guard.add_argument("--strict", action="store_true", help="raise at the first bad tensor")
    guard.add_argument(
        "--plant-nan",
        metavar="MODULE",
        default=None,
        help="demonstration: make this module's output NaN (e.g. layers.1.moe.experts)",
    )
    guard.add_argument("--plant-step", type=positive_int, default=2, help="step to plant it at")


def run(args: argparse.Namespace, console: Console) -> int:
    """Runs the numerics command; 0 when clean, 1 when a non-finite tensor was found."""
    from rich.progress import Progress

    from moe_devkit.diagnostics.numerics import NonFiniteError, NumericsGuard

    model, device, dtype = build_model(args)
    if args.plant_nan is not None:
        _plant_nan(model, args.plant_nan, args.plant_step)
    step = training_step(model, args, device, dtype)
    guard = NumericsGuard(model, check_every=args.check_every, strict=args.strict)
    with guard, Progress(console=console, transient=True) as progress:
        task = progress.add_task("training under the guard", total=args.steps)
        for i in range(args.steps):
            try:
                step(i)
            except NonFiniteError:
                break
            progress.advance(task)
    if not args.strict:
        guard.check()
    _print(console, guard)
    write_report(args, {"numerics": guard.to_dict()}, guard.findings)
    return 1 if guard.findings else 0


COMMAND = Command(
    "numerics",
    "train the reference model under the NaN/Inf guard; --plant-nan MODULE demonstrates",
    add_arguments,
    run,
)


def _plant_nan(model: torch.nn.Module, name: str, at_step: int) -> None:
    """Makes module ``name`` return NaN at the ``at_step``-th forward of the model: the first
    floating-point tensor of its output (a tensor, tuple, NamedTuple or dataclass such as
    ``RoutingDecision``) is multiplied by NaN."""
    modules = dict(model.named_modules())
    if name not in modules or not name:
        names = ", ".join(n for n in modules if n.count(".") <= 2 and n)
        raise UsageError(f"--plant-nan: no module named {name!r}; try one of: {names}")
    calls = {"n": 0}

    def count(*_: object) -> None:
        calls["n"] += 1

    def plant(_: object, __: object, output: object) -> object:
        if calls["n"] != at_step:
            return output
        poisoned, planted = _with_first_float_nan(output)
        if not planted:
            raise UsageError(f"--plant-nan: module {name!r} returns no floating-point tensor")
        return poisoned

    model.register_forward_pre_hook(count)
    modules[name].register_forward_hook(plant)


def _with_first_float_nan(value: object) -> tuple[object, bool]:
    """``value`` with its first floating-point tensor times NaN, and whether there was one."""
    import torch

    if isinstance(value, torch.Tensor):
        return (value * math.nan, True) if value.is_floating_point() else (value, False)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            new, planted = _with_first_float_nan(getattr(value, field.name))
            if planted:
                return dataclasses.replace(value, **{field.name: new}), True
        return value, False
    if isinstance(value, tuple):
        items = list(value)
        for i, item in enumerate(items):
            items[i], planted = _with_first_float_nan(item)
            if planted:
                rebuilt = type(value)(*items) if hasattr(value, "_fields") else tuple(items)
                return rebuilt, True
    return value, False


def _print(console: Console, guard: NumericsGuard) -> None:
    from rich.table import Table

    if not guard.findings:
        console.print(f"[green]no non-finite outputs or gradients in {guard.step} step(s)[/green]")
        return
    table = Table(title="First non-finite tensors")
    for column in ("step", "module", "phase", "tensor"):
        table.add_column(column)
    for finding in guard.findings:
        details = finding.details
        table.add_row(str(finding.step), str(finding.location), details["phase"], details["tensor"])
    console.print(table)
