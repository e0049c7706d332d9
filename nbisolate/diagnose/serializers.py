"""The serializers a check judges, each exactly as the tool that uses it runs it.

A verdict is only worth something if it comes from the same code that will
really pickle the object: ``pickle`` is the C pickler multiprocessing uses,
``cloudpickle`` the one of loky, joblib, Dask and Ray, and ``dill`` is
``%%isolate``'s own dill pickler, imported from :mod:`nbisolate.ship` (modules
re-imported by name, arrays out of band) rather than re-stated here, so the two
cannot drift apart. The loaders guard the in-process load check against side
effects a check must never have (truncating a file, editing a notebook class).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import inspect
import io
import os
import pickle
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dill

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


class _IsolateDillPickler(dill.Pickler):
    """dill the way ``%%isolate`` ships inputs: ``recurse=True``, modules by name.

    Plain dill pickles a module that is not in the standard library or
    site-packages *by value*, with its whole namespace; ``%%isolate``
    re-imports every module by name in the worker instead, which is what we
    must judge.
    """

    def __init__(self, file: Any, protocol: int = PROTOCOL, **kwds: Any) -> None:
        kwds.setdefault("recurse", True)
        super().__init__(file, protocol, **kwds)

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        t = type(obj)
        if t is types.ModuleType:
            hit = self.memo.get(id(obj))
            if hit is not None:
                self.write(self.get(hit[0]))
                return
            self.save_reduce(importlib.import_module, (obj.__name__,), obj=obj)
            return
        numpy = sys.modules.get("numpy")
        if numpy is not None and t is numpy.ndarray:
            # dill registers its own saver for ndarray that calls
            # ``__reduce__()``: always in-band, a full copy of the data.
            # numpy's protocol-5 reduction hands the buffer to
            # buffer_callback instead, so sizing a 1 GB array copies nothing.
            # Same bytes counted, same verdict.
            hit = self.memo.get(id(obj))
            if hit is not None:
                self.write(self.get(hit[0]))
                return
            self.save_reduce(*obj.__reduce_ex__(self.proto), obj=obj)
            return
        super().save(obj, save_persistent_id)


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


class _SafeDillUnpickler(dill.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name == "_create_filehandle" and module in ("dill._dill", "dill.dill"):
            return _guarded_create_filehandle
        return super().find_class(module, name)


def _dill_loads(data: bytes, buffers: list[Any]) -> Any:
    return _SafeDillUnpickler(io.BytesIO(data), buffers=buffers).load()


def _pickle_loads(data: bytes, buffers: list[Any]) -> Any:
    return pickle.loads(data, buffers=buffers)


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
    _swaps: dict[tuple[str, str], Callable[..., Any]] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in self._swaps:
            return self._swaps[key]
        found = super().find_class(module, name)
        if module.startswith("cloudpickle") and name.startswith("_make_skeleton"):
            self._swaps[key] = _untracked(found)
            return self._swaps[key]
        return found


def _cloudpickle_loads(data: bytes, buffers: list[Any]) -> Any:
    return _CloudUnpickler(io.BytesIO(data), buffers=buffers).load()


def _dump_pickle(obj: Any, sink: Any, cb: Callable[[Any], Any], deadline: float) -> None:
    pickle.Pickler(sink, PROTOCOL, buffer_callback=cb).dump(obj)


def _dump_dill(obj: Any, sink: Any, cb: Callable[[Any], Any], deadline: float) -> None:
    _TimedIsolateDill(sink, PROTOCOL, deadline, buffer_callback=cb).dump(obj)


def _dump_cloudpickle(obj: Any, sink: Any, cb: Callable[[Any], Any], deadline: float) -> None:
    _cloudpickle.Pickler(sink, protocol=PROTOCOL, buffer_callback=cb).dump(obj)


@dataclass(frozen=True)
class _Serializer:
    name: str
    label: str
    used_by: str
    by_value_main: bool  # pickles functions/classes of __main__ by value
    dump: Callable[[Any, Any, Callable[[Any], Any], float], None]
    loads: Callable[[bytes, list[Any]], Any]


_SERIALIZERS: dict[str, _Serializer] = {
    "pickle": _Serializer(
        "pickle", "pickle", "multiprocessing, concurrent.futures, DataLoader workers",
        False, _dump_pickle, _pickle_loads,
    ),
    "dill": _Serializer(
        "dill", "dill (%%isolate)", "%%isolate, multiprocess", True, _dump_dill, _dill_loads,
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
