"""The VS Code configurations in .vscode/, checked statically and run for real.

Each launch configuration is sent to the debugpy adapter as VS Code sends it (variables
substituted, inputs at their defaults), must stop at a breakpoint in the code it runs, let a
variable be read, and exit 0 after continuing (dap_harness.py). The pytest configurations run
in a small workspace holding this project's pyproject.toml and one test, so their defaults
(the current file, the whole suite) stay what a user gets while the run stays fast. The
harness itself is tested against broken configurations: a missing module, a typo in a key,
a hang.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from dap_harness import (
    ALLOWED_VARIABLES,
    KNOWN_LAUNCH_KEYS,
    VARIABLE,
    DapFailure,
    input_defaults,
    load_jsonc,
    run_config,
    substitute,
)

ROOT = Path(__file__).resolve().parents[2]
VSCODE = ROOT / ".vscode"
TARGET = Path(__file__).parent / "targets" / "debug_target.py"
TIMEOUT = 45.0  # seconds per debug session; each test stays well under a minute

LAUNCH = load_jsonc(VSCODE / "launch.json")
CONFIGS: dict[str, dict[str, Any]] = {c["name"]: c for c in LAUNCH["configurations"]}


def _config(predicate: Any) -> dict[str, Any]:
    found = [c for c in LAUNCH["configurations"] if predicate(c)]
    assert len(found) == 1, f"expected one matching configuration, found {len(found)}"
    return found[0]


SINGLE = _config(lambda c: "${file}" in c.get("args", []))
SUITE = _config(lambda c: c.get("module") == "pytest" and "${file}" not in c.get("args", []))
EXPLORER = _config(lambda c: "debug-test" in c.get("purpose", []))
TORCH = _config(lambda c: c.get("module") == "moe_devkit.debug.torch_step")
JAX = _config(lambda c: c.get("module") == "moe_devkit.debug.jax_step")
BENCH = _config(lambda c: str(c.get("program", "")).endswith("perf_suite.py"))


def _line_of(path: Path, text: str) -> int:
    """The 1-based line of ``text`` in ``path`` (the breakpoint follows the code)."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if text in line:
            return number
    raise AssertionError(f"{path} no longer holds {text!r}: update the breakpoint in this test")


def _resolve(config: dict[str, Any], workspace: Path, file: Path | None = None) -> dict[str, Any]:
    variables = {"workspaceFolder": str(workspace), "file": str(file or TARGET)}
    resolved: dict[str, Any] = substitute(config, variables, input_defaults(LAUNCH))
    return resolved


@pytest.fixture
def mini_workspace(tmp_path: Path) -> Path:
    """A workspace with this project's pytest settings and a single tiny test."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "tests").mkdir()
    shutil.copy(TARGET, tmp_path / "tests" / "test_target.py")
    return tmp_path


# ----------------------------------------------------------------------------- static checks


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


@pytest.mark.parametrize("name", ["launch", "settings", "tasks", "extensions"])
def test_jsonc_parses(name: str) -> None:
    assert isinstance(load_jsonc(VSCODE / f"{name}.json"), dict)


def test_configurations_use_debugpy_and_known_keys() -> None:
    names = [c["name"] for c in LAUNCH["configurations"]]
    assert len(names) == len(set(names)), f"duplicate configuration names: {names}"
    for config in LAUNCH["configurations"]:
        assert config["type"] == "debugpy", f"{config['name']}: type must be debugpy"
        unknown = set(config) - KNOWN_LAUNCH_KEYS
        assert not unknown, f"{config['name']}: unknown key(s) {sorted(unknown)} (a typo?)"
    assert '"type": "python"' not in (VSCODE / "launch.json").read_text()


@pytest.mark.parametrize("name", ["launch", "settings", "tasks"])
def test_only_variables_vscode_resolves(name: str) -> None:
    data = load_jsonc(VSCODE / f"{name}.json")
    inputs = {item["id"] for item in LAUNCH.get("inputs", [])}
    for text in _strings(data):
        for match in VARIABLE.finditer(text):
            assert match.group(1) in ALLOWED_VARIABLES, f"{name}.json: {match.group(0)}"
            if match.group(1) == "input":
                assert match.group(2) in inputs, f"{name}.json: no input {match.group(2)!r}"


def test_referenced_modules_and_files_exist() -> None:
    for config in LAUNCH["configurations"]:
        resolved = _resolve(config, ROOT)
        if "module" in resolved:
            spec = importlib.util.find_spec(resolved["module"])
            assert spec is not None, f"{config['name']}: no module {resolved['module']!r}"
        if "program" in resolved:
            assert Path(resolved["program"]).is_file(), f"{config['name']}: no program"


def test_required_configurations() -> None:
    assert "module" not in EXPLORER and "program" not in EXPLORER, "the Test Explorer sets these"
    assert {"CUDA_LAUNCH_BLOCKING", "TORCH_SHOW_CPP_STACKTRACES", "TORCHDYNAMO_DISABLE"} <= set(
        TORCH["env"]
    )
    assert JAX["env"] == {"JAX_DISABLE_JIT": "1", "JAX_DEBUG_NANS": "True",
                          "JAX_TRACEBACK_FILTERING": "off",
                          "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # fmt: skip
    assert "distorted" in BENCH["name"]
    defaults = input_defaults(LAUNCH)
    for config, option in ((TORCH, "--device"), (JAX, "--platform")):
        choice = config["args"][config["args"].index(option) + 1]
        assert choice.startswith("${input:"), f"{config['name']}: {option} is not a choice"
    assert defaults["torchDevice"] == "cpu" and defaults["jaxPlatform"] == "cpu"


def test_tasks_run_the_nox_sessions_and_none_on_folder_open() -> None:
    tasks = load_jsonc(VSCODE / "tasks.json")["tasks"]
    for task in tasks:
        run_on = task.get("runOptions", {}).get("runOn")
        assert run_on != "folderOpen", f"task {task['label']!r} runs when the folder opens"
    commands = " ".join(t["command"] for t in tasks)
    noxfile = (ROOT / "noxfile.py").read_text()
    sessions = re.findall(r"^@nox\.session[^\n]*\n(?:@[^\n]*\n)*def (\w+)", noxfile, re.M)
    assert sessions, "no nox sessions found in noxfile.py"
    for session in sessions:
        assert f"-s {session}" in commands or f'-s "{session}(' in commands, session


def test_settings_enable_pytest_without_coverage() -> None:
    settings = load_jsonc(VSCODE / "settings.json")
    assert settings["python.testing.pytestEnabled"] is True
    assert not any("cov" in arg for arg in settings["python.testing.pytestArgs"])


def test_extensions() -> None:
    wanted = {"ms-python.python", "ms-python.debugpy", "charliermarsh.ruff"}
    assert wanted <= set(load_jsonc(VSCODE / "extensions.json")["recommendations"])


# ----------------------------------------------------------------------------- real runs


def test_single_test_configuration(mini_workspace: Path) -> None:
    target = mini_workspace / "tests" / "test_target.py"
    config = _resolve(SINGLE, mini_workspace, target)
    stop = run_config(config, breakpoint_at=(target, _line_of(target, "assert answer")),
                      variable="answer", timeout=TIMEOUT)  # fmt: skip
    assert stop.value == "42"


def test_full_suite_configuration(mini_workspace: Path) -> None:
    target = mini_workspace / "tests" / "test_target.py"
    config = _resolve(SUITE, mini_workspace)
    stop = run_config(config, breakpoint_at=(target, _line_of(target, "assert answer")),
                      variable="answer", timeout=TIMEOUT)  # fmt: skip
    assert stop.value == "42"


def test_test_explorer_configuration(mini_workspace: Path) -> None:
    target = mini_workspace / "tests" / "test_target.py"
    runner = mini_workspace / "run_pytest.py"  # stands in for the extension's pytest runner
    runner.write_text("import sys\nimport pytest\n\nraise SystemExit(pytest.main(sys.argv[1:]))\n")
    config = _resolve(EXPLORER, mini_workspace)
    config.update(program=str(runner), args=[f"{target}::test_debug_target"],
                  cwd=str(mini_workspace))  # fmt: skip
    stop = run_config(config, breakpoint_at=(target, _line_of(target, "assert answer")),
                      variable="answer", timeout=TIMEOUT)  # fmt: skip
    assert stop.value == "42"


def test_pytorch_model_configuration() -> None:
    source = ROOT / "moe_devkit" / "debug" / "torch_step.py"
    stop = run_config(_resolve(TORCH, ROOT), breakpoint_at=(source, _line_of(source,
                      "loss.backward()")), variable="loss", timeout=TIMEOUT)  # fmt: skip
    assert stop.value.startswith("tensor(")


def test_jax_model_configuration() -> None:
    pytest.importorskip("jax")
    source = ROOT / "moe_devkit" / "debug" / "jax_step.py"
    line = _line_of(source, "leaves = jax.tree_util.tree_leaves(grads)")
    stop = run_config(_resolve(JAX, ROOT), breakpoint_at=(source, line), variable="loss",
                      timeout=TIMEOUT)  # fmt: skip
    assert "Array" in stop.value or re.match(r"^-?[0-9.]+", stop.value), stop.value


def test_benchmark_configuration() -> None:
    source = ROOT / "benchmarks" / "perf_suite.py"
    line = _line_of(source, "run_suite(args, console)")
    stop = run_config(_resolve(BENCH, ROOT), breakpoint_at=(source, line), variable="args",
                      timeout=TIMEOUT)  # fmt: skip
    assert "quick=True" in stop.value


# ----------------------------------------------------------------------------- the harness


def test_harness_reports_a_missing_module() -> None:
    config = {**_resolve(TORCH, ROOT), "module": "moe_devkit.debug.no_such_step"}
    source = ROOT / "moe_devkit" / "debug" / "torch_step.py"
    with pytest.raises(DapFailure, match=r"(?s)before stopping at .*No module named"):
        run_config(config, breakpoint_at=(source, 1), variable="loss", timeout=20)


def test_harness_reports_a_key_typo() -> None:
    config = dict(_resolve(TORCH, ROOT))
    config["modul"] = config.pop("module")
    assert set(config) - KNOWN_LAUNCH_KEYS == {"modul"}  # the static check names it
    source = ROOT / "moe_devkit" / "debug" / "torch_step.py"
    with pytest.raises(DapFailure, match=r"'launch' failed.*must be specified"):
        run_config(config, breakpoint_at=(source, 1), variable="loss", timeout=20)


def test_harness_times_out_on_a_hang(tmp_path: Path) -> None:
    script = tmp_path / "hang.py"
    script.write_text("import time\n\ntime.sleep(600)\nvalue = 1\n")
    config = {"name": "hang", "type": "debugpy", "request": "launch", "program": str(script),
              "console": "integratedTerminal"}  # fmt: skip
    start = time.monotonic()
    with pytest.raises(DapFailure, match=r"timed out waiting for a stop at .*hang\.py:4"):
        run_config(config, breakpoint_at=(script, 4), variable="value", timeout=6)
    assert time.monotonic() - start < 20


def test_harness_rejects_unknown_variables() -> None:
    with pytest.raises(DapFailure, match="workspaceRoot"):
        substitute({"cwd": "${workspaceRoot}"}, {"workspaceFolder": "/w"}, {})
    assert sys.executable  # the debuggee runs on this interpreter
