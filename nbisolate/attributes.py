"""What a cell sets on a module, a class or a function means what it means in an ordinary cell.

``config.LR = 0.1``, ``Counter.seen += 1``, ``torch.backends.cudnn.benchmark = True``,
``train.calls = 0``: an ordinary cell changes an object the whole notebook shares.  Such
objects never travel as copies: a module is imported again on the other side, and a class or
a function comes back as the notebook's own (its identity is the point).  So without this
module what an isolated cell set on them would stay in the worker, and what the notebook had
set on a module would be missing there (the worker imports the module's file afresh).

Both ways, by the text of the cells:

1. **Back** (:func:`watch` and :func:`changed` in the worker, :func:`apply` in the kernel).
   The plan lists the cell's ``X.a.b = ...``, ``X.a += ...``, ``del X.a`` and
   ``setattr(X, "a", ...)``, then the attributes it may change in place, ``X.a.append(...)``
   and ``X.a[k] = ...`` (:func:`nbisolate.plan.attribute_uses`).  Before the cell the worker
   notes each attribute whose owner (``X``, ``X.a``: modules, classes and functions all the
   way) it can reach, with its value's state when that can change in place
   (:func:`nbisolate.inplace.image`); after it, each one rebound, deleted or changed goes
   back with the results, under a name of its own (:data:`PREFIX`), and the kernel sets it
   on its own object, or puts the change into the value it has (``config.LAYERS`` stays the
   list every other reference holds).  An owner the cell imported itself had no value
   before: its attribute goes back.
2. **There** (:class:`Registry` in the kernel, :func:`patch` in the worker).  The kernel
   remembers every attribute that a cell, ordinary or isolated, set (or changed in place) on
   a module or on a class or function defined in one, and sends each one's value as it is now with every isolated
   cell; the worker sets it on its module as that module is imported, at once when it is
   imported already.  Classes and functions of the notebook itself need no such help: they
   travel by value, their attributes with them.

Not followed: what a function the cell calls sets or changes (unseen in the cell's text), the
attributes of instances (those travel as copies: :mod:`nbisolate.inplace` brings their changes
back), and
``sys``, ``os``, ``builtins`` and ``__main__``, whose state travels its own ways
(:mod:`nbisolate.settings`, the namespace).

Standard library only: the worker imports it.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import inplace

PREFIX = "\x00attribute\x00"
"""The result name of an attribute a cell set: ``PREFIX + "config.LR"`` (no variable has a NUL)."""

Chain = tuple[str, ...]
"""A variable and the attributes after it: ``("config", "LR")`` for ``config.LR``."""

_MISSING: Any = object()
_NOT_FOLLOWED = frozenset({"sys", "os", "posix", "builtins", "__main__", "nbisolate"})


def shared(obj: Any) -> bool:
    """A module, a class or a function: an object that arrives as the other side's own."""
    if isinstance(obj, types.ModuleType):
        name = obj.__dict__.get("__name__")
        return isinstance(name, str) and name.partition(".")[0] not in _NOT_FOLLOWED
    return isinstance(obj, (type, types.FunctionType))


def owner(ns: Mapping[str, Any], chain: Chain) -> Any:
    """The object whose attribute ``chain`` names, if every step to it is shared; else ``_MISSING``.

    Only modules, classes and functions are looked into, so no instance's property runs here.
    """
    obj = ns.get(chain[0], _MISSING)
    for part in chain[1:-1]:
        if not shared(obj):
            return _MISSING
        try:
            obj = getattr(obj, part)
        except Exception:
            return _MISSING
    return obj if shared(obj) else _MISSING


def _value(obj: Any, attribute: str) -> Any:
    try:
        return getattr(obj, attribute)
    except Exception:
        return _MISSING


def name_of(chain: Chain) -> str:
    """The result name under which the attribute ``chain`` goes back."""
    return PREFIX + ".".join(chain)


def chain_of(name: str) -> Chain | None:
    """The chain of a result name from :func:`name_of`; None for a variable's name."""
    return tuple(name[len(PREFIX):].split(".")) if name.startswith(PREFIX) else None


def describe(name: str) -> str:
    """How a message names a result: ``the attribute config.LR`` or ``result 'x'``."""
    if name.startswith(inplace.STATE):
        return inplace.describe_state(name)
    chain = chain_of(name)
    return f"the attribute {'.'.join(chain)}" if chain else f"result {name!r}"


# -- back: in the worker, then in the kernel ------------------------------------------------
Seen = dict[Chain, tuple[Any, Any, "bytes | None"]]
"""Before the cell, per chain: its owner, its value, and that value's serialized state when the
cell may change it in place (:func:`nbisolate.inplace.image`), else None."""


def watch(ns: dict[str, Any], chains: Iterable[Chain]) -> Seen:
    """Before the cell: each attribute's owner, value and state (``_MISSING`` for what is not there yet)."""

    seen: Seen = {}
    for chain in chains:
        chain = tuple(chain)
        obj = owner(ns, chain)
        value = _MISSING if obj is _MISSING else _value(obj, chain[-1])
        state = inplace.image(value, ns) if value is not _MISSING and inplace.holds_state(value) else None
        seen[chain] = (obj, value, state)
    return seen


def changed(ns: dict[str, Any], seen: Seen) -> tuple[dict[str, Any], list[str], list[str]]:
    """After the cell: the attributes rebound or changed in place (by result name, with their
    values), the names of those deleted, and of those changed in place (among the first)."""

    values: dict[str, Any] = {}
    deleted: list[str] = []
    in_place: list[str] = []
    for chain, (before_owner, before, state) in seen.items():
        obj = owner(ns, chain)
        if obj is _MISSING:
            continue
        now = _value(obj, chain[-1])
        if obj is before_owner and now is before:
            if state is not None and inplace.image(now, ns) != state:  # config.LAYERS.append(3)
                values[name_of(chain)] = now
                in_place.append(name_of(chain))
            continue
        if now is not _MISSING:
            values[name_of(chain)] = now
        elif before is not _MISSING or obj is not before_owner:
            deleted.append(name_of(chain))
    return values, deleted, in_place


def apply(
    ns: Mapping[str, Any],
    values: Mapping[str, Any],
    deleted: Iterable[str],
    registry: Registry | None = None,
    in_place: Iterable[str] = (),
) -> list[str]:
    """In the kernel: set (or delete) each attribute on the notebook's own object; one the cell
    changed in place (``in_place``) takes the change into the object the notebook has, so every
    other reference to it sees it (:func:`nbisolate.inplace.apply_in_place`).

    Returns what could not be set, as sentences.  Each one set is remembered in
    ``registry``, so the next isolated cell finds it there too.
    """

    problems: list[str] = []
    changed_in_place = set(in_place)
    todo = [(name, values[name]) for name in values] + [(name, _MISSING) for name in deleted]
    for name, value in todo:
        chain = chain_of(name)
        if chain is None:
            continue
        where = ".".join(chain)
        obj = owner(ns, chain)
        if obj is _MISSING:
            problems.append(f"the cell set {where}, but {'.'.join(chain[:-1])} is no module, class or function here")
            continue
        try:
            if value is _MISSING:
                if _value(obj, chain[-1]) is not _MISSING:
                    delattr(obj, chain[-1])
            elif name not in changed_in_place or not inplace.apply_in_place(_value(obj, chain[-1]), value, {}):
                setattr(obj, chain[-1], value)
        except Exception as exc:
            problems.append(f"the cell set {where}, which the kernel could not take ({type(exc).__name__}: {exc})")
            continue
        if registry is not None:
            registry.record(obj, chain[-1])
    return problems


# -- the notebook's own classes: what their methods set on them ------------------------------
# ``class Particle: count = 0; def __init__(self): Particle.count += 1``: a cell that makes
# particles changes the class from inside a method, where its text shows nothing.  The
# notebook's classes travel as copies, so the kernel names those the inputs bring (a class,
# or an instance's class, bound in the notebook under its own name: :func:`class_roots`) and
# the worker compares their data attributes (:func:`watch_classes`, :func:`classes_changed`).


def class_roots(ns: Mapping[str, Any], inputs: Iterable[str]) -> dict[str, str]:
    """In the kernel: for each notebook class an input is or is an instance of, bound in ``ns``
    under its own name, that name and the input that brings it."""
    roots: dict[str, str] = {}
    for name in inputs:
        value = ns.get(name)
        kind = value if isinstance(value, type) else type(value)
        root = getattr(kind, "__name__", None)
        if kind.__module__ == "__main__" and isinstance(root, str) and root not in roots and ns.get(root) is kind:
            roots[root] = name
    return roots


def _data(kind: type) -> dict[str, Any]:
    """A class's own data attributes: not its dunders, methods, properties or nested classes."""
    return {
        name: value
        for name, value in vars(kind).items()
        if not (name.startswith("__") and name.endswith("__"))
        and not hasattr(type(value), "__get__")
        and not isinstance(value, type)
    }


ClassWatch = tuple[dict[str, type], Seen, dict[str, frozenset[str]]]
"""What :func:`watch_classes` took: each class by its notebook name, its attributes as
:func:`watch` saw them, and the names of its data attributes then."""


def watch_classes(ns: Mapping[str, Any], roots: Mapping[str, str]) -> ClassWatch:
    """In the worker, before the cell: the data attributes of the classes :func:`class_roots` named."""
    classes: dict[str, type] = {}
    for root, name in roots.items():
        value = ns.get(name)
        kind = value if isinstance(value, type) else type(value)
        if kind.__module__ == "__main__":
            classes[root] = kind
    names = {root: frozenset(_data(kind)) for root, kind in classes.items()}
    seen = watch(classes, [(root, attribute) for root in classes for attribute in names[root]])
    return classes, seen, names


def classes_changed(ns: Mapping[str, Any], watched: ClassWatch) -> tuple[dict[str, Any], list[str], list[str]]:
    """After the cell: as :func:`changed`, for the classes' attributes, and those added to them;
    not for a class whose name the cell bound to something else (it comes back itself)."""
    classes, seen, names = watched
    kept = {root: kind for root, kind in classes.items() if ns.get(root, kind) is kind}
    values, deleted, in_place = changed(kept, {c: v for c, v in seen.items() if c[0] in kept})
    for root, kind in kept.items():
        for attribute, value in _data(kind).items():
            if attribute not in names[root]:
                values[name_of((root, attribute))] = value
    return values, deleted, in_place


# -- there: the kernel remembers, the worker sets --------------------------------------------
Patch = tuple[str, str, str]
"""Where an attribute lives: (module, qualified name of a class or function in it or "", attribute)."""


def home(obj: Any) -> tuple[str, str] | None:
    """(module, qualified name) of a module, or of a class or function defined at a module's
    top level; None for the notebook's own (they travel by value) and for local ones."""
    if isinstance(obj, types.ModuleType):
        return (obj.__name__, "") if shared(obj) else None
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<locals>" in qualname:
        return None
    if module.partition(".")[0] in _NOT_FOLLOWED or module not in sys.modules:
        return None
    return module, qualname


def _resolve(module: types.ModuleType, qualname: str) -> Any:
    obj: Any = module
    for part in filter(None, qualname.split(".")):
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            break
    return obj


class Registry:
    """The attributes cells set on modules, and on classes and functions defined in modules.

    Kept by the kernel for its session; :meth:`current` reads each one's value as it is when
    an isolated cell starts (``_MISSING`` once deleted), so a later change in an ordinary cell
    travels too.
    """

    def __init__(self) -> None:
        self._set: dict[Patch, None] = {}
        self._failed: set[Patch] = set()

    def first_failure(self, where: Patch) -> bool:
        """True the first time an attribute fails to travel: it is said once, not every cell."""
        if where in self._failed:
            return False
        self._failed.add(where)
        return True

    def __len__(self) -> int:
        return len(self._set)

    def record(self, obj: Any, attribute: str) -> None:
        where = home(obj)
        if where is not None:
            self._set[(*where, attribute)] = None

    def note(self, ns: Mapping[str, Any], stored: Iterable[Chain], touched: Iterable[Chain] = ()) -> None:
        """An ordinary cell ran: remember what its text set (``stored``) or may have changed in
        place (``touched``, if its value can change) on shared objects of a module."""

        for chain, always in [*((c, True) for c in stored), *((c, False) for c in touched)]:
            obj = owner(ns, tuple(chain))
            if obj is not _MISSING and (always or inplace.holds_state(_value(obj, chain[-1]))):
                self.record(obj, chain[-1])

    def current(self) -> list[tuple[Patch, Any]]:
        """Each remembered attribute with its value now (``_MISSING``: deleted since)."""
        out: list[tuple[Patch, Any]] = []
        for where in self._set:
            module = sys.modules.get(where[0])
            if module is None:
                continue
            obj = _resolve(module, where[1])
            if obj is not _MISSING:
                out.append((where, _value(obj, where[2])))
        return out


registry = Registry()
"""The kernel's: every isolated cell sends what it remembers (:meth:`CellRun._patches`)."""


def is_missing(value: Any) -> bool:
    return value is _MISSING


def patch(patches: Iterable[tuple[Patch, Callable[[], Any] | None]]) -> None:
    """In the worker: set each attribute the notebook set, on its module as it is imported.

    Each patch comes with a function that loads its value (None: the attribute was deleted
    in the notebook).  A module imported already takes its patches at once; the others when
    the cell (or an input's loading) imports them, through a finder placed first on
    ``sys.meta_path`` for just those modules.
    """
    later: dict[str, list[tuple[Patch, Callable[[], Any] | None]]] = {}
    for item in patches:
        module = sys.modules.get(item[0][0])
        if module is not None:
            _set_on(module, [item])
        else:
            later.setdefault(item[0][0], []).append(item)
    if later:
        sys.meta_path.insert(0, _PatchOnImport(later))


def _set_on(module: types.ModuleType, items: Iterable[tuple[Patch, Callable[[], Any] | None]]) -> None:
    for (_, qualname, attribute), load in items:
        try:
            obj = _resolve(module, qualname)
            if obj is _MISSING:
                continue
            if load is None:
                if _value(obj, attribute) is not _MISSING:
                    delattr(obj, attribute)
            else:
                setattr(obj, attribute, load())
        except Exception:
            pass  # as it is in the module's file: the cell meets what it would have met before


class _PatchOnImport:
    """A ``sys.meta_path`` finder that lets the others find a module, then patches it once it ran."""

    def __init__(self, pending: dict[str, list[tuple[Patch, Callable[[], Any] | None]]]) -> None:
        self.pending = pending

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        # Taken first: another finder asked below may look the name up again (through us).
        items = self.pending.pop(name, None)
        if items is None:
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _Patching(spec.loader, items)
                if not self.pending and self in sys.meta_path:
                    sys.meta_path.remove(self)
            return spec
        self.pending[name] = items  # not found now: perhaps once the cell changed sys.path
        return None


class _Patching:
    """A module's own loader, which patches the module after running it and then steps aside."""

    def __init__(self, loader: Any, items: list[tuple[Patch, Callable[[], Any] | None]]) -> None:
        self._loader = loader
        self._items = items

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        try:
            module.__loader__ = self._loader
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self._loader
        except Exception:
            pass
        _set_on(module, self._items)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)
