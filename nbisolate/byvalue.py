"""Notebook functions and classes by value, keeping Python's meaning across the boundary.

A worker has no notebook ``__main__``: what the notebook defined must travel
*by value*.  :mod:`cloudpickle` does that best of the well-kept libraries
(it keeps dynamic classes and enums as one class per class, shares the globals
of functions pickled together, handles ``TypeVar``, run-time modules,
memoryviews and submodules), and :class:`Pickler` builds on it, adding the
three things a notebook needs that a general library cannot know:

**The notebook namespace is the worker's ``__main__``.**  A function defined
in the notebook has the notebook's namespace as its globals.  cloudpickle
would give it a fresh dict of just the globals it uses; here a function whose
globals *are* the namespace being shipped (``main``) is rebuilt with the
loading side's namespace instead (:data:`_MAIN` stands for it in the stream,
:func:`loads_into` says which dict it is).  So two functions sharing a global
(``bump()`` writing ``counter``, ``read()`` reading it) share it in the
worker, and the cell sees it too, as in the kernel.  The globals a function
uses are added to that namespace only where the name is not bound yet
(:func:`_function_setstate`): loading never overwrites a variable.

**What came from the notebook goes back as itself.**  Each function or class
sent by value gets a token (:func:`_token`); the loading side remembers the
token of what it rebuilt (:data:`_ARRIVED`).  When such an object is
serialized again on the way back, it is written as the token, and the kernel
finds its own original (:data:`_SENT`): ``type(result) is P``,
``isinstance``, ``==`` and ``match`` on enum members hold, and the notebook's
class is never redefined by a copy.  (cloudpickle's class tracker alone would
find the original class too, but then re-apply the copy's attributes to it.)

**Classes the cell defines come back once.**  All results go through one
pickler, so two instances of a new class share one class object, the one
bound under its name.

Modules are never pickled: :func:`_import_module` re-imports them by name in
the worker, with the submodules the notebook had imported that the code names
(``xml.dom.minidom`` after ``import xml.dom.minidom``), found in the kernel's
``sys.modules`` (never a scan of the package, never a module the notebook did
not import).
"""

from __future__ import annotations

import builtins
import contextvars
import copyreg
import functools
import importlib
import itertools
import linecache
import os
import pickle
import sys
import threading
import types
import weakref
from collections.abc import Iterable, MutableMapping
from contextlib import contextmanager
from typing import Any

import cloudpickle
from cloudpickle import cloudpickle as _cp

from . import openfiles, widgetrelay
from .inplace import dispatch_registry
from .travel import CACHED_FUNCTION

PROTOCOL = 5

# -- identity across the boundary --------------------------------------------------------

_SENT: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
"""token -> the object this process sent by value (weakly: a deleted class may go)."""
_TOKENS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
"""object -> its token, so an object sent twice keeps one token."""
_ARRIVED: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
"""object rebuilt here -> the token it came with: sent back by token, not by value."""
_counter = itertools.count(1)
_prefix = f"{os.getpid()}-{os.urandom(4).hex()}-"
_lock = threading.Lock()


def _token(obj: Any) -> str | None:
    """The token of ``obj`` (made on first use); None for an object that cannot be tracked."""
    try:
        with _lock:
            token = _TOKENS.get(obj)
            if token is None:
                token = f"{_prefix}{next(_counter)}"
                _TOKENS[obj] = token
                _SENT[token] = obj
        return token
    except TypeError:  # unhashable or not weakly referenceable: it still travels, untracked
        return None


def _arrived(obj: Any, token: str | None) -> Any:
    if token is not None:
        try:
            _ARRIVED[obj] = token
        except TypeError:
            pass
    return obj


def _sent_object(token: str, what: str) -> Any:
    """The original of something this process sent by value (the reconstructor on the way back)."""
    found = _SENT.get(token)
    if found is None:
        raise pickle.UnpicklingError(
            f"{what} came from this notebook, but it no longer exists here (it was deleted); "
            "define it again and rerun the cell"
        )
    return found


def sent(token: str) -> Any:
    """The object this process sent with ``token``, or None if it is gone."""
    return _SENT.get(token)


def arrived_token(obj: Any) -> str | None:
    """The token ``obj`` arrived with, if it was rebuilt here from another process."""
    try:
        return _ARRIVED.get(obj)
    except TypeError:
        return None


# -- context variables ------------------------------------------------------------------------
#
# A ``ContextVar`` cannot be pickled, and in a notebook it is one object that functions
# read (``request_id.get()``) and cells set, the value staying set for the next cell.  So
# one travels as its name, its default and its value in the sending cell's context; the
# loading side makes one variable per token and sets that value in its own context (the
# worker loads its inputs in the thread the cell runs in).  Back in the kernel it is the
# notebook's own variable again, and a value the cell set is set on it (a variable carries
# its value only if the cell set one: an unchanged value keeps its identity).  They are
# held strongly: a ContextVar takes no weak reference, and is made once, at module level.

_VARS_SENT: dict[str, contextvars.ContextVar[Any]] = {}
_VAR_TOKENS: dict[contextvars.ContextVar[Any], str] = {}
_VARS_ARRIVED: dict[contextvars.ContextVar[Any], tuple[str, Any]] = {}
"""A variable rebuilt here -> its token and the value it arrived with."""
_VARS_MADE: dict[str, contextvars.ContextVar[Any]] = {}
"""token -> the variable rebuilt here: one per token, however many streams carry it."""


class _NoValue:
    """A variable without a default, or not set: one object on both sides (pickled by name)."""

    def __reduce__(self) -> str:
        return "_NO_VALUE"

    def __repr__(self) -> str:
        return "<no value>"


_NO_VALUE = _NoValue()


def _var_token(var: contextvars.ContextVar[Any]) -> str:
    with _lock:
        token = _VAR_TOKENS.get(var)
        if token is None:
            token = _VAR_TOKENS[var] = f"{_prefix}v{next(_counter)}"
            _VARS_SENT[token] = var
    return token


def _var_default(var: contextvars.ContextVar[Any]) -> Any:
    """The default ``var`` was made with (it has no attribute for it), or :data:`_NO_VALUE`."""
    try:
        return contextvars.Context().run(var.get)
    except LookupError:
        return _NO_VALUE


def reduce_context_var(var: contextvars.ContextVar[Any], returning: bool) -> tuple[Any, ...]:
    """How ``var`` travels (see "context variables" above)."""
    value = var.get(_NO_VALUE)
    arrived = _VARS_ARRIVED.get(var) if returning else None
    if arrived is not None:
        token, first = arrived
        return _context_var_back, (token, var.name, _NO_VALUE if value is first else value)
    return _rebuild_context_var, (_var_token(var), var.name, _var_default(var), value)


def _rebuild_context_var(token: str, name: str, default: Any, value: Any) -> contextvars.ContextVar[Any]:
    var = _VARS_MADE.get(token)
    if var is None:
        var = _VARS_MADE[token] = (
            contextvars.ContextVar(name) if default is _NO_VALUE else contextvars.ContextVar(name, default=default)
        )
    if value is not _NO_VALUE:
        var.set(value)
    _VARS_ARRIVED[var] = (token, var.get(_NO_VALUE))
    return var


def _context_var_back(token: str, name: str, value: Any) -> contextvars.ContextVar[Any]:
    """The notebook's own variable, with the value the cell set (if it set one) set on it."""
    var = _VARS_SENT.get(token)
    if var is None:
        raise pickle.UnpicklingError(f"context variable {name!r} came from this notebook, but it is gone")
    if value is not _NO_VALUE:
        from . import settings

        settings.hold_in_context(var, value)
    return var


# -- the notebook namespace ----------------------------------------------------------------

_loading = threading.local()


class _MainNamespace:
    """Stands in a stream for "the loading side's notebook namespace"."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _main_namespace, ()


_MAIN = _MainNamespace()


def _main_namespace() -> MutableMapping[str, Any]:
    main = getattr(_loading, "main", None)
    if main is None:  # loaded outside loads_into: this interpreter's __main__
        main = sys.modules["__main__"].__dict__
    return main


@contextmanager
def loads_into(main: MutableMapping[str, Any] | None):
    """Within this block, functions that belong to the notebook namespace are rebuilt on ``main``."""
    previous = getattr(_loading, "main", None)
    _loading.main = main
    try:
        yield
    finally:
        _loading.main = previous


def _rebuild_function(
    token: str | None, name: str | None, code: Any, globals_: dict[str, Any], *args: Any
) -> types.FunctionType:
    # cloudpickle sets the globals' __builtins__ to the builtins *dict* (for free-threaded
    # CPython); on a namespace that had its own (a notebook's __main__ has the module, and
    # `__builtins__.len` works there), that one stays.
    kept = globals_.get("__builtins__", _UNSET)
    func = _cp._make_function(code, globals_, *args)
    if kept is not _UNSET:
        globals_["__builtins__"] = kept
    _bind_as_in_notebook(name, func)
    return _arrived(func, token)


_UNSET = object()


def _bind_as_in_notebook(name: str | None, obj: Any) -> None:
    """Bind what arrived under the notebook's name for it, where that name is free
    (see :meth:`Pickler.notebook_name`); None: it is bound nowhere."""
    if name is not None:
        _main_namespace().setdefault(name, obj)


def _rebuild_class(token: str | None, name: str | None, maker: Any, *args: Any) -> type:
    cls = _arrived(maker(*args), token)
    _bind_as_in_notebook(name, cls)
    return cls


_TRAIT_BOOKKEEPING = frozenset({
    "_descriptors", "_instance_inits", "_traits", "_static_immutable_initial_values",
    "_trait_default_generators", "_all_trait_default_generators",
})
"""What traitlets' metaclass computes for a ``HasTraits`` class from its body and its bases: the
descriptors of every trait and handler, the library's among them."""


def _has_trait_bookkeeping(cls: type) -> bool:
    """A class made by traitlets' metaclass (a notebook's widget, a ``HasTraits`` subclass)."""
    module = sys.modules.get("traitlets.traitlets")
    meta = getattr(module, "MetaHasDescriptors", None)
    return isinstance(meta, type) and isinstance(cls, meta)


def _without_trait_bookkeeping(rest: list[Any]) -> list[Any]:
    """A traitlets class's state (cloudpickle's ``(state, slotstate)``, then its setter) without
    what its metaclass computes, which is computed again where it loads
    (:func:`_set_traitlets_class_state`). Copied, it took the handlers the library's classes
    declare (ipywidgets' ``Widget._comm_changed``) by value, as functions no name reaches, with
    their module's globals: a widget subclass defined in a cell carried ipywidgets' registry of
    every widget of the process, and made each of them again on the other side."""
    (clsdict, slotstate), *others = rest
    kept = {name: value for name, value in clsdict.items() if name not in _TRAIT_BOOKKEEPING}
    listitems, dictitems, _setter = (others + [None, None, None])[:3]
    return [(kept, slotstate), listitems, dictitems, _set_traitlets_class_state]


def _set_traitlets_class_state(cls: type, state: tuple[dict[str, Any], dict[str, Any]]) -> type:
    """cloudpickle's ``_class_setstate``, then traitlets' metaclass's own setup over the class as
    it now is (its traits named, its handlers and defaults found, its bases' included)."""
    _cp._class_setstate(cls, state)
    cls.setup_class(dict(vars(cls)))  # type: ignore[attr-defined]
    return cls


def _single_dispatch(func: types.FunctionType) -> tuple[Any, tuple[tuple[Any, Any], ...]] | None:
    """The function and the implementations a ``functools.singledispatch`` function was made of,
    or None for any other function."""
    impls = dispatch_registry(func)
    return None if impls is None else (func.__wrapped__, impls)


def _rebuild_single_dispatch(
    token: str | None, name: str | None, wrapped: Any, impls: tuple[tuple[Any, Any], ...]
) -> Any:
    func = functools.singledispatch(wrapped)
    for kind, impl in impls:
        func.register(kind, impl)
    _bind_as_in_notebook(name, func)
    return _arrived(func, token)


def _reduce_cached_property(prop: functools.cached_property) -> tuple[Any, ...]:
    """A ``functools.cached_property`` as its function and name: up to Python 3.11 it holds
    a lock, which no pickler takes, so a notebook class with one went to dill (and one with a
    ``singledispatchmethod`` as well could not travel at all)."""
    return _rebuild_cached_property, (prop.func, prop.attrname)


def _rebuild_cached_property(func: Any, attrname: str | None) -> functools.cached_property:
    prop = functools.cached_property(func)
    prop.attrname = attrname
    return prop


def _reduce_single_dispatch_method(method: functools.singledispatchmethod) -> tuple[Any, ...]:
    """A ``functools.singledispatchmethod`` as its function and implementations: from Python
    3.13 it keeps a cache of bound methods (a WeakKeyDictionary), which no pickler takes."""
    return _rebuild_single_dispatch_method, (method.func, dispatch_registry(method.dispatcher) or ())


def _rebuild_single_dispatch_method(func: Any, impls: tuple[tuple[Any, Any], ...]) -> Any:
    method = functools.singledispatchmethod(func)
    for kind, impl in impls:
        method.register(kind, impl)
    return method


# -- weak references ---------------------------------------------------------------------------
# No pickler takes a weak reference, and dill copies each one's referent on its own: a
# cell given ``wr = weakref.ref(o)`` and ``o`` saw ``wr() is o`` False, and, when only
# ``wr`` went, ``wr()`` None (a copy held by nothing). Here a weak reference, and the weak
# containers, travel as their referents, in the stream of every other value: they refer
# to the same copies the rest of the values hold. A referent is held by whatever holds it
# on the sending side, not by the reference; so the loading side holds each one it rebuilt
# (:data:`_HELD`): a worker for its cell, the kernel until the results are bound and the
# inputs' in-place changes taken (:func:`release_referents`). Then only what the
# notebook holds keeps a copy alive, as it would be had the cell run there.

_HELD: list[Any] = []
"""Referents of the weak references rebuilt here, alive until :func:`release_referents`."""


def release_referents() -> None:
    """Let go of the referents rebuilt so far: what nothing else holds is gone, as it would be."""
    _HELD.clear()


class _Gone:
    """The referent of a weak reference that was dead already: it dies as it is made."""


def _rebuild_weakref(target: Any, callback: Any) -> weakref.ref:
    if target is None:
        return weakref.ref(_Gone())
    _HELD.append(target)
    return weakref.ref(target, callback) if callback is not None else weakref.ref(target)


def _rebuild_weak_values(items: dict[Any, Any]) -> weakref.WeakValueDictionary:
    _HELD.extend(items.values())
    return weakref.WeakValueDictionary(items)


def _rebuild_weak_keys(items: list[tuple[Any, Any]]) -> weakref.WeakKeyDictionary:
    _HELD.extend(key for key, _ in items)
    return weakref.WeakKeyDictionary(items)


def _rebuild_weak_set(items: list[Any]) -> weakref.WeakSet:
    _HELD.extend(items)
    return weakref.WeakSet(items)


def _rebuild_cached(token: str | None, func: Any, maxsize: int | None, typed: bool) -> Any:
    return _arrived(functools.lru_cache(maxsize=maxsize, typed=typed)(func), token)


def _function_setstate(func: types.FunctionType, state: tuple[dict, dict]) -> None:
    """cloudpickle's function state, applied without overwriting the notebook's variables.

    A function rebuilt on the notebook namespace adds the globals it uses
    only where the name is unbound (a worker's fresh ``__main__``; in the
    kernel, a name the notebook does not have).  Any other function gets its
    globals as cloudpickle gives them.
    """
    attrs, slots = state
    func.__dict__.update(attrs)
    used = slots.pop("__globals__")
    closure = slots.pop("__closure__")
    slots.pop("_cloudpickle_submodules", None)  # loading them imported them: done
    target = func.__globals__
    if target is _main_namespace():
        for name, value in used.items():
            target.setdefault(name, value)
    else:
        target.update(used)
        target.setdefault("__builtins__", builtins.__dict__)
    if closure is not None:
        for i, cell in enumerate(closure):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell: a variable not bound yet when pickled
                continue
            func.__closure__[i].cell_contents = value  # type: ignore[index]
    for name, value in slots.items():
        setattr(func, name, value)


def _rebuild_code(filename: str, lines: list[str], make: Any, *args: Any) -> types.CodeType:
    """A code object, its cell's text put where tracebacks and ``inspect`` look for it first."""
    if filename not in linecache.cache:
        linecache.cache[filename] = (sum(map(len, lines)), None, list(lines), filename)
    return make(*args)


# -- modules ------------------------------------------------------------------------------------


def _import_module(name: str, submodules: tuple[str, ...] = ()) -> types.ModuleType:
    module = importlib.import_module(name)
    for sub in submodules:
        importlib.import_module(sub)
    return module


def submodules_used(name: str, names: Iterable[str] | frozenset[str]) -> tuple[str, ...]:
    """Submodules of ``name`` the notebook imported whose every part ``names`` mentions.

    ``xml.dom.minidom`` for ``xml`` when the code says ``xml.dom.minidom``:
    the same rule as cloudpickle's for functions (a submodule is needed when
    the code names it), read from ``sys.modules`` so nothing the notebook did
    not import is ever imported.
    """
    names = names if isinstance(names, frozenset) else frozenset(names)
    if not names:
        return ()
    prefix = name + "."
    return tuple(
        sorted(
            m
            for m in list(sys.modules)
            if m.startswith(prefix) and names.issuperset(m[len(prefix) :].split("."))
        )
    )


# cloudpickle's reducers, but for open files: cloudpickle sends a text file's contents as a
# StringIO (no longer a file, and a binary file not at all); here they travel as the same file
# at the same place (Pickler.open_file, nbisolate.openfiles).
_REDUCERS = {
    kind: reduce
    for kind, reduce in cloudpickle.Pickler._dispatch_table.items()
    if reduce is not _cp._file_reduce
}

_cp_dynamic_file = "<dynamic-code>"
"""What cloudpickle names the file of every code object it copies (see :meth:`Pickler.code`)."""

# Only these make a new class on the loading side; only a new class is tracked by a token.
_CLASS_MAKERS = (_cp._make_skeleton_class, _cp._make_skeleton_enum)


# -- the pickler -----------------------------------------------------------------------------------


class Pickler(cloudpickle.Pickler):
    """cloudpickle's pickler with the notebook's meaning (see the module docstring).

    ``main`` is the namespace whose functions are rebuilt on the other side's
    namespace; ``names`` the identifiers the code uses (for submodules).
    *When* a value goes by value is not decided here but by
    :func:`nbisolate.travel.route`, which :class:`nbisolate.ship.FastPickler`
    asks; this class provides the reductions it chooses from.
    """

    def __init__(
        self,
        file: Any,
        protocol: int = PROTOCOL,
        *,
        main: MutableMapping[str, Any] | None = None,
        names: Iterable[str] = (),
        buffer_callback: Any = None,
        returning: bool = False,
    ) -> None:
        # Before the C pickler's __init__, which reads it once. A plain dict: the C pickler
        # looks it up for every non-basic object, and cloudpickle's ChainMap costs a
        # Python call each time; copyreg's current entries, so later registrations count.
        self.dispatch_table = {**copyreg.dispatch_table, **_REDUCERS}
        for kind in openfiles.FILE_TYPES:
            self.dispatch_table[kind] = self.open_file
        self.dispatch_table[types.CodeType] = self.code
        self.dispatch_table[functools.cached_property] = _reduce_cached_property
        self.dispatch_table[functools.singledispatchmethod] = _reduce_single_dispatch_method
        self.dispatch_table[weakref.ref] = self.weak_reference
        self.dispatch_table[weakref.WeakValueDictionary] = self.weak_container
        self.dispatch_table[weakref.WeakKeyDictionary] = self.weak_container
        self.dispatch_table[weakref.WeakSet] = self.weak_container
        self.dispatch_table[contextvars.ContextVar] = self.context_var
        super().__init__(file, protocol=protocol, buffer_callback=buffer_callback)
        self.main = main
        self.names = frozenset(names)
        # Only a worker sending results back to the kernel that sent it its inputs may
        # write what came from there as a token: anyone else (the kernel shipping a class
        # that came back from an earlier worker to a new one) sends it by value again.
        self.returning = returning
        # The notebook's widgets go to a worker by their model's id (widgetrelay.reduction).
        self.widget_class = None if returning else widgetrelay.widget_class()
        self.modules: set[str] = set()
        self.cells: set[str] = set()  # the notebook cells whose text went with their code

    # cloudpickle's hooks for dynamic functions --------------------------------------------------
    def _function_getnewargs(self, func: types.FunctionType) -> tuple[Any, ...]:
        code, base_globals, name, defaults, closure = super()._function_getnewargs(func)
        if self.main is not None and func.__globals__ is self.main:
            base_globals = _MAIN
        return code, base_globals, name, defaults, closure

    def _dynamic_function_reduce(self, func: types.FunctionType) -> tuple[Any, ...]:
        newargs = self._function_getnewargs(func)
        state = _cp._function_getstate(func)
        name = self.notebook_name(func) if newargs[1] is _MAIN else None
        return (_rebuild_function, (_token(func), name, *newargs), state, None, None, _function_setstate)

    def notebook_name(self, obj: Any) -> str | None:
        """The notebook's name for a function or class it defined, for the worker to bind it too.

        In the notebook ``pickle.dumps(p)`` finds ``p``'s class as ``__main__.P``;
        a class that reached the worker inside ``p`` (not named by the cell) was
        bound nowhere there, and pickling failed (``attribute lookup P on __main__
        failed``), as did saving a model with ``joblib.dump``.  So what the
        notebook has bound under its own name is bound under that name in the
        worker's ``__main__`` too (where the name is free: loading never
        overwrites a variable).  Only on the way to a worker: a result comes back
        under the names the cell bound, and no other.
        """
        if self.returning or self.main is None:
            return None
        name = getattr(obj, "__qualname__", None)
        if not isinstance(name, str) or not name.isidentifier():  # Outer.Inner, f.<locals>.g
            return None
        try:
            return name if self.main.get(name) is obj else None
        except Exception:  # a namespace that cannot be asked: nothing is bound
            return None

    # the three reductions :class:`nbisolate.ship.FastPickler` chooses from ---------------------
    def module_by_name(self, module: types.ModuleType) -> tuple[Any, ...]:
        """``import_module(name)`` in the worker, with the submodules the code names."""
        name = module.__name__
        self.modules.add(name)
        return _import_module, (name, submodules_used(name, self.names))

    def by_value(self, obj: Any) -> Any:
        """A function or class as cloudpickle copies it, tokened; anything else: NotImplemented
        (cloudpickle's dispatch table then copies run-time modules, TypeVars...)."""
        if type(obj) is types.FunctionType:
            dispatch = _single_dispatch(obj)
            if dispatch is not None:
                # Made again around its function, with the same implementations: copied as a
                # function, its dispatch cache (a WeakKeyDictionary) could not be pickled at all.
                return _rebuild_single_dispatch, (_token(obj), self.notebook_name(obj), *dispatch)
            return self._dynamic_function_reduce(obj)
        if type(obj) is CACHED_FUNCTION:
            # By name it would be looked up in the other side's __main__, which lacks it: made
            # again there around its function, by value, with the same limits and an empty cache.
            params = obj.cache_parameters()
            return _rebuild_cached, (_token(obj), obj.__wrapped__, params["maxsize"], params["typed"])
        if not issubclass(type(obj), type):
            return NotImplemented
        reduced = _cp._class_reduce(obj)
        if not isinstance(reduced, tuple) or reduced[0] not in _CLASS_MAKERS:
            return reduced  # e.g. types.CodeType: a name of cloudpickle's, not a copy
        maker, args, *rest = reduced
        if obj.__dict__.get("__slots__") and maker is _cp._make_skeleton_class:
            # cloudpickle sets __slots__ after making the class, which leaves its instances
            # a __dict__ (and no slots): the copy's instances would not fit the original
            # class on the way back. Slots must exist when the class is made.
            type_kwargs = dict(args[3], __slots__=obj.__dict__["__slots__"])
            args = (*args[:3], type_kwargs, *args[4:])
        if rest and _has_trait_bookkeeping(obj):
            rest = _without_trait_bookkeeping(rest)
        return (_rebuild_class, (_token(obj), self.notebook_name(obj), maker, *args), *rest)

    @staticmethod
    def by_name(obj: Any) -> Any:
        """A class found by name: pickle's own ``save_global`` (NotImplemented), or, for the
        interpreter's own types that no module exports under their name (``types.CodeType``
        is ``builtins.code``), cloudpickle's lookup through the ``types`` module."""
        if issubclass(type(obj), type) and obj in _cp._BUILTIN_TYPE_NAMES:
            return _cp._class_reduce(obj)
        return NotImplemented

    def code(self, obj: types.CodeType) -> tuple[Any, ...]:
        """cloudpickle's copy of a code object, but still saying where it was written.

        cloudpickle names every copied code's file ``<dynamic-code>`` (so that its
        output does not depend on where a function was defined); a traceback through
        a notebook function in the worker then showed ``File <dynamic-code>:7`` and
        no line, and ``inspect.getsource(f)`` failed.  Here the code keeps its file
        (``Cell In[2]`` to IPython), and the text of a cell, which exists only in
        this process's ``linecache`` (IPython keeps cells there, with no time
        stamp), travels with it, once per stream.
        """
        make, args = _cp._code_reduce(obj)
        filename = obj.co_filename
        args = tuple(filename if type(arg) is str and arg == _cp_dynamic_file else arg for arg in args)
        entry = linecache.cache.get(filename)
        if entry is None or entry[1] is not None:  # a file: the other side reads it itself
            return make, args
        self.cells.add(filename)
        return _rebuild_code, (filename, entry[2], make, *args)

    @staticmethod
    def weak_reference(ref: weakref.ref) -> tuple[Any, ...]:
        """A weak reference as its referent and callback (see "weak references" above)."""
        target = ref()
        return _rebuild_weakref, (target, ref.__callback__ if target is not None else None)

    @staticmethod
    def weak_container(box: Any) -> tuple[Any, ...]:
        """A ``WeakValueDictionary``, ``WeakKeyDictionary`` or ``WeakSet`` as what it holds now."""
        if type(box) is weakref.WeakValueDictionary:
            return _rebuild_weak_values, (dict(box.items()),)
        if type(box) is weakref.WeakKeyDictionary:
            return _rebuild_weak_keys, (list(box.items()),)
        return _rebuild_weak_set, (list(box),)

    def context_var(self, var: contextvars.ContextVar[Any]) -> tuple[Any, ...]:
        """A ``ContextVar``: its name, default and value, and back as the notebook's own."""
        return reduce_context_var(var, self.returning)

    def open_file(self, f: Any) -> tuple[Any, ...]:
        """An open file, as :mod:`nbisolate.openfiles` carries it: the same file at the same place;
        one that came from the other side goes back as itself."""
        if self.returning:
            token = openfiles.arrived(f)
            if token is not None:
                return _sent_object, (token, repr(f))
            return openfiles.reduce(f, None)
        return openfiles.reduce(f, _token(f))

    def sent_back(self, obj: Any) -> tuple[Any, ...] | None:
        """For an object that arrived from the other side: how to send it back as itself."""
        if not self.returning:
            return None
        token = arrived_token(obj)
        if token is None:
            return None
        return _sent_object, (token, getattr(obj, "__qualname__", None) or repr(obj))
