"""Shared set-up of torch for the CLI commands: import, device and dtype resolution."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_devkit.cli import UsageError

if TYPE_CHECKING:
    import torch


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


def resolve_dtype(name: str) -> torch.dtype:
    """Maps 'float32' | 'bfloat16' | 'float16' to the torch dtype."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
