"""Cell planning: which notebook variables a cell reads, and which it binds.

A worker sees nothing of the notebook but what we ship, so the plan must find
every name the cell needs from the notebook, and no more: shipping a variable
the cell never mentions costs time (a 1 GB array) and can fail for nothing (an
open connection). Planning is a pure function of the source text and the
names that exist in the namespace; no process, no pickling.

The rules, in order of the statements at module level:

* a name read before the cell binds it for sure is an *input*, if the
  notebook has it (``x = x + 1`` ships ``x``);
* a name bound only inside a branch or a loop is not bound "for sure", so a
  later read still ships the notebook's value as a fallback;
* a name that a function, lambda, class body or comprehension of the cell
  reads as a global is an input when the notebook has it: we cannot know
  whether the cell binds it before the call, and shipping it is harmless;
* builtins are never inputs unless the notebook shadows them.

Outputs are the names the cell binds at top level (assignment, augmented
assignment, ``for``/``with`` targets, walrus, imports, ``def``, ``class``,
``match`` captures) plus names that its functions declare ``global`` and
assign.
"""

from __future__ import annotations

import ast
import builtins
import functools
import os
import re
import symtable
import sys
import types
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import magicline
from .errors import IsolateUsageError
from .magicline import UsageError, split_options

_BUILTINS = frozenset(dir(builtins))


@dataclass(frozen=True)
class Plan:
    """What a cell needs and gives back.

    ``inputs`` are shipped to the worker, ``outputs`` copied back on success,
    ``has_result`` tells whether the last statement is an expression whose
    value becomes the cell's ``Out``.
    """

    source: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    has_result: bool
    missing: tuple[str, ...] = ()
    names: frozenset[str] = frozenset()
    """Every identifier and attribute name the code mentions (``xml``, ``dom``, ``minidom``):
    the submodules of a shipped module that the cell reaches are the ones it names."""
    deletes: tuple[str, ...] = ()
    """Names the cell may ``del``, at top level or in a function that declares them ``global``:
    if they are gone when it ends, they go from the notebook too (``del big_tmp`` frees it
    there, as in an ordinary cell)."""
    imports: tuple[str, ...] = ()
    """The modules the cell imports by absolute name (``matplotlib.pyplot``), anywhere in it."""
    whole_namespace: str | None = None
    """The first call by which the cell reads the namespace as a whole (``globals()``, ``dir()``),
    which its text cannot tell the names of: only the variables it names travel, and the user
    is told so."""
    attributes: tuple[tuple[str, ...], ...] = ()
    """The attributes the cell sets or deletes on a variable and the attributes after it
    (``config.LR = 0.1`` gives ``("config", "LR")``), anywhere in it, then those whose value
    it may change in place (``config.LAYERS.append(3)``): those of modules, classes and
    functions come back (:mod:`nbisolate.attributes`)."""
    written: tuple[str, ...] = ()
    """Variables whose items the cell's text writes (``arr[0] = 5``, ``df["y"] = 2``,
    ``df.loc[k, "a"] = v``, ``del d[k]``, ``arr += 1``): an input among them that is still the
    same object when the cell ends changed in place, however large (:func:`item_writes`)."""


def parse_cell(source: str, first_line: int = 1, filename: str = "<isolated cell>") -> ast.Module:
    """Parse a cell; a syntax error is Python's own, placed as the user sees the cell.

    ``first_line`` is the line number, in the notebook cell, of the source's
    first line (2 under a ``%%isolate`` line), and ``filename`` the name the
    cell's text is known by (IPython's, in a kernel), so the error reads like
    an ordinary cell's: ``Cell In[n], line k`` with the line and a caret.
    """
    try:
        return ast.parse(source, filename=filename, mode="exec")
    except SyntaxError as exc:
        shift = first_line - 1
        error = SyntaxError(
            exc.msg,
            (
                filename,
                (exc.lineno or 1) + shift,
                exc.offset,
                exc.text,
                (exc.end_lineno + shift) if exc.end_lineno else None,
                exc.end_offset,
            ),
        )
        raise error from None
    except RecursionError:
        raise IsolateUsageError(
            "the cell is nested too deeply for Python's parser; nothing ran. "
            "Split long expressions into several statements."
        ) from None


class _ModuleScope(ast.NodeVisitor):
    """Walks module-level code in execution order, tracking names bound for sure."""

    def __init__(self) -> None:
        self.bound: set[str] = set()
        self.free: list[str] = []
        self.binds: list[str] = []
        self.nested: list[ast.AST] = []
        self.deleted: list[str] = []
        self._depth = 0  # > 0 inside a branch, a loop or a try body

    # -- helpers -------------------------------------------------------
    def _read(self, name: str) -> None:
        if name not in self.bound and name not in self.free:
            self.free.append(name)

    def _bind(self, name: str) -> None:
        if name not in self.binds:
            self.binds.append(name)
        if self._depth == 0:
            self.bound.add(name)

    def _conditional(self, nodes: Iterable[ast.AST]) -> None:
        self._depth += 1
        for node in nodes:
            self.visit(node)
        self._depth -= 1

    def _visit_all(self, nodes: Iterable[ast.AST | None]) -> None:
        for node in nodes:
            if node is not None:
                self.visit(node)

    def generic_visit(self, node: ast.AST) -> None:
        """Children in source order, without recursion: ``a + b + ... `` may nest thousands deep."""
        stack = list(ast.iter_child_nodes(node))[::-1]
        while stack:
            child = stack.pop()
            if hasattr(self, "visit_" + type(child).__name__):
                self.visit(child)
            else:
                stack.extend(list(ast.iter_child_nodes(child))[::-1])

    # -- names ---------------------------------------------------------
    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self._read(node.id)
        elif isinstance(node.ctx, ast.Store):
            self._bind(node.id)
        else:  # del x needs x
            self._read(node.id)
            if node.id not in self.deleted:
                self.deleted.append(node.id)

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        inner = magic_code(node)
        if inner is not None:  # %time x = f(): the statement runs in the namespace, as written
            for stmt in inner.body:
                self.visit(stmt)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        self._visit_all(node.targets)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._visit_all([node.value, node.annotation])
        if node.value is not None or not isinstance(node.target, ast.Name):
            self.visit(node.target)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.visit(node.value)
        if isinstance(node.target, ast.Name):
            self._read(node.target.id)
            self._bind(node.target.id)
        else:
            self.visit(node.target)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self.visit(node.target)

    # -- imports -------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._bind(alias.asname or alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name != "*":
                self._bind(alias.asname or alias.name)

    # -- control flow --------------------------------------------------
    def visit_If(self, node: ast.If) -> None:
        self.visit(node.test)
        self._conditional(node.body + node.orelse)

    def visit_While(self, node: ast.While) -> None:
        self._conditional([node.test, *node.body, *node.orelse])

    def visit_For(self, node: ast.For) -> None:
        self.visit(node.iter)
        self._depth += 1
        self.visit(node.target)
        # The body runs only after the target is assigned: there it is bound for sure
        # (`for row in rows: total += row` never needs the notebook's `row`).
        self._bound_within(node.target, node.body)
        self._visit_all(node.orelse)  # an empty iterable leaves the target unbound here
        self._depth -= 1

    def _bound_within(self, target: ast.AST | str, body: Iterable[ast.AST]) -> None:
        """Visit ``body`` with the names of ``target`` bound for sure, as they are there."""
        if isinstance(target, str):
            names = {target}
        else:
            names = {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        added = names - self.bound
        self.bound |= added
        self._visit_all(body)
        self.bound -= added

    visit_AsyncFor = visit_For

    def visit_Try(self, node: ast.Try) -> None:
        self._depth += 1
        self._visit_all(node.body)
        for handler in node.handlers:
            self._visit_all([handler.type])
            if handler.name:
                self._bind(handler.name)
                self._bound_within(handler.name, handler.body)  # `except E as err:` binds err
            else:
                self._visit_all(handler.body)
        self._visit_all(node.orelse)
        self._depth -= 1
        self._visit_all(node.finalbody)

    visit_TryStar = visit_Try

    def visit_With(self, node: ast.With) -> None:
        for item in node.items:
            self.visit(item.context_expr)
            if item.optional_vars is not None:
                self.visit(item.optional_vars)
        self._visit_all(node.body)

    visit_AsyncWith = visit_With

    def visit_Match(self, node: ast.Match) -> None:
        self.visit(node.subject)
        self._depth += 1
        for case in node.cases:
            for sub in ast.walk(case.pattern):
                if isinstance(sub, ast.MatchAs | ast.MatchStar) and sub.name:
                    self._bind(sub.name)
                elif isinstance(sub, ast.MatchMapping) and sub.rest:
                    self._bind(sub.rest)
                elif isinstance(sub, ast.MatchValue | ast.MatchClass):
                    self.visit(sub.value if isinstance(sub, ast.MatchValue) else sub.cls)
            self._visit_all([case.guard, *case.body])
        self._depth -= 1

    # -- nested scopes: evaluate what runs now, defer the bodies -------
    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        args = node.args
        self._visit_all([*args.defaults, *args.kw_defaults])
        if not isinstance(node, ast.Lambda):
            self._visit_all(node.decorator_list)
            every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
            self._visit_all(a.annotation for a in every if a is not None)
            self._visit_all([node.returns])
            self._bind(node.name)
        self.nested.append(node)

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function
    visit_Lambda = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._visit_all([*node.decorator_list, *node.bases, *(k.value for k in node.keywords)])
        self._bind(node.name)
        self.nested.append(node)

    def _comprehension(self, node: ast.AST) -> None:
        """Reads of a comprehension, minus its own loop variables.

        Walked here rather than left to ``symtable``: from Python 3.12 on,
        comprehensions are inlined (PEP 709) and have no scope of their own
        there, so their reads would be missed.
        """
        generators = node.generators  # type: ignore[attr-defined]
        self.visit(generators[0].iter)
        local: set[str] = set()
        reads: list[str] = []
        stack: list[ast.AST] = [node]
        while stack:
            sub = stack.pop()
            if isinstance(sub, ast.Lambda | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue  # their own scopes: symtable reports their globals
            if isinstance(sub, ast.comprehension):
                local.update(n.id for n in ast.walk(sub.target) if isinstance(n, ast.Name))
            elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load):
                reads.append(sub.id)
            stack.extend(ast.iter_child_nodes(sub))
        for name in reads:
            if name not in local:
                self._read(name)
        self.nested.append(node)

    visit_ListComp = _comprehension
    visit_SetComp = _comprehension
    visit_DictComp = _comprehension
    visit_GeneratorExp = _comprehension

    def visit_Global(self, node: ast.Global) -> None:
        pass

    visit_Nonlocal = visit_Global


def _nested_globals(source: str) -> tuple[set[str], set[str]]:
    """Names that nested scopes read as globals, and names they assign as ``global``.

    ``symtable`` applies Python's own scoping rules (class bodies,
    comprehensions, ``nonlocal``), which is more reliable than re-deriving them.
    A name a function declares ``global`` and assigns counts as read too: the
    table does not count ``counter += 1`` or ``del counter`` as a reference, yet
    both need the notebook's value, and a function may rebind or delete it (its
    name is among the cell's deletes: gone after the cell, it goes here too).
    """
    reads: set[str] = set()
    writes: set[str] = set()
    top = symtable.symtable(source, "<isolated cell>", "exec")
    stack = list(top.get_children())
    while stack:
        table = stack.pop()
        for sym in table.get_symbols():
            if sym.is_global():
                if sym.is_referenced():
                    reads.add(sym.get_name())
                if sym.is_declared_global() and sym.is_assigned():
                    reads.add(sym.get_name())
                    writes.add(sym.get_name())
        stack.extend(table.get_children())
    return reads, writes


# Magics whose argument (line) or body (cell) is Python run in the user's namespace.
_CODE_MAGICS = frozenset({"time", "timeit", "prun"})
_CODE_MAGIC_OPTIONS = {"timeit": magicline.TIMEIT, "prun": magicline.PRUN}  # %time takes none


def magic_code(node: ast.AST) -> ast.Module | None:
    """The Python a ``%time``/``%timeit``/``%prun`` line or cell runs, parsed; else None.

    IPython turns ``%time total = f()`` into ``get_ipython().run_line_magic('time',
    'total = f()')``: the statement binds ``total`` in the namespace when it runs,
    so the plan must see it (an input it reads, a result it binds) as if written
    plainly. Code that is not plain Python (a nested ``!ls``) is left to run time.
    """
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return None
    owner = node.func.value
    if not (isinstance(owner, ast.Call) and getattr(owner.func, "id", None) == "get_ipython"):
        return None
    args = node.args
    if (
        node.func.attr == "run_line_magic"
        and len(args) >= 2
        and all(isinstance(a, ast.Constant) for a in args[:2])
        and args[0].value == "run"
    ):
        return _run_in_place(args[1].value)
    if not args or not (isinstance(args[0], ast.Constant) and args[0].value in _CODE_MAGICS):
        return None
    if node.func.attr == "run_line_magic" and len(args) >= 2:
        code = args[1]
    elif node.func.attr == "run_cell_magic" and len(args) >= 3:
        code = args[2]
    else:
        return None
    if not (isinstance(code, ast.Constant) and isinstance(code.value, str)):
        return None
    text = code.value
    spec = _CODE_MAGIC_OPTIONS.get(args[0].value)
    if node.func.attr == "run_line_magic" and spec:  # options first: %timeit -n1 x = f()
        try:
            text = split_options(text, spec)[1]
        except UsageError:  # refused when it runs, as IPython refuses it
            return None
    try:
        return ast.parse(text)
    except SyntaxError:
        return None


_SCRIPT_MAX = 1 << 20
"""A script ``%run -i`` runs is read for its names up to this size (larger: none are)."""


def _run_in_place(line: Any) -> ast.Module | None:
    """The script ``%run -i script.py`` runs in the cell's namespace, parsed, so the names it
    reads travel as the cell's own would; ``%run`` without ``-i`` runs it in a namespace of its
    own (what it binds is found when it ends), and a path with ``$``/``{}`` is known only then."""
    import shlex

    try:
        words = shlex.split(line) if isinstance(line, str) else []
    except ValueError:
        return None
    flags = []
    while words and words[0].startswith("-"):
        flags.append(words.pop(0))
    if "-i" not in flags or "-m" in flags or not words or any(c in words[0] for c in "${}"):
        return None
    path = os.path.expanduser(words[0])
    if not os.path.exists(path) and os.path.exists(path + ".py"):
        path += ".py"
    try:
        if os.path.getsize(path) > _SCRIPT_MAX:
            return None
        with open(path, encoding="utf-8") as fh:
            return ast.parse(fh.read())
    except (OSError, SyntaxError, ValueError):
        return None  # run time reports it


def _chain(node: ast.AST) -> tuple[str, ...] | None:
    """``a.b.c`` as ``("a", "b", "c")``; None for anything but a name and attributes."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return tuple(reversed(parts))


def attribute_uses(tree: ast.AST) -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]]:
    """The attributes of variables the code changes, as chains (``config.LR`` is ``("config", "LR")``),
    each once, in two tuples.

    First those it sets or deletes: ``x.a = v``, ``x.a.b += 1``, ``del x.a``,
    ``setattr(x, "a", v)``, ``delattr(x, "a")``.  Then those whose value it may change in
    place, of two names or more: ``x.a.append(v)``, ``x.a[k] = v``, ``del x.a[k]``, and
    ``x.a`` of ``x.a.b = v``.  Inside functions too: what the cell defines and calls runs.
    Whether ``x`` is a module, a class or an instance is for the running side to find out.
    """
    stored: dict[tuple[str, ...], None] = {}
    touched: dict[tuple[str, ...], None] = {}
    for node in ast.walk(tree):
        chain = None
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)):
            chain = _chain(node)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            receiver = _chain(node.func.value)  # config.LAYERS of config.LAYERS.append(3)
            if receiver is not None and len(receiver) > 1:
                touched[receiver] = None
            continue
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)):
            container = _chain(node.value)  # config.OPTS of config.OPTS["a"] = 1
            if container is not None and len(container) > 1:
                touched[container] = None
            continue
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("setattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and node.args[1].value.isidentifier()
        ):
            owner = _chain(node.args[0])
            chain = None if owner is None else (*owner, node.args[1].value)
        if chain is not None and len(chain) > 1:
            stored[chain] = None
            if len(chain) > 2:  # config.model.lr = 0.1 changes config.model in place
                touched[chain[:-1]] = None
    return tuple(stored), tuple(c for c in touched if c not in stored)


_INDEXERS = frozenset({"loc", "iloc", "at", "iat"})
"""pandas' indexers: ``df.loc[k] = v`` writes into ``df``."""


def item_writes(tree: ast.AST) -> tuple[str, ...]:
    """The variables whose items (or whose own value, in place: ``arr += 1``) the code writes,
    anywhere in it, each once: ``x[k] = v``, ``x[k] += v``, ``del x[k]``, ``x.loc[k] = v``
    (pandas' ``loc``, ``iloc``, ``at``, ``iat``), ``x += v``.  Method calls are not among them:
    most only read (``arr.sum()``), and the running side watches small inputs whatever the
    cell does to them."""
    found: dict[str, None] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)):
            chain = _chain(node.value)
            if chain is not None and (len(chain) == 1 or (len(chain) == 2 and chain[1] in _INDEXERS)):
                found[chain[0]] = None
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            found[node.target.id] = None
    return tuple(found)


def last_expression(tree: ast.Module) -> ast.Expr | None:
    """The last statement, when it is an expression statement."""
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        return tree.body[-1]
    return None


_DOLLAR = re.compile(r"(?<!\$)\$([A-Za-z_][A-Za-z0-9_]*)")
_BRACES = re.compile(r"(?<!\{)\{([^{}]+)\}(?!\})")


def _expanded_names(tree: ast.Module) -> set[str]:
    """Names an IPython line expands when it runs: ``!echo $word {n + 1}`` reads ``word`` and ``n``.

    IPython turns ``!cmd`` and ``%magic line`` into ``get_ipython().system('cmd')``
    and the like, and expands ``$name`` and ``{expr}`` in the string from the
    namespace at run time: the worker needs those variables too.
    """
    found: set[str] = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value
        if not (isinstance(owner, ast.Call) and getattr(owner.func, "id", None) == "get_ipython"):
            continue
        for arg in node.args:
            if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                continue
            found.update(_DOLLAR.findall(arg.value))
            for expr in _BRACES.findall(arg.value):
                try:
                    found.update(
                        n.id for n in ast.walk(ast.parse(expr, mode="eval")) if isinstance(n, ast.Name)
                    )
                except SyntaxError:
                    continue
    return found


_NAMESPACE_CALLS = frozenset({"globals", "vars", "locals", "dir"})


def _dynamic_reads(tree: ast.Module) -> tuple[set[str], str | None]:
    """Names the code reads through the namespace, not by name: ``eval("a + 1")`` and
    ``exec("r = a")`` with a literal text, ``globals()["a"]``, ``globals().get("a")``; and
    the first call that reads the namespace as a whole (``globals()``, ``vars()``, ``dir()``,
    ``locals()``; None if there is none), which no text can tell the names of."""
    found: set[str] = set()
    by_key: set[int] = set()  # globals() calls that read one literal key
    for node in ast.walk(tree):
        inner, key = None, None
        if isinstance(node, ast.Subscript) and _namespace_call(node.value):
            inner, key = node.value, node.slice
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            if _namespace_call(node.func.value) and node.args:
                inner, key = node.func.value, node.args[0]
        if inner is not None and isinstance(key, ast.Constant) and isinstance(key.value, str):
            found.add(key.value)
            by_key.add(id(inner))
    whole: str | None = None
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            continue
        name = node.func.id
        if name in ("eval", "exec") and node.args:
            text = node.args[0]
            if isinstance(text, ast.Constant) and isinstance(text.value, str):
                try:
                    code = ast.parse(text.value, mode="eval" if name == "eval" else "exec")
                except SyntaxError:
                    continue
                found.update(n.id for n in ast.walk(code) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load))
        elif name in _NAMESPACE_CALLS and not node.args and id(node) not in by_key and whole is None:
            whole = f"{name}()"
    return found, whole


def _namespace_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and node.func.id in ("globals", "vars", "locals") and not node.args
    )


@dataclass(frozen=True)
class _Reading:
    """What a cell's text alone says (the names it reads and binds), whatever the notebook holds."""

    free: tuple[str, ...]  # read at top level before being bound, in order
    binds: tuple[str, ...]  # bound at top level, then in nested code (``global``), in order
    others: tuple[str, ...]  # read in nested code, expanded by IPython lines or eval'd, not in ``free``
    has_result: bool
    deletes: tuple[str, ...]
    names: frozenset[str]
    imports: tuple[str, ...]
    attributes: tuple[tuple[str, ...], ...]
    whole_namespace: str | None
    written: tuple[str, ...]


@functools.lru_cache(maxsize=64)
def _read(source: str) -> _Reading:
    """Parse and read a cell's text once: a cell run again (the usual way to work) is not
    parsed again.  Raises :class:`SyntaxError` (never cached) as :func:`parse_cell` does."""
    tree = parse_cell(source)
    scope = _ModuleScope()
    for stmt in tree.body:
        scope.visit(stmt)
    nested_reads, nested_writes = _nested_globals(source)
    dynamic, whole = _dynamic_reads(tree)
    expanded = (_expanded_names(tree) | dynamic) - set(scope.free)
    parts = (tree, *(m for m in map(magic_code, ast.walk(tree)) if m is not None))  # and %time's code
    return _Reading(
        free=tuple(scope.free),
        binds=tuple(scope.binds) + tuple(sorted(nested_writes - set(scope.binds))),
        others=tuple(sorted((nested_reads | expanded) - set(scope.free))),
        has_result=last_expression(tree) is not None and not source.rstrip().endswith(";"),
        deletes=tuple(scope.deleted) + tuple(sorted(nested_writes - set(scope.deleted))),
        names=frozenset(
            node.id if isinstance(node, ast.Name) else node.attr
            for part in parts
            for node in ast.walk(part)
            if isinstance(node, (ast.Name, ast.Attribute))
        ),
        imports=tuple(
            dict.fromkeys(
                name
                for node in ast.walk(tree)
                for name in (
                    [alias.name for alias in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module]
                    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                    else []
                )
            )
        ),
        attributes=tuple(dict.fromkeys(chain for part in parts for uses in attribute_uses(part) for chain in uses)),
        whole_namespace=whole,
        written=tuple(dict.fromkeys(name for part in parts for name in item_writes(part))),
    )


def plan_cell(
    source: str,
    available: Container[str],
    inputs: Iterable[str] | None = None,
    outputs: Iterable[str] | None = None,
    first_line: int = 1,
    filename: str = "<isolated cell>",
) -> Plan:
    """Plan a cell against the names that exist in the notebook.

    ``inputs`` overrides detection (only those are shipped); a named input
    that does not exist is a usage error.  ``outputs`` narrows what comes back.
    """
    try:
        # By its text alone (IPython names each run's code anew), but for a script that
        # ``%run -i`` runs, which may have changed since.
        reading = _read.__wrapped__(source) if "run_line_magic('run'" in source else _read(source)
    except SyntaxError:
        parse_cell(source, first_line, filename)  # raises it, placed as the user sees the cell
        raise
    if inputs is not None:
        chosen = tuple(dict.fromkeys(inputs))
        missing = [n for n in chosen if n not in available]
        if missing:
            raise IsolateUsageError(
                f"no notebook variable named {', '.join(repr(n) for n in missing)}; "
                "nothing ran. Define it first, or leave the names out and let "
                "%%isolate find the inputs itself."
            )
    else:
        chosen = tuple(n for n in reading.free + reading.others if n in available)

    binds = reading.binds
    out = tuple(dict.fromkeys(outputs)) if outputs is not None else binds
    missing_reads = tuple(
        n for n in reading.free if n not in available and n not in _BUILTINS and n not in binds
    )
    return Plan(
        source=source,
        inputs=chosen,
        outputs=out,
        has_result=reading.has_result,
        missing=missing_reads,
        deletes=reading.deletes,
        names=reading.names,
        imports=reading.imports,
        attributes=reading.attributes,
        whole_namespace=reading.whole_namespace,
        written=tuple(n for n in reading.written if n in chosen),
    )


# Packages a template must not import before forking: they start threads or
# initialize devices at import, which a forked child cannot inherit safely, or
# pick a GUI backend.  The worker imports them itself when the cell needs them.
_NEVER_PRELOAD = frozenset(
    {"torch", "tensorflow", "jax", "jaxlib", "cupy", "numba", "matplotlib", "ray", "dask",
     "distributed", "IPython", "ipykernel", "ipywidgets", "nbisolate", "zmq", "tornado"}
)


def user_packages(namespace: Mapping[str, Any]) -> list[str]:
    """Third-party top-level packages the notebook has imported (modules, or things from them).

    Only what the user imported counts, never what the kernel itself loaded,
    so the template imports nothing the user did not.

    Every notebook variable is looked at, so none is *touched*: only its type
    (``type()`` reads the object's header, never ``__class__``) and the
    ``__module__`` kept in that type's, a function's or a module's own
    dictionary.  A lazy proxy whose ``__class__`` raises or whose attribute
    access blocks runs none of its code here.
    """
    stdlib = getattr(sys, "stdlib_module_names", frozenset())
    found: dict[str, None] = {}
    for name, value in list(namespace.items()):
        if name.startswith("_"):
            continue
        module = _module_of(value)
        if not isinstance(module, str):
            continue
        top = module.partition(".")[0]
        if (
            top
            and top not in stdlib
            and top not in _NEVER_PRELOAD
            and top not in ("__main__", "builtins")
            and top in sys.modules
        ):
            found[top] = None
    return list(found)


# What a cell imports itself may also be preloaded when the kernel's own objects keep
# it out of user_packages: IPython (``exit`` is an IPython object in every notebook)
# and matplotlib (imported without a backend; the worker picks Agg at its start).
_FROM_CELLS_TOO = frozenset({"IPython", "matplotlib"})


def cell_packages(imports: Iterable[str]) -> list[str]:
    """The modules a cell imports that the template should import for the next cells.

    A plotting cell (``import matplotlib.pyplot as plt``) costs its worker
    about 0.4 s of imports, ``from IPython.display import HTML`` 50 ms, on
    every run: the template imports them once instead, once a cell has.  Only
    installed third-party packages count: a module of the user's own (a file
    beside the notebook) is imported by each worker afresh, so an edit to it
    shows in the next isolated cell as it always has.
    """
    stdlib = getattr(sys, "stdlib_module_names", frozenset())
    found = []
    for name in imports:
        top = name.partition(".")[0]
        if top in stdlib or (top in _NEVER_PRELOAD and top not in _FROM_CELLS_TOO):
            continue
        if _installed(top):
            found.append(name)
    return found


@functools.lru_cache(maxsize=256)
def _installed(top: str) -> bool:
    """Whether the top-level package ``top`` is installed (in site-packages), without importing it."""
    import importlib.util

    module = sys.modules.get(top)
    try:
        spec = module.__spec__ if module is not None else importlib.util.find_spec(top)
    except (ImportError, ValueError, AttributeError):
        return False
    origin = getattr(spec, "origin", None)
    if not origin or origin == "namespace":  # a namespace package: where its first part is
        origin = next(iter(getattr(spec, "submodule_search_locations", None) or ()), None)
    if not origin:
        return False
    return str(origin).startswith(_site_roots())


def own_sources(packages: Iterable[str]) -> dict[str, tuple[str, int, int]]:
    """The user's own modules among ``packages`` and their submodules, as loaded in this process:
    module name -> (source file, modification time in ns, size).

    The template imports a notebook's packages once and serves them to every
    worker after, while a module of the user's own (outside site-packages)
    may be edited and reloaded meanwhile (``importlib.reload``, ``%autoreload``).
    These are the files to watch for that (:meth:`TemplateLauncher.refresh`);
    installed packages are left out, as are compiled modules, which cannot be
    reloaded.
    """
    tops = {name.partition(".")[0] for name in packages}
    roots = _site_roots()
    found: dict[str, tuple[str, int, int]] = {}
    for name, module in list(sys.modules.items()):
        if name.partition(".")[0] not in tops:
            continue
        try:
            path = object.__getattribute__(module, "__dict__").get("__file__")
        except Exception:  # not a module after all (a lazy proxy): nothing to watch
            continue
        if not isinstance(path, str) or not path.endswith(".py") or path.startswith(roots):
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue
        found[name] = (path, st.st_mtime_ns, st.st_size)
    return found


@functools.lru_cache(maxsize=1)
def _site_roots() -> tuple[str, ...]:
    """Where installed packages live: this environment's site-packages, the system's and the user's."""
    import site
    import sysconfig

    paths = sysconfig.get_paths()
    roots = [paths.get("purelib"), paths.get("platlib")]
    try:
        roots += [*site.getsitepackages(), site.getusersitepackages()]
    except AttributeError:  # an embedded interpreter's site module may lack them
        pass
    return tuple(os.path.join(str(root), "") for root in dict.fromkeys(roots) if root)


_TYPE_MODULE = type.__dict__["__module__"]


def _module_of(value: Any) -> Any:
    """The module name a value comes from, read without running any of its code."""
    kind = type(value)
    try:
        if issubclass(kind, types.ModuleType):
            return object.__getattribute__(value, "__dict__").get("__name__")
        if kind in (types.FunctionType, types.BuiltinFunctionType):
            return object.__getattribute__(value, "__module__")
        if issubclass(kind, type):
            return _TYPE_MODULE.__get__(value)
        return _TYPE_MODULE.__get__(kind)
    except Exception:
        return None
