"""`--fix`: inline before/after cases, byte preservation, and property tests."""

from __future__ import annotations

import ast
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_devkit.lint import Settings, check_file, check_source, main

ROOT = Path(__file__).resolve().parents[2]


def fix(
    source: str | bytes,
    tmp_path: Path,
    name: str = "mod.py",
    unsafe: bool = False,
    settings: Settings | None = None,
) -> bytes:
    path = tmp_path / name
    path.write_bytes(source.encode() if isinstance(source, str) else source)
    result = check_file(str(path), settings, fix=True, unsafe_fixes=unsafe)
    return result.new_data if result.new_data is not None else path.read_bytes()


CASES = [
    ("import pdb\npdb.set_trace()\nx = 1\n", "x = 1\n"),
    ("import os, pdb\npdb.set_trace()\nos.getcwd()\n", "import os\nos.getcwd()\n"),
    (
        "from ipdb import set_trace as st, launch_ipdb_on_exception\n"
        "st()\nlaunch_ipdb_on_exception\n",
        "from ipdb import launch_ipdb_on_exception\nlaunch_ipdb_on_exception\n",
    ),
    ("import pdb\nclass P(pdb.Pdb):\n    pass\n", "import pdb\nclass P(pdb.Pdb):\n    pass\n"),
    ("def f():\n    breakpoint()\n", "def f():\n    pass\n"),
    # Removing a print changes the program's output: --fix keeps it (see UNSAFE_CASES).
    ("if x:\n    print(1)\nelse:\n    y = 2\n", "if x:\n    print(1)\nelse:\n    y = 2\n"),
    ("from pprint import pprint\npprint(x)\n", "from pprint import pprint\npprint(x)\n"),
    ("if x: breakpoint()\n", "if x: pass\n"),
    ("x = 1; breakpoint(); y = 2\n", "x = 1; y = 2\n"),
    ("x = 1; breakpoint()\n", "x = 1\n"),
    (
        "def f():\n    # why we stop here\n    breakpoint()\n    return 1\n",
        "def f():\n    # why we stop here\n    return 1\n",
    ),
    (
        "def f():\n    x = 1\n    # trailing note\n    breakpoint()\ny = 2\n",
        "def f():\n    x = 1\n    # trailing note\ny = 2\n",
    ),
    (
        "import os\nos.environ['CUDA_LAUNCH_BLOCKING'] = '1'\nimport torch\n"
        "torch.autograd.set_detect_anomaly(True)\nrun()\n",
        "import os\nimport torch\nrun()\n",
    ),
    (
        "try:\n    import ipdb\nexcept ImportError:\n    import pdb\n",
        "try:\n    pass\nexcept ImportError:\n    pass\n",
    ),
    ("x = f(breakpoint())\n", "x = f(breakpoint())\n"),  # inside an expression: reported only
    ("with jax.disable_jit():\n    f()\n", "with jax.disable_jit():\n    f()\n"),
    ("breakpoint()  # noqa\n", "breakpoint()  # noqa\n"),
    # An import stays while a call that --fix keeps (suppressed, unfixable) still reads it.
    (
        "import pdb\n\ndef f():\n    pdb.set_trace()  # noqa: DBG002\n",
        "import pdb\n\ndef f():\n    pdb.set_trace()  # noqa: DBG002\n",
    ),
    ("import pdb\npdb.set_trace()  # noqa: T100\n", "import pdb\npdb.set_trace()  # noqa: T100\n"),
    (
        "import pdb; pdb.set_trace()  # noqa: DBG002\n",
        "import pdb; pdb.set_trace()  # noqa: DBG002\n",
    ),
    (
        "import os, pdb\npdb.set_trace()  # noqa\nos.getcwd()\n",
        "import os, pdb\npdb.set_trace()  # noqa\nos.getcwd()\n",
    ),
    (
        "import pdb, ipdb\npdb.set_trace()  # noqa: DBG002\nipdb.set_trace()\n",
        "import pdb\npdb.set_trace()  # noqa: DBG002\n",
    ),
    ("import pdb\nx = pdb.set_trace()\n", "import pdb\nx = pdb.set_trace()\n"),
    # ptvsd, and the breakpoint names imported from builtins and sys
    ("import ptvsd\nptvsd.enable_attach()\nptvsd.wait_for_attach()\nrun()\n", "run()\n"),
    ("from ptvsd import break_into_debugger\nbreak_into_debugger()\nrun()\n", "run()\n"),
    ("from builtins import breakpoint\nbreakpoint()\nrun()\n", "run()\n"),
    (
        "import sys\nfrom sys import argv, breakpointhook\nbreakpointhook()\n"
        "sys.__breakpointhook__()\nrun(argv)\n",
        "import sys\nfrom sys import argv\nrun(argv)\n",
    ),
    # An alias of a debugger goes with the last call that reads it, and then its import.
    ("import ipdb\nt = ipdb.set_trace\nt()\nx = 1\n", "x = 1\n"),
    (
        "import pdb\n\ndef f():\n    bp = pdb.set_trace\n    again = bp\n    again()\n"
        "    return 1\n",
        "\ndef f():\n    return 1\n",
    ),
    ("bp = breakpoint\nif x:\n    bp()\n", "if x:\n    pass\n"),
    (
        "import ipdb\nt = ipdb.set_trace\nt()\nt()  # noqa: DBG002\n",
        "import ipdb\nt = ipdb.set_trace\nt()  # noqa: DBG002\n",
    ),
    (
        "import ipdb\nt = ipdb.set_trace\nt()\nhooks = [t]\n",
        "import ipdb\nt = ipdb.set_trace\nhooks = [t]\n",
    ),
    # not a debug statement: the hook saved and restored, an alias nothing calls
    (
        "import sys\nsaved = sys.breakpointhook\nsys.breakpointhook = hook\n"
        "sys.breakpointhook = saved\n",
        "import sys\nsaved = sys.breakpointhook\nsys.breakpointhook = hook\n"
        "sys.breakpointhook = saved\n",
    ),
    ("t = logger.set_trace\nt()\n", "t = logger.set_trace\nt()\n"),
    # q as a decorator: the decorator goes, the function stays
    ("import q\n\n@q\ndef f():\n    return 1\n", "\ndef f():\n    return 1\n"),
    (
        "import functools, q\n\n# traced while debugging\n@q.t\n@functools.cache\n"
        "def f():\n    return 1\n",
        "import functools\n\n# traced while debugging\n@functools.cache\ndef f():\n    return 1\n",
    ),
    (
        "import functools, q\n\n@functools.cache\n# why\n@q\n# note\ndef f():\n    return 1\n",
        "import functools\n\n@functools.cache\n# why\n# note\ndef f():\n    return 1\n",
    ),
    (
        "import q\n\nclass C:\n    @q\n    def f(self):\n        return 1\n",
        "\nclass C:\n    def f(self):\n        return 1\n",
    ),
    ("import q\n\n@q\nclass C:\n    pass\n", "\nclass C:\n    pass\n"),
    (
        "import ipdb\n\n@ipdb.launch_ipdb_on_exception()\ndef f():\n    return 1\n",
        "\ndef f():\n    return 1\n",
    ),
    (
        "import q\n\n@q  # noqa\ndef f():\n    pass\n",
        "import q\n\n@q  # noqa\ndef f():\n    pass\n",
    ),
    # A pdb.Pdb subclass is code, not a leftover: --fix leaves it, only the real call goes.
    (
        "import pdb\n\n\nclass ForkedPdb(pdb.Pdb):\n"
        "    def interaction(self, *args, **kwargs):\n"
        "        pdb.Pdb.interaction(self, *args, **kwargs)\n\n"
        "    def set_trace(self, frame=None):\n"
        "        super().set_trace(frame)\n\n\n"
        "def f():\n    pdb.set_trace()\n    ForkedPdb().set_trace()\n",
        "import pdb\n\n\nclass ForkedPdb(pdb.Pdb):\n"
        "    def interaction(self, *args, **kwargs):\n"
        "        pdb.Pdb.interaction(self, *args, **kwargs)\n\n"
        "    def set_trace(self, frame=None):\n"
        "        super().set_trace(frame)\n\n\n"
        "def f():\n    ForkedPdb().set_trace()\n",
    ),
]

UNSAFE_CASES = [
    ("if x:\n    print(1)\nelse:\n    y = 2\n", "if x:\n    pass\nelse:\n    y = 2\n"),
    (
        "from pprint import pprint\npprint(x)\nprint(1)  # noqa\n",
        "from pprint import pprint\nprint(1)  # noqa\n",
    ),
    ("import pdb\npdb.set_trace()\nprint(1)\nx = 1\n", "x = 1\n"),
]


@pytest.mark.parametrize(("before", "after"), CASES)
def test_fix(tmp_path: Path, before: str, after: str) -> None:
    assert fix(before, tmp_path).decode() == after


@pytest.mark.parametrize(("before", "after"), UNSAFE_CASES)
def test_unsafe_fix(tmp_path: Path, before: str, after: str) -> None:
    assert fix(before, tmp_path, unsafe=True).decode() == after


def test_fix_counts_findings_not_aliases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "a.py"
    path.write_text("import ipdb\nt = ipdb.set_trace\nt()\nx = 1\n")
    assert main(["--fix", str(path)]) == 1
    assert capsys.readouterr() == ("", f"Fixed 2 finding(s) in {path}\n")
    assert path.read_text() == "x = 1\n"


def test_fix_keeps_an_import_whose_call_is_not_checked(tmp_path: Path) -> None:
    before = "import pdb\npdb.set_trace()\n"
    ignored = Settings(ignore=("DBG002",))
    assert fix(before, tmp_path, settings=ignored).decode() == before
    selected = Settings(select=("DBG001",))
    assert fix(before, tmp_path, settings=selected).decode() == before


def test_fix_keeps_an_import_whose_call_libcst_cannot_place(tmp_path: Path) -> None:
    """Before 3.12, a type-parameter line is rewritten for `ast` and its columns move."""
    before = "import pdb\nclass C[T]: pdb.set_trace()\n"
    after = before if sys.version_info < (3, 12) else "class C[T]: pass\n"
    assert fix(before, tmp_path).decode() == after


def test_fix_keeps_crlf_bom_and_encoding(tmp_path: Path) -> None:
    before = b"\xef\xbb\xbfimport os\r\nbreakpoint()\r\nx = 1\r\n"
    assert fix(before, tmp_path) == b"\xef\xbb\xbfimport os\r\nx = 1\r\n"
    latin = b"# -*- coding: latin-1 -*-\nx = '\xe9'\nbreakpoint()\n"
    assert fix(latin, tmp_path) == b"# -*- coding: latin-1 -*-\nx = '\xe9'\n"


def test_fix_never_touches_an_unparsable_file(tmp_path: Path) -> None:
    assert fix("breakpoint()\ndef f(:\n", tmp_path) == b"breakpoint()\ndef f(:\n"


def test_fix_exit_codes_and_second_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a.py"
    path.write_text("import pdb\npdb.set_trace()\nx = f(breakpoint())\n")
    assert main(["--fix", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == f"{path}:3:7: DBG003 `breakpoint()` left in code\n"
    assert err == f"Fixed 2 finding(s) in {path}\n"
    assert path.read_text() == "x = f(breakpoint())\n"
    path.write_text("x = 1\n")
    assert main(["--fix", str(path)]) == 0


def test_fix_keeps_prints_unless_unsafe_fixes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "a.py"
    path.write_text("def f(x):\n    breakpoint()\n    print(x)\n    return x\n")
    assert main(["--fix", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == f"{path}:3:5: DBG101 `print()` in library code\n"
    assert err == (
        f"Fixed 1 finding(s) in {path}\n"
        "check-debug: 1 print(s) kept: removing one changes the program's output; "
        "add --unsafe-fixes to remove them\n"
    )
    assert path.read_text() == "def f(x):\n    print(x)\n    return x\n"
    assert main(["--fix", "--unsafe-fixes", str(path)]) == 1
    assert capsys.readouterr() == ("", f"Fixed 1 finding(s) in {path}\n")
    assert path.read_text() == "def f(x):\n    return x\n"


def test_unsafe_fixes_needs_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a.py"
    path.write_text("print(1)\n")
    assert main(["--unsafe-fixes", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines()[-1] == (
        "check-debug: error: --unsafe-fixes only applies with --fix; pass both"
    )
    assert path.read_text() == "print(1)\n"


STATEMENTS = [
    "x = 1",
    "y = f(x)",
    "pdb.set_trace()",
    "breakpoint()",
    "print(x)",
    "print(x, file=fh)",
    "ipdb.set_trace()",
    "torch.autograd.set_detect_anomaly(True)",
    "os.environ['CUDA_LAUNCH_BLOCKING'] = '1'",
    "# a comment",
    "",
    "z = g(breakpoint())",
]
FLAGGED_STATEMENTS = {STATEMENTS[i] for i in (2, 3, 4, 6, 7, 8)}


@st.composite
def modules(draw: st.DrawFn) -> str:
    lines = ["import os", "import pdb", "import ipdb", "import torch"]
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.integers(0, 3))
        body = [draw(st.sampled_from(STATEMENTS)) for _ in range(draw(st.integers(1, 3)))]
        body.append("w = 0")  # a block always holds a statement
        if kind == 0:
            lines.extend(body)
        elif kind == 1:
            lines.append(draw(st.sampled_from(["def f():", "if x:", "for i in r:", "class C:"])))
            lines.extend(f"    {line}" if line else "" for line in body)
        elif kind == 2:
            lines.append(
                "; ".join(line for line in body if line and not line.startswith("#")) or "x = 1"
            )
        else:
            lines.append(
                "if x: " + (body[0] if body[0] and not body[0].startswith("#") else "y = 1")
            )
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return newline.join(lines) + newline


def kept_lines(source: str) -> list[str]:
    return [
        line.strip()
        for line in source.splitlines()
        if line.strip() and line.strip() not in FLAGGED_STATEMENTS and line.strip() != "pass"
    ]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(modules())
def test_fix_property_generated(tmp_path: Path, source: str) -> None:
    fixed = fix(source.encode(), tmp_path, unsafe=True).decode()
    ast.parse(fixed)  # the result parses
    assert (
        kept_lines(fixed)
        == [
            line
            for line in kept_lines(source)
            if line not in {"import pdb", "import ipdb"}
            and not set(line.split("; ")) <= FLAGGED_STATEMENTS
        ]
        or ";" in source
        or "if x: " in source
    )
    assert fix(fixed.encode(), tmp_path, unsafe=True).decode() == fixed  # a second run: no-op
    remaining = {f.code for f in check_source(fixed, "mod.py")}
    assert remaining <= {"DBG003", "DBG001"}  # only what cannot be removed safely


def codes(source: str) -> Counter[str]:
    return Counter(f.code for f in check_source(source, "mod.py"))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(modules())
def test_safe_fix_keeps_every_print_generated(tmp_path: Path, source: str) -> None:
    fixed = fix(source.encode(), tmp_path).decode()
    ast.parse(fixed)
    assert codes(fixed)["DBG101"] == codes(source)["DBG101"]
    assert set(codes(fixed)) <= {"DBG003", "DBG001", "DBG101"}
    assert fix(fixed.encode(), tmp_path).decode() == fixed


KEPT_CALLS = [
    "pdb.set_trace()",
    "pdb.set_trace()  # noqa: DBG002",
    "pdb.set_trace()  # noqa: T100",
    "x = pdb.set_trace()",
    "ipdb.set_trace()",
    "ipdb.set_trace()  # noqa",
    "q(x)  # noqa: DBG002",
    "y = 1",
]


@st.composite
def debugger_modules(draw: st.DrawFn) -> str:
    imports = draw(st.sampled_from(["import pdb, ipdb, q", "import pdb\nimport ipdb\nimport q"]))
    body = draw(st.lists(st.sampled_from(KEPT_CALLS), min_size=1, max_size=6))
    if draw(st.booleans()):  # one line, where a trailing comment covers every statement
        code = "; ".join(line.split("  #")[0] for line in body)
        comment = draw(st.sampled_from(["", "  # noqa: DBG002", "  # noqa"]))
        return f"{imports.replace(chr(10), '; ')}; {code}{comment}\n"
    return imports + "\ndef f():\n" + "".join(f"    {line}\n" for line in body)


def read_but_not_imported(source: str) -> set[str]:
    tree = ast.parse(source)
    imported = {
        (alias.asname or alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    read = {
        node.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
    }
    return (read & {"pdb", "ipdb", "q"}) - imported


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(debugger_modules())
def test_fix_never_drops_an_import_that_kept_code_reads(tmp_path: Path, source: str) -> None:
    fixed = fix(source.encode(), tmp_path).decode()
    assert read_but_not_imported(fixed) == set()
    assert fix(fixed.encode(), tmp_path).decode() == fixed


ALIAS_LINES = [
    "t = ipdb.set_trace",
    "u = t",
    "t()",
    "u()",
    "t()  # noqa: DBG002",
    "u()  # noqa",
    "x = t",
    "y = 1",
]


@st.composite
def alias_modules(draw: st.DrawFn) -> str:
    body = draw(st.lists(st.sampled_from(ALIAS_LINES), min_size=1, max_size=6))
    lines = ["t = ipdb.set_trace", *body] if draw(st.booleans()) else body
    return "import ipdb\ndef f():\n" + "".join(f"    {line}\n" for line in lines)


def unbound_reads(source: str) -> set[str]:
    """Return the names the code reads but neither assigns nor imports."""
    nodes = list(ast.walk(ast.parse(source)))
    names = [node for node in nodes if isinstance(node, ast.Name)]
    bound = {name.id for name in names if isinstance(name.ctx, ast.Store)}
    bound |= {alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names}
    return {name.id for name in names if isinstance(name.ctx, ast.Load)} - bound


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(alias_modules())
def test_fix_never_drops_an_alias_that_kept_code_reads(tmp_path: Path, source: str) -> None:
    fixed = fix(source.encode(), tmp_path).decode()
    assert unbound_reads(fixed) <= unbound_reads(source)
    assert fix(fixed.encode(), tmp_path).decode() == fixed


PROJECT_FILES = sorted(
    str(p)
    for p in ROOT.glob("**/*.py")
    if not any(part in {".venv", ".nox", "fixtures", ".git"} for part in p.parts)
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.sampled_from(PROJECT_FILES), st.integers(0, 10_000))
def test_fix_property_project_files(tmp_path: Path, path: str, seed: int) -> None:
    """Insert a breakpoint() after a random top-level statement; --fix restores the file."""
    source = Path(path).read_text(encoding="utf-8")
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    ends = [node.end_lineno for node in tree.body if node.end_lineno is not None]
    at = ends[seed % len(ends)] if ends else 0
    injected = "".join(lines[:at]) + "breakpoint()\n" + "".join(lines[at:])
    if not source.endswith("\n") and at == len(lines):
        return
    before = {(f.code, f.message) for f in check_source(source, os.path.relpath(path, ROOT))}
    fixed = fix(injected, tmp_path, "case.py").decode()
    ast.parse(fixed)
    if not before:
        assert fixed == source
    assert fix(fixed, tmp_path, "case.py").decode() == fixed
