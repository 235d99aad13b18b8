"""A small, flow-insensitive scope analysis over Python's `ast`, enough to resolve call targets.

libcst's ScopeProvider/QualifiedNameProvider answer the same question for every node and cost
about ten times a parse; the checker only needs the qualified names of a few call targets, so it
records every binding once and resolves a name only when a rule asks. Python's rules are kept
where they matter: a name bound anywhere in a function is local to all of it, class bodies do
not enclose their methods, `global`/`nonlocal` redirect a binding, an unbound name is a builtin.
`x = a.b` makes `x` an alias of whatever `a.b` names, resolved when asked; each binding is
resolved once per question, so `node = node.parent` neither loops nor multiplies the work.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

DYNAMIC_IMPORTERS = frozenset({"builtins.__import__", "importlib.import_module"})
MAX_DEPTH = 8
# What each binding (by id) was resolved to while answering one question; an entry that is
# still being resolved reads as empty, which ends a cycle.
_Memo = dict[int, set[str]]


class Scope:
    """The names bound in one function, class, lambda, comprehension or module body."""

    __slots__ = (
        "bases",
        "bindings",
        "globals",
        "kind",
        "nonlocals",
        "parent",
        "self_name",
        "star_imports",
    )

    def __init__(self, kind: str, parent: Scope | None) -> None:
        self.kind = kind
        self.parent = parent
        # A binding is a qualified name (import), None (anything else), or an expression that
        # may name something (`__import__("pdb")`, `pdb.set_trace`), resolved lazily in the
        # scope where it ran.
        self.bindings: dict[str, list[str | tuple[ast.expr, Scope] | None]] = {}
        self.globals: set[str] = set()
        self.nonlocals: set[str] = set()
        self.star_imports: list[str] = []
        # A class body: its base classes, resolved in the enclosing scope.
        self.bases: tuple[ast.expr, ...] = ()
        # A function defined directly in a class body: its first positional parameter.
        self.self_name: str | None = None

    def module(self) -> Scope:
        """Return the module scope at the root of this chain."""
        scope = self
        while scope.parent is not None:
            scope = scope.parent
        return scope

    def target_for(self, name: str) -> Scope:
        """Return the scope that a binding of `name` made here lands in."""
        if name in self.globals:
            return self.module()
        if name in self.nonlocals:
            scope = self.parent
            while scope is not None and scope.kind == "class":
                scope = scope.parent
            while scope is not None and name not in scope.bindings and scope.parent is not None:
                scope = scope.parent
            return scope if scope is not None else self.module()
        return self

    def bind(self, name: str, value: str | tuple[ast.expr, Scope] | None) -> None:
        """Record that `name` is bound to `value` (flow-insensitively)."""
        self.target_for(name).bindings.setdefault(name, []).append(value)


def lookup(name: str, scope: Scope) -> list[str | tuple[ast.expr, Scope] | None] | None:
    """Return the bindings `name` refers to from `scope`, or None when it is a builtin."""
    current: Scope | None = scope
    if name in scope.globals:
        current = scope.module()
    first = True
    while current is not None:
        if (first or current.kind != "class") and name in current.bindings:
            return current.bindings[name]
        first = False
        current = current.parent
    return None


def qualified_names(node: ast.expr, scope: Scope, depth: int = 0) -> set[str]:
    """Return the qualified names an expression (`a.b.c`, `__import__("m").f`) may refer to."""
    return _qualnames(node, scope, depth, {})


def _qualnames(node: ast.expr, scope: Scope, depth: int, memo: _Memo) -> set[str]:
    if isinstance(node, ast.Name):
        return _name_qualnames(node.id, scope, depth, memo)
    if isinstance(node, ast.Attribute):
        return {f"{base}.{node.attr}" for base in _qualnames(node.value, scope, depth, memo)}
    if isinstance(node, ast.Call) and depth < MAX_DEPTH:
        # A call's result is named after the callee (`pdb.Pdb().set_trace` -> pdb.Pdb.set_trace),
        # except that a dynamic import yields the module it imports.
        module = _dynamic_import(node, scope, depth, memo)
        return {module} if module is not None else _qualnames(node.func, scope, depth + 1, memo)
    return set()


def _name_qualnames(name: str, scope: Scope, depth: int, memo: _Memo) -> set[str]:
    bindings = lookup(name, scope)
    if bindings is None:
        names = {f"builtins.{name}"}
        current: Scope | None = scope
        while current is not None:
            names.update(f"{module}.{name}" for module in current.star_imports)
            current = current.parent
        return names
    result: set[str] = set()
    for value in bindings:
        if isinstance(value, str):
            result.add(value)
        elif value is not None and depth < MAX_DEPTH:
            known = memo.get(id(value))
            if known is None:
                memo[id(value)] = set()  # `x = x.next`: `x` inside reads as nothing
                known = memo[id(value)] = _bound_qualnames(value[0], value[1], depth + 1, memo)
            result |= known
    return result


def _bound_qualnames(value: ast.expr, scope: Scope, depth: int, memo: _Memo) -> set[str]:
    """Return what a name bound to `value` names: the module of a dynamic import, an alias."""
    if isinstance(value, ast.Call):
        module = _dynamic_import(value, scope, depth, memo)
        return {module} if module is not None else set()
    return _qualnames(value, scope, depth, memo)


def dynamic_import_target(call: ast.Call, scope: Scope, depth: int = 0) -> str | None:
    """Return the module that `__import__("m")` or `importlib.import_module("m")` yields."""
    return _dynamic_import(call, scope, depth, {})


def _dynamic_import(call: ast.Call, scope: Scope, depth: int, memo: _Memo) -> str | None:
    if not call.args or not isinstance(call.args[0], ast.Constant):
        return None
    module = call.args[0].value
    if not isinstance(module, str) or not module or module.startswith("."):
        return None
    importers = _qualnames(call.func, scope, depth + 1, memo) & DYNAMIC_IMPORTERS
    if not importers:
        return None
    if "builtins.__import__" in importers and len(call.args) < 5 and not call.keywords:
        return module.split(".")[0]  # __import__("a.b") returns the top-level package
    return module


def target_names(target: ast.expr) -> Iterator[ast.Name]:
    """Yield the names an assignment target binds."""
    if isinstance(target, ast.Name):
        yield target
    elif isinstance(target, (ast.Tuple, ast.List)):
        for element in target.elts:
            yield from target_names(element)
    elif isinstance(target, ast.Starred):
        yield from target_names(target.value)
