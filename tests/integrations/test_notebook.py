"""The IPython extension (``%load_ext moe_devkit``) in a real InteractiveShell."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("IPython")
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

SETUP = """
import torch
from moe_devkit import MoEModel, RouterConfig
torch.manual_seed(0)
model = MoEModel(RouterConfig(hidden_size=16, num_experts=4, max_k=2, expert_hidden_size=32,
                              complexity_hidden_size=4), num_layers=2)
x = torch.randn(2, 8, 16)
"""


@pytest.fixture
def shell() -> InteractiveShell:
    from moe_devkit.integrations.notebook import load_ipython_extension

    ip = InteractiveShell.instance()
    ip.reset()
    ip.run_line_magic("load_ext", "moe_devkit")  # a no-op after the first test
    load_ipython_extension(ip)  # fresh magics (no inspectors) for each test
    ip.run_cell(SETUP).raise_error()
    return ip


@pytest.fixture
def shown(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What the magics display, captured instead of sent to a front end."""
    from moe_devkit.integrations import notebook

    out: list[Any] = []
    monkeypatch.setattr(notebook, "_show_html", lambda text: out.append(("html", text)))
    monkeypatch.setattr(notebook, "_show_png", lambda png: out.append(("png", png)))
    return out


def test_load_ext_is_lazy_and_registers_the_magics() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "ip = InteractiveShell.instance()\n"
        "import moe_devkit\n"
        "assert 'torch' not in sys.modules, 'import moe_devkit loaded torch'\n"
        "ip.run_line_magic('load_ext', 'moe_devkit')\n"
        "assert 'torch' not in sys.modules, '%load_ext moe_devkit loaded torch'\n"
        "assert 'moe_profile' in ip.magics_manager.magics['cell']\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_magics_are_registered(shell: InteractiveShell) -> None:
    magics = shell.magics_manager.magics
    assert {"moe_inspect", "moe_report"} <= set(magics["line"])
    assert "moe_profile" in magics["cell"]


def test_inspect_then_report(shell: InteractiveShell, shown: list[Any]) -> None:
    shell.run_line_magic("moe_inspect", "model")
    shell.run_cell("for _ in range(3): model(x)").raise_error()
    inspector = shell.user_ns["moe_inspector"]
    assert sorted(inspector.layers) == ["layers.0.moe.router", "layers.1.moe.router"]
    assert all(state.steps == 3 for state in inspector.layers.values())
    shell.run_line_magic("moe_report", "")
    kinds = [kind for kind, _ in shown]
    assert kinds == ["html", "png"]
    table = shown[0][1]
    assert "<table>" in table and "layers.0.moe.router" in table and "Gini" in table
    assert shown[1][1].startswith(b"\x89PNG\r\n\x1a\n")


def test_detach_keeps_statistics(shell: InteractiveShell) -> None:
    shell.run_line_magic("moe_inspect", "model")
    shell.run_cell("model(x)").raise_error()
    shell.run_line_magic("moe_inspect", "--detach model")
    shell.run_cell("model(x)").raise_error()
    inspector = shell.user_ns["moe_inspector"]
    assert not inspector.attached
    assert all(state.steps == 1 for state in inspector.layers.values())


def test_profile_cell_reports_routing_stages(shell: InteractiveShell, shown: list[Any]) -> None:
    shell.run_cell_magic("moe_profile", "model", "y = model(x)")
    profile = shell.user_ns["moe_profile"]
    stages = {s.stage for s in profile.stages}
    assert {"gating", "select_k", "dispatch", "experts", "combine"} <= stages
    assert all(s.calls == 2 for s in profile.stages)  # one span per layer
    assert abs(sum(s.share for s in profile.stages) - 1) < 1e-9
    assert "y" in shell.user_ns  # the cell ran in the user namespace
    assert shown[-1][0] == "html" and "dispatch" in shown[-1][1]


def test_profile_of_a_cell_without_the_model(shell: InteractiveShell, shown: list[Any]) -> None:
    shell.run_cell_magic("moe_profile", "model", "z = 1 + 1")
    assert shell.user_ns["moe_profile"].stages == ()
    assert "No <code>moe.*</code> span" in shown[-1][1]


def test_profile_reraises_the_cell_error(shell: InteractiveShell) -> None:
    with pytest.raises(ZeroDivisionError):
        shell.run_cell_magic("moe_profile", "model", "1 / 0")


@pytest.mark.parametrize(
    ("magic", "line", "message"),
    [
        ("moe_inspect", "missing", "no variable 'missing'"),
        ("moe_inspect", "x", "must be a torch.nn.Module"),
        ("moe_inspect", "", "usage: %moe_inspect"),
        ("moe_report", "", "no model inspected yet"),
        ("moe_report", "other", "'other' is not inspected"),
    ],
)
def test_usage_errors(shell: InteractiveShell, magic: str, line: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        shell.run_line_magic(magic, line)


def test_report_before_any_forward(shell: InteractiveShell) -> None:
    shell.run_line_magic("moe_inspect", "model")
    with pytest.raises(UsageError, match="no routing recorded yet"):
        shell.run_line_magic("moe_report", "")


def test_documented_jupyter_workflow() -> None:
    """docs/notebook.md: autoreload, %lprun (line_profiler), %memit (memory_profiler).

    In a fresh interpreter: %memit forks its memory monitor, and a fork of this pytest
    process, where other tests have started JAX's threads, could deadlock.
    """
    import subprocess
    import sys

    pytest.importorskip("line_profiler")
    pytest.importorskip("memory_profiler")
    lines = (
        "%load_ext autoreload",
        "%autoreload 2",
        "%load_ext line_profiler",
        "from moe_devkit.routers.torch_router import DynamicMoERouter, MoELayer",
        "%lprun -f DynamicMoERouter.forward -f MoELayer.forward model(x)",
        "%load_ext memory_profiler",
        "%memit model(x)",
        "%autoreload 0",
    )
    code = (
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "ip = InteractiveShell.instance()\n"
        f"ip.run_cell({SETUP!r}).raise_error()\n"
        f"for line in {lines!r}:\n"
        "    ip.run_cell(line).raise_error()\n"
        "print('workflow ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "workflow ok" in proc.stdout
    assert proc.stdout.count("Total time:") == 2  # %lprun timed both functions
    assert "peak memory" in proc.stdout  # %memit printed its measurement
