"""The ``moe-devkit`` command line: one ``main(argv) -> int``, subcommands found through a dict.

Exit codes: 0 success, 1 findings (e.g. alarms, leftover debug statements), 2 usage errors.
A user's mistake prints one clear line, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from moe_devkit._argparse import ArgumentParser
from moe_devkit.commands.common import UsageError

if TYPE_CHECKING:
    import torch

# What the diagnostics commands import beside torch or JAX; the core install (the check-debug
# hook's) has none of them, and the extras bring them.
DIAGNOSTICS_MODULES = ("numpy", "rich", "matplotlib")


@dataclass(frozen=True)
class Command:
    """A subcommand, implemented by a module that defines ``add_arguments(parser)`` and
    ``run(args, console) -> int``; the module is imported only when the command runs.

    ``needs``: the modules it imports that the core install lacks; ``extra``: the extra that
    installs them.
    """

    help: str
    module: str
    extra: str = "torch"
    needs: tuple[str, ...] = DIAGNOSTICS_MODULES

    def missing(self) -> list[str]:
        """The modules of ``needs`` that are not installed (found without importing them)."""
        return [name for name in self.needs if importlib.util.find_spec(name) is None]

    def missing_error(self) -> str | None:
        """One line naming the missing modules and the extra to install, or None."""
        missing = self.missing()
        if not missing:
            return None
        names = " and ".join([", ".join(missing[:-1]), missing[-1]] if missing[1:] else missing)
        install = f"pip install 'moe-devkit[{self.extra}]'"
        return f"this command needs {names}, not installed here: `{install}`"


def check_device(args: argparse.Namespace) -> None:
    """Raises UsageError when the command's ``--device`` (if it has one) does not exist here.

    Run before the command, so that a bad device stops it before ``check_output`` creates
    its output directory. ``--framework jax`` asks JAX, anything else asks torch.
    """
    name = getattr(args, "device", None)
    if name is None:
        return
    if getattr(args, "framework", "torch") == "jax":
        from moe_devkit.commands._diagnose_jax import require_jax, resolve_jax_device

        require_jax()
        resolve_jax_device(name)
        return
    from moe_devkit.commands._torch import require_torch, resolve_device

    require_torch()
    _check_cuda_index(resolve_device(name), name)


def _check_cuda_index(device: torch.device, name: str) -> None:
    import torch

    if device.type != "cuda" or device.index is None:
        return
    count = torch.cuda.device_count()
    if device.index >= count:
        raise UsageError(f"--device {name}: torch sees only {count} CUDA device(s)")


def _load(command: Command) -> ModuleType:
    return importlib.import_module(command.module)


COMMANDS: dict[str, Command] = {
    "diagnose": Command(
        "run the reference router on a synthetic workload and report its routing",
        "moe_devkit.commands.diagnose",
    ),
    "report": Command(
        "re-render routing_analysis.png and report.html from a stored report.json",
        "moe_devkit.commands.report",
        needs=(*DIAGNOSTICS_MODULES, "torch"),  # moe_devkit.inspect imports torch
    ),
    "numerics": Command(
        "train the reference model under the NaN/Inf guard; --plant-nan MODULE demonstrates",
        "moe_devkit.commands.numerics",
    ),
    "gradients": Command(
        "one training step of the reference model and its gradient statistics",
        "moe_devkit.commands.gradients",
    ),
    "memory": Command(
        "train the reference model for N steps and judge memory growth (leak verdict)",
        "moe_devkit.commands.memory",
    ),
    "profile": Command(
        "time and profile the reference MoE layer: per-stage breakdown, dynamic vs static",
        "moe_devkit.commands.profile",
    ),
    "check-debug": Command(
        "find leftover debug statements in Python files (same as the check-debug hook)",
        "moe_devkit.commands.check_debug",
        extra="",
        needs=(),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """Builds the argument parser with one subparser per entry of COMMANDS."""
    parser = ArgumentParser(
        prog="moe-devkit", description="Diagnostics for dynamic-k Mixture-of-Experts routers."
    )
    from moe_devkit import __version__

    parser.add_argument("--version", action="version", version=f"moe-devkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name, command in COMMANDS.items():
        if command.missing():  # its module cannot be imported: main names the extra instead
            sub.add_parser(name, help=command.help, add_help=False)
            continue
        subparser = sub.add_parser(name, help=command.help, description=command.help)
        _load(command).add_arguments(subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the process exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "check-debug":  # pass its flags through untouched
        from moe_devkit.lint import main as check_debug_main

        return int(check_debug_main(args_list[1:]))
    command = COMMANDS.get(args_list[0]) if args_list else None
    error = command.missing_error() if command is not None else None
    if error is not None:  # before argparse, which knows none of the command's options
        sys.stderr.write(f"moe-devkit {args_list[0]}: error: {error}\n")
        return 2
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse already printed the usage line
        return int(exc.code) if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)  # logs keep whole tables
    try:
        check_device(args)
        return int(_load(COMMANDS[args.command]).run(args, console))
    except UsageError as exc:
        sys.stderr.write(f"moe-devkit {args.command}: error: {exc}\n")  # one unwrapped line
        return 2
    except KeyboardInterrupt:
        return 130
