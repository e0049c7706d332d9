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
    a name. ``typing.TypeVar``/``ParamSpec``/``TypeVarTuple`` reduce to their
    name too (their ``__reduce__`` returns ``__name__``), and so does an
    ``Enum`` member (``__reduce_ex__`` gives ``(its class, (value,))``) -- its
    class then decides. An ``Enum`` class that is found by name also goes by
    reference, even from the notebook's ``__main__``: dill cannot send one by
    value (its members refer back to the class by name, so dill's copy still
    needs ``__main__.<Enum>`` on the other side), so today a notebook Enum or
    TypeVar reaches the worker as a name the worker's ``__main__`` does not
    have, and loading fails with "Can't get attribute". :func:`route` says so
    truthfully; ``%pickle_check`` reports it.
``PICKLE`` / ``SHARED_MEMORY``
    Everything else takes the C pickler's own path (``__reduce_ex__(5)``).
    Objects that support protocol 5 (numpy arrays, pandas blocks) hand their
    memory to ``buffer_callback`` as out-of-band buffers instead of copying it
    into the stream. When a shipment's buffers add up to
    :data:`nbisolate.wire.SHM_THRESHOLD` or more and the system has
    ``memfd_create``, :class:`nbisolate.wire.Channel` sends them through one
    shared anonymous memfd instead of the socket: such a value is labelled
    ``SHARED_MEMORY``. That depends on the whole shipment, so it is decided
    after serialization (``Shipment.routes``), never guessed per value.
``DILL_VALUE``
    A function or class a fresh interpreter cannot find by name -- defined in
    the notebook (``__main__``), a lambda, a closure, a class made inside a
    function -- is handed to ``dill.dumps(obj, recurse=True)`` and travels by
    value with the globals it uses (``recurse`` sends only the globals the
    code refers to; without it dill would drop them and the worker would hit
    ``NameError``).
``DILL``
    When the C pickler cannot serialize something at all (an open file, a
    module that cannot be re-imported), the *whole* shipment is redone with
    dill alone (:func:`nbisolate.ship.dumps`), which is slower but handles
    more kinds; modules are still re-imported and arrays still out of band.

Standard library only at import (dill and numpy are never imported here), as
the worker imports it through :mod:`nbisolate.ship`.
"""

from __future__ import annotations

import enum
import sys
import types
import typing
from typing import Any, NamedTuple


class Route(str, enum.Enum):
    """The path a value takes; the value of each member is its short label."""

    MODULE = "module (re-imported)"
    REFERENCE = "by reference"
    PICKLE = "pickle"
    SHARED_MEMORY = "pickle + shared memory"
    DILL_VALUE = "dill (by value)"
    DILL = "dill (whole shipment)"

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
_DILL_VALUE, _DILL = Route.DILL_VALUE, Route.DILL
_ModuleType, _BuiltinType, _FunctionType = (
    types.ModuleType, types.BuiltinFunctionType, types.FunctionType
)
_Enum = enum.Enum
_modules = sys.modules


def route(obj: Any) -> Route:
    """How ``obj`` itself is written by :func:`nbisolate.ship.dumps`'s fast pickler.

    Only the object, not what it contains: a list holding a lambda is
    ``PICKLE`` (the lambda inside is ``DILL_VALUE``). Cheap (type tests and at
    most one attribute walk), so the pickler calls it for every module,
    function and class it meets. ``DILL`` means the fast pickler refuses the
    object and the whole shipment goes to dill.
    """
    kind = type(obj)  # the real type: isinstance() would ask a weak proxy's referent
    if kind is _ModuleType:
        return _MODULE if module_is_importable(obj) else _DILL
    if kind is _BuiltinType:
        return _REFERENCE
    if kind is _FunctionType or issubclass(kind, type):
        hit = _lookup(obj)
        if hit is None or hit[1] is not obj:
            return _DILL_VALUE
        if not hit[0].startswith("__"):
            return _REFERENCE  # importable: pickle's own save_global
        if hit[0] == "__main__" and kind is not _FunctionType and issubclass(obj, _Enum):
            return _REFERENCE  # a notebook Enum: dill can't send it by value either; see above
        return _DILL_VALUE
    if issubclass(kind, _Enum):
        return route(kind)
    if NAMED_INSTANCE_TYPES and issubclass(kind, NAMED_INSTANCE_TYPES):
        hit = _lookup(obj)
        return _REFERENCE if hit is not None and hit[1] is obj else _DILL
    return _PICKLE


def refers_to_main(obj: Any) -> bool:
    """True when ``obj`` is written as a reference into ``__main__``, which a worker lacks.

    What ``%pickle_check`` looks for under ``%%isolate``: notebook functions and
    most classes go by value, but a notebook Enum or TypeVar goes by name.
    """
    if route(obj) is not _REFERENCE:
        return False
    target = type(obj) if issubclass(type(obj), _Enum) else obj
    return getattr(target, "__module__", None) == "__main__"


class Travel(NamedTuple):
    """How one shipped value travelled, recorded while it was serialized.

    ``route`` is the path its top-level object took (see the module
    docstring), ``size`` the bytes it added (its share of the stream plus its
    out-of-band buffers), ``buffer_bytes`` the out-of-band part, ``by_value``
    how many functions and classes inside it were sent by value with dill, and
    ``reference`` the ``module.qualname`` a ``REFERENCE`` is looked up by.
    """

    route: Route
    size: int
    buffer_bytes: int = 0
    by_value: int = 0
    reference: str | None = None

    @property
    def label(self) -> str:
        """Short text for a table: ``pickle + shared memory``, ``dill (by value)``..."""
        return LABELS[self.route]


def reference_name(obj: Any) -> str | None:
    """``module.qualname`` of an object that travels by reference (its class, for an Enum member)."""
    target = type(obj) if issubclass(type(obj), enum.Enum) else obj
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}.{qualname}"
    return None
