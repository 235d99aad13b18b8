"""One pass over a module's `ast`: record every binding and the nodes the rules look at."""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass, field

from moe_devkit.lint.scopes import Scope, target_names

COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)
# Fields that never hold a node worth visiting, and nodes with nothing to visit.
_LEAF_FIELDS = frozenset({"ctx", "op", "ops", "type_comment", "kind", "conversion", "level"})
_SKIPPED = frozenset(
    {ast.Constant, ast.Load, ast.Store, ast.Del, ast.Pass, ast.Break, ast.Continue}
)
_CHILD_FIELDS: dict[type, tuple[str, ...]] = {}


@dataclass
class CallSite:
    """A call, the innermost statement around it, its scope, and whether a main block holds it."""

    call: ast.Call
    stmt: ast.stmt
    scope: Scope
    in_main: bool


@dataclass
class DecoratorSite:
    """A decorator that is a name (`@q`, `@q.t`), the definition it decorates, and its scope."""

    expr: ast.expr
    stmt: ast.stmt
    scope: Scope


@dataclass
class ModuleFacts:
    """What the rules need from one module.

    `loads` maps a name to the nodes that read it: the statement, or for a read inside a
    decorator the decorator's expression (`--fix` can drop a decorator alone). `aliases` holds
    every `name = a.b` assignment.
    """

    calls: list[CallSite] = field(default_factory=list)
    imports: list[tuple[ast.Import | ast.ImportFrom, Scope]] = field(default_factory=list)
    env_assigns: list[tuple[ast.Assign | ast.AugAssign, Scope]] = field(default_factory=list)
    loads: dict[str, list[ast.stmt | ast.expr]] = field(default_factory=dict)
    decorators: list[DecoratorSite] = field(default_factory=list)
    aliases: list[tuple[ast.Assign, ast.Name, Scope]] = field(default_factory=list)


def is_main_test(test: ast.expr) -> bool:
    """Return whether `test` is `__name__ == "__main__"` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return False
    if not isinstance(test.ops[0], ast.Eq):
        return False
    sides = {type(test.left), type(test.comparators[0])}
    if sides != {ast.Name, ast.Constant}:
        return False
    name, const = (test.left, test.comparators[0])
    if isinstance(name, ast.Constant):
        name, const = const, name
    return (
        isinstance(name, ast.Name)
        and name.id == "__name__"
        and isinstance(const, ast.Constant)
        and const.value == "__main__"
    )


Handler = Callable[[ast.AST, Scope, ast.stmt, bool], None]


class Walker:
    """Visit a module once; collect bindings into scopes and facts for the rules."""

    def __init__(self) -> None:
        self.facts = ModuleFacts()
        self.decorator: ast.expr | None = None  # the decorator being visited, if any
        self.handlers: dict[type, Handler] = {
            ast.Name: self._name,  # type: ignore[dict-item]
            ast.FunctionDef: self._function,  # type: ignore[dict-item]
            ast.AsyncFunctionDef: self._function,  # type: ignore[dict-item]
            ast.Lambda: self._lambda,  # type: ignore[dict-item]
            ast.ClassDef: self._class,  # type: ignore[dict-item]
            ast.Import: self._import,  # type: ignore[dict-item]
            ast.ImportFrom: self._import_from,  # type: ignore[dict-item]
            ast.Global: self._global,  # type: ignore[dict-item]
            ast.Nonlocal: self._nonlocal,  # type: ignore[dict-item]
            ast.ExceptHandler: self._except,  # type: ignore[dict-item]
            ast.Call: self._call,  # type: ignore[dict-item]
            ast.Assign: self._assign,  # type: ignore[dict-item]
            ast.AugAssign: self._aug_assign,  # type: ignore[dict-item]
            ast.If: self._if,  # type: ignore[dict-item]
            ast.NamedExpr: self._named_expr,  # type: ignore[dict-item]
            ast.MatchAs: self._match_capture,  # type: ignore[dict-item]
            ast.MatchStar: self._match_capture,  # type: ignore[dict-item]
            ast.MatchMapping: self._match_mapping,  # type: ignore[dict-item]
            ast.Load: self._leaf,
            ast.Store: self._leaf,
            ast.Del: self._leaf,
            ast.Constant: self._leaf,
        }
        for comprehension in COMPREHENSIONS:
            self.handlers[comprehension] = self._comprehension  # type: ignore[assignment]
        type_alias = getattr(ast, "TypeAlias", None)
        if type_alias is not None:  # Python >= 3.12
            self.handlers[type_alias] = self._type_alias

    def run(self, module: ast.Module) -> tuple[Scope, ModuleFacts]:
        """Walk `module`; return its scope and the collected facts."""
        scope = Scope("module", None)
        for stmt in module.body:
            self.visit(stmt, scope, stmt, False)
        return scope, self.facts

    def visit(self, node: ast.AST, scope: Scope, stmt: ast.stmt, in_main: bool) -> None:
        """Visit `node` and its children."""
        if isinstance(node, ast.stmt):
            stmt = node
        handler = self.handlers.get(type(node))
        if handler is not None:
            handler(node, scope, stmt, in_main)
        else:
            self.children(node, scope, stmt, in_main)

    def children(self, node: ast.AST, scope: Scope, stmt: ast.stmt, in_main: bool) -> None:
        """Visit the children of `node` (the hot loop: fields that hold no node are skipped)."""
        fields = _CHILD_FIELDS.get(type(node))
        if fields is None:
            fields = _CHILD_FIELDS[type(node)] = tuple(
                name for name in node._fields if name not in _LEAF_FIELDS
            )
        handlers = self.handlers
        for name in fields:
            value = getattr(node, name, None)
            if value is None:
                continue
            for item in value if isinstance(value, list) else (value,):
                if not isinstance(item, ast.AST):
                    continue
                kind = type(item)
                if kind in _SKIPPED:
                    continue
                handler = handlers.get(kind)
                child_stmt = item if isinstance(item, ast.stmt) else stmt
                if handler is not None:
                    handler(item, scope, child_stmt, in_main)
                else:
                    self.children(item, scope, child_stmt, in_main)

    def visit_all(self, nodes: list[ast.AST], scope: Scope, stmt: ast.stmt, main: bool) -> None:
        """Visit each node of a list."""
        for node in nodes:
            self.visit(node, scope, stmt, main)

    def _leaf(self, node: ast.AST, scope: Scope, stmt: ast.stmt, in_main: bool) -> None:
        pass

    def _name(self, node: ast.Name, scope: Scope, stmt: ast.stmt, in_main: bool) -> None:
        if isinstance(node.ctx, ast.Load):
            self.facts.loads.setdefault(node.id, []).append(self.decorator or stmt)
        else:
            scope.bind(node.id, None)

    def _arguments(
        self, args: ast.arguments, outer: Scope, inner: Scope, stmt: ast.stmt, in_main: bool
    ) -> None:
        defaults: list[ast.AST] = [*args.defaults, *(d for d in args.kw_defaults if d)]
        self.visit_all(defaults, outer, stmt, in_main)
        every = [*args.posonlyargs, *args.args, *args.kwonlyargs]
        every += [arg for arg in (args.vararg, args.kwarg) if arg is not None]
        for arg in every:
            inner.bind(arg.arg, None)
            if arg.annotation is not None:
                self.visit(arg.annotation, outer, stmt, in_main)

    def _decorators(self, node: ast.AST, scope: Scope, stmt: ast.stmt, in_main: bool) -> None:
        outer = self.decorator
        for decorator in getattr(node, "decorator_list", ()):
            self.decorator = decorator
            if isinstance(decorator, (ast.Name, ast.Attribute)):
                self.facts.decorators.append(DecoratorSite(decorator, stmt, scope))
            self.visit(decorator, scope, stmt, in_main)
        self.decorator = outer

    def _type_params(self, node: ast.AST, inner: Scope) -> None:
        for param in getattr(node, "type_params", ()):
            inner.bind(param.name, None)

    def _function(
        self,
        node: ast.FunctionDef | ast.AsyncFunctionDef,
        scope: Scope,
        stmt: ast.stmt,
        in_main: bool,
    ) -> None:
        # A definition inside `if __name__ == "__main__":` runs only as a script: its body
        # follows the main block's print policy.
        self._decorators(node, scope, stmt, in_main)
        if node.returns is not None:
            self.visit(node.returns, scope, stmt, in_main)
        scope.bind(node.name, None)
        inner = Scope("function", scope)
        if scope.kind == "class":
            positional = [*node.args.posonlyargs, *node.args.args]
            inner.self_name = positional[0].arg if positional else None
        self._type_params(node, inner)
        self._arguments(node.args, scope, inner, stmt, in_main)
        self.visit_all([*node.body], inner, stmt, in_main)

    def _lambda(self, node: ast.Lambda, scope: Scope, stmt: ast.stmt, in_main: bool) -> None:
        inner = Scope("function", scope)
        self._arguments(node.args, scope, inner, stmt, in_main)
        self.visit(node.body, inner, stmt, in_main)

    def _class(self, node: ast.ClassDef, scope: Scope, stmt: ast.stmt, in_main: bool) -> None:
        self._decorators(node, scope, stmt, in_main)
        self.visit_all([*node.bases, *node.keywords], scope, stmt, in_main)
        scope.bind(node.name, None)
        inner = Scope("class", scope)
        inner.bases = tuple(node.bases)
        self._type_params(node, inner)
        self.visit_all([*node.body], inner, stmt, in_main)

    def _comprehension(
        self,
        node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp,
        scope: Scope,
        stmt: ast.stmt,
        in_main: bool,
    ) -> None:
        inner = Scope("comprehension", scope)
        for generator in node.generators:
            self.visit(
                generator.iter, scope if generator is node.generators[0] else inner, stmt, in_main
            )
            self.visit(generator.target, inner, stmt, in_main)
            self.visit_all([*generator.ifs], inner, stmt, in_main)
        parts: list[ast.AST] = (
            [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
        )
        self.visit_all(parts, inner, stmt, in_main)

    def _import(self, node: ast.Import, scope: Scope, stmt: ast.stmt, in_main: bool) -> None:
        for alias in node.names:
            if alias.asname is not None:
                scope.bind(alias.asname, alias.name)
            else:
                top = alias.name.split(".")[0]
                scope.bind(top, top)
        self.facts.imports.append((node, scope))

    def _import_from(self, node: ast.ImportFrom, scope: Scope, stmt: ast.stmt, main: bool) -> None:
        relative = node.level > 0 or node.module is None
        for alias in node.names:
            if alias.name == "*":
                if not relative:
                    scope.star_imports.append(node.module or "")
                continue
            value = None if relative else f"{node.module}.{alias.name}"
            scope.bind(alias.asname or alias.name, value)
        if not relative:
            self.facts.imports.append((node, scope))

    def _global(self, node: ast.Global, scope: Scope, stmt: ast.stmt, in_main: bool) -> None:
        scope.globals.update(node.names)

    def _nonlocal(self, node: ast.Nonlocal, scope: Scope, stmt: ast.stmt, in_main: bool) -> None:
        scope.nonlocals.update(node.names)

    def _except(self, node: ast.ExceptHandler, scope: Scope, stmt: ast.stmt, main: bool) -> None:
        if node.name:
            scope.bind(node.name, None)
        self.children(node, scope, stmt, main)

    def _call(self, node: ast.Call, scope: Scope, stmt: ast.stmt, in_main: bool) -> None:
        self.facts.calls.append(CallSite(node, stmt, scope, in_main))
        self.children(node, scope, stmt, in_main)

    def _assign(self, node: ast.Assign, scope: Scope, stmt: ast.stmt, in_main: bool) -> None:
        self.visit(node.value, scope, stmt, in_main)
        target = node.targets[0] if len(node.targets) == 1 else None
        value = node.value
        if isinstance(target, ast.Name) and isinstance(value, (ast.Call, ast.Name, ast.Attribute)):
            # `m = __import__("pdb")` binds a module, `t = pdb.set_trace` an alias.
            scope.bind(target.id, (value, scope))
            if not isinstance(value, ast.Call):
                self.facts.aliases.append((node, target, scope))
        else:
            self.visit_all([*node.targets], scope, stmt, in_main)
        if any(isinstance(target, ast.Subscript) for target in node.targets):
            self.facts.env_assigns.append((node, scope))

    def _aug_assign(self, node: ast.AugAssign, scope: Scope, stmt: ast.stmt, main: bool) -> None:
        self.children(node, scope, stmt, main)
        if isinstance(node.target, ast.Name):
            self.facts.loads.setdefault(node.target.id, []).append(stmt)
        self.facts.env_assigns.append((node, scope))

    def _if(self, node: ast.If, scope: Scope, stmt: ast.stmt, in_main: bool) -> None:
        self.visit(node.test, scope, stmt, in_main)
        body_main = in_main or (scope.kind == "module" and is_main_test(node.test))
        self.visit_all([*node.body], scope, stmt, body_main)
        self.visit_all([*node.orelse], scope, stmt, in_main)

    def _named_expr(self, node: ast.NamedExpr, scope: Scope, stmt: ast.stmt, main: bool) -> None:
        self.visit(node.value, scope, stmt, main)
        target: Scope = scope
        while target.kind == "comprehension" and target.parent is not None:
            target = target.parent
        target.bind(node.target.id, None)

    def _match_capture(
        self, node: ast.MatchAs | ast.MatchStar, scope: Scope, stmt: ast.stmt, main: bool
    ) -> None:
        if node.name is not None:
            scope.bind(node.name, None)
        self.children(node, scope, stmt, main)

    def _match_mapping(
        self, node: ast.MatchMapping, scope: Scope, stmt: ast.stmt, main: bool
    ) -> None:
        if node.rest is not None:
            scope.bind(node.rest, None)
        self.children(node, scope, stmt, main)

    def _type_alias(self, node: ast.AST, scope: Scope, stmt: ast.stmt, in_main: bool) -> None:
        name = getattr(node, "name", None)
        if isinstance(name, ast.Name):
            scope.bind(name.id, None)
        self.visit(getattr(node, "value"), scope, stmt, in_main)  # noqa: B009


def names_in(targets: list[ast.expr]) -> list[str]:
    """Return the plain names among assignment targets."""
    return [name.id for target in targets for name in target_names(target)]
