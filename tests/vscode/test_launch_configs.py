"""The VS Code configurations in .vscode/, checked statically and run for real.

Each launch configuration is sent to the debugpy adapter as VS Code sends it (launch_json.py
and dap_harness.py: variables substituted, inputs at their defaults, the adapter's default
exception filters ticked, subprocesses attached when the configuration asks for it). Each must
stop at a breakpoint in the code it runs, let a variable be read, and exit 0 after continuing,
with no other stop in any process. The pytest configurations run twice: in a small workspace holding
this project's pyproject.toml and one test (the breakpoint), and on this project's own tests
that start subprocesses, which exit with SystemExit(2) on purpose or have their stderr
compared, where no stop is allowed but one breakpoint the test sets: the current-file
configuration on part of tests/test_benchmark_args.py, the full suite on the tests marked
``vscode_smoke``, the Test Explorer configuration as the Testing view launches it (with a
breakpoint in the test) and as picked from the dropdown. The harness itself is tested against
broken configurations: a missing module, a typo in a key, a hang, a subprocess that stops.
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
from dap_harness import DapFailure, Run, run_config
from launch_json import (
    ALLOWED_VARIABLES,
    KNOWN_LAUNCH_KEYS,
    VARIABLE,
    input_defaults,
    load_jsonc,
    substitute,
)

ROOT = Path(__file__).resolve().parents[2]
VSCODE = ROOT / ".vscode"
TARGET = Path(__file__).parent / "targets" / "debug_target.py"
TIMEOUT = 45.0  # seconds per debug session; each test stays well under a minute
REAL_TIMEOUT = 100.0  # a session on this project's tests: torch imports under the debugger
BENCHMARK_TESTS = ROOT / "tests" / "test_benchmark_args.py"
BENCHMARK_SUBSET = "bench_check_debug or bench_detector-pairs"  # 3 scripts exit 2 (usage)

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


def _resolve(
    config: dict[str, Any], workspace: Path, file: Path | None = None, **inputs: str
) -> dict[str, Any]:
    """``config`` as VS Code resolves it: the inputs at their defaults unless given here."""
    variables = {"workspaceFolder": str(workspace), "file": str(file or TARGET)}
    resolved: dict[str, Any] = substitute(config, variables, {**input_defaults(LAUNCH), **inputs})
    return resolved


def _as_testing_view(workspace: Path, tests: list[str], scratch: Path) -> dict[str, Any]:
    """The Test Explorer configuration as the Testing view's "Debug Test" launches it.

    The Python extension fills in its defaults (subProcess true, redirectOutput, the cwd)
    where the configuration leaves them out, then sets program to its pytest runner and
    args to --rootdir and the chosen tests; a small runner stands in for the extension's.
    """
    runner = scratch / "run_pytest.py"
    runner.write_text("import sys\nimport pytest\n\nraise SystemExit(pytest.main(sys.argv[1:]))\n")
    defaults = {"subProcess": True, "redirectOutput": True, "showReturnValue": True,
                "stopOnEntry": False, "cwd": str(workspace)}  # fmt: skip
    config = {**defaults, **_resolve(EXPLORER, workspace)}
    config.update(program=str(runner), args=["--rootdir", str(workspace), *tests], purpose=[])
    return config


def _passed(run: Run, count: int) -> None:
    """pytest ran and passed ``count`` tests, and no debugger's warning reached the output."""
    assert re.search(rf"\b{count} passed\b", run.output), run.output[-2000:]
    assert "frozen modules" not in run.output, run.output[-2000:]


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
    # The Testing view replaces program; from the dropdown, the adapter needs one of these.
    assert EXPLORER.get("program") == "${file}", "the dropdown runs the open file"
    assert "module" not in EXPLORER and "code" not in EXPLORER, "the Testing view sets program"
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


def test_test_configurations_leave_the_tests_subprocesses_undebugged() -> None:
    for config in (SINGLE, SUITE, EXPLORER):
        assert config.get("subProcess") is False, f"{config['name']}: subProcess must be false"


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
    run = run_config(config, breakpoint_at=(target, _line_of(target, "assert answer")),
                     variable="answer", timeout=TIMEOUT)  # fmt: skip
    assert run.value == "42"
    assert "uncaught" in run.filters, run.filters  # VS Code's default exception breakpoints


def test_single_test_configuration_on_tests_that_start_failing_subprocesses() -> None:
    """Each selected case runs a benchmark script that exits with SystemExit(2): no stop."""
    config = _resolve(SINGLE, ROOT, BENCHMARK_TESTS, pytestK=BENCHMARK_SUBSET)
    run = run_config(config, timeout=REAL_TIMEOUT)
    _passed(run, 3)


def test_full_suite_configuration(mini_workspace: Path) -> None:
    target = mini_workspace / "tests" / "test_target.py"
    config = _resolve(SUITE, mini_workspace)
    run = run_config(config, breakpoint_at=(target, _line_of(target, "assert answer")),
                     variable="answer", timeout=TIMEOUT)  # fmt: skip
    assert run.value == "42"


def test_full_suite_configuration_on_the_smoke_tests() -> None:
    """The whole suite's configuration, narrowed to the tests marked vscode_smoke."""
    config = _resolve(SUITE, ROOT)
    config["args"] = [*config["args"], "-m", "vscode_smoke", "-rA"]
    run = run_config(config, timeout=REAL_TIMEOUT)
    _passed(run, 4)
    assert "PASSED tests/lint/test_check_debug_cli.py::test_parallel_run_matches_serial" in (
        run.output
    ), run.output[-2000:]


def test_test_explorer_configuration(mini_workspace: Path) -> None:
    target = mini_workspace / "tests" / "test_target.py"
    config = _as_testing_view(mini_workspace, [f"{target}::test_debug_target"], mini_workspace)
    run = run_config(config, breakpoint_at=(target, _line_of(target, "assert answer")),
                     variable="answer", timeout=TIMEOUT)  # fmt: skip
    assert run.value == "42"


def test_test_explorer_configuration_stops_only_at_the_breakpoint(tmp_path: Path) -> None:
    """The Testing view's Debug Test on a case whose script exits 2: the breakpoint, no more."""
    case = "test_bad_argument_fails_fast_with_one_line[bench_detector-pairs]"
    config = _as_testing_view(ROOT, [f"{BENCHMARK_TESTS.relative_to(ROOT)}::{case}"], tmp_path)
    line = _line_of(BENCHMARK_TESTS, "assert outcome.code == case.code")
    run = run_config(config, breakpoint_at=(BENCHMARK_TESTS, line), variable="outcome",
                     timeout=REAL_TIMEOUT)  # fmt: skip
    assert "code=2" in (run.value or ""), run.value
    _passed(run, 1)


def test_test_explorer_configuration_from_the_dropdown() -> None:
    """Picked in Run and Debug with a test file open: the file runs as a script, exit 0."""
    test_file = ROOT / "tests" / "lint" / "test_check_debug_cli.py"
    run = run_config(_resolve(EXPLORER, ROOT, test_file), timeout=TIMEOUT)
    assert run.exit_code == 0 and run.sessions == ["launch"]


def test_pytorch_model_configuration() -> None:
    source = ROOT / "moe_devkit" / "debug" / "torch_step.py"
    run = run_config(_resolve(TORCH, ROOT), breakpoint_at=(source, _line_of(source,
                     "loss.backward()")), variable="loss", timeout=TIMEOUT)  # fmt: skip
    assert (run.value or "").startswith("tensor(")


def test_jax_model_configuration() -> None:
    pytest.importorskip("jax")
    source = ROOT / "moe_devkit" / "debug" / "jax_step.py"
    line = _line_of(source, "leaves = jax.tree_util.tree_leaves(grads)")
    run = run_config(_resolve(JAX, ROOT), breakpoint_at=(source, line), variable="loss",
                     timeout=TIMEOUT)  # fmt: skip
    value = run.value or ""
    assert "Array" in value or re.match(r"^-?[0-9.]+", value), value


def test_benchmark_configuration() -> None:
    source = ROOT / "benchmarks" / "perf" / "suite.py"
    line = _line_of(source, "run_suite(args, console)")
    run = run_config(_resolve(BENCH, ROOT), breakpoint_at=(source, line), variable="args",
                     timeout=TIMEOUT)  # fmt: skip
    assert "quick=True" in (run.value or "")


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


def test_harness_attaches_subprocesses_and_reports_their_stops(tmp_path: Path) -> None:
    child = tmp_path / "child.py"
    child.write_text("import sys\n\nsys.exit(2)\n")
    parent = tmp_path / "parent.py"
    parent.write_text(
        f"import subprocess, sys\n\nsubprocess.run([sys.executable, {str(child)!r}])\n"
    )
    config = {"name": "parent", "type": "debugpy", "request": "launch", "program": str(parent),
              "console": "integratedTerminal", "subProcess": True}  # fmt: skip
    stops = r"(?s)stopped 1 time\(s\).*Subprocess \d+: exception SystemExit\(2\) at .*child\.py:3"
    with pytest.raises(DapFailure, match=stops):
        run_config(config, timeout=30)
    run = run_config({**config, "subProcess": False}, timeout=30)
    assert run.exit_code == 0 and run.sessions == ["launch"]


def test_harness_rejects_unknown_variables() -> None:
    with pytest.raises(DapFailure, match="workspaceRoot"):
        substitute({"cwd": "${workspaceRoot}"}, {"workspaceFolder": "/w"}, {})
    assert sys.executable  # the debuggee runs on this interpreter
