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


def test_missing_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(tmp_path, capsys, "missing.py")
    assert (code, out) == (
        1,
        "missing.py:1:1: DBG902 cannot read file: No such file or directory\n",
    )


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
    assert code == 2 and "usage:" in err


def test_list_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(tmp_path, capsys, "--list-rules")
    assert code == 0 and out.splitlines()[0] == (
        "DBG001 debugger-import: import of a debugger module or entry point"
    )


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
