"""Debugging switches for PyTorch and JAX, set in one place.

Environment variables are read when a framework loads (``TORCH_SHOW_CPP_STACKTRACES`` at
``import torch``, ``CUDA_LAUNCH_BLOCKING`` at CUDA initialisation, ``JAX_*`` at
``import jax``), so ``apply_env`` must run before the import. Anomaly detection and CUDA
sync-debug mode have no environment variable: ``torch_debug_mode`` switches them on for a
block and restores them after it. Everything here is meant for a debugging session only.
"""

# The DBG codes suppressed below are check-debug's (moe_devkit.lint), unknown to ruff.
# ruff: noqa: RUF100, RUF102

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Literal

SyncDebug = Literal["off", "warn", "error"]
Anomaly = Literal["off", "on", "nan"]

TORCH_DEBUG_ENV: Mapping[str, str] = {
    "CUDA_LAUNCH_BLOCKING": "1",  # kernel errors raise at the launching line
    "TORCH_SHOW_CPP_STACKTRACES": "1",
    "TORCHDYNAMO_DISABLE": "1",  # torch.compile runs eagerly, so breakpoints inside are hit
}

JAX_DEBUG_ENV: Mapping[str, str] = {
    "JAX_DISABLE_JIT": "1",  # ops run one by one on concrete arrays: breakpoints and prints work
    "JAX_DEBUG_NANS": "True",
    "JAX_TRACEBACK_FILTERING": "off",
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
}

JAX_PLATFORMS: Mapping[str, str] = {"cpu": "cpu", "gpu": "cuda"}


def jax_cache_env() -> dict[str, str]:
    """A persistent compilation cache that keeps even the smallest compiled op.

    With jit off JAX compiles each primitive on first use (hundreds of small compiles per
    step); cached, a second debug run takes about a third of the time.
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return {
        "JAX_COMPILATION_CACHE_DIR": os.path.join(base, "moe-devkit", "jax-debug"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


def apply_env(
    variables: Mapping[str, str], environ: MutableMapping[str, str] | None = None
) -> dict[str, str]:
    """Sets each variable not already set (a value from launch.json or the shell wins).

    Returns:
        The variables this call set.
    """
    target = os.environ if environ is None else environ
    added = {name: value for name, value in variables.items() if name not in target}
    target.update(added)
    return added


def jax_env(platform: str) -> dict[str, str]:
    """The JAX debugging variables, the compilation cache and ``JAX_PLATFORMS`` for ``platform``.

    Raises:
        ValueError: an unknown platform.
    """
    if platform not in JAX_PLATFORMS:
        raise ValueError(f"platform must be one of {sorted(JAX_PLATFORMS)}; got {platform!r}")
    return {**JAX_DEBUG_ENV, **jax_cache_env(), "JAX_PLATFORMS": JAX_PLATFORMS[platform]}


def configure_jax(platform: str) -> None:
    """Sets the same switches through ``jax.config`` (for a JAX already imported)."""
    import jax

    jax.config.update("jax_platforms", jax_env(platform)["JAX_PLATFORMS"])  # type: ignore[no-untyped-call]
    jax.config.update("jax_disable_jit", True)  # type: ignore[no-untyped-call]  # noqa: DBG204
    jax.config.update("jax_debug_nans", True)  # type: ignore[no-untyped-call]  # noqa: DBG204
    jax.config.update("jax_traceback_filtering", "off")  # type: ignore[no-untyped-call]


@contextmanager
def torch_debug_mode(
    device_type: str, sync_debug: SyncDebug = "warn", anomaly: Anomaly = "on"
) -> Iterator[None]:
    """Anomaly detection, sync-debug mode (CUDA) and no torch.compile inside the block.

    Args:
        device_type: "cpu" or "cuda"; sync-debug mode exists on CUDA only.
        sync_debug: "warn" or "error" on every host synchronisation, or "off".
        anomaly: "on" records the forward traceback of every backward op, so an error in
            backward names the forward line that made it; "nan" also raises on the first
            NaN any backward op returns, even in values the loss never reads (the grouped
            matmul leaves the rows past its last offset undefined, which can trip it);
            "off" leaves anomaly detection as it is.
    """
    import torch
    import torch._dynamo.config as dynamo_config

    was_enabled = torch.is_anomaly_enabled()
    was_check_nan = torch.is_anomaly_check_nan_enabled()
    compile_disabled = dynamo_config.disable
    cuda = device_type == "cuda" and sync_debug != "off"
    previous_sync = torch.cuda.get_sync_debug_mode() if cuda else 0
    if anomaly != "off":
        torch.autograd.set_detect_anomaly(True, check_nan=anomaly == "nan")  # noqa: DBG201
    dynamo_config.disable = True
    if cuda:
        torch.cuda.set_sync_debug_mode(sync_debug)
    try:
        yield
    finally:
        torch.autograd.set_detect_anomaly(was_enabled, check_nan=was_check_nan)
        dynamo_config.disable = compile_disabled
        if cuda:
            torch.cuda.set_sync_debug_mode(previous_sync)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The reference model's sizes, shared by the debug steps (small: each line is quick)."""
    for name, default in (
        ("--hidden-size", 32), ("--num-experts", 8), ("--max-k", 4), ("--layers", 2),
        ("--batch", 2), ("--seq", 16), ("--seed", 0),
    ):  # fmt: skip
        parser.add_argument(name, type=int, default=default)
