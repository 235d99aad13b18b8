"""The rules, applied to the facts one `ast` pass collected (see walker.py and scopes.py)."""

from __future__ import annotations

import ast
from dataclasses import dataclass, replace

from moe_devkit.lint import rules as r
from moe_devkit.lint.scopes import Scope, dynamic_import_target, qualified_names
from moe_devkit.lint.walker import CallSite, DecoratorSite, Walker

FALSY_STRINGS = frozenset({"", "0", "false", "no", "off", "default"})
STANDARD_STREAMS = frozenset({"sys.stdout", "sys.stderr", "sys.__stdout__", "sys.__stderr__"})


@dataclass(frozen=True)
class Removal:
    """A statement, some names of an import, or a decorator that `--fix` may delete.

    `line` and `col` locate the statement, or with `decorator` the decorator's expression
    (1-based line, 0-based column as `ast` counts it); `names` lists the import aliases to drop
    (`"a.b"` or `"a.b as c"`), or is empty for the whole statement.
    """

    line: int
    col: int
    names: tuple[str, ...] = ()
    decorator: bool = False


@dataclass(frozen=True)
class ImportedName:
    """A debugger name an import binds: the alias as `--fix` spells it, and who reads the name.

    `readers` holds the (line, col) of every statement that loads the bound name.
    """

    alias: str
    readers: frozenset[tuple[int, int]]


@dataclass(frozen=True)
class DebuggerImport:
    """The debugger names of a flagged import, and whether they are all the names it binds."""

    names: tuple[ImportedName, ...]
    only_debuggers: bool


@dataclass(frozen=True)
class DebuggerAlias:
    """`name = <debugger entry point>` (`t = ipdb.set_trace`): not a finding, but `--fix`
    removes it with the last statement that reads `name`, so the debugger import can go too.

    `readers` holds the (line, col) of every statement that loads `name`.
    """

    line: int
    col: int
    readers: frozenset[tuple[int, int]]


@dataclass(frozen=True)
class Candidate:
    """A finding before suppression: where, which rule, what, and how to fix it if it can be.

    A DBG001 candidate carries `imported` and no removal: which of its names `--fix` may drop
    depends on which statements are removed (see `plan_import_removals`).
    """

    line: int
    col: int
    code: str
    message: str
    removal: Removal | None
    imported: DebuggerImport | None = None


@dataclass(frozen=True)
class Policy:
    """Where prints are allowed in the file being checked."""

    print_allowed: bool = False
    allow_print_to_file: bool = True
    allow_main_block: bool = True


def truthy(node: ast.expr | None) -> bool | None:
    """Return the truth of a literal (`"0"` and `"false"` are false), or None if not a literal."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        inner = truthy(node.operand)
        return None if inner is None else not inner
    if not isinstance(node, ast.Constant):
        return None
    if isinstance(node.value, str):
        return node.value.strip().lower() not in FALSY_STRINGS
    return bool(node.value)


def argument(call: ast.Call, index: int, keyword: str) -> ast.expr | None:
    """Return the argument at `index` or named `keyword`, or None when absent."""
    if len(call.args) > index and not isinstance(call.args[index], ast.Starred):
        return call.args[index]
    for kw in call.keywords:
        if kw.arg == keyword:
            return kw.value
    return None


def is_debugger_name(name: str) -> bool:
    """Return whether a qualified name is inside a debugger module or is a debugger entry point."""
    if name in r.DEBUGGER_CALLABLES:
        return True
    parts = name.split(".")
    return any(".".join(parts[:end]) in r.DEBUGGER_MODULES for end in range(1, len(parts) + 1))


def enters_debugger(name: str) -> bool:
    """Return whether a qualified name is a debugger's (DBG001-DBG003), the builtin's included."""
    return name in r.BREAKPOINT_CALLABLES or is_debugger_name(name)


class Analysis:
    """Apply every rule to one module."""

    def __init__(self, module: ast.Module, policy: Policy) -> None:
        self.policy = policy
        self.scope, self.facts = Walker().run(module)
        self.consumed: set[int] = set()
        self.candidates: list[Candidate] = []

    def run(self) -> list[Candidate]:
        """Return the candidates of every rule."""
        for site in self.facts.calls:
            self._call(site)
        for decorator in self.facts.decorators:
            self._decorator(decorator)
        for node, scope in self.facts.env_assigns:
            self._env_assign(node, scope)
        self._imports()
        return self.candidates

    def debugger_aliases(self) -> list[DebuggerAlias]:
        """Return the assignments that bind a debugger entry point to another name."""
        aliases = []
        for node, target, scope in self.facts.aliases:
            names = qualified_names(node.value, scope)
            if names and all(enters_debugger(name) for name in names):
                readers = self._readers(target.id)
                aliases.append(DebuggerAlias(node.lineno, node.col_offset, readers))
        return aliases

    def _add(
        self, node: ast.expr | ast.stmt, stmt: ast.stmt, code: str, message: str, fix: bool
    ) -> None:
        line = stmt.lineno
        col = node.col_offset if getattr(node, "lineno", 0) == line else stmt.col_offset
        removal = Removal(stmt.lineno, stmt.col_offset) if fix else None
        self.candidates.append(Candidate(line, col, code, message, removal))

    def _call(self, site: CallSite) -> None:
        call = site.call
        if id(call) in self.consumed:
            return
        for name in sorted(qualified_names(call.func, site.scope)):
            found = self._classify(name, site)
            if found is None:
                continue
            if delegates_to_base(site):
                return
            code, message = found
            if any(call is d for d in getattr(site.stmt, "decorator_list", ())):
                self._add_decorator(call, code, message)
            else:
                statement = isinstance(site.stmt, ast.Expr) and site.stmt.value is call
                self._add(call, site.stmt, code, message, statement)
            self._consume_receiver(call.func)
            return

    def _add_decorator(self, decorator: ast.expr, code: str, message: str) -> None:
        line, col = decorator.lineno, decorator.col_offset
        removal = Removal(line, col, decorator=True)
        self.candidates.append(Candidate(line, col, code, message, removal))

    def _decorator(self, site: DecoratorSite) -> None:
        """`@q` or `@q.t`: the decorator is called with the function, so it is a debugger call."""
        for name in sorted(qualified_names(site.expr, site.scope)):
            if is_debugger_name(name):
                self._add_decorator(site.expr, "DBG002", f"debugger decorator `@{name}`")
                return

    def _consume_receiver(self, func: ast.expr) -> None:
        while isinstance(func, ast.Attribute):
            func = func.value
        if isinstance(func, ast.Call):
            self.consumed.add(id(func))

    def _classify(self, name: str, site: CallSite) -> tuple[str, str] | None:
        call = site.call
        if name in r.BREAKPOINT_CALLABLES:
            return "DBG003", f"`{name.removeprefix('builtins.')}()` left in code"
        if name in r.DYNAMIC_IMPORTERS:
            module = dynamic_import_target(call, site.scope)
            if module is not None and is_debugger_name(module):
                return "DBG004", f"debugger `{module}` imported dynamically"
            return None
        if is_debugger_name(name):
            return "DBG002", f"debugger call `{name}()`"
        if name in r.PRINT_CALLABLES or name in r.PPRINT_CALLABLES:
            return self._print(name, site)
        return self._ml_switch(name, site)

    def _print(self, name: str, site: CallSite) -> tuple[str, str] | None:
        policy = self.policy
        if policy.print_allowed or (policy.allow_main_block and site.in_main):
            return None
        pprint = name in r.PPRINT_CALLABLES
        stream = argument(site.call, 1, "stream") if pprint else argument(site.call, 99, "file")
        if policy.allow_print_to_file and stream is not None and not self._standard(stream, site):
            return None
        short = name.rsplit(".", 1)[1]
        return (
            ("DBG102", f"`{short}()` in library code")
            if pprint
            else (
                "DBG101",
                "`print()` in library code",
            )
        )

    @staticmethod
    def _standard(stream: ast.expr, site: CallSite) -> bool:
        if isinstance(stream, ast.Constant) and stream.value is None:
            return True
        return bool(qualified_names(stream, site.scope) & STANDARD_STREAMS)

    def _ml_switch(self, name: str, site: CallSite) -> tuple[str, str] | None:
        call = site.call
        if name in r.ANOMALY_SETTERS and truthy(argument(call, 0, "mode")):
            return "DBG201", "autograd anomaly detection enabled"
        if name in r.ANOMALY_CONTEXTS:
            return "DBG201", "autograd anomaly detection enabled (`detect_anomaly()`)"
        if name in r.SYNC_DEBUG_SETTERS and truthy(argument(call, 0, "debug_mode")):
            return "DBG202", "CUDA sync debug mode enabled"
        if name in r.JAX_CONFIG_UPDATE:
            flag = argument(call, 0, "name")
            enabled = truthy(argument(call, 1, "val"))
            if isinstance(flag, ast.Constant) and flag.value in r.JAX_DEBUG_FLAGS and enabled:
                return "DBG204", f"JAX debug flag `{flag.value}` enabled"
            return None
        if name in r.JAX_DEBUG_CONTEXTS:
            value = argument(call, 0, "disable" if name == "jax.disable_jit" else "new_val")
            if (value is None and name == "jax.disable_jit") or truthy(value):
                return "DBG204", f"`{name}()` left in code"
            return None
        if name == r.JAX_BREAKPOINT:
            return "DBG205", "`jax.debug.breakpoint()` left in code"
        if name == r.JAX_PRINT:
            return "DBG206", "`jax.debug.print()` left in code"
        return self._env_call(name, call)

    def _env_call(self, name: str, call: ast.Call) -> tuple[str, str] | None:
        pairs: list[tuple[ast.expr | None, ast.expr | None]] = []
        if name in (f"{r.ENVIRON}.setdefault", f"{r.ENVIRON}.__setitem__", r.PUTENV):
            pairs.append((argument(call, 0, "key"), argument(call, 1, "value")))
        elif name == f"{r.ENVIRON}.update":
            first = argument(call, 0, "")
            if isinstance(first, ast.Dict):
                pairs.extend(zip(first.keys, first.values, strict=True))
            pairs.extend((ast.Constant(kw.arg), kw.value) for kw in call.keywords if kw.arg)
        found = debug_env_vars(pairs)
        if not found:
            return None
        return "DBG203", f"debug environment variable `{found[0]}` set in code"

    def _env_assign(self, node: ast.Assign | ast.AugAssign, scope: Scope) -> None:
        pairs: list[tuple[ast.expr | None, ast.expr | None]] = []
        if isinstance(node, ast.Assign):
            subscripts = [t for t in node.targets if isinstance(t, ast.Subscript)]
            for target in subscripts:
                if r.ENVIRON in qualified_names(target.value, scope):
                    pairs.append((target.slice, node.value))
        elif (
            isinstance(node.op, ast.BitOr)
            and isinstance(node.value, ast.Dict)
            and r.ENVIRON in qualified_names(node.target, scope)
        ):
            pairs.extend(zip(node.value.keys, node.value.values, strict=True))
        found = debug_env_vars(pairs)
        if found:
            whole = isinstance(node, ast.Assign) and len(node.targets) == 1
            message = f"debug environment variable `{found[0]}` set in code"
            self._add(node, node, "DBG203", message, whole)

    def _imports(self) -> None:
        for node, _scope in self.facts.imports:
            flagged = [alias for alias in node.names if self._debugger_alias(node, alias)]
            if not flagged:
                continue
            names = tuple(
                ImportedName(alias_text(a), self._readers(bound_name(node, a))) for a in flagged
            )
            imported = DebuggerImport(names, len(flagged) == len(node.names))
            shown = ", ".join(f"`{alias_target(node, a)}`" for a in flagged)
            message = f"import of debugger {shown}"
            self.candidates.append(
                Candidate(node.lineno, node.col_offset, "DBG001", message, None, imported)
            )

    @staticmethod
    def _debugger_alias(node: ast.Import | ast.ImportFrom, alias: ast.alias) -> bool:
        if isinstance(node, ast.Import):
            return is_debugger_name(alias.name)
        module = node.module or ""
        # `from builtins import breakpoint` and `from sys import breakpointhook` too, though
        # `import builtins` and `import sys` are not debugger imports.
        return is_debugger_name(module) or enters_debugger(f"{module}.{alias.name}")

    def _readers(self, name: str) -> frozenset[tuple[int, int]]:
        return frozenset((node.lineno, node.col_offset) for node in self.facts.loads.get(name, ()))


def delegates_to_base(site: CallSite) -> bool:
    """Return whether a call is a method handing on to its class's base (`Base.m(self, ...)`).

    In `class P(pdb.Pdb)`, `pdb.Pdb.interaction(self, *args)` inside a method is how the
    subclass extends the debugger, not a leftover call (as `super().interaction()` is not).
    """
    func, scope, args = site.call.func, site.scope, site.call.args
    owner = scope.parent
    if owner is None or owner.kind != "class" or owner.parent is None:
        return False
    if not (isinstance(func, ast.Attribute) and args and isinstance(args[0], ast.Name)):
        return False
    if scope.self_name is None or args[0].id != scope.self_name:
        return False
    bases = set().union(*(qualified_names(base, owner.parent) for base in owner.bases))
    return bool(bases & qualified_names(func.value, scope))


def debug_env_vars(pairs: list[tuple[ast.expr | None, ast.expr | None]]) -> list[str]:
    """Return the debug variables that `(key, value)` pairs switch on."""
    found = []
    for key, value in pairs:
        if isinstance(key, ast.Constant) and key.value in r.DEBUG_ENV_VARS and truthy(value):
            found.append(str(key.value))
    return found


def bound_name(node: ast.Import | ast.ImportFrom, alias: ast.alias) -> str:
    """Return the name an import alias binds."""
    if alias.asname:
        return alias.asname
    return alias.name.split(".")[0] if isinstance(node, ast.Import) else alias.name


def alias_text(alias: ast.alias) -> str:
    """Return an alias as `--fix` identifies it: `name` or `name as asname`."""
    return f"{alias.name} as {alias.asname}" if alias.asname else alias.name


def alias_target(node: ast.Import | ast.ImportFrom, alias: ast.alias) -> str:
    """Return the qualified name an alias imports."""
    return alias.name if isinstance(node, ast.Import) else f"{node.module}.{alias.name}"


def analyse(module: ast.Module, policy: Policy) -> list[Candidate]:
    """Return every candidate finding in a parsed module."""
    return Analysis(module, policy).run()


def removed_aliases(aliases: list[DebuggerAlias], removed: set[tuple[int, int]]) -> list[Removal]:
    """Return the debugger aliases that `--fix` removes once the `removed` statements are gone.

    An alias goes when it was read and every statement that read it goes; an alias of an alias
    follows in turn.
    """
    gone = set(removed)
    result: list[Removal] = []
    pending = [alias for alias in aliases if alias.readers]
    while True:
        ready = [a for a in pending if a.readers <= gone and (a.line, a.col) not in gone]
        if not ready:
            return result
        for alias in ready:
            gone.add((alias.line, alias.col))
            result.append(Removal(alias.line, alias.col))


def plan_import_removals(
    candidates: list[Candidate], removed: set[tuple[int, int]]
) -> list[Candidate]:
    """Give each flagged import the removal `--fix` may make once `removed` statements are gone.

    A name stays imported while any statement that reads it stays: a suppressed, ignored,
    unfixable or unapplied finding, or any other code.

    Args:
        candidates: the findings to fix, their imports without a removal.
        removed: the (line, col) of every statement that `--fix` deletes.
    """
    return [_import_removal(c, c.imported, removed) if c.imported else c for c in candidates]


def _import_removal(
    candidate: Candidate, imported: DebuggerImport, removed: set[tuple[int, int]]
) -> Candidate:
    unused = tuple(name.alias for name in imported.names if name.readers <= removed)
    if not unused:
        return replace(candidate, removal=None)
    whole = imported.only_debuggers and len(unused) == len(imported.names)
    removal = Removal(candidate.line, candidate.col, () if whole else unused)
    return replace(candidate, removal=removal)
