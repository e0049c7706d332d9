"""Shipping values between the kernel and a worker.

Why not plain ``pickle``: a spawned interpreter has no notebook ``__main__``,
so functions and classes defined in cells, lambdas and closures must travel
*by value*, and module objects must never be pickled at all but re-imported by
name. Why not plain ``dill``: it is built on the pure-Python pickler and is an
order of magnitude slower on ordinary data (100k small dicts: ~50 ms with the
C pickler, ~1.9 s with dill).

So the fast path is the C ``pickle.Pickler`` (by way of cloudpickle's
subclass, :class:`nbisolate.byvalue.Pickler`) with a ``reducer_override``
that makes a per-object choice (the idea of choosing the serializer per
object, as some experiment recorders do per class). The choice itself is
:func:`nbisolate.travel.route`, the one place that decides how a value
travels; the pickler only carries it out, and :class:`Shipment` records per
variable the route taken (:attr:`Shipment.travel`), so what the panel shows
is what happened:

* a module becomes ``importlib.import_module(name)`` in the worker, with the
  submodules the notebook imported that the code names;
* a function or class the worker could not import by name (defined in the
  notebook, a lambda, a nested function, a notebook Enum) travels by value
  (:mod:`nbisolate.byvalue`): cloudpickle's copy, rebuilt on the worker's
  ``__main__``, and sent back as the notebook's own original;
* a function or class found by name goes by reference;
* an open file is the same file, opened again in the worker at the same place
  (:mod:`nbisolate.openfiles`);
* everything else takes the C pickler's own path, including protocol-5
  out-of-band buffers, so arrays are never copied into the stream.

If the fast path cannot serialize a variable (a lock, say, which dill makes
anew), that variable alone is written by ``dill`` and its bytes
are embedded in the fast stream (:class:`_ByDill`); everything else keeps the
fast path and its meaning (a notebook class in another result still comes
back as the notebook's own, an Enum member is still ``is``-identical). All
other variables go through *one* pickler with one memo, so objects shared
between them stay shared on the other side (``b['x'] is a`` still holds).
"""

from __future__ import annotations

import contextvars
import copyreg
import errno
import functools
import io
import mmap
import os
import pickle
import time
import types
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import byvalue, openfiles, widgetrelay
from .errors import ShipError
from .inplace import is_ndarray_type
from .travel import (
    CACHED_FUNCTION,
    HEAPTYPE,
    LABELS,
    Route,
    Travel,
    module_is_importable,
    needs_value,
    process_state,
    reference_name,
    route,
)
from .wire import HAVE_MEMFD, SHM_THRESHOLD

__all__ = [
    "PROTOCOL",
    "FastPickler",
    "Route",
    "Shipment",
    "Travel",
    "dill_pickler",
    "dill_pickler_class",
    "dumps",
    "fast_pickler",
    "loads",
    "module_is_importable",
    "modules_in_pickle",
    "needs_value",
    "pull",
    "pull_spans",
]

PROTOCOL = 5


_import_module = byvalue._import_module  # the dill fallback re-imports modules the same way


_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
                         "SHORT_BINSTRING", "BINSTRING"})
_IMPORTERS = frozenset({("nbisolate.byvalue", "_import_module"), ("dill._dill", "_import_module")})


def modules_in_pickle(data: bytes | memoryview) -> set[str]:
    """Module names a pickle stream imports when loaded (globals, re-imported modules).

    Used where the loading side is another machine, to check before sending
    that it can import them. A stream it cannot read gives what was found so far.
    """
    return _scan_pickle(data, strict=False) or set()


def _scan_pickle(data: bytes | memoryview, strict: bool) -> set[str] | None:
    """The modules of a stream of pickles; with ``strict``, None unless it is valid throughout."""
    import io
    import pickletools

    found: set[str] = set()
    memo: dict[int, Any] = {}  # one memo for the whole stream, as ship.loads reads it
    file = io.BytesIO(data)
    size = len(file.getbuffer())
    try:
        while file.tell() < size:
            recent: list[Any] = [None, None]  # what the last two pushing opcodes pushed
            want_module = False
            for op, arg, _ in pickletools.genops(file):
                name = op.name
                if name in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                    memo[len(memo) if name == "MEMOIZE" else int(arg)] = recent[-1]
                    continue
                if name in ("FRAME", "PROTO"):
                    continue
                pushed: Any = None
                if name in _STRING_OPS:
                    pushed = arg
                elif name in ("BINGET", "LONG_BINGET", "GET"):
                    pushed = memo.get(int(arg))
                elif name in ("GLOBAL", "INST"):
                    module, _, attr = str(arg).partition(" ")
                    pushed = ("global", module, attr)
                elif name == "STACK_GLOBAL" and isinstance(recent[-2], str):
                    pushed = ("global", recent[-2], recent[-1])
                if want_module and isinstance(pushed, str):
                    found.add(pushed)  # the argument of _import_module(name)
                    want_module = False
                if isinstance(pushed, tuple):
                    found.add(pushed[1])
                    want_module = pushed[1:] in _IMPORTERS
                recent = [recent[-1], pushed]
    except Exception:
        return None if strict else found
    return found


class FastPickler(byvalue.Pickler):
    """The C pickler, carrying out :func:`nbisolate.travel.route` for modules, functions, classes.

    ``reducer_override`` is called by the C pickler for objects of every type
    but the handful it writes itself (None, bools, ints, floats, str, bytes,
    dict, list...), and it must stay cheap: only modules, functions and
    classes reach :func:`~nbisolate.travel.route`; everything else goes to the
    dispatch table (cloudpickle's reducers: TypeVars, code objects,
    memoryviews...) or its own ``__reduce_ex__`` at once.

    It also notes the modules the stream will import on the other side
    (``modules``): a remote worker must be able to import every one of them;
    and how many functions and classes it sent by value (``copied``).
    """

    copied = 0

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is _FunctionType or kind is CACHED_FUNCTION or issubclass(kind, type):  # not isinstance: a weak proxy would forward it
            back = self.sent_back(obj)
            if back is not None:  # it came from the other side: it goes back as itself
                return back
        elif kind is not _ModuleType and kind is not _BuiltinType:
            if kind.__reduce__ is _EXCEPTION_REDUCE and rebuilt_without_init(kind):
                return exception_reduction(obj)
            if self.widget_class is not None and issubclass(kind, self.widget_class):  # the page's, by id
                return widgetrelay.reduction(obj)
            return NotImplemented
        how = route(obj)
        if how is _MODULE:
            return self.module_by_name(obj)
        if how is _BY_VALUE:
            if kind is not _ModuleType:
                self.copied += 1
            return self.by_value(obj)
        module = getattr(obj, "__module__", None)  # Route.REFERENCE
        if isinstance(module, str):
            self.modules.add(module)
        return self.by_name(obj)


@dataclass
class Shipment:
    """Serialized variables: one pickle stream plus its out-of-band buffers.

    ``sizes`` (bytes, stream share plus buffers), ``seconds`` and ``how`` are
    per variable, for the live panel; ``skipped`` names what could not be
    serialized (only when skipping was asked for) and why. :attr:`modules`
    are the modules loading the shipment imports, for checking a remote worker.

    ``routes`` records, while serializing, the route each variable really
    took (:class:`nbisolate.travel.Route`); ``buffer_bytes`` its out-of-band
    bytes and ``by_value`` how many functions or classes inside it went by
    value (both list only variables that have any), ``references`` the name a
    by-reference variable is looked up by. :attr:`travel` gathers them per
    variable and :attr:`how` gives the routes as short labels (``pickle``,
    ``pickle + direct copy``, ``by reference``, ``by value``,
    ``module (re-imported)``, ``dill``), both built on first
    use, off the per-cell path. Shared memory is decided from the whole
    shipment's buffers exactly as :meth:`nbisolate.wire.Channel.send` decides
    it, so the label says what the local channel does with them.
    """

    names: list[str]
    data: bytes
    buffers: list[memoryview] = field(default_factory=list)
    engine: str = "pickle"
    sizes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    routes: dict[str, Route] = field(default_factory=dict)
    by_value: dict[str, int] = field(default_factory=dict)
    buffer_bytes: dict[str, int] = field(default_factory=dict)
    references: dict[str, str | None] = field(default_factory=dict)
    module_refs: set[str] | None = None  # noted while pickling; None: scan the stream
    starts: list[tuple[int, int]] = field(default_factory=list)
    """Per name, where its pickle starts: (offset in ``data``, index of its first buffer)."""
    cells: list[str] = field(default_factory=list)
    """The file names of the notebook cells whose code went by value, with their text."""

    @property
    def nbytes(self) -> int:
        return len(self.data) + sum(b.nbytes for b in self.buffers)

    @property
    def large_buffers(self) -> bool:
        """True when the buffers do not go through the socket (a direct copy, or a memfd)."""
        return HAVE_MEMFD and sum(b.nbytes for b in self.buffers) >= SHM_THRESHOLD

    def label(self, name: str) -> str | None:
        """How variable ``name`` travelled, as a short label; None if it was not shipped."""
        found = self.routes.get(name)
        return LABELS[found] if found is not None else None

    @property
    def how(self) -> dict[str, str]:
        """Per variable, how it travelled as a short label (:data:`nbisolate.travel.LABELS`)."""
        found = self.__dict__.get("_how")
        if found is None:
            found = self.__dict__["_how"] = {name: LABELS[r] for name, r in self.routes.items()}
        return found

    @how.setter
    def how(self, labels: dict[str, str]) -> None:
        self.__dict__["_how"] = labels

    @property
    def travel(self) -> dict[str, Travel]:
        """Per variable, a :class:`nbisolate.travel.Travel`: route, size, buffers, by-value count."""
        return {
            name: Travel(
                taken, self.sizes.get(name, 0), self.buffer_bytes.get(name, 0),
                self.by_value.get(name, 0), self.references.get(name),
            )
            for name, taken in self.routes.items()
        }

    @property
    def modules(self) -> set[str]:
        """Modules loading this shipment imports: re-imported modules, and those of classes
        and functions sent by reference, also inside by-value ones. Computed on first use."""
        found = getattr(self, "_modules", None)
        if found is None:
            found = modules_in_pickle(self.data) if self.module_refs is None else set(self.module_refs)
            self._modules = found
        return found


def _describe_failure(name: str, value: Any, exc: BaseException) -> tuple[str, str | None, Any]:
    """A one-paragraph reason naming the member path, and the diagnosis report behind it."""
    path = None
    report = None
    detail = f"{type(exc).__name__}: {exc}"
    try:
        from .diagnose import pickle_check

        report = pickle_check(value, name=name, serializers=["dill"])
        found = getattr(report, "errors", None) or getattr(report, "problems", [])
        problems = [p for p in found if getattr(p, "path", None)]
        if problems:
            first = problems[0]
            path = first.path
            detail = f"{first.path}: {first.type_name} ({first.reason}). Fix: {first.fix}"
            if len(problems) > 1:
                detail += f" (+{len(problems) - 1} more; run %pickle_check {name})"
    except Exception:  # diagnosis is a help, never a second failure
        pass
    return detail, path, report


def _attempt(
    pickler_factory: Any, values: Mapping[str, Any], names: Sequence[str], shared: Sequence[Any] = ()
) -> tuple[Shipment | None, str | None, BaseException | None]:
    """Serialize ``names`` in one pickler; on failure, the name that failed and why.

    Each value's route is noted as it is written: :func:`nbisolate.travel.route`
    of the value (the call the fast pickler itself makes for modules,
    functions and classes), ``DILL`` for a value only dill could write
    (:class:`_ByDill`), and ``DIRECT_COPY`` for values with buffers once the
    total is known.
    """
    file = io.BytesIO()
    buffers: list[pickle.PickleBuffer] = []
    pickler = pickler_factory(file, buffer_callback=buffers.append)
    if shared:  # written as memo references (BINGET n): no cost for the objects not among them;
        file.write(_memo_prelude(len(shared)))  # the other side's own take those places first
        pickler.memo = {id(obj): (i, obj) for i, obj in enumerate(shared)}
    sizes: dict[str, int] = {}
    seconds: dict[str, float] = {}
    oob: dict[str, int] = {}
    by_value: dict[str, int] = {}
    starts: list[tuple[int, int]] = []
    routes: dict[str, Route] = {}
    references: dict[str, str | None] = {}
    copied = 0  # functions and classes the pickler sent by value so far
    for name in names:
        value = values[name]
        start_pos, start_buf, t0 = file.tell(), len(buffers), time.perf_counter()
        starts.append((start_pos, start_buf))
        try:
            pickler.dump(value)
        except Exception as exc:
            return None, name, exc
        seconds[name] = time.perf_counter() - t0
        if len(buffers) > start_buf:
            oob[name] = nbytes = sum(b.raw().nbytes for b in buffers[start_buf:])
        else:
            nbytes = 0
        sizes[name] = (file.tell() - start_pos) + nbytes
        now = getattr(pickler, "copied", 0)
        if now != copied:
            by_value[name], copied = now - copied, now
        kind = type(value)
        if kind is _ProcessState:
            taken = _REFERENCE
            references[name] = f"{value.module}.{value.attribute}"
        else:
            taken = _PICKLE if kind in _PLAIN else _DILL if kind is _ByDill else route(value)
        if taken is _REFERENCE and kind is not _ProcessState:
            references[name] = reference_name(value)
        routes[name] = taken
    raw = [b.raw() for b in buffers]
    if raw and HAVE_MEMFD and sum(oob.values()) >= SHM_THRESHOLD:  # as wire.Channel.send decides
        for name in oob:
            if routes[name] is _PICKLE:
                routes[name] = _DIRECT_COPY
    shipment = Shipment(
        names=list(names),
        data=file.getvalue(),
        buffers=raw,
        sizes=sizes,
        seconds=seconds,
        routes=routes,
        by_value=by_value,
        buffer_bytes=oob,
        references=references,
        starts=starts,
    )
    shipment.module_refs = getattr(pickler, "modules", None)
    shipment.cells = sorted(getattr(pickler, "cells", ()))
    return shipment, None, None


# Members read once (an enum member lookup costs ~50 ns), and the types whose
# route is PICKLE without asking: the per-cell path runs through here.
_MODULE, _PICKLE, _DILL, _BY_VALUE = Route.MODULE, Route.PICKLE, Route.DILL, Route.BY_VALUE
_REFERENCE, _DIRECT_COPY = Route.REFERENCE, Route.DIRECT_COPY
_ModuleType, _BuiltinType, _FunctionType = (
    types.ModuleType, types.BuiltinFunctionType, types.FunctionType
)
_PLAIN = frozenset({int, float, complex, str, bytes, bytearray, bool, type(None), list, tuple,
                    dict, set, frozenset})
_SCALARS = frozenset({int, float, complex, str, bytes, bool, type(None), tuple, frozenset})
"""Values that are never a process's state object (:func:`nbisolate.travel.process_state`)."""


def fast_pickler(
    file: Any,
    buffer_callback: Any = None,
    main: MutableMapping[str, Any] | None = None,
    names: Iterable[str] = (),
    returning: bool = False,
) -> pickle.Pickler:
    """The pickler of the fast path (:class:`FastPickler`, protocol 5) writing to ``file``.

    ``main`` is the notebook namespace (see :mod:`nbisolate.byvalue`), ``names``
    the identifiers the code uses (submodules it reaches come along).
    """
    return FastPickler(
        file, main=main, names=names, buffer_callback=buffer_callback, returning=returning
    )


_dill_pickler_class: Any = None


def _is_exact_ndarray(obj: Any) -> bool:
    return is_ndarray_type(type(obj))


def dill_pickler_class() -> type:
    """The pickler of the dill fallback, keeping the promises the fast path makes.

    Plain dill pickles a module that is not installed (a ``.py`` next to the
    notebook) by value, namespace and all, and copies numpy arrays in-band
    (it reduces them without protocol 5).  Modules are re-imported by name and
    exact arrays keep their out-of-band buffers here too.  And the notebook's
    functions and classes travel as the fast path sends them
    (:class:`nbisolate.byvalue.Pickler`'s reductions, their members written by
    dill): dill's own copy of a class was another class on the other side, so
    an object that only dill can write (one holding a lock) came back an
    instance of a copy of its notebook class (``type(s) is Store`` False).
    ``main``, ``names`` and ``returning`` are the fast pickler's.  A class made
    on first use, because importing dill costs time a worker should not pay
    unless it needs it; ``%pickle_check`` subclasses it to judge (and trace)
    exactly what ``%%isolate`` does.
    """
    global _dill_pickler_class
    if _dill_pickler_class is None:
        import dill

        class DillPickler(dill.Pickler):  # type: ignore[misc]
            def __init__(
                self,
                file: Any,
                *args: Any,
                main: MutableMapping[str, Any] | None = None,
                names: Iterable[str] = (),
                returning: bool = False,
                **kwds: Any,
            ) -> None:
                super().__init__(file, *args, **kwds)
                self._notebook = (main, names, returning)
                self._by_value: byvalue.Pickler | None = None
                self._widget = None if returning else widgetrelay.widget_class()

            def notebook_reduction(self, obj: Any) -> Any:
                """A notebook function or class as the fast path writes it; NotImplemented otherwise."""
                if self._by_value is None:
                    main, names, returning = self._notebook
                    self._by_value = byvalue.Pickler(io.BytesIO(), main=main, names=names, returning=returning)
                back = self._by_value.sent_back(obj)
                if back is not None:
                    return back
                if route(obj) is not Route.BY_VALUE:
                    return NotImplemented
                return self._by_value.by_value(obj)

            def reducer_override(self, obj: Any) -> Any:
                kind = type(obj)
                if kind is _FunctionType or kind is CACHED_FUNCTION or issubclass(kind, type):
                    return self.notebook_reduction(obj)
                if kind is types.ModuleType and route(obj) is Route.MODULE:
                    return _import_module, (obj.__name__,)
                if _is_exact_ndarray(obj):
                    return obj.__reduce_ex__(PROTOCOL)
                if kind.__reduce__ is _EXCEPTION_REDUCE and rebuilt_without_init(kind):
                    return exception_reduction(obj)
                if kind is contextvars.ContextVar:
                    return byvalue.reduce_context_var(obj, self._notebook[2])
                if self._widget is not None and issubclass(kind, self._widget):
                    return widgetrelay.reduction(obj)
                if kind in openfiles.FILE_TYPES:  # the same file at the same place, never truncated
                    try:
                        return openfiles.reduce(obj, byvalue._token(obj))
                    except openfiles.Unreachable:
                        raise
                    except pickle.PicklingError:  # a pipe, a terminal: dill's own way
                        return NotImplemented
                return NotImplemented

        _dill_pickler_class = DillPickler
    return _dill_pickler_class


def dill_pickler(
    file: Any,
    buffer_callback: Any = None,
    main: MutableMapping[str, Any] | None = None,
    names: Iterable[str] = (),
    returning: bool = False,
) -> pickle.Pickler:
    """The pickler of the dill fallback (``recurse=True``, protocol 5) writing to ``file``."""
    return dill_pickler_class()(
        file, protocol=PROTOCOL, recurse=True, buffer_callback=buffer_callback,
        main=main, names=names, returning=returning,
    )


class _ByDill:
    """One variable written by dill, travelling inside the fast stream.

    Why per variable and not the whole shipment: redoing everything with dill
    would drop what the fast path keeps (a notebook class goes back as the
    notebook's own, an Enum member stays ``is``-identical, modules follow
    their package); one open file among the results must not change the
    meaning of the others. The dill bytes are one argument of the reduction,
    and dill's out-of-band buffers are ``PickleBuffer`` arguments, which the
    fast pickler sends out of band in turn: arrays inside still go through
    shared memory. What is shared between this variable and another is not
    shared on the other side (two memos); the fallback is for the rare value.
    """

    __slots__ = ("data", "buffers")

    def __init__(self, value: Any, pickler: Callable[[Any, Any], pickle.Pickler] | None = None) -> None:
        """``pickler(file, buffer_callback)``: :func:`dill_pickler`, with the notebook's namespace."""
        file = io.BytesIO()
        buffers: list[pickle.PickleBuffer] = []
        (pickler or dill_pickler)(file, buffers.append).dump(value)
        self.data = file.getvalue()
        self.buffers = buffers

    def __reduce__(self) -> tuple[Any, tuple[bytes, list[pickle.PickleBuffer]]]:
        return _load_dill, (self.data, self.buffers)


def _load_dill(data: bytes, buffers: list[Any]) -> Any:
    import dill

    return dill.Unpickler(io.BytesIO(data), buffers=buffers, ignore=True).load()


def dumps(
    values: Mapping[str, Any],
    *,
    skip_failures: bool = False,
    main: MutableMapping[str, Any] | None = None,
    uses: Iterable[str] = (),
    returning: bool = False,
    shared: Sequence[Any] = (),
) -> Shipment:
    """Serialize named values in one pass, preserving sharing between them.

    With ``skip_failures`` (used for results coming back) a variable that
    cannot be serialized is left out and named in ``skipped``; otherwise the
    first such variable raises :class:`ShipError` naming it and, when the
    diagnosis engine finds it, the member path and the fix.  ``main`` is the
    namespace the values come from (the notebook's, or the worker's
    ``__main__``): functions defined there are rebuilt on the other side's.
    ``uses``: the identifiers the code uses, so re-imported modules bring the
    submodules it names.  ``returning``: a worker's results going back to the
    kernel that sent its inputs, so what came from there goes back as itself.
    ``shared``: objects, all different, that the other side has as well
    (a worker's inputs, the notebook's own objects): a value that is or holds
    one of them is written as a reference to it, read back with the same
    ``shared`` there (:func:`loads`), so ``y = data`` is the notebook's ``data``.
    """
    names = list(values)
    skipped: dict[str, str] = {}
    uses = frozenset(uses)

    def fast(file: Any, buffer_callback: Any = None) -> pickle.Pickler:
        return fast_pickler(file, buffer_callback, main=main, names=uses, returning=returning)

    def slow(file: Any, buffer_callback: Any = None) -> pickle.Pickler:
        return dill_pickler(file, buffer_callback, main=main, names=uses, returning=returning)

    todo = list(names)
    ready: dict[str, Any] = dict(values)  # a value only dill can write is replaced by its _ByDill
    for name, value in values.items():
        if type(value) not in _SCALARS:
            state = process_state(value)
            if state is not None:  # the process's own environ, sys.path...: the other side's own
                ready[name] = _ProcessState(*state)
    while True:
        shipment, failed, exc = _attempt(fast, ready, todo, shared)
        if shipment is not None:
            shipment.skipped = skipped
            return shipment
        assert failed is not None and exc is not None
        if type(ready[failed]) is not _ByDill and not isinstance(exc, openfiles.Unreachable):
            try:
                ready[failed] = _ByDill(values[failed], slow)
                continue  # again, with this one variable written by dill
            except Exception as dill_exc:
                exc = dill_exc
        detail, path, report = _describe_failure(failed, values[failed], exc)
        if isinstance(exc, openfiles.Unreachable):  # its own words say more than the category's
            detail = f"{path or failed} is an open file, but {exc}"
        if not skip_failures:
            value = values[failed]
            error = ShipError(
                f"cannot send variable {failed!r} ({type(value).__module__}."
                f"{type(value).__qualname__}) to the worker: {detail.rstrip('.')}. Nothing ran. "
                f"Create it inside the isolated cell instead, or leave it out of the "
                f"inputs; `%pickle_check {failed}` shows every problem in it.",
                name=failed,
                path=path,
            )
            error.report = report  # the panel lists every problem without diagnosing again
            raise error from exc
        skipped[failed] = f"{type(values[failed]).__module__}.{type(values[failed]).__qualname__}: {detail}"
        todo = [n for n in todo if n != failed]


def in_band(value: Any, main: MutableMapping[str, Any] | None = None) -> bytes:
    """One small value written whole into the message (no buffers beside it), as the fast path
    writes it, or by dill where only dill can; read back with :func:`loads` (engine ``pickle``).
    Raises what the pickler raised when neither can write it."""
    file = io.BytesIO()
    try:
        fast_pickler(file, None, main=main).dump(value)
    except Exception:
        file = io.BytesIO()
        slow = functools.partial(dill_pickler, main=main)
        fast_pickler(file, None, main=main).dump(_ByDill(value, slow))  # dill's own error, if it cannot
    return file.getvalue()


def exception_reduction(exc: BaseException) -> tuple[Any, ...]:
    """How an exception of a class made by a ``class`` statement travels: so that it loads as itself.

    Pickle's own way (``BaseException.__reduce__``) rebuilds an exception by
    calling its class with ``exc.args``: one whose ``__init__`` takes other
    arguments (``PairError(a, b)`` calling ``super().__init__(f"{a}-{b}")``)
    cannot be loaded, so a cell raising it showed a ``RemoteError`` where an
    ordinary cell raises ``PairError``, and a list of such errors did not come
    back at all.  Both picklers send such an exception, wherever it is (raised,
    kept as ``err = e``, in a list of failures), as its class, its ``args`` and
    its attributes, and it is made again without calling its ``__init__``.  A
    class that defines its own way (``__reduce__``, ``__reduce_ex__``, a
    ``copyreg`` reducer) keeps it.  The picklers ask only for a type whose
    ``__reduce__`` is ``BaseException``'s, one attribute lookup for any object.
    """
    return _rebuild_exception, (type(exc), exc.args, dict(vars(exc)) or None)


_EXCEPTION_REDUCE = BaseException.__reduce__
_OBJECT_REDUCE_EX = object.__reduce_ex__


def rebuilt_without_init(kind: type) -> bool:
    """True for an exception class (``kind.__reduce__`` is pickle's) that travels as :func:`exception_reduction` says."""
    return bool(kind.__flags__ & HEAPTYPE) and kind.__reduce_ex__ is _OBJECT_REDUCE_EX and kind not in copyreg.dispatch_table


def _rebuild_exception(kind: type, args: tuple[Any, ...], state: dict[str, Any] | None) -> BaseException:
    exc = kind.__new__(kind, *args)
    if state:
        exc.__dict__.update(state)
    return exc


class _ProcessState:
    """A variable bound to an object that stands for the process's state (``os.environ``,
    ``matplotlib.rcParams``: :data:`nbisolate.travel.PROCESS_STATE`): loaded as the loading
    process's own."""

    __slots__ = ("module", "attribute")

    def __init__(self, module: str, attribute: str) -> None:
        self.module, self.attribute = module, attribute

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return _own_state, (self.module, self.attribute)


def _own_state(module: str, attribute: str) -> Any:
    import importlib

    return getattr(importlib.import_module(module), attribute)


def loads(
    names: Iterable[str],
    data: bytes | memoryview,
    buffers: Sequence[Any],
    engine: str = "pickle",
    main: MutableMapping[str, Any] | None = None,
    *,
    starts: Sequence[Sequence[int]] | None = None,
    failed: dict[str, BaseException] | None = None,
    shared: Sequence[Any] = (),
) -> dict[str, Any]:
    """Rebuild the values written by :func:`dumps`, in order and with one memo.

    ``main`` is the namespace notebook functions are rebuilt on (the worker's
    ``__main__``, or the notebook's when results come back); by default this
    interpreter's ``__main__``.  With ``starts`` (:attr:`Shipment.starts`) and a
    ``failed`` dict, a value whose rebuilding raises (a ``__setstate__`` that
    fails here) is left out and named in ``failed``, and loading goes on with
    the next one from where it starts; a value that shares an object with one
    that failed is left out too, and says so. Without them the first failure
    raises. ``shared``: this side's objects for those :func:`dumps` was given,
    in the same order.
    """
    names = list(names)
    current: Any = _unpickler(data, 0, buffers, 0, list(shared), engine, prelude=bool(shared))
    out: dict[str, Any] = {}
    lost: set[int] = set()  # memo places of objects inside values that could not be rebuilt
    with byvalue.loads_into(main):
        for i, name in enumerate(names):
            try:
                out[name] = current.load()
                continue
            except Exception as exc:
                if failed is None or starts is None or len(starts) != len(names):
                    raise
                if isinstance(exc, _SharesLost):
                    exc = pickle.UnpicklingError(
                        f"it shares objects with {', '.join(map(repr, failed))}, which could not be rebuilt"
                    )
                failed[name] = exc
            if i + 1 == len(names):
                break
            # The next value starts afresh, with every memo place it may refer to: what loaded
            # before, and nothing for what the failed value would have made (lost: a value
            # that refers to it cannot be rebuilt either).
            offset, first_buffer = starts[i + 1][:2]
            had = current.memo.copy()
            places = _memoized(data, 0, offset)  # (the shared objects' places among them)
            lost |= {place for place in range(places) if place not in had}
            end = starts[i + 2][0] if i + 2 < len(names) else len(data)
            if _refers_to(data, offset, end, lost):
                current = _Skip(had)
            else:
                known = [had.get(place) for place in range(places)]
                current = _unpickler(data, offset, buffers, first_buffer, known, engine)
    return out


class _SharesLost(Exception):
    """A value refers to an object inside one that could not be rebuilt."""


class _Skip:
    """Stands for the unpickler of a value that refers to a lost object (see :func:`loads`)."""

    def __init__(self, memo: dict[int, Any]) -> None:
        self.memo = memo  # what loaded before it, for the value after it

    def load(self) -> Any:
        raise _SharesLost()


class _Unpickler(pickle.Unpickler):
    """The C unpickler, whose memo starts with objects this side has (``known``, by place)."""

    def __init__(self, file: Any, *, buffers: Any, known: Sequence[Any]) -> None:
        super().__init__(file, buffers=buffers)
        self._known = known

    def persistent_load(self, pid: Any) -> Any:
        return self._known[pid]


def _unpickler(
    data: bytes | memoryview,
    offset: int,
    buffers: Sequence[Any],
    first_buffer: int,
    known: list[Any],
    engine: str,
    prelude: bool = False,
) -> Any:
    """An unpickler of ``data`` from ``offset`` and of ``buffers`` from ``first_buffer``, whose memo
    holds ``known`` at its places 0 on. The C unpickler takes no memo set from outside (it would
    write its own entries over it): a small pickle read first puts them there (:func:`_memo_prelude`:
    at the start of ``data`` with ``prelude``, as :func:`dumps` writes it, else made here)."""
    parts = buffers[first_buffer:] if first_buffer else buffers
    rest = memoryview(data)[offset:] if offset else data
    if engine == "dill":
        import dill

        unpickler = dill.Unpickler(io.BytesIO(rest), buffers=parts, ignore=True)
        if prelude:
            unpickler.persistent_load = known.__getitem__
            unpickler.load()
        else:
            unpickler.memo = dict(enumerate(known))  # (a Python unpickler: its memo is a dict)
        return unpickler
    if not known:
        return _Unpickler(io.BytesIO(rest), buffers=parts, known=known)
    file = io.BytesIO(rest) if prelude else io.BytesIO(_memo_prelude(len(known)) + bytes(rest))
    unpickler = _Unpickler(file, buffers=parts, known=known)
    unpickler.load()
    return unpickler


def _memo_prelude(count: int) -> bytes:
    """A pickle that puts the ``count`` objects ``persistent_load`` gives for 0 to ``count - 1``
    into the memo, at those places, and returns None."""
    one = [pickle.BININT + i.to_bytes(4, "little", signed=True) + pickle.BINPERSID + pickle.MEMOIZE + pickle.POP
           for i in range(count)]
    return pickle.PROTO + bytes([5]) + b"".join(one) + pickle.NONE + pickle.STOP


def _memoized(data: bytes | memoryview, start: int, end: int) -> int:
    """How many memo places the pickles in ``data[start:end]`` make (read only after a failure)."""
    import pickletools

    count, file = 0, io.BytesIO(memoryview(data)[start:end])
    while file.tell() < end - start:
        for op, arg, _ in pickletools.genops(file):
            if op.name == "MEMOIZE":
                count += 1
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                count = max(count, int(arg) + 1)
    return count


def _refers_to(data: bytes | memoryview, start: int, end: int, places: set[int]) -> bool:
    """Whether the pickle in ``data[start:end]`` refers to any of the memo ``places``."""
    import pickletools

    file = io.BytesIO(memoryview(data)[start:end])
    return any(
        op.name in ("GET", "BINGET", "LONG_BINGET") and int(arg) in places for op, arg, _ in pickletools.genops(file)
    )


# -- large buffers copied straight between the kernel and a worker ----------------------------
#
# A large result used to travel the way inputs do: the worker copied its buffers into a
# fresh memfd and the kernel mapped it. Measured on 400 MB, that costs ten times the
# cell itself: shared memory is made of 4 KiB pages (shmem gets no transparent huge
# pages unless the machine is configured for it), so the worker faults in 100,000 fresh
# pages for the copy (~0.25 s) and the kernel faults them in again to map them (~0.04 s),
# while the cell's own array sits in 2 MiB pages (~0.025 s). Instead the worker says
# where its buffers are and waits; the kernel copies them with ``process_vm_readv``
# straight into private memory of its own (huge pages, so ~0.035 s for 400 MB) and
# answers. One copy, no shared segment at all (nothing to unlink, whatever ends the
# run), the result's memory belongs to the kernel from the start and never depends on
# the worker, which may exit at once. Where the kernel may not read the worker (a
# seccomp profile, a ptrace policy) it answers ``PULL_RESEND`` and the buffers come
# through shared memory as before.
#
# Inputs are the mirror image (:func:`room`, :func:`place`): the new worker makes room in
# its own memory and the kernel writes the buffers in. The kernel writes rather than the
# worker reads because a process may always write into its descendants, while reading an
# ancestor is refused under Yama's ``ptrace_scope`` 1 (Ubuntu's default).

PULL_TAKEN = b"T"
"""The kernel's answer on the channel: it copied the buffers; the worker may go on and exit."""
PULL_RESEND = b"R"
"""The kernel's answer on the channel: it could not read them; send them with the message."""

_IOV_MAX = 1024  # iovecs per process_vm_readv call (Linux's UIO_MAXIOV)
_SMALL = 1 << 20  # buffers under this share one allocation; larger ones get their own mapping
_PAGE = mmap.PAGESIZE
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_libc: Any = None


def _c() -> Any:
    """libc through ctypes, with ``process_vm_readv``/``writev`` declared; None where there is none."""
    global _libc
    if _libc is None:
        import ctypes

        try:
            lib = ctypes.CDLL(None, use_errno=True)
            calls = (lib.process_vm_readv, lib.process_vm_writev)
        except (OSError, AttributeError):
            _libc = False
            return None
        for call in calls:
            call.restype = ctypes.c_ssize_t
            call.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong,
                             ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
        # madvise through ctypes lets go of the GIL meanwhile (the mmap module's does not):
        # a thread faulting in room would otherwise stall the kernel's other threads.
        lib.madvise.restype = ctypes.c_int
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        get = ctypes.pythonapi.PyObject_GetBuffer
        get.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_int]
        get.restype = ctypes.c_int
        ctypes.pythonapi.PyBuffer_Release.argtypes = [ctypes.c_void_p]
        _libc = lib
    return _libc or None


def _py_buffer() -> Any:
    import ctypes

    class PyBuffer(ctypes.Structure):  # CPython's Py_buffer, stable across versions
        _fields_ = [
            ("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
            ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
            ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
            ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p),
        ]

    return PyBuffer()


def pull_spans(buffers: Sequence[Any]) -> list[tuple[int, int]] | None:
    """Where each buffer's bytes are in this process, ``(address, length)``, for :func:`pull`.

    The caller must keep ``buffers`` alive and unchanged until the kernel has
    answered. None where reading another process is not possible here (not
    Linux, no ``process_vm_readv``): the buffers then travel with the message.
    """
    lib = _c()
    if lib is None:
        return None
    import ctypes

    api = ctypes.pythonapi
    view = _py_buffer()
    spans = []
    for b in buffers:
        try:
            if api.PyObject_GetBuffer(b, ctypes.byref(view), 0) != 0:  # PyBUF_SIMPLE: contiguous
                return None
        except (BufferError, TypeError, ValueError):  # not contiguous: it travels with the message
            return None
        try:
            spans.append((int(view.buf or 0), int(view.len)))
        finally:
            api.PyBuffer_Release(ctypes.byref(view))
    return spans


def available_memory() -> int | None:
    """MemAvailable of this machine in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _private(n: int) -> Any:
    """``n`` bytes of fresh private memory of this process, in huge pages where they pay."""
    mm = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if _MADV_HUGEPAGE is not None and n >= 2 << 20:
        try:
            mm.madvise(_MADV_HUGEPAGE)  # as numpy does for its own large arrays
        except OSError:
            pass
    return mm


class Ready:
    """Room for large buffers that are on their way, made and faulted in before they arrive.

    Copying into fresh memory costs the page faults that zero it as well as
    the copy: measured on 400 MB, 1.5-2.5x a warm ``memcpy``, against 1.1-1.5x
    into memory faulted in already. A worker waiting for its cell has time for
    the faults of its inputs, and the kernel, waiting for a cell, for those of
    its result (:meth:`fault_some`, a piece at a time, so buffers that arrive
    meanwhile wait for one piece at most); memory not faulted in yet is still
    room, just slower to copy into. :func:`room` uses it when the large
    buffers fit, and frees what they do not use.

    Made in a process that then forks, its pages would be shared with the
    child until written: each write would copy a page. The kernel makes its
    room in a thread while the worker (forked by the template, not by it) runs.
    """

    STEP = 16 << 20

    def __init__(self, nbytes: int) -> None:
        import ctypes

        self.size = _round_up(int(nbytes), 2 << 20)
        self.map: Any = _private(self.size)
        self.faulted = 0
        first = ctypes.c_char.from_buffer(self.map)
        self._base = ctypes.addressof(first)
        del first  # an exported buffer would keep the map from closing

    def fault_some(self) -> bool:
        """Fault in the next piece; False once all of it is in (or the system cannot be asked to)."""
        if self.map is None or self.faulted >= self.size:
            return False
        step = min(self.STEP, self.size - self.faulted)
        lib = _c()
        try:
            if lib is not None:
                if lib.madvise(self._base + self.faulted, step, _MADV_POPULATE_WRITE) != 0:
                    raise OSError("madvise")
            else:
                self.map.madvise(_MADV_POPULATE_WRITE, self.faulted, step)
        except (OSError, ValueError):  # before Linux 5.14: the copy faults them in instead
            self.faulted = self.size
            return False
        self.faulted += step
        return self.faulted < self.size

    def carve(self, sizes: Sequence[int]) -> list[memoryview] | None:
        """Views for buffers of ``sizes`` (page-aligned, in order), None when they do not fit."""
        if self.map is None:
            return None
        offsets, end = [], 0
        for n in sizes:
            offsets.append(end)
            end += _round_up(int(n), _PAGE)
        if end > self.size:
            return None
        whole = memoryview(self.map)
        views = [whole[o : o + int(n)] for o, n in zip(offsets, sizes, strict=True)]
        if end < self.size:
            try:
                self.map.madvise(mmap.MADV_DONTNEED, end, self.size - end)  # the rest goes back
            except (OSError, ValueError, AttributeError):
                pass
        self.map = None  # the views keep the mapping now
        return views

    def release(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None


_MADV_POPULATE_WRITE = 23  # Linux 5.14+; not in the mmap module's constants


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def room(sizes: Sequence[int], ready: Ready | None = None) -> tuple[list[memoryview], list[tuple[int, int]]]:
    """Memory here for buffers of ``sizes``: the views, and where each is (for :func:`place`).

    The large buffers take ``ready`` when they fit in it (what they leave of
    it is freed; it is released when they do not fit). Otherwise each buffer
    of a megabyte or more gets a fresh private mapping of its own (freed
    when the last view of it goes, so dropping one value frees its memory).
    The small ones share one ``bytearray``. Raises ``MemoryError`` when
    there is no room.
    """
    import ctypes

    sizes = [int(n) for n in sizes]
    large = [n for n in sizes if n >= _SMALL]
    carved = ready.carve(large) if ready is not None and large else None
    if ready is not None:
        ready.release()  # unused (or carved: then a no-op)
    pool_view = memoryview(bytearray(sum(n for n in sizes if n < _SMALL)))
    out: list[memoryview] = []
    pos = 0
    try:
        for n in sizes:
            if n < _SMALL:
                out.append(pool_view[pos : pos + n])
                pos += n
            elif carved:
                out.append(carved.pop(0))
            else:
                out.append(memoryview(_private(n)))
    except (OSError, ValueError) as exc:
        raise MemoryError(f"cannot allocate {sum(sizes)} bytes: {exc}") from exc
    spans = []
    for view in out:
        if view.nbytes == 0:
            spans.append((0, 0))
            continue
        spans.append((ctypes.addressof(ctypes.c_char.from_buffer(view)), view.nbytes))
    return out, spans


def pull(pid: int, spans: Sequence[Sequence[int]], ready: Ready | None = None) -> list[memoryview]:
    """Copy ``spans`` (from :func:`pull_spans`) out of process ``pid`` into memory of this one.

    The memory is :func:`room`'s (``ready``'s when they fit in it, which is
    used or released either way); one ``process_vm_readv`` call copies up to
    1,024 buffers, two threads share a large copy. Raises ``OSError`` when the
    process may not be read (``EPERM``), is gone (``ESRCH``) or the spans are
    not its memory (``EFAULT``), ``MemoryError`` when there is no room here.
    """
    lib = _c()
    if lib is None:
        if ready is not None:
            ready.release()
        raise OSError(errno.ENOSYS, "process_vm_readv is not available here")
    out, here = room([n for _, n in spans], ready)
    _copy(lib.process_vm_readv, pid, [(h, int(a), n) for (h, n), (a, _) in zip(here, spans, strict=True)])
    return out


def place(pid: int, spans: Sequence[Sequence[int]], buffers: Sequence[Any]) -> None:
    """Copy ``buffers`` of this process into ``spans`` of process ``pid`` (from its :func:`room`).

    The mirror of :func:`pull`, for inputs: a worker may read its kernel only
    where the machine's ptrace policy lets descendants read their ancestors
    (Yama's ``ptrace_scope`` 1, the default on Ubuntu, does not), while a
    process may always write into its own descendants. Raises ``OSError``
    like :func:`pull` (``EFAULT`` also when a span is shorter than its buffer).
    """
    lib = _c()
    if lib is None:
        raise OSError(errno.ENOSYS, "process_vm_writev is not available here")
    here = pull_spans(buffers)
    if here is None:
        raise OSError(errno.EINVAL, "a buffer here is not contiguous")
    if any(int(m) < n for (_, n), (_, m) in zip(here, spans, strict=True)):
        raise OSError(errno.EFAULT, "a buffer does not fit the room made for it")
    _copy(lib.process_vm_writev, pid, [(h, int(a), n) for (h, n), (a, _) in zip(here, spans, strict=True)])


def _copy(call: Any, pid: int, todo: list[tuple[int, int, int]]) -> None:
    """``call`` (``process_vm_readv`` or ``writev``) over ``(here, there, length)`` segments."""
    todo = [t for t in todo if t[2]]
    if sum(n for _, _, n in todo) >= _PARALLEL and (os.cpu_count() or 1) > 1:
        _copy_parallel(call, pid, _split(todo))
    else:
        _copy_serial(call, pid, todo)


_PARALLEL = 64 << 20
"""From this many bytes on, two threads copy: each half-faults its own pages and pins its own.

``process_vm_readv`` is not a plain ``memcpy``: it pins the other process's
pages and faults in the fresh ones here, page by page; two threads on two
cores measured 1.25-1.6x faster on 400 MB (the copy itself is bound by memory
bandwidth, the faulting and pinning are not). ctypes releases the GIL during
the call."""


def _split(todo: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    """``todo`` cut into two lists of about equal bytes, a segment cut at a 2 MiB boundary if need be."""
    half = sum(n for _, _, n in todo) // 2
    first: list[tuple[int, int, int]] = []
    second: list[tuple[int, int, int]] = []
    seen = 0
    for dst, src, n in todo:
        if seen >= half:
            second.append((dst, src, n))
        elif seen + n <= half:
            first.append((dst, src, n))
        else:
            cut = max(_PAGE, (half - seen) // (2 << 20) * (2 << 20))  # keep huge pages whole
            cut = min(cut, n)
            first.append((dst, src, cut))
            if n > cut:
                second.append((dst + cut, src + cut, n - cut))
        seen += n
    return [part for part in (first, second) if part]


def _copy_parallel(call: Any, pid: int, parts: list[list[tuple[int, int, int]]]) -> None:
    import threading

    failures: list[BaseException] = []

    def copy(part: list[tuple[int, int, int]]) -> None:
        try:
            _copy_serial(call, pid, part)
        except BaseException as exc:  # re-raised in the calling thread
            failures.append(exc)

    if len(parts) == 1:
        _copy_serial(call, pid, parts[0])
        return
    helper = threading.Thread(target=copy, args=(parts[1],), name="nbisolate-copy", daemon=True)
    helper.start()
    copy(parts[0])
    helper.join()
    if failures:
        raise failures[0]


def _copy_serial(call: Any, pid: int, todo: list[tuple[int, int, int]]) -> None:
    """``call`` over each ``(here, there, length)`` of ``todo``, 1,024 segments per call."""
    import ctypes

    class IOVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    i = 0
    done = 0  # bytes of todo[i] already copied
    while i < len(todo):
        batch = todo[i : i + _IOV_MAX]
        local = (IOVec * len(batch))()
        remote = (IOVec * len(batch))()
        for j, (dst, src, n) in enumerate(batch):
            skip = done if j == 0 else 0
            local[j].base, local[j].len = dst + skip, n - skip
            remote[j].base, remote[j].len = src + skip, n - skip
        got = call(pid, local, len(batch), remote, len(batch), 0)
        verb = "reading" if call.__name__ == "process_vm_readv" else "writing into"
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{verb} process {pid}: {os.strerror(err)}")
        if got == 0:
            raise OSError(errno.EFAULT, f"{verb} process {pid}: nothing could be copied")
        while got and i < len(todo):  # advance over what was copied, maybe part of a buffer
            left = todo[i][2] - done
            if got >= left:
                got -= left
                i += 1
                done = 0
            else:
                done += got
                got = 0
