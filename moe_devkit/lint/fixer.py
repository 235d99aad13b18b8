"""`--fix`: delete flagged statements with libcst, keeping every other byte of the file.

Statements are found by the position `ast` reported (line, character column). A deleted line's
leading comments and blank lines move to the next statement (or the block's footer); a block
left empty gets `pass`; an import loses only the names that were flagged and are unused. A
decorator is found by the position of its expression and deleted alone, its function kept.
"""

from __future__ import annotations

from collections.abc import Sequence, Set

import libcst as cst
from libcst.helpers import get_full_name_for_node
from libcst.metadata import MetadataWrapper, PositionProvider

Removals = dict[tuple[int, int], tuple[str, ...]]


def _alias_text(alias: cst.ImportAlias) -> str:
    name = get_full_name_for_node(alias.name) or ""
    if alias.asname is not None and isinstance(alias.asname.name, cst.Name):
        return f"{name} as {alias.asname.name.value}"
    return name


def _drop_aliases(
    node: cst.BaseSmallStatement, names: tuple[str, ...]
) -> cst.BaseSmallStatement | None:
    if not isinstance(node, (cst.Import, cst.ImportFrom)) or isinstance(node.names, cst.ImportStar):
        return node
    kept = [alias for alias in node.names if _alias_text(alias) not in names]
    if not kept:
        return None
    if isinstance(node, cst.Import) or node.lpar is None:
        kept[-1] = kept[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
    return node.with_changes(names=kept)


class _Remover(cst.CSTTransformer):
    METADATA_DEPENDENCIES = (PositionProvider,)

    def __init__(self, removals: Removals, decorators: Set[tuple[int, int]]) -> None:
        super().__init__()
        self.removals = removals
        self.decorators = decorators
        self.applied: set[tuple[int, int]] = set()
        # Keyed by id; the values keep the nodes alive so that no id is reused.
        self.emptied: dict[int, cst.SimpleStatementLine] = {}

    def _filter(
        self, original: Sequence[cst.BaseSmallStatement], updated: Sequence[cst.BaseSmallStatement]
    ) -> list[cst.BaseSmallStatement]:
        body: list[cst.BaseSmallStatement] = []
        for before, after in zip(original, updated, strict=True):
            start = self.get_metadata(PositionProvider, before).start
            key = (start.line, start.column)
            if key not in self.removals:
                body.append(after)
                continue
            self.applied.add(key)
            names = self.removals[key]
            remaining = _drop_aliases(after, names) if names else None
            if remaining is not None:
                body.append(remaining)
        if body and len(body) != len(updated):
            body[-1] = body[-1].with_changes(semicolon=updated[-1].semicolon)
        return body

    def leave_SimpleStatementLine(
        self, original_node: cst.SimpleStatementLine, updated_node: cst.SimpleStatementLine
    ) -> cst.SimpleStatementLine:
        body = self._filter(original_node.body, updated_node.body)
        if len(body) == len(updated_node.body) and body == list(updated_node.body):
            return updated_node
        if body:
            return updated_node.with_changes(body=body)
        # libcst drops an emptied line together with its comments; a marked `pass` keeps the
        # line until its block moves the comments on (see _compact).
        result = updated_node.with_changes(body=[cst.Pass()])
        self.emptied[id(result)] = result
        return result

    def leave_SimpleStatementSuite(
        self, original_node: cst.SimpleStatementSuite, updated_node: cst.SimpleStatementSuite
    ) -> cst.SimpleStatementSuite:
        body = self._filter(original_node.body, updated_node.body)
        if len(body) == len(updated_node.body) and body == list(updated_node.body):
            return updated_node
        return updated_node.with_changes(body=body or [cst.Pass()])

    def _compact(
        self, statements: Sequence[cst.BaseStatement]
    ) -> tuple[list[cst.BaseStatement], list[cst.EmptyLine]]:
        kept: list[cst.BaseStatement] = []
        carried: list[cst.EmptyLine] = []
        for statement in statements:
            if id(statement) in self.emptied and isinstance(statement, cst.SimpleStatementLine):
                carried.extend(statement.leading_lines)
                continue
            if carried:
                leading = [*carried, *getattr(statement, "leading_lines", ())]
                statement = statement.with_changes(leading_lines=leading)
                carried = []
            kept.append(statement)
        return kept, carried

    def leave_IndentedBlock(
        self, original_node: cst.IndentedBlock, updated_node: cst.IndentedBlock
    ) -> cst.IndentedBlock:
        if not any(id(s) in self.emptied for s in updated_node.body):
            return updated_node
        kept, carried = self._compact(updated_node.body)
        if not kept:
            kept = [cst.SimpleStatementLine([cst.Pass()], leading_lines=carried)]
            carried = []
        return updated_node.with_changes(body=kept, footer=[*carried, *updated_node.footer])

    def _undecorated(
        self, original: Sequence[cst.Decorator], updated: Sequence[cst.Decorator]
    ) -> tuple[list[cst.Decorator], list[cst.EmptyLine]] | None:
        """Return the decorators kept and the comments of deleted ones, or None if none is."""
        kept: list[cst.Decorator] = []
        carried: list[cst.EmptyLine] = []  # a deleted decorator's comments stay in the file
        for source, decorator in zip(original, updated, strict=True):
            start = self.get_metadata(PositionProvider, source.decorator).start
            if (start.line, start.column) in self.decorators:
                self.applied.add((start.line, start.column))
                carried.extend(decorator.leading_lines)
                continue
            kept.append(decorator.with_changes(leading_lines=[*carried, *decorator.leading_lines]))
            carried = []
        return None if len(kept) == len(updated) else (kept, carried)

    def leave_FunctionDef(
        self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef
    ) -> cst.FunctionDef:
        found = self._undecorated(original_node.decorators, updated_node.decorators)
        if found is None:
            return updated_node
        lines = [*found[1], *updated_node.lines_after_decorators]
        return updated_node.with_changes(decorators=found[0], lines_after_decorators=lines)

    def leave_ClassDef(
        self, original_node: cst.ClassDef, updated_node: cst.ClassDef
    ) -> cst.ClassDef:
        found = self._undecorated(original_node.decorators, updated_node.decorators)
        if found is None:
            return updated_node
        lines = [*found[1], *updated_node.lines_after_decorators]
        return updated_node.with_changes(decorators=found[0], lines_after_decorators=lines)

    def leave_Module(self, original_node: cst.Module, updated_node: cst.Module) -> cst.Module:
        if not any(id(s) in self.emptied for s in updated_node.body):
            return updated_node
        kept, carried = self._compact(updated_node.body)
        return updated_node.with_changes(body=kept, footer=[*carried, *updated_node.footer])


def apply_removals(
    text: str, removals: Removals, decorators: Set[tuple[int, int]] = frozenset()
) -> tuple[str, set[tuple[int, int]]]:
    """Delete the statements at `removals` and the decorators whose expressions start at
    `decorators` (line, column; for a statement, import names to drop or `()` for all).

    Returns:
        The new text (the original when libcst cannot parse it) and the positions removed.
    """
    try:
        module = cst.parse_module(text)
    except (cst.ParserSyntaxError, RecursionError, ValueError):
        return text, set()
    remover = _Remover(removals, decorators)
    new_module = MetadataWrapper(module, unsafe_skip_copy=True).visit(remover)
    return new_module.code, remover.applied
