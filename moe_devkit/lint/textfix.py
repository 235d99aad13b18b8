"""`--fix` without libcst: delete the flagged statements that stand on lines of their own.

Most fixes delete whole lines: `breakpoint()` alone on its line, an `import pdb`, a decorator
line. Found by the positions `ast` reports, such a deletion gives the very text that the libcst
fixer (fixer.py) writes, without importing libcst (which takes longer to import than the rest
of check-debug takes to run). A block left empty gets `pass`; `import os, pdb` loses `pdb`.
Any other shape is declined and left to fixer.py: a statement after `if x:` on its line, a kept
statement beside a removed one after `;`, a parenthesized import losing names, indentation by
tabs or form feeds, a lone `\r` line end, a file whose last line has no newline.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Set

Position = tuple[int, int]  # 1-based line, 0-based character column
NEWLINE = re.compile(r"\r\n?|\n")
# After a deleted statement, the rest of its last line: an optional `;`, an optional comment.
LINE_REST = re.compile(r"[ \t\f]*(?:;[ \t\f]*)?(?:#[^\r\n]*)?(?:\r\n?|\n)")
DECORATOR_REST = re.compile(r"[ \t\f]*(?:#[^\r\n]*)?(?:\r\n?|\n)")
BLANK = " \t\f"
# What libcst calls small statements: the ones its fixer deletes (never a compound one).
SMALL_STATEMENTS: tuple[type[ast.stmt], ...] = (
    ast.Expr,
    ast.Assign,
    ast.AugAssign,
    ast.AnnAssign,
    ast.Return,
    ast.Raise,
    ast.Import,
    ast.ImportFrom,
    ast.Pass,
    ast.Break,
    ast.Continue,
    ast.Delete,
    ast.Global,
    ast.Nonlocal,
    ast.Assert,
    *((ast.TypeAlias,) if hasattr(ast, "TypeAlias") else ()),
)


class _Declined(Exception):
    """The edit has a shape that only the libcst fixer writes exactly."""


class _Edits:
    """Replacements of whole physical lines (0-based, inclusive), checked not to overlap."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.spans: dict[int, tuple[int, str]] = {}

    def replace(self, first: int, last: int, text: str) -> None:
        if first in self.spans:
            raise _Declined
        self.spans[first] = (last, text)

    def apply(self) -> str:
        out: list[str] = []
        index = 0
        for first in sorted(self.spans):
            last, text = self.spans[first]
            if first < index:
                raise _Declined
            out.extend(self.lines[index:first])
            out.append(text)
            index = last + 1
        out.extend(self.lines[index:])
        return "".join(out)


def remove_whole_lines(
    text: str, removals: Mapping[Position, tuple[str, ...]], decorators: Set[Position]
) -> tuple[str, set[Position]] | None:
    """Delete statements and decorators as fixer.apply_removals does, or return None.

    Args:
        text: the file's text.
        removals: statement positions, each with the import names to drop (`()`: all).
        decorators: positions of the decorator expressions to delete.

    Returns:
        The new text and the positions removed (all of them), or None when some edit is not
        a whole-line deletion, a block's `pass` or a one-line import losing names.
    """
    if not text.endswith("\n") or "\r" in text.replace("\r\n", ""):
        return None  # libcst drops a last `\r`, and keeps a last line's missing newline missing
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    lines = _physical_lines(text)
    edits = _Edits(lines)
    done: set[Position] = set()
    try:
        for node in ast.walk(tree):
            for body in _bodies(node):
                done |= _remove_statements(body, node, removals, lines, edits, text)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                done |= _remove_decorators(node, decorators, lines, edits)
        if done != set(removals) | set(decorators):
            return None
        # libcst writes an empty module as one newline.
        return edits.apply() or _first_newline(text), done
    except _Declined:
        return None


def _physical_lines(text: str) -> list[str]:
    """Split as Python counts lines (`\\n`, `\\r\\n`, `\\r`), keeping the line ends."""
    lines: list[str] = []
    start = 0
    for match in NEWLINE.finditer(text):
        lines.append(text[start : match.end()])
        start = match.end()
    if start < len(text):
        lines.append(text[start:])
    return lines


def _bodies(node: ast.AST) -> list[list[ast.stmt]]:
    found = []
    for name in ("body", "orelse", "finalbody"):
        value = getattr(node, name, None)
        if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
            found.append(value)
    return found


def _char_col(line: str, byte_col: int) -> int:
    if line.isascii():
        return byte_col
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", "ignore"))


def _start(node: ast.stmt | ast.expr | ast.alias, lines: list[str]) -> Position:
    return node.lineno, _char_col(lines[node.lineno - 1], node.col_offset)


def _end(node: ast.stmt | ast.expr | ast.alias, lines: list[str]) -> Position:
    line = node.end_lineno or node.lineno
    return line, _char_col(lines[line - 1], node.end_col_offset or 0)


def _groups(body: list[ast.stmt]) -> list[list[ast.stmt]]:
    """The body's logical lines: statements joined by `;` on one physical line."""
    groups: list[list[ast.stmt]] = []
    for statement in body:
        if groups and statement.lineno == groups[-1][-1].end_lineno:
            groups[-1].append(statement)
        else:
            groups.append([statement])
    return groups


def _alias_text(alias: ast.alias) -> str:
    return alias.name if alias.asname is None else f"{alias.name} as {alias.asname}"


def _kept_aliases(statement: ast.stmt, names: tuple[str, ...]) -> list[ast.alias] | None:
    """Return the aliases an import keeps (None: the whole statement goes)."""
    if not isinstance(statement, SMALL_STATEMENTS):  # a compound statement: libcst keeps it
        raise _Declined
    if not names:
        return None
    if not isinstance(statement, (ast.Import, ast.ImportFrom)):
        raise _Declined
    if any(alias.name == "*" for alias in statement.names):
        raise _Declined
    kept = [alias for alias in statement.names if _alias_text(alias) not in names]
    return kept or None


def _remove_statements(
    body: list[ast.stmt],
    owner: ast.AST,
    removals: Mapping[Position, tuple[str, ...]],
    lines: list[str],
    edits: _Edits,
    text: str,
) -> set[Position]:
    done: set[Position] = set()
    groups = _groups(body)
    deleted: list[tuple[int, int]] = []
    for group in groups:
        targets = [s for s in group if _start(s, lines) in removals]
        if not targets:
            continue
        kept_names = [_kept_aliases(s, removals[_start(s, lines)]) for s in targets]
        done |= {_start(s, lines) for s in targets}
        if len(group) == 1 and kept_names[0] is not None:
            edits.replace(*_import_without(group[0], kept_names[0], lines))
        elif len(targets) == len(group) and all(names is None for names in kept_names):
            deleted.append(_group_lines(group, lines))
        else:
            raise _Declined
    for first, last in deleted:
        edits.replace(first, last, "")
    if deleted and len(deleted) == len(groups) and not isinstance(owner, ast.Module):
        first, last = deleted[-1]
        edits.spans[first] = (last, _pass_line(lines[first], text))
    return done


def _group_lines(group: list[ast.stmt], lines: list[str]) -> tuple[int, int]:
    """Return the 0-based lines that the statements of a logical line fill alone."""
    first_line, first_col = _start(group[0], lines)
    if lines[first_line - 1][:first_col].strip(" \t"):
        raise _Declined  # after `if x:` on its line, or after a form feed (libcst's columns)
    if first_line > 1 and lines[first_line - 2].rstrip("\r\n").endswith("\\"):
        raise _Declined  # a continuation line
    last_line, last_col = _end(group[-1], lines)
    if not LINE_REST.fullmatch(lines[last_line - 1], last_col):
        raise _Declined
    return first_line - 1, last_line - 1


def _pass_line(line: str, text: str) -> str:
    """`pass` for a block left empty, as libcst writes it: indented as the deleted line, and
    ended by the file's first kind of newline."""
    indent = line[: len(line) - len(line.lstrip(BLANK))]
    if indent.strip(" "):  # tabs or form feeds: libcst's indentation may differ
        raise _Declined
    return f"{indent}pass{_first_newline(text)}"


def _first_newline(text: str) -> str:
    """The newline libcst writes in new lines: the file's first one."""
    match = NEWLINE.search(text)
    return match.group(0) if match else "\n"


def _import_without(
    statement: ast.stmt, kept: list[ast.alias], lines: list[str]
) -> tuple[int, int, str]:
    """`import os, pdb` -> `import os`: the line's edit. Each kept name keeps the separator
    after it but the last one, as libcst writes an unparenthesized import."""
    if not isinstance(statement, (ast.Import, ast.ImportFrom)):
        raise _Declined
    line_no, start = _start(statement, lines)
    _, end = _end(statement, lines)
    line = lines[line_no - 1]
    if statement.end_lineno != line_no or "(" in line[start:end]:
        raise _Declined  # `from m import (a,\n b)` keeps its commas in libcst
    aliases = statement.names
    parts = [line[start : _start(aliases[0], lines)[1]]]
    for alias in kept:
        parts.append(line[_start(alias, lines)[1] : _end(alias, lines)[1]])
        if alias is not kept[-1]:
            following = aliases[aliases.index(alias) + 1]
            parts.append(line[_end(alias, lines)[1] : _start(following, lines)[1]])
    return line_no - 1, line_no - 1, line[:start] + "".join(parts) + line[end:]


def _remove_decorators(
    node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef,
    decorators: Set[Position],
    lines: list[str],
    edits: _Edits,
) -> set[Position]:
    done: set[Position] = set()
    for decorator in node.decorator_list:
        line_no, col = _start(decorator, lines)
        if (line_no, col) not in decorators:
            continue
        before = lines[line_no - 1][:col].rstrip(" \t")
        if not before.endswith("@") or before[:-1].strip(" \t"):
            raise _Declined  # `@(name)` or a decorator sharing its line
        last_line, last_col = _end(decorator, lines)
        if not DECORATOR_REST.fullmatch(lines[last_line - 1], last_col):
            raise _Declined
        edits.replace(line_no - 1, last_line - 1, "")
        done.add((line_no, col))
    return done
