"""The moe-devkit command line (``moe_devkit.cli``): the list of subcommands, argparse's
mistakes as one line and exit 2, the ``--device`` check before any command, help, the
``python -m moe_devkit`` entry point, and what importing and listing the commands loads."""

from __future__ import annotations

import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_support import assert_one_line_usage_error, moe_devkit

import moe_devkit.commands as commands_package
from moe_devkit.cli import COMMANDS, main

HEAVY = ("torch", "jax", "numpy", "rich", "matplotlib")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bogus"], "argument COMMAND: invalid choice: 'bogus'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["diagnose", "--steps", "0"], "argument --steps: expected a positive integer; got '0'"),
        (["diagnose", "--mode", "nope"], "argument --mode: invalid choice: 'nope'"),
        (["report"], "the following arguments are required: report"),
        (["report", "r.json", "--out"], "argument --out: expected one argument"),
        (["numerics", "--plant-step", "x"], "argument --plant-step: expected a positive integer"),
        (["gradients", "--top", "0"], "argument --top: expected a positive integer; got '0'"),
        (["gradients", "--vanishing", "tiny"], "argument --vanishing: invalid float value"),
        (["gradients", "--lr", "0", "--out", "new/g.json"], "argument --lr: expected a finite"),
        (["memory", "--steps", "-1"], "argument --steps: expected a positive integer; got '-1'"),
        (["memory", "--unknown"], "unrecognized arguments: --unknown"),
        (["profile", "--tokens", "0"], "argument --tokens: expected a positive integer"),
        (["profile", "--warmup", "-1"], "argument --warmup: expected a non-negative integer"),
        (
            ["profile", "--tolerance", "0"],
            "argument --tolerance: expected a finite positive number; got '0'",
        ),
        (["profile", "--tolerance", "x"], "argument --tolerance: expected a positive number"),
    ],
)
def test_argparse_errors_are_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    proc = moe_devkit(args, tmp_path)
    top_level = args[0] in ("bogus", "--bogus") or "unrecognized" in message  # argparse's way
    assert_one_line_usage_error(proc, "moe-devkit" if top_level else f"moe-devkit {args[0]}")
    assert message in proc.stderr
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
JAX = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax")


@pytest.mark.parametrize(
    "args",
    [
        ["diagnose", "--device", "tpu"],  # --out defaults to ./moe_devkit_report
        ["diagnose", "--device", "cuda:x", "--out", "new"],
        pytest.param(["diagnose", "--framework", "jax", "--device", "tpu"], marks=JAX),
        pytest.param(["profile", "--device", "cuda", "--out", "new"], marks=NO_CUDA),
        ["profile", "--device", "mps", "--out", "new"],
        ["gradients", "--device", "tpu", "--out", "new/gradients.json"],
        pytest.param(["numerics", "--device", "cuda:7", "--out", "new/n.json"], marks=NO_CUDA),
        ["memory", "--device", "cuda:-1", "--out", "new/memory.json"],
    ],
)
def test_bad_device_creates_nothing(args: list[str], tmp_path: Path) -> None:
    """The device is checked before the output directory is created."""
    proc = moe_devkit(args, tmp_path)
    assert_one_line_usage_error(proc, f"moe-devkit {args[0]}")
    assert "--device" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_cuda_index_beyond_the_devices(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a machine with one GPU, cuda:7 is a usage error, not torch's invalid device ordinal."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = tmp_path / "new"
    assert main(["profile", "--device", "cuda:7", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == "moe-devkit profile: error: --device cuda:7: torch sees only 1 CUDA device(s)\n"
    assert not out.exists()


@pytest.mark.parametrize("args", [["--help"], ["profile", "--help"], ["report", "-h"]])
def test_help_stays_the_full_help(args: list[str], tmp_path: Path) -> None:
    proc = moe_devkit(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: moe-devkit")
    assert proc.stdout.count("\n") > 5 and proc.stderr == ""


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "diagnose" in capsys.readouterr().out


def test_every_command_module_is_listed() -> None:
    """Each public module of moe_devkit.commands (``common`` aside) declares the COMMAND that
    the CLI lists, under its own name with ``-`` for ``_`` (``compare_routing`` is
    ``compare-routing``); check-debug is listed by the CLI itself."""
    modules = [
        info.name
        for info in pkgutil.iter_modules(commands_package.__path__)
        if not info.name.startswith("_") and info.name != "common"
    ]
    assert sorted(COMMANDS) == sorted(m.replace("_", "-") for m in modules)
    for name, command in COMMANDS.items():
        assert command.name == name
        assert command.run.__module__ == f"moe_devkit.commands.{name.replace('-', '_')}"


@pytest.mark.vscode_smoke
def test_module_entry_point_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "moe_devkit", "--version"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("moe-devkit ")


def test_import_is_lazy() -> None:
    code = (
        "import sys, moe_devkit, moe_devkit.cli;"
        "heavy = [m for m in ('torch', 'jax', 'matplotlib') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


@pytest.mark.parametrize("args", [["--help"], ["diagnose", "--help"], ["profile", "--help"]])
def test_help_imports_no_heavy_module(args: list[str]) -> None:
    """Listing the commands and their options imports no command's work: the command
    modules' top level is light, whatever is installed."""
    code = (
        "import sys\n"
        "from moe_devkit.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: moe-devkit")
    assert proc.stderr.strip() == ""
