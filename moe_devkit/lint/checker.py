"""Check one file: decode, pre-filter, parse, apply the rules, honour `# noqa`, fix if asked."""

from __future__ import annotations

import io
import os
import re
import tokenize
from dataclasses import dataclass, replace

from moe_devkit.lint.config import Settings
from moe_devkit.lint.rules import NOQA_ALIASES, RULES_BY_CODE, TRIGGER_WORDS
from moe_devkit.lint.source import Decoded, SourceError, decode, encode, parse

# The analysis is imported by the first file that passes the pre-filter: a commit of clean
# files never loads it, and the hook starts faster.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from moe_devkit.lint.analysis import Candidate, DebuggerAlias, Removal

NOQA = re.compile(
    r"#\s*noqa(?::[\s]?(?P<codes>[A-Z]+[0-9]+(?:[,\s]+[A-Z]+[0-9]+)*))?", re.IGNORECASE
)


@dataclass(frozen=True, order=True)
class Finding:
    """One reported problem; `str()` gives the output line `path:line:col: CODE message`."""

    path: str
    line: int
    col: int
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}: {self.code} {self.message}"


@dataclass(frozen=True)
class FileResult:
    """The findings left in a file, how many `--fix` removed, and the fixed bytes if any.

    `withheld`: findings left in place because only `--unsafe-fixes` removes them.
    `skipped`: why the file was not checked at all (over `max-file-size`), else None.
    """

    findings: tuple[Finding, ...]
    fixed: int = 0
    new_data: bytes | None = None
    withheld: int = 0
    skipped: str | None = None


# `print(`, `print (`, and print under another name (`p = print`, `import print as p`). Each
# pattern starts with a literal, so `re` jumps from one occurrence of it to the next.
PRINT_USE = re.compile(
    r"print(?:(?<!\wprint)\s*\(|\b(?:\s+as\b|(?<==print)|(?<== print)|(?<=builtins\.print)))"
)
# `import os, q` (TRIGGER_WORDS has `import q`).
Q_IMPORT = re.compile(r"import(?<!\wimport)[ \t]+(?:[\w.]+(?:[ \t]+as[ \t]+\w+)?[ \t]*,[ \t]*)+q\b")


def may_contain_finding(text: str) -> bool:
    """Return whether the text holds a word that every finding needs (a cheap pre-filter)."""
    if any(word in text for word in TRIGGER_WORDS):
        return True
    return PRINT_USE.search(text) is not None or Q_IMPORT.search(text) is not None


def _char_col(lines: list[str], line: int, byte_col: int) -> int:
    """Convert `ast`'s UTF-8 byte offset into a character offset."""
    if line > len(lines) or lines[line - 1].isascii():
        return byte_col
    return len(lines[line - 1].encode("utf-8")[:byte_col].decode("utf-8", "ignore"))


def _comment_lines(text: str) -> dict[int, str] | None:
    comments: dict[int, str] = {}
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.COMMENT:
                comments[token.start[0]] = token.string
    except (tokenize.TokenError, SyntaxError):
        return None
    return comments


class _Noqa:
    """Answer whether a code is suppressed on a line, reading comments only when needed."""

    def __init__(self, text: str, lines: list[str]) -> None:
        self.text = text
        self.lines = lines
        self.comments: dict[int, str] | None = None
        self.tokenized = False

    def suppressed(self, line: int, code: str) -> bool:
        if line > len(self.lines) or "noqa" not in self.lines[line - 1].lower():
            return False
        if not self.tokenized:
            self.comments, self.tokenized = _comment_lines(self.text), True
        comment = self.lines[line - 1] if self.comments is None else self.comments.get(line, "")
        match = NOQA.search(comment)
        if match is None:
            return False
        if not match.group("codes"):
            return True
        codes = {c.upper() for c in re.split(r"[,\s]+", match.group("codes")) if c}
        return code in codes or any(code in NOQA_ALIASES.get(c, ()) for c in codes)


def check_source(
    text: str, path: str = "<string>", settings: Settings | None = None
) -> list[Finding]:
    """Return the findings in Python source text, sorted.

    Args:
        text: the source, already decoded.
        path: the name to report (and to match against per-path settings).
        settings: what to check; the defaults if None.
    """
    decoded = Decoded(text.removeprefix("\ufeff"), "utf-8", False)
    return list(_check_decoded(decoded, path, settings or Settings(), fix=False).findings)


def check_file(
    path: str, settings: Settings | None = None, fix: bool = False, unsafe_fixes: bool = False
) -> FileResult:
    """Check (and with `fix`, repair in memory) one file; never raises for a bad file.

    Args:
        path: the file to read.
        settings: what to check; the defaults if None.
        fix: compute the file without the findings that can be removed safely.
        unsafe_fixes: with `fix`, also remove prints (DBG101, DBG102), changing the output.
    """
    settings = settings or Settings()
    data = _read(path, settings.max_file_size)
    if isinstance(data, FileResult):
        return data
    try:
        decoded = decode(data)
    except SourceError as err:
        return FileResult((Finding(path, err.line, err.col, err.code, err.message),))
    return _check_decoded(decoded, path, settings, fix, unsafe_fixes)


def _read(path: str, limit: int) -> bytes | FileResult:
    """Return the file's bytes, or the result for a file that is unreadable or over `limit`."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if 0 < limit < size:
                return FileResult((), skipped=f"{size} bytes, over max-file-size = {limit} bytes")
            return handle.read()
    except OSError as err:
        return FileResult((Finding(path, 1, 1, "DBG902", f"cannot read file: {err.strerror}"),))


def _check_decoded(
    decoded: Decoded, path: str, settings: Settings, fix: bool, unsafe_fixes: bool = False
) -> FileResult:
    text = decoded.text
    if not may_contain_finding(text) and not settings.all_syntax:
        return FileResult(())
    try:
        tree = parse(text, path)
    except SourceError as err:
        return FileResult((Finding(path, err.line, err.col, err.code, err.message),))
    from moe_devkit.lint.analysis import Analysis, Policy

    relpath = settings.relative(path)
    enabled = settings.enabled_codes(relpath)
    policy = Policy(
        settings.print_allowed(relpath), settings.allow_print_to_file, settings.allow_main_block
    )
    lines = text.splitlines()
    noqa = _Noqa(text, lines)
    analysis = Analysis(tree, policy)
    kept = [c for c in analysis.run() if c.code in enabled and not noqa.suppressed(c.line, c.code)]
    if fix:
        return _fix(decoded, path, kept, analysis.debugger_aliases(), lines, unsafe_fixes)
    return FileResult(tuple(sorted(_finding(path, c, lines) for c in kept)))


def _finding(path: str, candidate: Candidate, lines: list[str]) -> Finding:
    col = _char_col(lines, candidate.line, candidate.col) + 1
    return Finding(path, candidate.line, col, candidate.code, candidate.message)


def _fix(
    decoded: Decoded,
    path: str,
    kept: list[Candidate],
    aliases: list[DebuggerAlias],
    lines: list[str],
    unsafe_fixes: bool,
) -> FileResult:
    withheld = 0 if unsafe_fixes else sum(_unsafe(c) for c in kept)
    if withheld:
        kept = [replace(c, removal=None) if _unsafe(c) else c for c in kept]
    statements = {(c.removal.line, c.removal.col) for c in kept if c.removal is not None}
    planned, cleanup = _plan(kept, aliases, statements)
    new_text, applied = _apply(decoded.text, planned, cleanup, lines)
    if not statements | {(a.line, a.col) for a in cleanup} <= applied:
        # A statement libcst did not find stays, and so must the aliases and imports it reads.
        found = [a for a in aliases if (a.line, a.col) in applied]
        planned, cleanup = _plan(kept, found, statements & applied)
        new_text, applied = _apply(decoded.text, planned, cleanup, lines)
    left = [
        c for c in planned if c.removal is None or (c.removal.line, c.removal.col) not in applied
    ]
    findings = tuple(sorted(_finding(path, c, lines) for c in left))
    if new_text == decoded.text:
        return FileResult(findings, withheld=withheld)
    return FileResult(findings, len(kept) - len(left), encode(new_text, decoded), withheld)


def _unsafe(candidate: Candidate) -> bool:
    """Return whether removing the candidate's statement needs `--unsafe-fixes`."""
    return candidate.removal is not None and RULES_BY_CODE[candidate.code].unsafe_fix


def _plan(
    kept: list[Candidate], aliases: list[DebuggerAlias], statements: set[tuple[int, int]]
) -> tuple[list[Candidate], list[Removal]]:
    """Return the findings with the removals they get, and the debugger aliases that go too."""
    from moe_devkit.lint.analysis import plan_import_removals, removed_aliases

    cleanup = removed_aliases(aliases, statements)
    gone = statements | {(alias.line, alias.col) for alias in cleanup}
    return plan_import_removals(kept, gone), cleanup


def _apply(
    text: str, planned: list[Candidate], cleanup: list[Removal], lines: list[str]
) -> tuple[str, set[tuple[int, int]]]:
    """Delete the planned removals; return the new text and the `ast` positions removed."""
    removals = [c.removal for c in planned if c.removal is not None] + cleanup
    positions = {(r.line, _char_col(lines, r.line, r.col)): r for r in removals}
    if not positions:
        return text, set()
    from moe_devkit.lint.textfix import remove_whole_lines  # only to fix

    statements = {at: r.names for at, r in positions.items() if not r.decorator}
    decorators = {at for at, r in positions.items() if r.decorator}
    done = remove_whole_lines(text, statements, decorators)
    if done is None:  # a shape only libcst edits exactly: libcst is imported only then
        from moe_devkit.lint.fixer import apply_removals

        done = apply_removals(text, statements, decorators)
    new_text, applied = done
    return new_text, {(positions[at].line, positions[at].col) for at in applied}
