"""`--fix` without libcst (textfix.py) writes what the libcst fixer writes, or declines.

Each source is fixed twice, once as check-debug does it and once with the whole-line fixer
turned off (libcst does every edit); the results must be equal, byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_check_debug_fix import CASES, UNSAFE_CASES, modules

from moe_devkit.lint import FileResult, check_file, textfix
from moe_devkit.lint.textfix import remove_whole_lines

# Shapes the whole-line fixer takes: a check that it does not decline them all.
TAKEN = [
    "import pdb\npdb.set_trace()\nx = 1\n",
    "def f():\n    breakpoint()\n",
    "def f():\r\n    # why\r\n    breakpoint()\r\n    return 1\r\n",
    "x = 1\nif y:\r\n    breakpoint()\r\n",
    "if y:\r\n    breakpoint()\r\n",
    "breakpoint(\n    # why\n)\nx = 1\n",
    "x = 1\nbreakpoint(); breakpoint()  # both\n",
    "x = 1\nbreakpoint();\n",
    "import os, pdb, sys\npdb.set_trace()\nos, sys\n",
    "import os , pdb\npdb.set_trace()\nos\n",
    "import pdb as p, os\np.set_trace()\nos\n",
    "import os, pdb;  # c\npdb.set_trace()\nos\n",
    "from ipdb import set_trace as st, launch_ipdb_on_exception\nst()\nlaunch_ipdb_on_exception\n",
    "import q\n@ q\ndef f(): pass\n",
    "import q\n@q.t(\n  1)  # traced\ndef f(): pass\n",
    "import q\nclass C:\n    @q\n    async def f(self): pass\n",
    "x = 'é'\nbreakpoint()\n",
    "def f():\n    x = 'é'\n    breakpoint(); breakpoint()  # é\n",
    "class C:\n    def f(self):\n        breakpoint()\n    # c\n",
    "try:\n    breakpoint()\nexcept E:\n    breakpoint()\nelse:\n    breakpoint()\n"
    "finally:\n    breakpoint()\n",
    "match x:\n    case 1:\n        breakpoint()\n",
    "for i in r:\n    pass\nelse:\n    breakpoint()\n",
    "while x:\n    breakpoint()\n    # note\n\n# top\nx = 1\n",
    "if x:\n    breakpoint()\n    breakpoint()\n",
    "def f():\n    # a\n    breakpoint()\n    # b\n    breakpoint()\n    # c\n",
    "def f():\n    breakpoint()\n        # deeper\n  # shallower\n# none\n",
    "if a:\n    pass\nelif b:\n    breakpoint()\nelse:\n    breakpoint()\n",
    "with x:\n    (breakpoint())\n",
    "async def f():\n    async with x:\n        breakpoint()\n"
    "    async for i in x:\n        breakpoint()\n",
    "def f():\n    '''doc'''\n    breakpoint()\n",
    "if x:\n\n    breakpoint()\n\n\n\ny = 2\n",
    "breakpoint()\n",
    "# only a comment stays\nbreakpoint()\n",
    "import os\nos.environ['CUDA_LAUNCH_BLOCKING'] = '1'\nrun()\n",
]
# Shapes left to libcst, which writes them (or leaves them) its own way.
DECLINED = [
    "if x: breakpoint()\n",
    "x = 1; breakpoint(); y = 2\n",
    "def f():\n\tbreakpoint()\n",
    "x = 1; \\\n  breakpoint()\n",
    "from ipdb import (set_trace, launch_ipdb_on_exception)\nset_trace()\n"
    "launch_ipdb_on_exception\n",
    "from ipdb import (\n    set_trace,\n    launch_ipdb_on_exception,\n)\nset_trace()\n"
    "launch_ipdb_on_exception\n",
    "import q\n@(q)\ndef f(): pass\n",
    "\fbreakpoint()\n",
    "x = 1\nbreakpoint()",
    "def f():\n    breakpoint()  \\\n\n    x = 1\n",
    "class C: breakpoint()\n",
    "breakpoint()\rx = 1\r",
]


def both(tmp_path: Path, source: str, unsafe: bool) -> tuple[FileResult, FileResult]:
    """Fix `source` as check-debug does, then with libcst alone; same path, same settings."""
    path = tmp_path / "mod.py"
    path.write_bytes(source.encode())
    fast = check_file(str(path), fix=True, unsafe_fixes=unsafe)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(textfix, "remove_whole_lines", lambda *args: None)
        path.write_bytes(source.encode())
        slow = check_file(str(path), fix=True, unsafe_fixes=unsafe)
    return fast, slow


@pytest.mark.parametrize("unsafe", [False, True])
@pytest.mark.parametrize(
    "source", TAKEN + DECLINED + [before for before, _ in CASES + UNSAFE_CASES]
)
def test_same_result_as_libcst(tmp_path: Path, source: str, unsafe: bool) -> None:
    fast, slow = both(tmp_path, source, unsafe)
    assert fast == slow


Asked = tuple[dict[tuple[int, int], tuple[str, ...]], set[tuple[int, int]]]


def asked_edits(tmp_path: Path, source: str) -> Asked:
    """The edits that check-debug asks the whole-line fixer for (its first call)."""
    asked: list[Asked] = []

    def record(text: str, removals: object, decorators: object) -> None:
        asked.append((dict(removals), set(decorators)))  # type: ignore[call-overload]

    path = tmp_path / "mod.py"
    path.write_bytes(source.encode())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(textfix, "remove_whole_lines", record)
        check_file(str(path), fix=True, unsafe_fixes=True)
    return asked[0]


@pytest.mark.parametrize("source", TAKEN)
def test_common_shapes_need_no_libcst(tmp_path: Path, source: str) -> None:
    removals, decorators = asked_edits(tmp_path, source)
    assert remove_whole_lines(source, removals, decorators) is not None


@pytest.mark.parametrize("source", DECLINED)
def test_other_shapes_are_left_to_libcst(tmp_path: Path, source: str) -> None:
    removals, decorators = asked_edits(tmp_path, source)
    assert remove_whole_lines(source, removals, decorators) is None


LINES = [
    "x = 1",
    "breakpoint()",
    "pdb.set_trace()",
    "breakpoint(); breakpoint()",
    "x = 2; breakpoint()",
    "# note",
    "",
    "breakpoint(  # why\n)",
    "s = 'é'",
    "print(x)",
    "import os, pdb",
    "from pdb import set_trace as st, Pdb",
    "st()",
    "Pdb",
]


@st.composite
def fixable_modules(draw: st.DrawFn) -> str:
    """Modules of statements, blocks, comments and decorators in the shapes `--fix` meets."""
    lines = ["import pdb, q"]
    for _ in range(draw(st.integers(1, 8))):
        body = draw(st.lists(st.sampled_from(LINES), min_size=1, max_size=4))
        header = draw(
            st.sampled_from(["", "def f():", "if x:", "class C:", "@q\ndef g():", "else:"])
        )
        if header == "else:":
            header = "if y:\n    pass\nelse:"
        if header:
            body = [line.replace("\n", "\n    ") for line in body]
            lines.append(header)
            lines.extend(f"    {line}" if line else "" for line in body)
            lines.append(f"    {draw(st.sampled_from(['', 'breakpoint()', 'y = 0']))}")
        else:
            lines.extend(body)
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return newline.join(lines) + newline


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.one_of(fixable_modules(), modules()), st.booleans())
def test_same_result_as_libcst_generated(tmp_path: Path, source: str, unsafe: bool) -> None:
    try:
        compile(source, "mod.py", "exec")
    except SyntaxError:
        return  # an empty block drawn: nothing to fix
    fast, slow = both(tmp_path, source, unsafe)
    assert fast == slow
