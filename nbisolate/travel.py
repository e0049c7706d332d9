"""How a value travels to a worker: the one decision :mod:`nbisolate.ship` makes, and its label.

:func:`nbisolate.ship.dumps` asks :func:`route` about every module, function
and class it meets and does what the answer says, so the label a user sees
(the panel's "travels as" column, ``Shipment.how``) and what really happened
cannot disagree; ``%pickle_check`` asks the same function to know which
notebook objects still go by name under ``%%isolate``.

The routes, and the CPython/pickle behaviour behind each:

``MODULE``
    A module object is never pickled (the C pickler refuses modules, and
    dill would copy a local module's whole namespace). It becomes
    ``importlib.import_module(name)`` in the worker, which works when the
    module is in ``sys.modules`` under its own name (:func:`module_is_importable`).
``REFERENCE``
    Pickle's default for functions and classes is *by reference*:
    ``save_global`` writes ``module`` and ``qualname`` and the loader does
    ``getattr(import_module(module), qualname)``. That is right whenever a
    fresh interpreter can find the object by that name (:func:`found_by_name`,
    the same test as cloudpickle's ``_should_pickle_by_reference``: the name
    must lead back to the very same object). Builtin functions always reduce to
    a name, and so do importable ``typing.TypeVar``/``ParamSpec``/``TypeVarTuple``
    objects and the members of an importable ``Enum``. A variable bound to the
    process's own state (``os.environ``, ``matplotlib.rcParams``:
    :data:`PROCESS_STATE`) goes by reference too, as the other process's own.
``PICKLE`` / ``DIRECT_COPY``
    Everything else takes the C pickler's own path (``__reduce_ex__(5)``).
    Objects that support protocol 5 (numpy arrays, pandas blocks) hand their
    memory to ``buffer_callback`` as out-of-band buffers instead of copying it
    into the stream. When a shipment's buffers add up to
    :data:`nbisolate.wire.SHM_THRESHOLD` or more (on Linux), they do not go
    through the socket: the kernel copies them straight into the worker's
    memory (:func:`nbisolate.ship.place`), or they go through one shared
    anonymous memfd where that copy is refused or the notebook runs on
    (``--bg``): such a value is labelled ``DIRECT_COPY``. That depends on the
    whole shipment, so it is decided after serialization
    (``Shipment.routes``), never guessed per value.
``BY_VALUE``
    What a fresh interpreter cannot find by name -- a function or class
    defined in the notebook (``__main__``), a lambda, a closure, a class made
    inside a function, a notebook ``Enum`` or ``TypeVar``, a module made at
    run time -- travels by value through :mod:`nbisolate.byvalue`
    (cloudpickle, with the notebook namespace as the worker's ``__main__`` and
    identity kept both ways), in the same stream and memo as everything else:
    a factory and the class it builds arrive as one.
``OPEN_FILE``
    An open file is the same file in the worker, opened again at the same
    place and never truncated, and the notebook's file moves on to where the
    cell left it (:mod:`nbisolate.openfiles`).
``DILL``
    When the fast path cannot serialize a variable at all (a lock, a value
    holding a pipe), that variable alone is written by dill and
    embedded in the fast stream (:class:`nbisolate.ship._ByDill`); the others
    keep the fast path and its meaning. Modules are still re-imported and
    arrays still out of band.

Standard library only at import (dill and numpy are never imported here), as
the worker imports it through :mod:`nbisolate.ship`.
"""

from __future__ import annotations

import enum
import functools
import sys
import types
import typing
from typing import Any, NamedTuple

from .openfiles import FILE_TYPES


class Route(str, enum.Enum):
    """The path a value takes; the value of each member is its short label."""

    MODULE = "module (re-imported)"
    REFERENCE = "by reference"
    PICKLE = "pickle"
    DIRECT_COPY = "pickle + direct copy"
    BY_VALUE = "by value"
    OPEN_FILE = "same file, opened again"
    DILL = "dill"

    def __str__(self) -> str:
        return self.value


LABELS: dict[Route, str] = {member: member.value for member in Route}
"""Route -> label, as a plain dict: ``Route.value`` is a descriptor, this is a lookup."""

# Instances that pickle as a bare name: their ``__reduce__`` returns a string,
# which makes pickle write a global reference ``module.name``.
NAMED_INSTANCE_TYPES: tuple[type, ...] = tuple(
    t
    for t in (
        getattr(typing, "TypeVar", None),
        getattr(typing, "ParamSpec", None),
        getattr(typing, "TypeVarTuple", None),
    )
    if isinstance(t, type)
)


def module_is_importable(module: types.ModuleType) -> bool:
    """A module a worker can import again by its name (``sys.modules[name] is module``)."""
    name = getattr(module, "__name__", None)
    return bool(name) and name != "__main__" and sys.modules.get(name) is module


def _lookup(obj: Any) -> tuple[str, Any] | None:
    """``(module, found)``: what ``getattr(sys.modules[module], qualname)`` gives for ``obj``.

    None when ``obj`` has no usable module/qualname or the walk breaks; a
    ``<lambda>`` or ``<locals>`` part can never be looked up by a loader.
    This is what pickle's ``save_global`` does, and what the worker's loader
    will do with the name.
    """
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if not module or not qualname or type(module) is not str or type(qualname) is not str:
        return None
    if "<" in qualname:  # <lambda>, <locals>: no loader can look these up
        return None
    found: Any = _modules.get(module)
    if found is None:
        return None
    if "." not in qualname:
        found = getattr(found, qualname, None)
    else:
        for part in qualname.split("."):
            found = getattr(found, part, None)
            if found is None:
                return None
    return None if found is None else (module, found)


def found_by_name(obj: Any) -> bool:
    """True when a fresh interpreter finds ``obj`` by its module and qualified name.

    The name must lead back to ``obj`` itself (a class replaced by a later
    cell, or renamed, is not found), and the module must not be ``__main__``
    (a worker's ``__main__`` is not the notebook) nor a dunder pseudo-module.
    """
    hit = _lookup(obj)
    return hit is not None and hit[1] is obj and not hit[0].startswith("__")


def needs_value(obj: Any) -> bool:
    """True when a function or class cannot be found by name in a fresh interpreter."""
    return not found_by_name(obj)


# Members read once: ``Route.MODULE`` goes through the enum metaclass (~50 ns),
# and route() runs for every module, function and class a shipment holds.
_MODULE, _REFERENCE, _PICKLE = Route.MODULE, Route.REFERENCE, Route.PICKLE
_BY_VALUE, _DILL, _OPEN_FILE = Route.BY_VALUE, Route.DILL, Route.OPEN_FILE
CACHED_FUNCTION = type(functools.lru_cache(maxsize=None)(lambda: None))
HEAPTYPE = 1 << 9
"""``Py_TPFLAGS_HEAPTYPE`` in a type's ``__flags__``: the type was made by a ``class`` statement."""
"""``functools.lru_cache``'s (and ``cache``'s) wrapper: a function of the notebook's under it
travels as its function does (by value, when the other side could not import it by name)."""

_ModuleType, _BuiltinType, _FunctionType = (
    types.ModuleType, types.BuiltinFunctionType, types.FunctionType
)
_Enum = enum.Enum
_modules = sys.modules
_BUILTIN_MODULES = frozenset({"builtins", "types"})


def route(obj: Any) -> Route:
    """How ``obj`` itself is written by :func:`nbisolate.ship.dumps`'s fast pickler.

    Only the object, not what it contains: a list holding a lambda is
    ``PICKLE`` (the lambda inside is ``BY_VALUE``). Cheap (type tests and at
    most one attribute walk), so the pickler calls it for every module,
    function and class it meets.
    """
    kind = type(obj)  # the real type: isinstance() would ask a weak proxy's referent
    if kind is _ModuleType:
        return _MODULE if module_is_importable(obj) else _BY_VALUE
    if kind is _BuiltinType:
        return _REFERENCE
    if kind is _FunctionType or kind is CACHED_FUNCTION or issubclass(kind, type):
        hit = _lookup(obj)
        if hit is None or hit[1] is not obj or hit[0].startswith("__"):
            if kind is not _FunctionType and getattr(obj, "__module__", None) in _BUILTIN_MODULES:
                return _REFERENCE  # types.CodeType and its kin: named by the types module
            return _BY_VALUE
        return _REFERENCE  # importable: pickle's own save_global
    if issubclass(kind, _Enum):
        return route(kind)
    if NAMED_INSTANCE_TYPES and issubclass(kind, NAMED_INSTANCE_TYPES):
        hit = _lookup(obj)
        found = hit is not None and hit[1] is obj and not hit[0].startswith("__")
        return _REFERENCE if found else _BY_VALUE
    if kind in FILE_TYPES:
        return _OPEN_FILE
    return _PICKLE


def refers_to_main(obj: Any) -> bool:
    """True when the dill fallback writes ``obj`` as a name in ``__main__``, which a worker lacks.

    The fast path sends every notebook object by value; dill, the fallback for
    what the fast path cannot serialize, still writes a notebook ``Enum`` (and
    its members) and a notebook ``TypeVar`` by name. ``%pickle_check`` looks
    for exactly that.
    """
    kind = type(obj)
    if issubclass(kind, _Enum):
        target: Any = kind
    elif kind is not _FunctionType and issubclass(kind, type) and issubclass(obj, _Enum):
        target = obj
    elif NAMED_INSTANCE_TYPES and issubclass(kind, NAMED_INSTANCE_TYPES):
        target = obj
    else:
        return False
    hit = _lookup(target)
    return hit is not None and hit[0] == "__main__" and hit[1] is target


class Travel(NamedTuple):
    """How one shipped value travelled, recorded while it was serialized.

    ``route`` is the path its top-level object took (see the module
    docstring), ``size`` the bytes it added (its share of the stream plus its
    out-of-band buffers), ``buffer_bytes`` the out-of-band part, ``by_value``
    how many functions and classes inside it were sent by value, and
    ``reference`` the ``module.qualname`` a ``REFERENCE`` is looked up by.
    """

    route: Route
    size: int
    buffer_bytes: int = 0
    by_value: int = 0
    reference: str | None = None

    @property
    def label(self) -> str:
        """Short text for a table: ``pickle + direct copy``, ``by value``..."""
        return LABELS[self.route]


PROCESS_STATE: tuple[tuple[str, str], ...] = (
    ("os", "environ"),
    ("os", "environb"),
    ("sys", "path"),
    ("sys", "argv"),
    ("warnings", "filters"),
    ("matplotlib", "rcParams"),
    ("matplotlib", "rcParamsDefault"),
    ("matplotlib", "rcParamsOrig"),
    ("pandas", "options"),
    ("random", "_inst"),
    ("numpy.random.mtrand", "_rand"),
)
"""Objects that stand for a process's own state, which nbisolate keeps alike on both sides (the
environment, ``sys.path`` and ``argv``, the warning filters, matplotlib's and pandas' settings,
see :mod:`nbisolate.settings`; the global random generators, see :mod:`nbisolate.rng`).  A variable bound to one travels *by reference*, as the other
process's own: after ``from os import environ`` or ``from matplotlib import rcParams``, in an
ordinary cell the name *is* the process's object, and setting through it changes the process;
a copy would change nothing.  Other module-level objects travel as values: a fresh import's
would not hold what the notebook did to them."""


def process_state(value: Any) -> tuple[str, str] | None:
    """``(module, attribute)`` when ``value`` is one of :data:`PROCESS_STATE` in this process."""
    for module, attribute in PROCESS_STATE:
        loaded = sys.modules.get(module)
        if loaded is not None and getattr(loaded, attribute, None) is value:
            return module, attribute
    return None


def reference_name(obj: Any) -> str | None:
    """``module.qualname`` of an object that travels by reference (its class, for an Enum member)."""
    target = type(obj) if issubclass(type(obj), enum.Enum) else obj
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}.{qualname}"
    return None
