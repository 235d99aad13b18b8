"""The ``moe-devkit`` command line: one ``main(argv) -> int`` over the subcommands listed in
``COMMANDS``.

Exit codes: 0 success, 1 findings (e.g. alarms, leftover debug statements), 2 usage errors.
A user's mistake prints one clear line, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from moe_devkit._argparse import ArgumentParser
from moe_devkit.commands import (
    compare_routing,
    diagnose,
    gradients,
    memory,
    numerics,
    profile,
    report,
)
from moe_devkit.commands.common import Command, UsageError

if TYPE_CHECKING:
    import torch

COMMANDS: dict[str, Command] = {
    command.name: command
    for command in (
        diagnose.COMMAND,
        report.COMMAND,
        numerics.COMMAND,
        gradients.COMMAND,
        memory.COMMAND,
        profile.COMMAND,
        compare_routing.COMMAND,
    )
}

# ``moe-devkit check-debug ARGS`` is ``check-debug ARGS``: main hands ARGS to the checker
# before argparse sees them, so the checker parses its own flags (``--help`` included).
CHECK_DEBUG = "check-debug"
CHECK_DEBUG_HELP = "find leftover debug statements in Python files (same as the check-debug hook)"


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


def build_parser() -> argparse.ArgumentParser:
    """Builds the argument parser with one subparser per entry of COMMANDS, and check-debug
    listed after them."""
    parser = ArgumentParser(
        prog="moe-devkit", description="Diagnostics for dynamic-k Mixture-of-Experts routers."
    )
    from moe_devkit import __version__

    parser.add_argument("--version", action="version", version=f"moe-devkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name, command in COMMANDS.items():
        subparser = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(subparser)
    sub.add_parser(CHECK_DEBUG, help=CHECK_DEBUG_HELP, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the process exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == CHECK_DEBUG:  # pass its flags through untouched
        from moe_devkit.lint import main as check_debug_main

        return int(check_debug_main(args_list[1:]))
    command = COMMANDS.get(args_list[0]) if args_list else None
    error = command.missing_error() if command is not None else None
    if error is not None:  # before argparse, which would parse options it cannot run
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
        return int(COMMANDS[args.command].run(args, console))
    except UsageError as exc:
        sys.stderr.write(f"moe-devkit {args.command}: error: {exc}\n")  # one unwrapped line
        return 2
    except KeyboardInterrupt:
        return 130
