"""Shared set-up of the CLI commands that run the reference model: the torch import, device
and dtype resolution, the router options, and progress over the steps of a run.

Its top level imports neither torch nor rich: the commands declare their options with it when
``moe-devkit --help`` lists them.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from moe_devkit.commands.common import UsageError, positive_int

if TYPE_CHECKING:
    import torch
    from rich.console import Console

    from moe_devkit.config import RouterConfig


def require_torch() -> None:
    """Raises UsageError with the install hint if torch is not importable."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UsageError(
            "this command needs PyTorch; install it with `pip install 'moe-devkit[torch]'` "
            "or bring your own torch build"
        ) from None


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; an unavailable device is a UsageError."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N; got {name!r}")
    return device


def device_name(device: torch.device) -> str:
    """``cpu``, or ``cuda:N (the GPU's name)``."""
    import torch

    if device.type != "cuda":
        return str(device)
    index = torch.cuda.current_device() if device.index is None else device.index
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def resolve_dtype(name: str) -> torch.dtype:
    """Maps 'float32' | 'bfloat16' | 'float16' to the torch dtype."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def add_router_arguments(
    parser: argparse.ArgumentParser, *, hidden_size: int, num_experts: int, title: str
) -> argparse._ArgumentGroup:
    """The reference router's options, shared by every command that builds one."""
    group = parser.add_argument_group(title)
    group.add_argument("--hidden-size", type=positive_int, default=hidden_size)
    group.add_argument(
        "--expert-hidden-size", type=positive_int, default=None, help="default: 2 x hidden size"
    )
    group.add_argument("--num-experts", type=positive_int, default=num_experts)
    group.add_argument("--min-k", type=positive_int, default=1)
    group.add_argument("--max-k", type=positive_int, default=4)
    group.add_argument("--mode", choices=("complexity", "top_p"), default="complexity")
    group.add_argument("--top-p", type=float, default=0.6)
    return group


def add_device_arguments(group: argparse._ArgumentGroup) -> None:
    """--device, --dtype and --seed."""
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    group.add_argument("--seed", type=int, default=0)


def router_config(args: argparse.Namespace) -> RouterConfig:
    """RouterConfig from the options of ``add_router_arguments`` (UsageError if invalid)."""
    from moe_devkit.config import RouterConfig

    ffn = args.expert_hidden_size or 2 * args.hidden_size
    try:
        return RouterConfig(
            hidden_size=args.hidden_size,
            expert_hidden_size=ffn,
            complexity_hidden_size=max(args.hidden_size // 4, 1),
            num_experts=args.num_experts,
            min_k=args.min_k,
            max_k=args.max_k,
            mode=args.mode,
            top_p=args.top_p,
        )
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


@contextlib.contextmanager
def step_progress(console: Console, label: str, total: int) -> Iterator[Callable[[], None]]:
    """Yields ``advance()``, to call once per step: a rich progress bar on a terminal, else
    (a log, a pipe) one plain line at the start and at every tenth of the steps."""
    if console.is_terminal:
        from rich.progress import Progress

        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(label, total=total)
            yield lambda: progress.advance(task)
        return
    console.print(f"{label}: 0/{total} steps", highlight=False)
    start, done = time.perf_counter(), 0

    def advance() -> None:
        nonlocal done
        done += 1
        if done * 10 // total > (done - 1) * 10 // total:
            seconds = time.perf_counter() - start
            line = f"{label}: {done}/{total} steps ({100 * done // total}%), {seconds:.1f} s"
            console.print(line, highlight=False)

    yield advance
