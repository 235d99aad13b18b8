"""The ``moe-devkit`` command line: one ``main(argv) -> int``, subcommands found through a dict.

Exit codes: 0 success, 1 findings (e.g. alarms, leftover debug statements), 2 usage errors.
A user's mistake prints one clear line, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.console import Console


class UsageError(Exception):
    """A mistake in the command line or its environment; printed as one line, exit 2."""


@dataclass(frozen=True)
class Command:
    """A subcommand: how to declare its arguments and how to run it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Console], int]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


def _add_diagnose_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("reference model")
    model.add_argument("--hidden-size", type=_positive_int, default=256)
    model.add_argument("--num-experts", type=_positive_int, default=16)
    model.add_argument("--min-k", type=_positive_int, default=1)
    model.add_argument("--max-k", type=_positive_int, default=4)
    model.add_argument("--mode", choices=("complexity", "top_p"), default="complexity")
    model.add_argument("--top-p", type=float, default=0.6)
    model.add_argument("--layers", type=_positive_int, default=2)
    work = parser.add_argument_group("workload")
    work.add_argument("--steps", type=_positive_int, default=20, help="forward passes to record")
    work.add_argument("--batch", type=_positive_int, default=8)
    work.add_argument("--seq", type=_positive_int, default=256)
    work.add_argument("--seed", type=int, default=0)
    work.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    work.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")


def _run_diagnose(args: argparse.Namespace, console: Console) -> int:
    from moe_devkit.commands.diagnose import run_diagnose

    return run_diagnose(args, console)


def _add_check_debug_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of check-debug")


def _run_check_debug(args: argparse.Namespace, console: Console) -> int:
    from moe_devkit.lint import main as check_debug_main

    return check_debug_main(list(args.args))


COMMANDS: dict[str, Command] = {
    "diagnose": Command(
        "run the reference router on a synthetic workload and report its routing",
        _add_diagnose_arguments,
        _run_diagnose,
    ),
    "check-debug": Command(
        "find leftover debug statements in Python files (same as the check-debug hook)",
        _add_check_debug_arguments,
        _run_check_debug,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """Builds the argument parser with one subparser per entry of COMMANDS."""
    parser = argparse.ArgumentParser(
        prog="moe-devkit", description="Diagnostics for dynamic-k Mixture-of-Experts routers."
    )
    from moe_devkit import __version__

    parser.add_argument("--version", action="version", version=f"moe-devkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the process exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if args_list and args_list[0] == "check-debug":  # pass its flags through untouched
        return _run_check_debug(argparse.Namespace(args=args_list[1:]), Console())
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse already printed the usage line
        return int(exc.code) if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    console = Console()
    try:
        return COMMANDS[args.command].run(args, console)
    except UsageError as exc:
        Console(stderr=True).print(f"moe-devkit {args.command}: error: {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130
