"""What check-debug loads: only libcst (and tomli before 3.11) is installed with the hook, and a
run imports only what its files need. Speed itself is measured by
benchmarks/bench_check_debug.py; these tests pin the imports that the speed depends on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"numpy", "matplotlib", "rich", "torch", "jax", "PIL"}
# What a run over clean files never needs: checking them is a read and a substring search.
START_UP = {
    "typing",
    "pathlib",
    "subprocess",
    "tempfile",
    "multiprocessing",
    "tomllib",
    "tomli",
    "libcst",
    "moe_devkit.lint.analysis",
}
CLEAN = "def forward(x):\n    return x * 2\n"
LEFTOVER = "import pdb\n\n\ndef forward(x):\n    pdb.set_trace()\n    return x\n"


def imported_by(cwd: Path, setup: str, call: str, *argv: str) -> tuple[int, set[str]]:
    """Run `setup`, then `status = call` in a fresh interpreter; return the status and the
    modules (with their top-level packages) it imported.

    `-S` skips site-packages' start-up imports (an editable install's finder imports pathlib,
    which a hook's environment does not), so what the run itself imports is seen.
    """
    code = (
        "import json, site, sys\n"
        "sys.path.extend(site.getsitepackages())\n"
        "before = set(sys.modules)\n"
        f"{setup}\n"
        f"status = {call}\n"
        "print(json.dumps([status, sorted(set(sys.modules) - before)]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code, *argv],
        cwd=cwd,
        env=dict(os.environ, PYTHONPATH=str(ROOT), XDG_CACHE_HOME=str(cwd / "cache")),
        capture_output=True,
        text=True,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    status, modules = json.loads(done.stdout.splitlines()[-1])
    return status, set(modules) | {name.split(".")[0] for name in modules}


def check_debug(cwd: Path, *argv: str) -> tuple[int, set[str]]:
    return imported_by(cwd, "from moe_devkit.lint import main", "main(sys.argv[1:])", *argv)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project whose pyproject.toml has no [tool.check-debug] table."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "example"\n')
    for index in range(5):
        (tmp_path / f"clean{index}.py").write_text(CLEAN * 100)
    (tmp_path / "leftover.py").write_text(LEFTOVER)
    return tmp_path


def test_clean_commit_imports_only_what_checking_needs(project: Path) -> None:
    status, modules = check_debug(project, *(f"clean{index}.py" for index in range(5)))
    assert status == 0
    assert modules & (HEAVY | START_UP) == set()


def test_findings_import_no_diagnostics_module_nor_libcst(project: Path) -> None:
    status, modules = check_debug(project, "leftover.py", "clean0.py")
    assert status == 1
    assert "moe_devkit.lint.analysis" in modules  # the file was analysed
    assert modules & (HEAVY | {"libcst", "multiprocessing", "tomllib", "tomli"}) == set()


def test_fix_of_whole_lines_imports_no_libcst(project: Path) -> None:
    status, modules = check_debug(project, "--fix", "leftover.py")
    assert status == 1
    assert (project / "leftover.py").read_text() == "\n\ndef forward(x):\n    return x\n"
    assert modules & (HEAVY | {"libcst", "multiprocessing"}) == set()


def test_fix_of_other_shapes_still_uses_libcst(project: Path) -> None:
    (project / "leftover.py").write_text("x = 1; breakpoint()\n")
    status, modules = check_debug(project, "--fix", "leftover.py")
    assert status == 1
    assert (project / "leftover.py").read_text() == "x = 1\n"
    assert "libcst" in modules


def test_settings_table_is_parsed_once(project: Path) -> None:
    """The table is parsed with tomllib; the next run of an unchanged file reads it back."""
    (project / "pyproject.toml").write_text('[tool.check-debug]\nignore = ["DBG0"]\n')
    status, modules = check_debug(project, "leftover.py")
    assert status == 0  # the table was applied
    assert {"tomllib", "tomli"} & modules
    status, modules = check_debug(project, "leftover.py")
    assert status == 0
    assert modules & (HEAVY | START_UP - {"moe_devkit.lint.analysis"}) == set()


def test_moe_devkit_check_debug_imports_no_rich(project: Path) -> None:
    setup, call = "from moe_devkit.cli import main", "main(['check-debug', *sys.argv[1:]])"
    status, modules = imported_by(project, setup, call, "leftover.py")
    assert status == 1
    assert modules & (HEAVY | {"libcst"}) == set()


def test_core_dependencies_are_the_hooks_alone() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == ["libcst>=1.1", "tomli>=1.1; python_version < '3.11'"]
    extras = project["optional-dependencies"]
    assert extras["diagnostics"] == ["numpy>=1.24", "rich>=13", "matplotlib>=3.7"]
    for extra in ("torch", "jax", "hf"):  # each way to run the diagnostics brings their deps
        assert "moe-devkit[diagnostics]" in extras[extra]
    assert {"jax", "hf"} <= {e for s in extras["dev"] for e in s.split("[")[-1][:-1].split(",")}


DIAGNOSTICS_COMMANDS = [
    "diagnose",
    "report",
    "numerics",
    "gradients",
    "memory",
    "profile",
    "compare-routing",
]


def without_diagnostics_deps(*argv: str) -> subprocess.CompletedProcess[str]:
    """`moe-devkit ARGV` where numpy, rich and matplotlib cannot be imported (the core
    install: a None entry in sys.modules makes an import fail and find_spec return None)."""
    code = (
        "import sys\n"
        "for name in ('numpy', 'rich', 'matplotlib'):\n"
        "    sys.modules[name] = None\n"
        "from moe_devkit.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize("command", DIAGNOSTICS_COMMANDS)
@pytest.mark.parametrize("flag", [[], ["--help"], ["--steps", "3"]])
def test_diagnostics_command_without_its_extra_is_one_line(command: str, flag: list[str]) -> None:
    done = without_diagnostics_deps(command, *flag)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        f"moe-devkit {command}: error: this command needs numpy, rich and matplotlib, "
        "not installed here: `pip install 'moe-devkit[torch]'`\n"
    )


def test_help_and_check_debug_work_without_the_diagnostics_deps(tmp_path: Path) -> None:
    done = without_diagnostics_deps("--help")
    assert done.returncode == 0 and "check-debug" in done.stdout and done.stderr == ""
    (tmp_path / "a.py").write_text("breakpoint()\n")
    done = without_diagnostics_deps("check-debug", str(tmp_path / "a.py"))
    assert (done.returncode, done.stderr) == (1, "")
    assert done.stdout == f"{tmp_path / 'a.py'}:1:1: DBG003 `breakpoint()` left in code\n"


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True)
    return done.stdout


def committed(path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    git(path, "init", "-q")
    git(path, "add", ".")
    git(path, "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "init")
    return path


def pre_commit(cwd: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pre_commit", *args],
        cwd=cwd,
        env=dict(os.environ, PRE_COMMIT_HOME=str(home), PRE_COMMIT_COLOR="never"),
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.slow
def test_hook_installs_with_libcst_alone(tmp_path: Path) -> None:
    """`pre-commit try-repo` runs the hook from a clone; an environment that pre-commit keeps
    (a config naming the clone) holds the core dependencies only."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    for name in ("pyproject.toml", "README.md", ".pre-commit-hooks.yaml"):
        shutil.copy2(ROOT / name, hooks / name)
    shutil.copytree(
        ROOT / "moe_devkit", hooks / "moe_devkit", ignore=shutil.ignore_patterns("__pycache__")
    )
    committed(hooks, {})
    rev = git(hooks, "rev-parse", "HEAD").strip()
    config = f"repos:\n- repo: {hooks}\n  rev: {rev}\n  hooks:\n  - id: check-debug\n"
    project = committed(
        tmp_path / "project", {"pkg/model.py": LEFTOVER, ".pre-commit-config.yaml": config}
    )
    finding = "pkg/model.py:5:5: DBG002 debugger call `pdb.set_trace()`"
    tried = pre_commit(project, tmp_path / "try", "try-repo", str(hooks), "check-debug", "-a")
    assert tried.returncode == 1 and finding in tried.stdout, tried.stdout + tried.stderr
    home = tmp_path / "home"
    ran = pre_commit(project, home, "run", "--all-files")
    assert ran.returncode == 1 and finding in ran.stdout, ran.stdout + ran.stderr
    (site,) = home.glob("repo*/py_env-*/lib/python*/site-packages")
    installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert {"libcst", "moe_devkit"} <= installed
    assert installed & {"numpy", "matplotlib", "rich", "pillow", "torch", "jax"} == set()
