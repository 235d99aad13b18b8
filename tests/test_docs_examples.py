"""The documented examples work: README.md's and docs/*.md's Python blocks run, their command
lines name commands and options that exist.

Python blocks. Every ```python block of README.md and docs/*.md runs, the blocks of one page
in order in one namespace (a page reads as one session), in a subprocess in a scratch
directory. Two HTML comments, invisible on the rendered page, right before a block's fence:

* ``<!-- no-test: REASON -->``: the block is not run (it needs a GPU, a network, a process
  group, IPython, ...); the reason is required and the markers are counted per page
  (``NOT_RUN``), so a new one is a visible change;
* ``<!-- test-setup: WHAT`` ... ``-->``: the lines in between run first, in the page's
  namespace (a small model and data standing in for the reader's).

Command lines. Every ``moe-devkit ...``, ``python -m moe_devkit...``, ``python benchmarks/...``
and ``torchrun ... benchmarks/...`` command in those pages (shell blocks, and inline code spans) is
handed to the program's own argument parser, not run: the program starts until it calls
``ArgumentParser.parse_args``, which is stopped there, and its parser then parses the
documented arguments. A command with placeholders (``[--repeat N]``, ``cpu|cuda``) checks
only that each ``--option`` it names exists.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]

# Blocks marked <!-- no-test: ... --> per page; change it together with the markers.
NOT_RUN = {
    "README.md": 3,
    "docs/integrations.md": 2,
    "docs/notebook.md": 6,
}
# What a page's blocks import beyond torch.
NEEDS = {"docs/jax.md": ("jax",)}
TIMEOUT_S = 240

FENCE = re.compile(r"^\s*```")
NO_TEST = re.compile(r"^<!--\s*no-test:\s*(?P<reason>.*?)\s*-->$")
SETUP_START = re.compile(r"^<!--\s*test-setup:")


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    code: str
    setup: str | None
    not_run: str | None  # the no-test reason

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: str) -> list[Block]:
    """The page's ```python blocks with their markers."""
    lines = (ROOT / page).read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        if not FENCE.match(lines[i]):
            i += 1
            continue
        language = lines[i].strip()[3:].strip()
        end = i + 1
        while end < len(lines) and not FENCE.match(lines[end]):
            end += 1
        if language == "python":
            setup, not_run = _marker(lines, i)
            code = "\n".join(lines[i + 1 : end]) + "\n"
            found.append(Block(page, i + 1, code, setup, not_run))
        i = end + 1
    return found


def _marker(lines: list[str], fence: int) -> tuple[str | None, str | None]:
    """(setup code, no-test reason) from the comment ending on the line before the fence."""
    j = fence - 1
    if j < 0:
        return None, None
    last = lines[j].strip()
    match = NO_TEST.match(last)
    if match:
        assert match["reason"], f"{lines[j]!r}: a no-test marker needs its reason"
        return None, match["reason"]
    if last != "-->":
        return None, None
    start = j - 1
    while start >= 0 and not SETUP_START.match(lines[start].strip()):
        assert "-->" not in lines[start], f"line {start + 1}: a comment ends before the block"
        start -= 1
    if start < 0:
        return None, None
    return "\n".join(lines[start + 1 : j]) + "\n", None


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]
RUN_PAGES = sorted({b.page for b in ALL_BLOCKS if b.not_run is None})

# Runs the blocks of the JSON file argv[1] in one namespace; a traceback names page and line.
RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
with open(sys.argv[1]) as f:
    blocks = json.load(f)
for block in blocks:
    if block["setup"] is not None:
        exec(compile(block["setup"], block["name"] + " (test-setup)", "exec"), namespace)
    exec(compile(block["code"], block["name"], "exec"), namespace)
    print("ran", block["name"], flush=True)
"""


def test_markers_are_counted() -> None:
    counted: dict[str, int] = {}
    for block in ALL_BLOCKS:
        if block.not_run is not None:
            counted[block.page] = counted.get(block.page, 0) + 1
    assert counted == NOT_RUN
    assert len(ALL_BLOCKS) - sum(counted.values()) >= 10  # most blocks do run


@pytest.mark.parametrize("page", RUN_PAGES)
def test_python_blocks_run(page: str, started: dict[str, Started]) -> None:
    pytest.importorskip("torch")
    for module in NEEDS.get(page, ()):
        pytest.importorskip(module)
    returncode, stdout, stderr = started[page].result()
    assert returncode == 0, stdout + stderr
    ran = [line for line in stdout.splitlines() if line.startswith("ran ")]
    assert ran == [f"ran {b.name}" for b in ALL_BLOCKS if b.page == page and b.not_run is None]


# ----------------------------------------------------------------------------- command lines

PROGRAM = re.compile(
    r"^(moe-devkit(\s|$)|python3? -m moe_devkit|(python3?|torchrun) (-m \S+ )?.*benchmarks/)"
)
PLACEHOLDER = re.compile(r"[\[\]|<>]|\.\.\.")


def _segments(text: str) -> list[str]:
    """Shell commands of a page: lines of its shell blocks, and its inline code spans."""
    found: list[str] = []
    prose: list[str] = []
    in_block, language = False, ""
    for line in text.splitlines():
        if FENCE.match(line):
            in_block, language = not in_block, line.strip()[3:].strip()
            prose.append("")
            continue
        if not in_block:
            prose.append(line)
        elif language in ("bash", "sh", "console", "shell"):
            found += line.split("&&")
    found += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", "\n".join(prose))]
    return [s.strip() for s in found if PROGRAM.match(s.strip())]


def commands() -> list[tuple[str, str]]:
    """(page, command) for every documented command line."""
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for page in PAGES:
        for segment in _segments((ROOT / page).read_text()):
            if segment not in seen:
                seen.add(segment)
                out.append((page, segment))
    return out


def _invocation(command: str) -> dict[str, object]:
    """What to start (a module or a script), its argv, and whether it has placeholders."""
    words = command.split(" #")[0].split()
    placeholders = bool(PLACEHOLDER.search(" ".join(words)))
    if words[0] == "moe-devkit":
        target, kind, args = "moe_devkit", "module", words[1:]
    elif words[1] == "-m" and words[2].startswith("moe_devkit"):
        target, kind, args = words[2], "module", words[3:]
    else:  # python benchmarks/x.py ..., python -m torch.distributed.run ... benchmarks/x.py
        index = next(i for i, w in enumerate(words) if w.startswith("benchmarks/"))
        target, kind, args = words[index], "script", words[index + 1 :]
    if not placeholders:
        args = shlex.split(" ".join(args), comments=True)
    return {
        "command": command,
        "kind": kind,
        "target": target,
        "args": args,
        "placeholders": placeholders,
        "options": re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(args)),
        "route": _leading_words(args),  # the leading plain words name a subcommand
    }


def _leading_words(args: list[str]) -> list[str]:
    route: list[str] = []
    for word in args:
        if word.startswith("-") or PLACEHOLDER.search(word):
            break
        route.append(word)
    return route


# Starts each program until its parse_args, then parses the documented arguments with it.
CHECKER = r"""
import argparse, contextlib, io, json, os, runpy, sys

class Parsed(BaseException):
    def __init__(self, parser, args):
        self.parser, self.args = parser, args

parse_args = argparse.ArgumentParser.parse_args
def stop(self, args=None, namespace=None):
    raise Parsed(self, sys.argv[1:] if args is None else list(args))
argparse.ArgumentParser.parse_args = stop

def subparser(parser, words):
    for word in words:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            break
        parser = actions[0].choices[word]
    return parser

problems, unavailable = [], []
with open(sys.argv[1]) as f:
    items = json.load(f)
for item in items:
    command, placeholders = item["command"], item["placeholders"]
    argv = item["route"] if placeholders else item["args"]
    sys.argv = [item["target"], *argv]
    path = list(sys.path)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if item["kind"] == "module":
                runpy.run_module(item["target"], run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, os.path.dirname(os.path.abspath(item["target"])))
                runpy.run_path(item["target"], run_name="__main__")
    except Parsed as parsed:
        parser, args = parsed.parser, parsed.args
    except BaseException as exc:
        if "No module named" in str(exc):  # needs what this machine lacks (Triton, ...)
            unavailable.append(f"{command}: {exc}")
        else:
            problems.append(f"{command}: stopped before parsing its arguments: {exc!r}")
        continue
    else:
        problems.append(f"{command}: never called ArgumentParser.parse_args")
        continue
    finally:
        sys.path[:] = path
    if placeholders:
        known = subparser(parser, args)._option_string_actions
        unknown = [o for o in item["options"] if o not in known]
        if unknown:
            problems.append(f"{command}: no such option(s) {unknown}")
        continue
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse_args(parser, args)
    except SystemExit as exc:
        if exc.code not in (0, None):
            problems.append(f"{command}: {err.getvalue().strip()}")
print(json.dumps({"problems": problems, "unavailable": unavailable}))
"""


def test_command_lines_parse(started: dict[str, Started]) -> None:
    pytest.importorskip("torch")
    found = commands()
    assert any(c.startswith("moe-devkit diagnose") for _, c in found)
    assert any(c.startswith("python benchmarks/") for _, c in found)
    for _, command in found:
        item = _invocation(command)
        if item["kind"] == "script":
            assert (ROOT / str(item["target"])).is_file(), f"{command}: no such script"
    returncode, stdout, stderr = started[COMMANDS].result()
    assert returncode == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["problems"] == [], "\n".join(result["problems"])
    for line in result["unavailable"]:
        print("not checked here:", line)


def test_check_debug_paths_exist() -> None:
    for _, command in commands():
        words = command.split(" #")[0].split()
        if "check-debug" in words and not PLACEHOLDER.search(" ".join(words)):
            for word in words[words.index("check-debug") + 1 :]:
                if not word.startswith("-"):
                    assert (ROOT / word).exists(), f"{command}: {word} does not exist"


# ----------------------------------------------------------------------------- processes

COMMANDS = "command lines"


class Started:
    """A subprocess started with the others (they run side by side), output in files."""

    def __init__(self, directory: Path, script: str, payload: object, cwd: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "payload.json").write_text(json.dumps(payload))
        self.out, self.err = directory / "stdout", directory / "stderr"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", script, str(directory / "payload.json")],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=cwd,
                env={**os.environ, "MPLBACKEND": "Agg", "JAX_PLATFORMS": "cpu"},
            )

    def result(self) -> tuple[int, str, str]:
        try:
            returncode = self.proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"still running after {TIMEOUT_S} s: {self.err.read_text()[-2000:]}")
        return returncode, self.out.read_text(), self.err.read_text()


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Started]]:
    """Every page's blocks and the command-line check, started at once."""
    have = {name for name in ("torch", "jax") if importlib.util.find_spec(name) is not None}
    processes: dict[str, Started] = {}
    if "torch" in have:
        for page in RUN_PAGES:
            if set(NEEDS.get(page, ())) <= have:
                payload = [
                    {"name": b.name, "setup": b.setup, "code": b.code}
                    for b in ALL_BLOCKS
                    if b.page == page and b.not_run is None
                ]
                work = tmp_path_factory.mktemp(page.replace("/", "-"))
                processes[page] = Started(work / ".run", RUNNER, payload, work)
        payload = [_invocation(command) for _, command in commands()]
        work = tmp_path_factory.mktemp("commands")
        processes[COMMANDS] = Started(work, CHECKER, payload, ROOT)
    yield processes
    for process in processes.values():
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()
