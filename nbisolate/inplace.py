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
   the contents of a list, dict, set or bytearray, the attributes of an ordinary
   object (an estimator, a dataclass), the elements of a NumPy array of the same
   shape, are replaced inside the notebook's object, so every other reference to
   it (``models[0]``, an alias) sees the change, as in an ordinary cell. Where
   that is not possible (a DataFrame, a class with its own ``__setattr__``) the
   name is bound to the changed copy.

A notebook function's default arguments are state too: ``def log(x, seen=[])``
keeps what each call appended, and so does ``def fib(n, memo={})``.  The function
travels as a copy, defaults included, so the worker also watches the defaults of
the functions among the inputs (:func:`defaults_of`); one that changed goes back
under a name of its own (:data:`DEFAULT` + ``"log.seen"``) and the kernel changes
the notebook's default object in place (:func:`default_in`).

Standard library only: the worker imports it.
"""

from __future__ import annotations

import io
import types
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

WATCH_LIMIT = 1 << 20
"""Inputs whose shipment is larger than this (bytes) are not watched for in-place changes."""

_UNCHANGEABLE = (
    int, float, complex, str, bytes, bool, type(None), range, frozenset, tuple,
    types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type,
)


def watchable(values: Mapping[str, Any], sizes: Mapping[str, int]) -> list[str]:
    """The inputs worth watching: changeable in place, and small enough to compare cheaply."""
    return [name for name, value in values.items() if sizes.get(name, WATCH_LIMIT + 1) <= WATCH_LIMIT and changeable(value)]


def holds_state(value: Any) -> bool:
    """A value whose contents a cell changes in place and :func:`apply_in_place` can take: a
    list, dict, set or bytearray (``Counter`` and its kin too), a NumPy array, an object whose
    state is its ``__dict__``; not a function, a ufunc or another callable a module exports,
    nor the process's own state."""
    if not changeable(value):
        return False
    kind = type(value)
    if isinstance(value, (list, dict, set, bytearray)) or (kind.__name__ == "ndarray" and kind.__module__ == "numpy"):
        return True
    return _plain_object(value)


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


DEFAULT = "\x00default\x00"
"""The result name of a function's default argument the cell changed: ``DEFAULT + "log.seen"``."""


def _defaults(function: types.FunctionType) -> dict[str, Any]:
    """A function's default arguments by parameter name (keyword-only ones included)."""
    code = function.__code__
    values = function.__defaults__ or ()
    positional = code.co_varnames[: code.co_argcount]
    out = dict(zip(positional[max(0, len(positional) - len(values)):], values[-len(positional):] if positional else (), strict=False))
    out.update(function.__kwdefaults__ or {})
    return out


def defaults_of(ns: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The default arguments worth watching of the notebook functions among ``names``, by result
    name: those that hold state (``seen=[]``) and whose own size is within :data:`WATCH_LIMIT`."""
    import sys

    out: dict[str, Any] = {}
    for name in names:
        function = ns.get(name)
        if type(function) is not types.FunctionType or function.__module__ != "__main__":
            continue
        for parameter, value in _defaults(function).items():
            try:
                if holds_state(value) and sys.getsizeof(value) <= WATCH_LIMIT:
                    out[f"{DEFAULT}{name}.{parameter}"] = value
            except Exception:  # a __sizeof__ that fails: not watched
                pass
    return out


def default_in(ns: Mapping[str, Any], key: str) -> Any:
    """The object a :data:`DEFAULT` result name names in ``ns`` (the function's default as it is
    there), or None when the name is no function there with such a default."""
    name, _, parameter = key[len(DEFAULT):].rpartition(".")
    function = ns.get(name)
    if type(function) is not types.FunctionType:
        return None
    return _defaults(function).get(parameter)


def describe_default(key: str) -> str:
    """How a message names a default argument's result: ``the default of seen in log()``."""
    name, _, parameter = key[len(DEFAULT):].rpartition(".")
    return f"the default of {parameter} in {name}()"


def changeable(value: Any) -> bool:
    """A value a cell may change in place (not an ``int``, a ``str``, a module, a function...).

    Not the process's own state (``os.environ``, ``sys.path``: :func:`nbisolate.travel.process_state`):
    each side's is its own, and what the cell changes of it comes back by :mod:`nbisolate.settings`.
    """
    from .travel import process_state

    return not isinstance(value, _UNCHANGEABLE) and process_state(value) is None


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
    except Exception:  # too big, or only dill can write it: not watched
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
        if isinstance(original, list):
            original[:] = [own(v) for v in new]
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
        elif kind.__name__ == "ndarray" and kind.__module__ == "numpy":
            if original.shape != new.shape or original.dtype != new.dtype or not original.flags.writeable:
                return False
            original[...] = new
        elif _plain_object(original):
            state = original.__dict__
            state.clear()
            state.update((k, own(v)) for k, v in new.__dict__.items())
        else:
            return False
    except Exception:
        return False
    return True


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
