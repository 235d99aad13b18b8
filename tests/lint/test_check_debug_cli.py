"""The command line: exact output, exit codes, edge files, configuration, usage errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_devkit.lint import main

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "scripts" / "check_debug.py")


def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = main(list(args))
    finally:
        os.chdir(cwd)
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


def test_clean_file_exits_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, "a.py", "x = 1\n")
    assert run(tmp_path, capsys, "a.py") == (0, "", "")


def test_output_is_sorted_one_line_per_finding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "b.py", "print(1)\nbreakpoint()\n")
    write(tmp_path, "a.py", "import pdb\n\npdb.set_trace()\n")
    code, out, _ = run(tmp_path, capsys, "b.py", "a.py")
    assert code == 1
    assert out == (
        "a.py:1:1: DBG001 import of debugger `pdb`\n"
        "a.py:3:1: DBG002 debugger call `pdb.set_trace()`\n"
        "b.py:1:1: DBG101 `print()` in library code\n"
        "b.py:2:1: DBG003 `breakpoint()` left in code\n"
    )


EDGE_FILES: list[tuple[str, bytes, str]] = [
    (
        "binary.py",
        b"\x89PNG\r\n\x1a\n\x00\x00",
        "binary.py:3:1: DBG901 binary file (contains a NUL byte), not checked\n",
    ),
    (
        "latin.py",
        b"x = '\xe9'\n",
        "latin.py:1:6: DBG901 not valid utf-8 (byte 0xe9), not checked\n",
    ),
    (
        "unknown.py",
        b"# -*- coding: klingon -*-\nx = 1\n",
        "unknown.py:1:1: DBG901 cannot decode: unknown encoding: klingon\n",
    ),
    (
        "syntax.py",
        b"def f(:\n    breakpoint()\n",
        "syntax.py:1:7: DBG900 syntax error: invalid syntax\n",
    ),
    (
        "cookie.py",
        b"# -*- coding: latin-1 -*-\nx = '\xe9'; breakpoint()\n",
        "cookie.py:2:10: DBG003 `breakpoint()` left in code\n",
    ),
    ("bom.py", b"\xef\xbb\xbfbreakpoint()\n", "bom.py:1:1: DBG003 `breakpoint()` left in code\n"),
    (
        "crlf.py",
        b"import os\r\n\r\nbreakpoint()\r\n",
        "crlf.py:3:1: DBG003 `breakpoint()` left in code\n",
    ),
    ("empty.py", b"", ""),
]


@pytest.mark.parametrize(("name", "data", "expected"), EDGE_FILES)
def test_edge_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, data: bytes, expected: str
) -> None:
    write(tmp_path, name, data)
    write(tmp_path, "z.py", "breakpoint()\n")  # still checked after a bad file
    code, out, err = run(tmp_path, capsys, name, "z.py")
    assert out == expected + "z.py:1:1: DBG003 `breakpoint()` left in code\n"
    assert code == 1
    assert "Traceback" not in err


def test_unreadable_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "missing.py").symlink_to(tmp_path / "nowhere.py")
    code, out, _ = run(tmp_path, capsys, "pkg")
    assert (code, out) == (
        1,
        "pkg/missing.py:1:1: DBG902 cannot read file: No such file or directory\n",
    )


def test_missing_path_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, "a.py", "breakpoint()\n")
    code, out, err = run(tmp_path, capsys, "missing.py", "a.py", "src/")
    assert (code, out) == (2, "a.py:1:1: DBG003 `breakpoint()` left in code\n")
    assert err == (
        "check-debug: error: argument PATH: no such file or directory: 'missing.py'\n"
        "check-debug: error: argument PATH: no such file or directory: 'src/'\n"
    )


@pytest.mark.vscode_smoke
def test_hook_with_a_missing_path_exits_2(tmp_path: Path) -> None:
    """The README's example, run in a project that has no src/ directory."""
    write(tmp_path, "a.py", "x = 1\n")
    result = hook(tmp_path, "src/")
    assert (result.returncode, result.stdout, result.stderr) == (
        2,
        "",
        "check-debug: error: argument PATH: no such file or directory: 'src/'\n",
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--max-file-size", "x"], "argument --max-file-size: expected a whole number of bytes"),
        (["--jobs", "many"], "argument --jobs/-j: invalid int value"),
    ],
)
def test_bad_options_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = hook(tmp_path, *args)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("check-debug: error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def hook(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )


def test_no_paths_checks_the_files_git_would_commit(tmp_path: Path) -> None:
    leftover = "breakpoint()\n"
    for name in ("tracked.py", "pkg/staged.pyi", "untracked.py", "ignored.py", "deleted.py"):
        write(tmp_path, name, leftover)
    write(tmp_path, "notes.txt", leftover)
    write(tmp_path, ".gitignore", "ignored.py\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "tracked.py", "pkg/staged.pyi", "deleted.py", "notes.txt")
    (tmp_path / "deleted.py").unlink()
    result = hook(tmp_path)
    assert (result.returncode, result.stderr) == (1, "")
    assert result.stdout == (
        "pkg/staged.pyi:1:1: DBG003 `breakpoint()` left in code\n"
        "tracked.py:1:1: DBG003 `breakpoint()` left in code\n"
        "untracked.py:1:1: DBG003 `breakpoint()` left in code\n"
    )
    result = hook(tmp_path / "pkg")  # in a subdirectory: the files under it
    assert result.stdout == "staged.pyi:1:1: DBG003 `breakpoint()` left in code\n"


def test_no_paths_outside_a_repository_is_a_usage_error(tmp_path: Path) -> None:
    write(tmp_path, "a.py", "breakpoint()\n")
    result = hook(tmp_path, GIT_CEILING_DIRECTORIES=str(tmp_path.parent))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(
        f"check-debug: error: no paths given, and git cannot list the files of {tmp_path} (fatal:"
    )
    assert result.stderr.endswith("); pass the files or directories to check\n")
    assert result.stderr.count("\n") == 1


def test_directory_is_walked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, "pkg/a.py", "breakpoint()\n")
    write(tmp_path, "pkg/.venv/b.py", "breakpoint()\n")
    write(tmp_path, "pkg/c.txt", "breakpoint()\n")
    code, out, _ = run(tmp_path, capsys, "pkg")
    assert (code, out) == (1, "pkg/a.py:1:1: DBG003 `breakpoint()` left in code\n")


def test_pyproject_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(
        tmp_path,
        "pyproject.toml",
        '[tool.check-debug]\nignore = ["DBG003"]\nextend-print-allowed-paths = ["tools/*"]\n'
        'per-file-ignores = { "legacy/*" = ["DBG0"] }\nexclude = ["vendored/*"]\n',
    )
    write(tmp_path, "a.py", "breakpoint()\nprint(1)\n")
    write(tmp_path, "tools/t.py", "print(1)\n")
    write(tmp_path, "legacy/l.py", "import pdb\nprint(1)\n")
    write(tmp_path, "vendored/v.py", "import pdb\n")
    code, out, _ = run(tmp_path, capsys, "a.py", "tools/t.py", "legacy/l.py", "vendored/v.py")
    assert code == 1
    assert out == (
        "a.py:2:1: DBG101 `print()` in library code\n"
        "legacy/l.py:2:1: DBG101 `print()` in library code\n"
    )


def test_command_line_select(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, "a.py", "breakpoint()\nprint(1)\n")
    code, out, _ = run(tmp_path, capsys, "--select", "DBG1", "a.py")
    assert (code, out) == (1, "a.py:2:1: DBG101 `print()` in library code\n")
    code, out, _ = run(tmp_path, capsys, "--ignore", "DBG101,DBG003", "a.py")
    assert (code, out) == (0, "")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('[tool.check-debug]\nselect = ["XYZ1"]\n', "unknown code 'XYZ1' in select"),
        ('[tool.check-debug]\ncolour = "red"\n', "unknown key(s) in [tool.check-debug]: colour"),
        (
            '[tool.check-debug]\nallow-main-block = "yes"\n',
            "allow-main-block must be true or false",
        ),
        ("[tool.check-debug\n", "cannot parse"),
        (
            "[tool.check-debug]\nmax-file-size = -1\n",
            "max-file-size must be a whole number of bytes >= 0 (0: no limit); got -1",
        ),
        (
            '[tool.check-debug]\nmax-file-size = "1MB"\n',
            "max-file-size must be a whole number of bytes >= 0 (0: no limit); got '1MB'",
        ),
    ],
)
def test_bad_config_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: str, message: str
) -> None:
    write(tmp_path, "pyproject.toml", config)
    write(tmp_path, "a.py", "x = 1\n")
    code, out, err = run(tmp_path, capsys, "a.py")
    assert (code, out) == (2, "")
    assert err.startswith("check-debug: error: ") and message in err


def test_bad_flag_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(tmp_path, capsys, "--no-such-flag")
    assert (code, err) == (2, "check-debug: error: unrecognized arguments: --no-such-flag\n")


def test_list_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(tmp_path, capsys, "--list-rules")
    assert code == 0 and out.splitlines()[0] == (
        "DBG001 debugger-import: import of a debugger module or entry point"
    )


@pytest.mark.vscode_smoke
def test_parallel_run_matches_serial(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for index in range(40):
        write(
            tmp_path,
            f"m{index:02}.py",
            "x = 1\n" * 2_000 + "y = 2  # " + "z" * 40_000 + "\n" + "breakpoint()\n",
        )
    serial = run(tmp_path, capsys, "--jobs", "1", ".")
    # A fresh process, as the hook runs: in-process, a test run's threads make it serial.
    result = subprocess.run(
        [sys.executable, SCRIPT, "--jobs", "2", "."],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == serial
    assert serial[1].count("\n") == 40


@pytest.mark.vscode_smoke
def test_script_entry_point_does_not_import_torch(tmp_path: Path) -> None:
    write(tmp_path, "a.py", "breakpoint()\n")
    probe = (
        "import runpy, sys; sys.argv = ['check_debug.py', 'a.py']\n"
        f"try:\n    runpy.run_path({SCRIPT!r}, run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 1, result.stderr
    assert result.stdout == "a.py:1:1: DBG003 `breakpoint()` left in code\n"


def generated_module(size: int) -> str:
    """A generated data table (as protobuf or codegen output), with a print to be checked."""
    lines = ["import os", "", "def show(x):", "    print(x)", "", "TABLE = ["]
    row, length = 0, sum(len(line) + 1 for line in lines)
    while length < size:
        lines.append(f"    ({row}, {row * 0.5}, 'name_{row}', os.sep),")
        length += len(lines[-1]) + 1
        row += 1
    return "\n".join([*lines, "]"]) + "\n"


def test_large_file_is_skipped_with_a_note(tmp_path: Path) -> None:
    path = write(tmp_path, "big_pb2.py", generated_module(5_000_000))
    size = path.stat().st_size
    write(tmp_path, "a.py", "breakpoint()\n")
    result = hook(tmp_path, "big_pb2.py", "a.py")
    assert (result.returncode, result.stdout, result.stderr) == (
        1,
        "a.py:1:1: DBG003 `breakpoint()` left in code\n",
        f"check-debug: skipped big_pb2.py: {size} bytes, over max-file-size = 1000000 bytes\n",
    )
    result = hook(tmp_path, "--fix", "big_pb2.py")
    assert (result.returncode, result.stdout) == (0, "")
    assert path.read_text() == generated_module(5_000_000)


def test_large_file_is_never_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import moe_devkit.lint.checker as checker

    def refuse(*args: object) -> None:
        raise AssertionError("a skipped file was decoded or parsed")

    monkeypatch.setattr(checker, "decode", refuse)
    monkeypatch.setattr(checker, "parse", refuse)
    write(tmp_path, "big.py", generated_module(1_000_001))
    code, out, err = run(tmp_path, capsys, "big.py")
    assert (code, out) == (0, "")
    assert err == (
        f"check-debug: skipped big.py: {(tmp_path / 'big.py').stat().st_size} bytes, "
        "over max-file-size = 1000000 bytes\n"
    )


def test_max_file_size_from_the_command_line_and_pyproject(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "big.py", generated_module(1_100_000))
    finding = "big.py:4:5: DBG101 `print()` in library code\n"
    assert run(tmp_path, capsys, "--max-file-size", "2000000", "big.py") == (1, finding, "")
    assert run(tmp_path, capsys, "--max-file-size", "0", "big.py") == (1, finding, "")
    write(tmp_path, "pyproject.toml", "[tool.check-debug]\nmax-file-size = 0\n")
    assert run(tmp_path, capsys, "big.py") == (1, finding, "")
    code, out, err = run(tmp_path, capsys, "--max-file-size", "100", "big.py")
    assert (code, out) == (0, "")
    assert err.startswith("check-debug: skipped big.py: ")
    assert err.endswith(" bytes, over max-file-size = 100 bytes\n")


@pytest.mark.parametrize("value", ["-1", "1MB", "1.5"])
def test_bad_max_file_size_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    code, out, err = run(tmp_path, capsys, "--max-file-size", value, "a.py")
    assert (code, out) == (2, "")
    assert err.splitlines()[-1] == (
        "check-debug: error: argument --max-file-size: "
        f"expected a whole number of bytes >= 0 (0: no limit); got {value!r}"
    )
