"""Rewrite syntax newer than the running Python (3.12 type parameters, `type` aliases, PEP 701
f-strings) into an equivalent shape `ast` can parse, so the same rules apply.

libcst parses every version's grammar; the rewrite keeps every line where it was, so findings
keep their line numbers (columns can move on a line that held new syntax).
"""

from __future__ import annotations

import libcst as cst


class _Downgrade(cst.CSTTransformer):
    def __init__(self, module: cst.Module) -> None:
        super().__init__()
        self.module = module

    def leave_FunctionDef(
        self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef
    ) -> cst.FunctionDef:
        return updated_node.with_changes(type_parameters=None)

    def leave_ClassDef(
        self, original_node: cst.ClassDef, updated_node: cst.ClassDef
    ) -> cst.ClassDef:
        return updated_node.with_changes(type_parameters=None)

    def leave_TypeAlias(
        self, original_node: cst.TypeAlias, updated_node: cst.TypeAlias
    ) -> cst.Assign:
        target = cst.AssignTarget(updated_node.name)
        return cst.Assign(targets=[target], value=updated_node.value)

    def leave_FormattedString(
        self, original_node: cst.FormattedString, updated_node: cst.FormattedString
    ) -> cst.SimpleString:
        # The placeholder has the f-string's length and newlines; its expressions go unchecked.
        code = self.module.code_for_node(original_node)
        quote = '"""' if "\n" in code else '"'
        inner = code[len(quote) : max(len(quote), len(code) - len(quote))]
        body = "".join(ch if ch == "\n" else "x" for ch in inner)
        return cst.SimpleString(f"{quote}{body}{quote}")


def downgrade(text: str) -> str | None:
    """Return `text` rewritten for this interpreter's `ast`, or None when libcst cannot parse it."""
    try:
        module = cst.parse_module(text)
        return module.visit(_Downgrade(module)).code
    except (cst.ParserSyntaxError, RecursionError, ValueError, TypeError):
        return None
