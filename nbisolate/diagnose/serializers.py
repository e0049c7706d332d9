"""The serializers a check judges, each exactly as the tool that uses it runs it.

A verdict is only worth something if it comes from the same code that will
really pickle the object: ``pickle`` is the C pickler multiprocessing uses,
``cloudpickle`` the one of loky, joblib, Dask and Ray, and ``dill`` is
``%%isolate`` itself: :mod:`nbisolate.ship`'s fast pickler (C pickler, dill
only for notebook functions and classes, routes from
:func:`nbisolate.travel.route`) and, when that fails, ship's whole-value dill
pickler -- imported from ship, subclassed only to note references into
``__main__``, never re-stated here, so the two cannot drift apart. The loaders guard the in-process load check against side
effects a check must never have (truncating a file, editing a notebook class).

``%pickle_check`` runs these loaders in a separate loader process
(:mod:`nbisolate.probe`), never in the kernel: loading runs the object's own
reconstruction code (``__reduce__`` callables, ``__setstate__``), which may open
files for writing, block, or exit. The loader process sets
:data:`_on_missing`, so that a reference it cannot resolve (anything defined in
the notebook's ``__main__``, which that process does not have) loads as a
stand-in, as it loaded in the kernel; whether a spawned child finds it is the
spawn check's question (:mod:`.spawn`), asked apart.
"""

from __future__ import annotations

import inspect
import io
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dill

from .. import openfiles
from ..byvalue import loads_into
from ..ship import FastPickler, dill_pickler_class
from ..travel import refers_to_main

try:  # cloudpickle is optional: compared when installed
    import cloudpickle as _cloudpickle
except ImportError:  # pragma: no cover - exercised only without cloudpickle
    _cloudpickle = None

PROTOCOL = 5
"""Protocol used for every check: the first with out-of-band buffers."""


class _OutOfTime(BaseException):
    """Raised inside a walk when ``max_seconds`` is used up.

    A BaseException so that no ``except Exception`` in a reducer or in our own
    tracer mistakes it for a pickling failure.
    """


# Types that never refer to __main__ by name: skipped before asking travel.route,
# since the pure-Python dill pickler asks about every object it writes.
_PLAIN_TYPES = frozenset({int, float, complex, str, bytes, bytearray, bool, type(None), list,
                          tuple, dict, set, frozenset})


class _IsolateDillPickler(dill_pickler_class()):  # type: ignore[misc]
    """``%%isolate``'s dill fallback pickler, made as :func:`nbisolate.ship.dill_pickler` makes it.

    The class is ship's own (modules re-imported by name when a worker can
    import them, exact numpy arrays out of band), so judging and tracing with
    it judges what ``%%isolate`` really does; only ``recurse=True``, the
    option ship passes, is defaulted here. It also notes a reference into
    ``__main__`` (:func:`nbisolate.travel.refers_to_main`), the one thing that
    pickles and loads here yet fails in the worker.
    """

    main_refs = False

    def __init__(self, file: Any, protocol: int = PROTOCOL, **kwds: Any) -> None:
        kwds.setdefault("recurse", True)
        super().__init__(file, protocol, **kwds)

    def reducer_override(self, obj: Any) -> Any:
        if not self.main_refs and type(obj) not in _PLAIN_TYPES and refers_to_main(obj):
            self.main_refs = True
        return super().reducer_override(obj)


class _TimedIsolateDill(_IsolateDillPickler):
    """The same, checking the clock: dill is pure Python and can run long."""

    def __init__(self, file: Any, protocol: int, deadline: float, **kwds: Any) -> None:
        super().__init__(file, protocol, **kwds)
        self._nb_deadline = deadline
        self._nb_calls = 0

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        self._nb_calls += 1
        if not self._nb_calls & 255 and time.perf_counter() > self._nb_deadline:
            raise _OutOfTime
        super().save(obj, save_persistent_id)


class _IsolateFastPickler(FastPickler):
    """``%%isolate``'s fast path (:class:`nbisolate.ship.FastPickler`) as it is.

    It never writes a reference into ``__main__`` (notebook objects go by
    value), so ``main_refs`` stays False; only the dill fallback can.
    """

    main_refs = False


def _guarded_create_filehandle(
    name: str, mode: str, position: int, closed: bool, open: Any, strictio: bool, fmode: int,
    fdata: Any,
) -> Any:
    """Stand-in for dill's file re-opener during our in-process load check.

    dill re-opens a pickled file by name when loading. For a file open for
    writing that means ``open(name, "w")``, which would truncate the user's
    file just because they asked whether it pickles. Writable modes are only
    checked (could the worker open it?), never opened; read-only modes go to
    dill's real function.
    """
    from dill import _dill

    if not any(c in mode for c in "wax+"):
        return _dill._create_filehandle(
            name, mode, position, closed, open, strictio, fmode, fdata
        )
    if not isinstance(name, str) or name.startswith("<"):
        # a file known by descriptor number (or stdin/a temp file): opening it
        # again here would share, and later close, a descriptor of the kernel
        return io.BytesIO()
    target = name if os.path.exists(name) else (os.path.dirname(os.path.abspath(name)) or ".")
    if not os.access(target, os.W_OK):
        raise pickle.UnpicklingError(f"[Errno 13] Permission denied: {name!r}")
    return io.BytesIO()


_on_missing: Callable[[str, str], Any] | None = None
"""What a reference this process cannot resolve loads as; None: the error stands.

Set only in the loader process, where ``__main__`` is not the notebook's."""


def _resolve(find: Callable[[str, str], Any], module: str, name: str) -> Any:
    try:
        return find(module, name)
    except (ImportError, AttributeError):
        if _on_missing is None:
            raise
        return _on_missing(module, name)


class _PlainUnpickler(pickle.Unpickler):
    """``pickle.loads`` as it is, but asking :data:`_on_missing` for what it cannot find."""

    def find_class(self, module: str, name: str) -> Any:
        return _resolve(super().find_class, module, name)


class _SafeDillUnpickler(dill.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name == "_create_filehandle" and module in ("dill._dill", "dill.dill"):
            return _guarded_create_filehandle
        if (module, name) == (openfiles.__name__, "reopen"):
            return openfiles.check_reopen
        return _resolve(super().find_class, module, name)


def _isolate_loads(data: bytes, buffers: list[Any], engine: str = "pickle") -> Any:
    """Load as :func:`nbisolate.ship.loads` does in a worker, changing nothing here.

    dill's file re-opener is guarded; by-value classes are built new (as in a
    worker) instead of being found, and overwritten, through cloudpickle's
    class tracker; by-value functions are rebuilt on a scratch namespace, not
    on the notebook's.
    """
    if engine == "dill":
        return _SafeDillUnpickler(io.BytesIO(data), buffers=buffers, ignore=True).load()
    with loads_into({}):
        return _CloudUnpickler(io.BytesIO(data), buffers=buffers).load()


def _pickle_loads(data: bytes, buffers: list[Any], engine: str = "pickle") -> Any:
    if _on_missing is None:
        return pickle.loads(data, buffers=buffers)
    return _PlainUnpickler(io.BytesIO(data), buffers=buffers).load()


def _untracked(make_skeleton: Callable[..., Any]) -> Callable[..., Any]:
    """cloudpickle's class factory, made to always build a new class.

    Loading a class pickled by value in the process that pickled it,
    cloudpickle finds the original class through its class tracker and sets
    the unpickled attributes *on it*: after one check, the notebook's class
    would carry copies of its methods (whose file is ``<dynamic-code>``).
    Without a tracker id the loader builds a fresh class, as a worker would.
    """
    signature = inspect.signature(make_skeleton)

    def build(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        if "class_tracker_id" in bound.arguments:
            bound.arguments["class_tracker_id"] = None
        return make_skeleton(*bound.args, **bound.kwargs)

    return build


class _CloudUnpickler(pickle.Unpickler):
    # An open file is looked at, never opened, by a check (as dill's are, above).
    _swaps: dict[tuple[str, str], Callable[..., Any]] = {
        (openfiles.__name__, "reopen"): openfiles.check_reopen
    }

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in self._swaps:
            return self._swaps[key]
        found = _resolve(super().find_class, module, name)
        if module.startswith("cloudpickle") and name.startswith("_make_skeleton"):
            self._swaps[key] = _untracked(found)
            return self._swaps[key]
        return found


def _cloudpickle_loads(data: bytes, buffers: list[Any], engine: str = "pickle") -> Any:
    return _CloudUnpickler(io.BytesIO(data), buffers=buffers).load()


@dataclass(frozen=True)
class _Dumped:
    """What a dump found out beyond its bytes: the engine that wrote them, and spawn hints."""

    engine: str = "pickle"
    main_refs: bool = False
    only_builtins: bool = False  # only str, bytes, numbers and the builtin containers: see below


_PLAIN = _Dumped()


class _BuiltinsWatch(pickle.Pickler):
    """The C pickler, noting whether it wrote anything but plain builtins.

    It calls ``reducer_override`` for every object except None, bools, ints, floats, str,
    bytes, bytearray and the exact builtin list, tuple, dict, set and frozenset (CPython
    3.8 on): never called, the stream names no global and calls nothing, so loading it
    runs no code and gives back what was written. A notebook's lists of dicts then need no
    load-back check (200,000 of them took a quarter of a second to load elsewhere).
    """

    only_builtins = True

    def reducer_override(self, obj: Any) -> Any:
        self.only_builtins = False
        return NotImplemented


def _dump_pickle(obj: Any, sink: Any, cb: Any, deadline: float) -> _Dumped:
    watch = _BuiltinsWatch(sink, PROTOCOL, buffer_callback=cb)
    watch.dump(obj)
    return _Dumped(only_builtins=watch.only_builtins)


def _dump_isolate(obj: Any, sink: Any, cb: Any, deadline: float) -> _Dumped:
    """``%%isolate``'s two tries, as :func:`nbisolate.ship.dumps` makes them for one value.

    First the fast path (the C pickler with ship's per-object routes); if that
    raises, ship writes that variable with dill instead, so the check starts over
    with ship's dill pickler (``sink.reset()`` and ``cb.reset()`` forget the
    first try's bytes and buffers). Only the dill try checks the clock: the
    fast path runs at C speed.
    """
    fast = _IsolateFastPickler(sink, protocol=PROTOCOL, buffer_callback=cb)
    try:
        fast.dump(obj)
        return _Dumped("pickle", fast.main_refs)
    except Exception:
        sink.reset()
        cb.reset()
    slow = _TimedIsolateDill(sink, PROTOCOL, deadline, buffer_callback=cb)
    slow.dump(obj)
    return _Dumped("dill", slow.main_refs)


def _dump_cloudpickle(obj: Any, sink: Any, cb: Any, deadline: float) -> _Dumped:
    _cloudpickle.Pickler(sink, protocol=PROTOCOL, buffer_callback=cb).dump(obj)
    return _PLAIN


@dataclass(frozen=True)
class _Serializer:
    name: str
    label: str
    used_by: str
    by_value_main: bool  # pickles functions/classes of __main__ by value
    dump: Callable[[Any, Any, Any, float], _Dumped]
    loads: Callable[[bytes, list[Any], str], Any]


_SERIALIZERS: dict[str, _Serializer] = {
    "pickle": _Serializer(
        "pickle", "pickle", "multiprocessing, concurrent.futures, DataLoader workers",
        False, _dump_pickle, _pickle_loads,
    ),
    "dill": _Serializer(
        "dill", "%%isolate", "%%isolate (by value; dill for what only dill writes)", True, _dump_isolate,
        _isolate_loads,
    ),
}
if _cloudpickle is not None:
    _SERIALIZERS["cloudpickle"] = _Serializer(
        "cloudpickle", "cloudpickle", "loky, joblib, Dask, Ray", True, _dump_cloudpickle,
        _cloudpickle_loads,
    )


def available_serializers() -> list[str]:
    """Names accepted by ``serializers=``: pickle, dill, and cloudpickle when installed."""
    return list(_SERIALIZERS)
