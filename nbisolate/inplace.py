"""In-place changes to inputs come back, as they would in an ordinary cell.

In a notebook, ``model.fit(X, y)``, ``history.append(loss)`` or ``cfg["lr"] = 0.1``
change an object the notebook holds: nothing is assigned, yet the next cell
sees the change. An isolated cell works on copies, so without this module such
a change would stay in the worker, silently: the model would come back unfitted.

How, in three steps and on both sides:

1. **The kernel picks what to watch** (:func:`watchable`): inputs of a type that
   can change in place (not ``int``, ``str``, ``tuple``..., not modules,
   functions or classes) whose shipment is small (:data:`WATCH_LIMIT`): watching
   costs one extra serialization of each before the cell and one after, so large
   data (a 400 MB array) is not watched, and the README says so.  The worker
   adds the notebook variables that the inputs' functions brought along
   (:func:`brought_along`: ``results`` of ``def run(x): results.append(x)``),
   which the cell does not name but changes by calling them.
2. **The worker compares** (:func:`snapshot` before the cell runs, :func:`changed`
   after): each watched input still bound to the object that arrived is
   serialized again with the same pickler, in the same process; different bytes
   mean it changed. Such a name goes back with the results, marked ``mutated``; a
   watched input that did not change does not go back at all, even when the cell
   might have bound it (``if False: x = 1``), so the notebook keeps its object.
3. **The kernel applies the change to its own object** (:func:`apply_in_place`):
   the contents of a list, dict, set, deque or bytearray, the attributes of an ordinary
   object (an estimator, a dataclass), the elements of a NumPy array of the same
   shape, the contents of a pandas DataFrame or Series, are replaced inside the notebook's object, so every other reference to
   it (``models[0]``, an alias) sees the change, as in an ordinary cell. Where
   that is not possible (a class with its own ``__setattr__``) the
   name is bound to the changed copy.  The objects inside an input keep their
   identity too: the worker notes where each one that holds state sat before the
   cell (:func:`identities`) and where those still inside sit after it
   (:func:`same_objects`); the kernel's own objects at those places take their
   changes in place and stand for their copies (:func:`keep_identities`), so
   ``est_a`` is fitted after ``for m in models.values(): m.fit(X, y)``.  An input
   whose objects were replaced by equal ones changed all the same (:func:`moved`).

A notebook function keeps state too: ``def log(x, seen=[])`` keeps what each
call appended to its default, and a closure (``def counter(): n = 0; def inc():
nonlocal n; n += 1``) keeps its variables.  The function travels as a copy,
defaults and closure included, so the worker also watches what the notebook
functions among the inputs keep (:func:`watch_functions`, :func:`functions_changed`);
what changed goes back under a name of its own (:data:`STATE` + ``"log.seen"``),
and the kernel sets it on the notebook's own function, in place where it can
(:func:`take_function_state`).

Standard library only: the worker imports it.
"""

from __future__ import annotations

import collections
import functools
import io
import struct
import sys
import threading
import types
import weakref
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any

WATCH_LIMIT = 1 << 20
"""Inputs whose shipment is larger than this (bytes) are not watched for in-place changes."""

TUPLE_ITEMS = 1_000
"""A tuple of more items is taken as a value: looking through it for one that can change would
cost every cell that sees it (a long tuple of numbers, a module's table)."""

_CONTAINERS = (list, dict, set, bytearray, collections.deque)
"""Containers whose contents :func:`apply_in_place` replaces inside the notebook's own object."""


def is_ndarray_type(kind: type) -> bool:
    """``kind`` is NumPy's ``ndarray`` itself (not a subclass), asked without importing NumPy."""
    return kind.__name__ == "ndarray" and kind.__module__ == "numpy"

_SYNC = (
    type(threading.Lock()), type(threading.RLock()), threading.Condition, threading.Event,
    threading.Semaphore, threading.Barrier,
)
"""Each process's own: an object holding one that takes the cell's change keeps the notebook's
(a thread of the kernel may hold or wait on it), and what the cell did to one stays in the worker."""

_UNCHANGEABLE = (
    int, float, complex, str, bytes, bool, type(None), range, frozenset, tuple,
    types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type,
    # What these carry changes, never they themselves: see watch_functions.
    types.MethodType, functools.partial,
    *_SYNC,
)


def watchable(values: Mapping[str, Any], sizes: Mapping[str, int]) -> list[str]:
    """The inputs worth watching: changeable in place, and small enough to compare cheaply."""
    return [name for name, value in values.items() if sizes.get(name, WATCH_LIMIT + 1) <= WATCH_LIMIT and changeable(value)]


def holds_state(value: Any) -> bool:
    """A value whose contents a cell changes in place and :func:`apply_in_place` can take: a
    list, dict, set, deque or bytearray (``Counter`` and its kin too), a NumPy array, a pandas DataFrame
    or Series, an object whose state is its ``__dict__``; not a function, a ufunc or another callable a module exports,
    nor the process's own state."""
    if not changeable(value):
        return False
    kind = type(value)
    if isinstance(value, _CONTAINERS) or is_ndarray_type(kind):
        return True
    if kind in _PANDAS or _pandas(kind):
        return True
    if isinstance(value, tuple):
        return len(value) <= TUPLE_ITEMS and any(holds_state(item) for item in value)
    return _plain_object(value) or _slot_names(value) is not None


def brought_along(ns: Mapping[str, Any], names: Iterable[str]) -> list[str]:
    """Of the notebook variables the inputs' functions brought into the worker (``results`` of
    ``def run(x): results.append(x)``), those worth watching: they hold state and are small.

    The cell does not name them, so the kernel did not pick them (:func:`watchable`); their
    size is not known before they are compared, so a cheap bound comes first: an object's own
    size (a list's or dict's table, an array's data) over :data:`WATCH_LIMIT` is not watched.
    """
    import sys

    out = []
    for name in names:
        value = ns.get(name)
        try:
            if holds_state(value) and sys.getsizeof(value) <= WATCH_LIMIT:
                out.append(name)
        except Exception:  # a __sizeof__ that fails: not watched
            pass
    return out


STATE = "\x00state\x00"
"""The result name of state a notebook function keeps that the cell changed: a default argument
(``STATE + "log.seen"``) or a variable of its closure (``STATE + "counter.n"``)."""

_SIMPLE = (int, float, complex, str, bytes, bool, type(None))
"""Values a closure's ``nonlocal n; n += 1`` rebinds: watched as values, not in place."""

Seen = dict[str, tuple[Any, Any, "bytes | None"]]
"""Before the cell, per :data:`STATE` name: the function, the value, and the value's image."""


def _defaults(function: types.FunctionType) -> dict[str, Any]:
    """A function's default arguments by parameter name (keyword-only ones included)."""
    code = function.__code__
    values = function.__defaults__ or ()
    positional = code.co_varnames[: code.co_argcount]
    # Defaults belong to the last parameters: pair both from the end.
    out = dict(zip(reversed(positional), reversed(values), strict=False))
    out.update(function.__kwdefaults__ or {})
    return out


def _closure(function: types.FunctionType) -> dict[str, Any]:
    """The cells of a function's closure by variable name."""
    return dict(zip(function.__code__.co_freevars, function.__closure__ or (), strict=False))


def _kept_state(function: Any) -> dict[str, Any]:
    """What a callable keeps between calls, by name: a function's defaults that hold state and
    the values of its closure that hold state or are plain values (``nonlocal n`` rebinds those);
    the object a method is bound to (``f = model.step``); a partial's arguments that hold state."""
    if isinstance(function, types.MethodType):
        out = {"__self__": function.__self__} if holds_state(function.__self__) else {}
    elif isinstance(function, functools.partial):
        out = {f"args[{i}]": value for i, value in enumerate(function.args) if holds_state(value)}
        out.update({f"keywords[{k}]": v for k, v in function.keywords.items() if holds_state(v)})
    else:
        out = {name: value for name, value in _defaults(function).items() if holds_state(value)}
        for name, cell in _closure(function).items():
            try:
                value = cell.cell_contents
            except ValueError:  # a variable not bound yet
                continue
            if isinstance(value, _SIMPLE) or holds_state(value):
                out[name] = value
    try:
        return {name: value for name, value in out.items() if sys.getsizeof(value) <= WATCH_LIMIT}
    except Exception:  # a __sizeof__ that fails: nothing of this function is watched
        return {}


def _functions(ns: Mapping[str, Any], names: Iterable[str]) -> Iterable[tuple[str, Any]]:
    """The notebook's functions among ``names``, and its bound methods and partials."""
    for name in names:
        function = ns.get(name)
        if (type(function) is types.FunctionType and function.__module__ == "__main__") or isinstance(
            function, (types.MethodType, functools.partial)
        ):
            yield name, function


def dispatch_registry(function: Any) -> tuple[tuple[Any, Any], ...] | None:
    """The implementations a ``functools.singledispatch`` function holds, by type, in the order
    they were registered (not the default one, for ``object``); None for any other callable."""
    registry = getattr(function, "registry", None)
    if type(registry) is not types.MappingProxyType or getattr(function, "__wrapped__", None) is None:
        return None
    if not callable(getattr(function, "register", None)):
        return None
    return tuple((kind, impl) for kind, impl in registry.items() if kind is not object)


REGISTRY = "registry"
"""The part of a ``singledispatch`` function's state that a cell changes with ``@f.register``."""


def watch_functions(ns: MutableMapping[str, Any], names: Iterable[str]) -> Seen:
    """Before the cell: the state the notebook functions among ``names`` keep, with its image;
    and the implementations of a ``singledispatch`` function (``@show.register`` in the cell
    registers one on the notebook's function, as an ordinary cell would)."""
    seen: Seen = {}
    for name, function in _functions(ns, names):
        for part, value in _kept_state(function).items():
            seen[f"{STATE}{name}.{part}"] = (function, value, image(value, ns))
        impls = dispatch_registry(function)
        if impls is not None:
            seen[f"{STATE}{name}.{REGISTRY}"] = (function, impls, None)
    return seen


def functions_changed(ns: MutableMapping[str, Any], seen: Seen) -> dict[str, Any]:
    """After the cell: by :data:`STATE` name, the state a function keeps that the cell rebound
    (a closure's ``nonlocal``) or changed in place, of functions still bound as they arrived."""
    out: dict[str, Any] = {}
    for key, (function, before, state) in seen.items():
        name, _, part = key[len(STATE):].rpartition(".")
        if ns.get(name) is not function:
            continue  # defined anew by the cell: it comes back itself
        if part == REGISTRY:
            impls = dispatch_registry(function)
            if impls != before:
                out[key] = impls
            continue
        now = _kept_state(function).get(part, before)
        if now is not before or (state is not None and image(now, ns) != state):
            out[key] = now
    return out


def take_function_state(ns: Mapping[str, Any], key: str, value: Any) -> bool:
    """In the kernel: the notebook function's own state takes what the cell left (a default in
    place, a closure's variable in place or rebound); False where it cannot."""
    name, _, part = key[len(STATE):].rpartition(".")
    function = ns.get(name)
    if isinstance(function, (types.MethodType, functools.partial)):
        mine = _kept_state(function).get(part, _NOTHING)
        return mine is not _NOTHING and apply_in_place(mine, value, {})
    if type(function) is not types.FunctionType:
        return False
    if part == REGISTRY:
        if dispatch_registry(function) is None:
            return False
        for kind, impl in value or ():
            if function.registry.get(kind) is not impl:
                function.register(kind, impl)
        return True
    cell = _closure(function).get(part)
    if cell is not None:
        try:
            if not (holds_state(cell.cell_contents) and apply_in_place(cell.cell_contents, value, {})):
                cell.cell_contents = value
            return True
        except (ValueError, AttributeError):
            return False
    default = _defaults(function).get(part, _NOTHING)
    return default is not _NOTHING and apply_in_place(default, value, {})


_NOTHING: Any = object()


def describe_state(key: str) -> str:
    """How a message names a function's state: ``seen, which log() keeps``."""
    name, _, part = key[len(STATE):].rpartition(".")
    return f"{name}.{part}" if part.startswith(("__self__", "args[", "keywords[")) else f"{part}, which {name}() keeps"


def changeable(value: Any) -> bool:
    """A value a cell may change in place (not an ``int``, a ``str``, a module, a function...).

    Not the process's own state (``os.environ``, ``sys.path``: :func:`nbisolate.travel.process_state`):
    each side's is its own, and what the cell changes of it comes back by :mod:`nbisolate.settings`.
    """
    from .travel import process_state

    if isinstance(value, tuple):  # ([1], {"a": 1}): its items can change, though it cannot
        return len(value) <= TUPLE_ITEMS and any(changeable(item) for item in value)
    return not isinstance(value, _UNCHANGEABLE) and process_state(value) is None


Path = tuple[tuple[str, Any], ...]
"""Where an object sits inside an input: ``("k", key)`` into a dict (or a weak dictionary's
values), ``("i", index)`` into a list or tuple, ``("a", name)`` into a plain object's attributes,
``("w", None)`` a weak reference's referent; ``()`` is the input itself."""

_WEAK = (weakref.ref, weakref.WeakValueDictionary, weakref.WeakKeyDictionary, weakref.WeakSet)
"""Weak references and containers: what they refer to travels with them (see
:mod:`nbisolate.byvalue`), and a change to it comes back to the notebook's own referents."""

WALK_LIMIT = 1_000
"""At most this many items inside one input are looked at for their identity (a list of many
numbers costs no more than this, and its numbers have none to keep)."""

_ATOMS = frozenset({int, float, complex, str, bytes, bool, type(None)})


def _inside(obj: Any) -> Iterator[tuple[tuple[str, Any], Any]]:
    kind = type(obj)
    if kind is weakref.ref:  # its referent, which the cell may change through it
        target = obj()
        return iter(()) if target is None else iter(((("w", None), target),))
    if isinstance(obj, dict) or kind is weakref.WeakValueDictionary:
        return ((("k", key), value) for key, value in list(obj.items()))
    if isinstance(obj, (list, tuple, collections.deque)):
        return ((("i", index), value) for index, value in enumerate(obj))
    if _plain_object(obj):
        return ((("a", name), value) for name, value in list(vars(obj).items()))
    slots = _slot_names(obj)
    if slots is not None:
        return ((("s", name), getattr(obj, name)) for name in slots if hasattr(obj, name))
    return iter(())


def _walk(value: Any) -> Iterator[tuple[Path, Any]]:
    """The objects inside ``value`` that hold state, each once with a path to it, breadth first."""
    seen = {id(value)}
    todo: collections.deque[tuple[Path, Any]] = collections.deque([((), value)])
    looked = 0
    while todo:
        path, obj = todo.popleft()
        for step, item in _inside(obj):
            looked += 1
            if looked > WALK_LIMIT:
                return
            if type(item) in _ATOMS or id(item) in seen or not _has_state(item):
                continue
            seen.add(id(item))
            yield (*path, step), item
            todo.append(((*path, step), item))


def _has_state(value: Any) -> bool:
    """:func:`holds_state` less its look at the process's own state, for the many items of a walk."""
    kind = type(value)
    if kind in _WEAK:
        return True
    if isinstance(value, _CONTAINERS) or is_ndarray_type(kind):
        return True
    if isinstance(value, tuple):
        return len(value) <= TUPLE_ITEMS and any(type(item) not in _ATOMS and _has_state(item) for item in value)
    if kind in _PANDAS or _pandas(kind):
        return True
    return not isinstance(value, _UNCHANGEABLE) and (_plain_object(value) or _slot_names(value) is not None)


def identities(value: Any) -> dict[int, tuple[Path, Any]]:
    """Before the cell: each object inside ``value`` that holds state, by id, with its path.

    The objects are kept with their paths, so no other object takes one's id while the cell
    runs.
    """
    return {id(obj): (path, obj) for path, obj in _walk(value)}


def same_objects(value: Any, before: Mapping[int, tuple[Path, Any]]) -> list[tuple[Path, Path]]:
    """After the cell: ``(path now, path before)`` of each object inside ``value`` that was inside
    it before the cell (``holder["q"]`` changed, ``log[0]`` moved to ``log[1]``), not of one the
    cell put there new (``holder["q"] = Q()``)."""
    out = []
    for path, obj in _walk(value):
        entry = before.get(id(obj))
        if entry is not None and entry[1] is obj:
            out.append((path, entry[0]))
    return out


def moved(value: Any, before: Mapping[int, tuple[Path, Any]]) -> bool:
    """After the cell: whether the objects inside ``value`` are other ones, or elsewhere, than
    before it, though its serialized state may be the same (``slots["x"] = Model()`` over an equal
    model): then it changed all the same."""
    found = 0
    for path, obj in _walk(value):
        entry = before.get(id(obj))
        if entry is None or entry[1] is not obj or entry[0] != path:
            return True
        found += 1
    return found != len(before)


def _at(obj: Any, path: Path) -> Any:
    for kind, key in path:
        if kind == "w":
            obj = obj()
            if obj is None:
                raise LookupError("a weak reference's referent is gone")
        else:
            obj = vars(obj)[key] if kind == "a" else getattr(obj, key) if kind == "s" else obj[key]
    return obj


def keep_identities(
    originals: Mapping[str, Any],
    values: Mapping[str, Any],
    pairs: Mapping[str, list[tuple[Path, Path]]],
    swap: dict[int, Any],
) -> None:
    """In the kernel, before the inputs take their change: each object that stayed inside a
    changed input (the estimator in ``models["a"]``, ``trainer.model``) takes its own change in
    place, and stands for its copy in ``swap``, so the input refers to the notebook's object as
    before and every other reference to that object (``est_a``) sees the change.

    All of them stand for their copies first (an object may refer back to its container); one
    that cannot take its change is then left out, and the others take theirs again, so that
    they refer to its changed copy instead.
    """
    found: list[tuple[Any, Any]] = []
    for name, original in originals.items():
        for now, before in pairs.get(name, ()):
            try:
                mine, theirs = _at(original, before), _at(values[name], now)
            except Exception:  # not where it was here: the input takes its change as a whole
                continue
            if type(mine) is type(theirs) and id(theirs) not in swap:
                found.append((mine, theirs))
                swap[id(theirs)] = mine
    while found:
        failed = {id(theirs) for mine, theirs in found if not apply_in_place(mine, theirs, swap)}
        if not failed:
            return
        for key in failed:
            del swap[key]
        found = [(mine, theirs) for mine, theirs in found if id(theirs) not in failed]


class _TooBig(Exception):
    pass


class _Bounded(io.BytesIO):
    def write(self, data: Any) -> int:
        if self.tell() + len(data) > 2 * WATCH_LIMIT:
            raise _TooBig
        return super().write(data)


def image(value: Any, main: MutableMapping[str, Any]) -> bytes | None:
    """The value serialized as the results would be (arrays in the stream): its state now."""
    from .ship import fast_pickler

    file = _Bounded()
    try:
        fast_pickler(file, None, main=main, returning=True).dump(value)
    except _TooBig:
        return None
    except Exception:  # only dill can write it (an object holding a lock): as it travels
        from .ship import dill_pickler

        file = _Bounded()
        try:
            dill_pickler(file, main=main, returning=True).dump(value)
        except Exception:  # too big, or not even dill can: not watched
            return None
    return file.getvalue()


def snapshot(
    ns: MutableMapping[str, Any], names: Iterable[str]
) -> dict[str, tuple[Any, bytes]]:
    """Before the cell runs: each watched input's object and its serialized state."""
    taken: dict[str, tuple[Any, bytes]] = {}
    for name in names:
        if name in ns:
            state = image(ns[name], ns)
            if state is not None:
                taken[name] = (ns[name], state)
    return taken


def changed(ns: MutableMapping[str, Any], taken: Mapping[str, tuple[Any, bytes]]) -> tuple[list[str], list[str]]:
    """After the cell ran: (watched inputs still bound to the object that arrived and changed
    in place, those still bound to it and unchanged)."""
    mutated: list[str] = []
    same: list[str] = []
    for name, (obj, before) in taken.items():
        if name not in ns or ns[name] is not obj:
            continue  # the cell bound the name to something else: an ordinary result
        (same if image(obj, ns) == before else mutated).append(name)
    return mutated, same


def apply_in_place(original: Any, new: Any, swap: Mapping[int, Any]) -> bool:
    """Make ``original`` hold what ``new`` holds; False where that cannot be done.

    ``swap`` maps the id of each changed copy to the notebook's original, so a
    changed input that refers to another (``b = {"a": a}``) refers to the
    notebook's own object afterwards.
    """
    if new is original:  # it came back as the notebook's own (the process's state): nothing to do
        return True
    kind = type(original)
    if kind is not type(new):
        return False

    def own(value: Any) -> Any:
        return swap.get(id(value), value)

    try:
        # Item by item, not update(): a subclass may give update another meaning (Counter's
        # counts what it is given), and its own item assignment keeps its order (OrderedDict).
        if kind is weakref.ref:
            # The notebook's reference stays; its referent takes the change made through it.
            mine, theirs = original(), new()
            if mine is None or theirs is None:
                return mine is theirs
            return own(theirs) is mine or apply_in_place(mine, theirs, swap)
        if kind in _WEAK:
            original.clear()
            if isinstance(original, weakref.WeakSet):
                for v in new:
                    original.add(own(v))
            else:
                for k, v in new.items():
                    original[own(k)] = own(v)
        elif isinstance(original, list):
            original[:] = [own(v) for v in new]
        elif isinstance(original, collections.deque):
            if original.maxlen != new.maxlen:
                return False
            original.clear()
            original.extend(own(v) for v in new)
        elif isinstance(original, dict):
            original.clear()
            for k, v in new.items():
                original[k] = own(v)
        elif isinstance(original, (set, bytearray)):
            if isinstance(original, set):
                original.clear()
                for v in new:
                    original.add(v)
            else:
                original[:] = new
        elif isinstance(original, tuple):
            # Its items are the same objects as before the cell (a tuple's cannot be replaced):
            # each takes its own change in place, or was an equal value all along.
            if len(original) != len(new):
                return False
            for before, after in zip(original, new, strict=True):
                if not (own(after) is before or _equal(before, after) or apply_in_place(before, after, swap)):
                    return False
        elif is_ndarray_type(kind):
            if original.shape != new.shape or original.dtype != new.dtype or not original.flags.writeable:
                return False
            original[...] = new
        elif kind in _PANDAS or _pandas(kind):
            _take_pandas(original, new)
        elif _plain_object(original):
            state = original.__dict__
            kept = {k: v for k, v in state.items() if isinstance(v, _SYNC)}
            state.clear()
            state.update((k, kept[k] if _same_kind(kept.get(k), v) else own(v)) for k, v in new.__dict__.items())
            _wake(kept.values())
        elif (slots := _slot_names(original)) is not None:
            for name in slots:
                if hasattr(new, name):
                    mine, theirs = getattr(original, name, None), getattr(new, name)
                    setattr(original, name, mine if isinstance(mine, _SYNC) and _same_kind(mine, theirs) else own(theirs))
                elif hasattr(original, name):
                    delattr(original, name)
        else:
            return False
    except Exception:
        return False
    return True


def _wake(kept: Iterable[Any]) -> None:
    """Wake the kernel's threads waiting on the conditions of an object that took a change
    (a consumer in ``queue.get()`` of a queue the cell put items in), as the cell's own
    ``put`` would have; each checks again what it waits for. A condition another thread
    holds now is left alone: that thread sees the change when it looks."""
    for condition in kept:
        if isinstance(condition, threading.Condition) and condition.acquire(blocking=False):
            try:
                condition.notify_all()
            finally:
                condition.release()


def _same_kind(mine: Any, theirs: Any) -> bool:
    """``mine`` (a lock, an event...) stands for ``theirs``, its copy: the notebook keeps its own."""
    return mine is not None and type(mine) is type(theirs)


def _equal(a: Any, b: Any) -> bool:
    """``a == b`` as a plain truth (an array's comparison, or one that raises, is not)."""
    try:
        return type(a) is type(b) and (a == b) is True
    except Exception:
        return False


def _slot_names(obj: Any) -> list[str] | None:
    """The slots of an object whose whole state is in them (a class with ``__slots__``, an
    ``attrs`` or ``dataclass(slots=True)`` class), set without a custom ``__setattr__``; None
    for any other object."""
    kind = type(obj)
    if kind.__setattr__ is not object.__setattr__ or kind.__dictoffset__ or isinstance(obj, type):
        return None
    names = [
        name
        for klass in kind.__mro__[:-1]
        for name, member in vars(klass).items()
        if isinstance(member, types.MemberDescriptorType)
    ]
    weakref = 1 if kind.__weakrefoffset__ > 0 else 0  # in the object itself before Python 3.12
    if not names or kind.__basicsize__ != object.__basicsize__ + _POINTER * (len(names) + weakref):
        return None  # state kept in C as well (a subclass of a C type): not only its slots
    return names


_POINTER = struct.calcsize("P")

_PANDAS: set[type] = set()
"""pandas' DataFrame and Series types, once met (pandas is never imported here)."""


def _pandas(kind: type) -> bool:
    if kind.__name__ in ("DataFrame", "Series") and kind.__module__ in ("pandas", "pandas.core.frame", "pandas.core.series"):
        _PANDAS.add(kind)
        return True
    return False


def _take_pandas(original: Any, new: Any) -> None:
    """A DataFrame or Series takes what a changed copy holds, staying the notebook's object.

    Its contents are its block manager (``_mgr``): the copy's becomes the
    original's, with the copy's ``attrs``, ``flags`` and (a Series) name, and the
    column cache pandas 2 keeps is emptied, so ``alias = df`` and ``bag["s"]``
    see ``df["y"] = 2`` and ``bag["s"][0] = 9`` as after an ordinary cell. These are
    pandas' own fields (pandas 2 and 3 alike); a pandas without them raises, and the
    name is bound to the changed copy as before.
    """
    fields = {"_mgr": new._mgr, "_attrs": dict(new.attrs)}
    flags = new.flags
    fields["_flags"] = type(flags)(original, allows_duplicate_labels=flags.allows_duplicate_labels)
    if type(original).__name__ == "Series":
        fields["_name"] = new.name
    original._mgr  # noqa: B018 - the field must be there before anything is set
    for field, value in fields.items():
        object.__setattr__(original, field, value)
    clear = getattr(original, "_clear_item_cache", None)  # pandas 2: columns handed out before
    if clear is not None:
        clear()


class _Reference:
    """A class with nothing but a ``__dict__``: the size its instances have without C state."""


def _plain_object(obj: Any) -> bool:
    """An object whose whole state is its ``__dict__``, set without a custom ``__setattr__``.

    A subclass of a C type (``random.Random``, an exception) keeps state outside its
    ``__dict__``: its instances are larger than :class:`_Reference`'s, and such an
    object is rebound rather than half updated.
    """
    kind = type(obj)
    if kind.__setattr__ is not object.__setattr__ or not hasattr(obj, "__dict__"):
        return False
    if kind.__basicsize__ != _Reference.__basicsize__ or kind.__itemsize__:
        return False
    for klass in kind.__mro__[:-1]:
        slots = klass.__dict__.get("__slots__")
        if slots and set([slots] if isinstance(slots, str) else slots) - {"__dict__", "__weakref__"}:
            return False
    return not isinstance(obj, (type, types.ModuleType, types.FunctionType))
