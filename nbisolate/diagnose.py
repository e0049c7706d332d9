"""``%pickle_check``: can this object cross a process boundary, and if not, which member can't?

A pickling error names a type and never a place: ``TypeError: cannot pickle
'_io.BufferedReader' object`` says nothing about which of a thousand
attributes holds the file. Worse, some objects pickle fine in the kernel and
only fail in the child: functions and classes defined in the notebook are
stored as a reference to ``__main__``, which a freshly spawned interpreter
does not have. This module answers three questions, side by side for the
serializers a notebook user actually meets:

* does it work? (``pickle``: multiprocessing, concurrent.futures, PyTorch
  DataLoader workers; ``dill`` the way ``%%isolate`` uses it; ``cloudpickle``:
  loky, joblib, Dask, Ray) -- judged by really dumping *and* loading, so there
  are no false verdicts;
* where is every culprit? -- the access path from the root
  (``model.loader.dataset._fh``), the culprit's type, a category;
* what to do about it? -- a fix worded for someone in the middle of a
  notebook.

How it works, and why this way:

1. **Fast path.** Each serializer dumps the object once with protocol 5 into
   a sink that only counts bytes, with a ``buffer_callback`` that keeps large
   buffers (numpy arrays, pandas blocks) out of band. Sizing a 1 GB array
   therefore copies nothing. The result is loaded back in-process (with the
   out-of-band buffers, again without copying) because some objects pickle
   fine and fail to load. Most objects are done here, at C speed.
2. **Slow path, only on failure.** A tracing subclass of the serializer's
   pure-Python pickler re-runs the same reduction that failed, keeps the stack
   of objects being saved, and when a ``save`` raises it records the deepest
   failing object, writes a placeholder and carries on with the siblings. So
   every distinct culprit is found in one walk, exactly along the graph that
   pickling follows (``__reduce_ex__``/``__getstate__`` results, ``__dict__``
   and ``__slots__``, dict keys and values, sequence items, function globals
   and closures) -- not along ``dir()``, which reports members pickling never
   touches. Cycles and shared objects are handled by the pickler's own memo
   plus a table of already failed objects; time and depth are bounded and the
   report says when it stopped early.
3. **The spawn trap.** A stdlib pickle that refers to ``__main__`` (or to a
   module a fresh interpreter can't import) loads in the kernel and fails in
   a spawned child. A cheap scan of the pickled bytes tells when to look; the
   tracer then finds which member is stored that way. When static reasoning
   is not conclusive, ``verify_spawn`` (see :func:`nbisolate.probe.spawn_loads`)
   asks a fresh interpreter -- injected, so this module never starts a process.

Everything here is plain functions and data: no processes, no IPython.
"""

from __future__ import annotations

import contextlib
import html
import importlib
import importlib.machinery
import inspect
import io
import logging
import os
import pickle
import re
import reprlib
import sqlite3
import sys
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dill

from .units import short_repr

try:  # cloudpickle is optional: compared when installed
    import cloudpickle as _cloudpickle
except ImportError:  # pragma: no cover - exercised only without cloudpickle
    _cloudpickle = None

__all__ = [
    "NamespaceReport",
    "Problem",
    "Report",
    "SerializerResult",
    "UnknownNameError",
    "available_serializers",
    "check_namespace",
    "pickle_check",
]

PROTOCOL = 5
"""Protocol used for every check: the first with out-of-band buffers."""

DEFAULT_MAX_SECONDS = 5.0
DEFAULT_MAX_DEPTH = 100
DEFAULT_MAX_PROBLEMS = 50
LARGE_BYTES = 100_000_000
"""Objects whose pickle is at least this big get a "large object" warning."""

_KEEP_LIMIT = 64 * 2**20
"""In-band bytes kept for the in-process load check; beyond this we only count."""

_VerifySpawn = Callable[[bytes], "str | None"]


# ---------------------------------------------------------------------------
# Public result types
# ---------------------------------------------------------------------------


@dataclass
class SerializerResult:
    """How one serializer fared with the whole object.

    ``ok`` is the verdict a user cares about: the object can be dumped here,
    loaded back, and (as far as we can tell) loaded in a freshly spawned
    process. ``dumps_ok`` and ``loads_ok`` are the two halves of the in-process
    round trip; ``spawn_ok`` is False when a reference to ``__main__`` or to
    an unimportable module makes a spawned child fail, None when unknown.
    ``size`` counts every byte that would be shipped, in-band pickle plus
    out-of-band buffers (``oob_bytes``).
    """

    name: str
    label: str
    used_by: str
    ok: bool | None
    dumps_ok: bool | None
    loads_ok: bool | None = None
    spawn_ok: bool | None = None
    size: int | None = None
    oob_bytes: int = 0
    seconds: float = 0.0
    error: str | None = None
    note: str | None = None

    @property
    def verdict(self) -> str:
        """One word for tables: ``ok``, ``fails``, ``spawn`` or ``unknown``."""
        if self.ok:
            return "ok"
        if self.ok is None:
            return "unknown"
        if self.dumps_ok and self.loads_ok and self.spawn_ok is False:
            return "spawn"
        return "fails"


@dataclass
class Problem:
    """One distinct culprit: where it is, what it is, why it fails, how to fix it.

    ``path`` is an access path from the checked name (``e.store.db``,
    ``cfg['feeds'][1]``, ``worker.<closure fh>``); ``type_name`` the culprit's
    qualified type (``sqlite3.Connection``); ``what`` a short description of
    the culprit itself. ``fails_with`` lists the serializers it breaks;
    ``severity`` is ``"error"`` when it breaks ``%%isolate`` (dill) too, and
    ``"warning"`` when only other serializers are affected, or for
    advisories such as very large objects. ``also_at`` holds other paths to
    the same object (a shared object is reported once).
    """

    path: str
    type_name: str
    category: str
    title: str
    reason: str
    fix: str
    fails_with: tuple[str, ...] = ()
    severity: str = "error"
    what: str = ""
    also_at: tuple[str, ...] = ()
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class Report:
    """The answer of :func:`pickle_check` for one object.

    ``ok`` is True when every checked serializer succeeded (including the
    spawn check); ``isolate_ok`` is the verdict for ``%%isolate`` alone (the
    dill column). ``truncated`` is True when the walk stopped early (time or
    depth bound); ``notes`` says what was skipped. ``str(report)`` is meant
    for a terminal, ``_repr_html_`` for a notebook.
    """

    name: str
    type_name: str
    results: dict[str, SerializerResult]
    problems: list[Problem]
    truncated: bool = False
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    omitted: int = 0

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results.values())

    @property
    def isolate_ok(self) -> bool | None:
        r = self.results.get("dill")
        return None if r is None else r.ok

    @property
    def errors(self) -> list[Problem]:
        """Problems that break ``%%isolate`` (severity ``"error"``)."""
        return [p for p in self.problems if p.severity == "error"]

    @property
    def size(self) -> int | None:
        """Bytes ``%%isolate`` would ship (dill), else the first known size."""
        r = self.results.get("dill")
        if r is not None and r.size is not None:
            return r.size
        for r in self.results.values():
            if r.size is not None:
                return r.size
        return None

    def __str__(self) -> str:
        return _report_text(self)

    __repr__ = __str__

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        return _report_html(self)


@dataclass
class NamespaceReport:
    """The answer of :func:`check_namespace`: one :class:`Report` per variable.

    ``reports`` is ordered with variables that have problems first.
    ``modules`` lists variables that hold modules: they are not pickled at
    all by ``%%isolate`` but re-imported by name in the worker.
    """

    reports: dict[str, Report]
    modules: list[str] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.reports.values())

    @property
    def truncated(self) -> bool:
        return any(r.truncated for r in self.reports.values())

    @property
    def problems(self) -> list[Problem]:
        return [p for r in self.reports.values() for p in r.problems]

    def __str__(self) -> str:
        return _namespace_text(self)

    __repr__ = __str__

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        return _namespace_html(self)


class UnknownNameError(KeyError):
    """``check_namespace`` was asked about names the namespace does not have."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        listed = ", ".join(self.names)
        plural = "s" if len(self.names) > 1 else ""
        super().__init__(
            f"no notebook variable{plural} named {listed}: check the spelling, or run the "
            "cell that defines it first"
        )

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


# ---------------------------------------------------------------------------
# Serializers
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Counting sink
# ---------------------------------------------------------------------------


class _Sink:
    """A write-only file that counts bytes, keeps them while small, and greps them.

    The grep looks for module names that make a by-reference pickle fail in a
    spawned child (``__main__``, modules a fresh interpreter can't import).
    Pickles store such names as plain strings, so a byte search tells us
    cheaply whether the slow walk is needed at all. False hits only cost time.
    """

    __slots__ = ("size", "chunks", "kept", "pattern", "hit", "_tail")

    def __init__(self, pattern: re.Pattern[bytes] | None) -> None:
        self.size = 0
        self.chunks: list[bytes] = []
        self.kept = True
        self.pattern = pattern
        self.hit = False
        self._tail = b""

    def write(self, data: Any) -> int:
        view = memoryview(data)
        n = view.nbytes
        self.size += n
        if self.kept:
            if self.size <= _KEEP_LIMIT:
                self.chunks.append(bytes(view))
            else:
                self.kept = False
                self.chunks = []
        if self.pattern is not None and not self.hit and n <= 4 * 2**20:
            chunk = bytes(view) if not isinstance(data, bytes) else data
            if self.pattern.search(self._tail + chunk[:256]) or self.pattern.search(chunk):
                self.hit = True
            self._tail = chunk[-256:]
        return n

    def value(self) -> bytes | None:
        return b"".join(self.chunks) if self.kept else None


class _NullSink:
    def write(self, data: Any) -> int:
        return memoryview(data).nbytes


# ---------------------------------------------------------------------------
# Can a fresh interpreter import this module?
# ---------------------------------------------------------------------------


def _is(obj: Any, classes: type | tuple[type, ...]) -> bool:
    """``isinstance`` by the real type.

    ``isinstance`` asks ``obj.__class__``, which a weak proxy forwards to its
    referent (and raises ReferenceError for once the referent is gone); we
    want to classify the object the pickler actually sees.
    """
    return issubclass(type(obj), classes)


def _main_module_has_file() -> str | None:
    main = sys.modules.get("__main__")
    f = getattr(main, "__file__", None)
    return f if isinstance(f, str) else None


class _Context:
    """State shared by all checks of one call (one variable or a namespace).

    Knows which loaded modules look suspicious (no spec, loaded under another
    name, or from a directory not on ``sys.path``), decides per referenced
    module whether a fresh interpreter can import it, and caches the answers
    of ``verify_spawn`` so each reference is probed once.
    """

    def __init__(self, verify_spawn: _VerifySpawn | None) -> None:
        self.verify_spawn = verify_spawn
        self._status: dict[str, str] = {}
        self._verified: dict[tuple[str, str], str | None] = {}
        self.suspicious = self._find_suspicious()
        names = sorted(self.suspicious, key=len, reverse=True)
        self.pattern_all = _needle_pattern(["__main__", *names])
        self.pattern_refs = _needle_pattern(names)

    @staticmethod
    def _find_suspicious() -> set[str]:
        on_path = set()
        cwd = os.getcwd()
        for entry in sys.path:
            if isinstance(entry, str):
                on_path.add(os.path.abspath(entry or cwd))
        found = set()
        for name, mod in list(sys.modules.items()):
            if mod is None or name == "__main__":
                continue
            spec = getattr(mod, "__spec__", None)
            if spec is None:
                found.add(name)
                continue
            if spec.name != name:
                found.add(name)
                continue
            if "." in name:
                continue
            origin = getattr(spec, "origin", None)
            if not origin or origin in ("built-in", "frozen") or not os.path.isabs(origin):
                continue
            where = os.path.dirname(origin)
            if spec.submodule_search_locations:
                where = os.path.dirname(where)
            if where not in on_path:
                found.add(name)
        return found

    def module_status(self, modname: str) -> str:
        """``ok``, ``main``, ``missing`` (a fresh interpreter won't find it) or ``unknown``."""
        cached = self._status.get(modname)
        if cached is None:
            cached = self._status[modname] = _module_status(modname)
        return cached

    def verify(self, obj: Any, modname: str, qualname: str) -> str | None | bool:
        """Ask ``verify_spawn`` whether a fresh interpreter can load ``obj`` by reference.

        Returns None when it can, the error text when it can't, and False when
        no verifier was given or ``obj`` itself can't be pickled for the probe.
        """
        if self.verify_spawn is None:
            return False
        key = (modname, qualname)
        if key not in self._verified:
            try:
                data = pickle.dumps(obj, protocol=PROTOCOL)
            except Exception:
                return False
            self._verified[key] = self.verify_spawn(data)
        return self._verified[key]


def _needle_pattern(names: Iterable[str]) -> re.Pattern[bytes] | None:
    names = [n for n in names if n]
    if not names:
        return None
    return re.compile(b"|".join(re.escape(n.encode()) for n in names))


def _module_status(modname: str) -> str:
    if modname in ("__main__", "__mp_main__"):
        return "main"
    mod = sys.modules.get(modname)
    if mod is None:
        return "unknown"
    spec = getattr(mod, "__spec__", None)
    if spec is None or spec.name != modname:
        return "unknown"
    if spec.origin in ("built-in", "frozen"):
        return "ok"
    top = modname.partition(".")[0]
    top_mod = sys.modules.get(top)
    top_spec = getattr(top_mod, "__spec__", None)
    if top_spec is None:
        return "unknown"
    for finder in list(sys.meta_path):
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        try:
            spec2 = find_spec(top, None)
        except Exception:
            continue
        if spec2 is None:
            continue
        same_origin = spec2.origin == top_spec.origin or (
            spec2.submodule_search_locations
            and top_spec.submodule_search_locations
            and list(spec2.submodule_search_locations)
            == list(top_spec.submodule_search_locations)
        )
        return "ok" if same_origin else "unknown"
    return "missing"


# ---------------------------------------------------------------------------
# Tracing picklers (the slow path)
# ---------------------------------------------------------------------------


@dataclass
class _Finding:
    obj: Any
    path: str
    kind: str  # "fail", "main" (spawn trap), "ref" (unimportable module), "depth"
    error: str
    serializer: str
    also: list[str] = field(default_factory=list)
    module: str = ""


class _Abandon(BaseException):
    """Unwinds the walk to a resource that holds a failing member.

    A lock inside a ``threading.Thread``, a buffer inside a ``GzipFile``, a
    pool inside a database engine: the useful answer is the thread, the
    file, the engine (one problem, one fix), not their private parts -- and
    walking on through their internals (a thread's ``_stderr`` leads into the
    whole kernel) only produces noise. A BaseException, so that reducers'
    ``except Exception`` don't stop it on the way.
    """

    def __init__(self, holder: Any, error: str) -> None:
        super().__init__()
        self.holder = holder
        self.error = error


_RESOURCE_BY_TYPE: dict[type, str | None] = {}


def _resource_of(obj: Any) -> str | None:
    t = type(obj)
    try:
        return _RESOURCE_BY_TYPE[t]
    except KeyError:
        found = _RESOURCE_BY_TYPE[t] = _resource_category(obj)
        return found
    except TypeError:  # unhashable metatype
        return _resource_category(obj)


class _TraceMixin:
    """Turns a pure-Python pickler into a culprit finder.

    ``save`` keeps the stack of objects being pickled. An exception that
    escapes ``save(obj)`` without having been handled by a deeper ``save``
    means ``obj`` itself can't be reduced: it is the deepest failing object,
    so we record it with its path, write a placeholder (``None``) and return
    normally, letting the parent carry on with its other members. The stream
    we produce is never loaded, so a placeholder is harmless.

    When the failing object sits inside a resource (see :class:`_Abandon`),
    the walk instead unwinds to the outermost such resource, forgets what it
    found inside it, and reports the resource, naming the failing member in
    the error text.
    """

    _nb_by_value_main = False

    def _nb_setup(
        self, name: str, serializer: str, ctx: _Context, deadline: float,
        max_depth: int, check_refs: bool,
    ) -> None:
        self._nb_name = name
        self._nb_serializer = serializer
        self._nb_ctx = ctx
        self._nb_deadline = deadline
        self._nb_max_depth = max_depth
        self._nb_check_refs = check_refs
        self._nb_stack: list[Any] = []
        self._nb_found: dict[int, _Finding] = {}
        self._nb_undo: list[tuple[Any, ...]] = []
        self._nb_calls = 0
        self._nb_depth_paths: list[str] = []
        self._nb_labels = _LabelCache()

    # The core of it ------------------------------------------------------

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        self._nb_calls += 1
        if not self._nb_calls & 63 and time.perf_counter() > self._nb_deadline:
            raise _OutOfTime
        stack = self._nb_stack
        seen = self._nb_found.get(id(obj))
        if seen is not None and seen.kind == "fail":
            stack.append(obj)
            try:
                self._nb_also(seen)
            finally:
                stack.pop()
            self.write(pickle.NONE)
            return
        if len(stack) >= self._nb_max_depth:
            if len(self._nb_depth_paths) < 3:
                stack.append(obj)
                try:
                    self._nb_depth_paths.append(self._nb_path())
                    self._nb_undo.append(("depth",))
                finally:
                    stack.pop()
            self.write(pickle.NONE)
            return
        mark = (len(self._nb_undo), len(self.memo)) if _resource_of(obj) else None
        stack.append(obj)
        try:
            super().save(obj, save_persistent_id)  # type: ignore[misc]
        except (_OutOfTime, RecursionError):
            raise
        except _Abandon as abandon:
            if abandon.holder is not obj or mark is None:
                raise
            self._nb_rollback(*mark)
            self._nb_record(obj, "fail", abandon.error)
            self.write(pickle.NONE)
        except Exception as exc:
            error = _exc_text(exc)
            holder = next((o for o in stack[:-1] if _resource_of(o)), None)
            if holder is not None:
                where = f" (at {self._nb_path()}, a {_type_name(type(obj))})"
                raise _Abandon(holder, error + where) from None
            self._nb_record(obj, "fail", error)
            self.write(pickle.NONE)
        else:
            if self._nb_check_refs and _is(
                obj, (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType)
            ):
                self._nb_check_ref(obj)
        finally:
            stack.pop()

    def _nb_check_ref(self, obj: Any) -> None:
        """Record ``obj`` if it was stored by a reference a spawned child can't resolve."""
        if _is(obj, types.ModuleType):
            modname = obj.__name__
            if modname in ("__main__", "builtins"):
                return
        else:
            modname = getattr(obj, "__module__", None)
            if not isinstance(modname, str):
                return
        if modname == "__main__":
            if self._nb_by_value_main or _is(obj, types.ModuleType):
                return
            if _main_ref_loads_in_child(obj):
                return
            self._nb_record(obj, "main", "")
            return
        if modname not in self._nb_ctx.suspicious:
            return
        status = self._nb_ctx.module_status(modname)
        if status == "ok":
            return
        self._nb_record(obj, "ref", status, module=modname)

    def _nb_record(self, obj: Any, kind: str, error: str, module: str = "") -> None:
        key = id(obj)
        seen = self._nb_found.get(key)
        if seen is not None:
            self._nb_also(seen)
            return
        self._nb_found[key] = _Finding(
            obj=obj, path=self._nb_path(), kind=kind, error=error,
            serializer=self._nb_serializer, module=module,
        )
        self._nb_undo.append(("found", key))

    def _nb_also(self, seen: _Finding) -> None:
        """Note another path to an object already reported (shared objects, once)."""
        if len(seen.also) >= 5:
            return
        path = self._nb_path()
        if path != seen.path and path not in seen.also:
            seen.also.append(path)
            self._nb_undo.append(("also", seen))

    def _nb_rollback(self, undo_len: int, memo_len: int) -> None:
        """Forget what was found, and memoized, since a resource's walk began.

        Memo entries go too: an object first met inside the abandoned
        resource and met again outside it must be walked again there, or a
        problem only reachable that way would be lost.
        """
        while len(self._nb_undo) > undo_len:
            entry = self._nb_undo.pop()
            if entry[0] == "found":
                self._nb_found.pop(entry[1], None)
            elif entry[0] == "also":
                entry[1].also.pop()
            else:
                self._nb_depth_paths.pop()
        memo = self.memo
        if len(memo) > memo_len:
            for key in list(memo)[memo_len:]:
                del memo[key]

    def _nb_path(self) -> str:
        return _render_path(self._nb_name, self._nb_stack, self._nb_labels)


def _stdlib_dispatch() -> dict[type, Any]:
    """The pure-Python pickler's own dispatch table, without what dill added.

    Importing dill extends ``pickle._Pickler.dispatch`` in place with its
    savers (functions, files, locks...), which would make a "stdlib pickle"
    walk behave like dill. The C pickler is untouched, so the tracer must be
    too: keep only the entries defined by the ``pickle`` module itself.
    """
    table = {
        t: f
        for t, f in pickle._Pickler.dispatch.items()
        if getattr(f, "__module__", None) == "pickle"
    }
    # the entries dill replaced (functions, classes) go back to pickle's own
    standard = {
        type(None): "save_none", bool: "save_bool", int: "save_long", float: "save_float",
        bytes: "save_bytes", bytearray: "save_bytearray", str: "save_str",
        tuple: "save_tuple", list: "save_list", dict: "save_dict", set: "save_set",
        frozenset: "save_frozenset", types.FunctionType: "save_global", type: "save_type",
        pickle.PickleBuffer: "save_picklebuffer",
    }
    for t, method in standard.items():
        if t not in table and hasattr(pickle._Pickler, method):
            table[t] = getattr(pickle._Pickler, method)
    return table


class _PickleTracer(_TraceMixin, pickle._Pickler):  # type: ignore[misc]
    _nb_by_value_main = False
    dispatch = _stdlib_dispatch()


class _DillTracer(_TraceMixin, _IsolateDillPickler):
    _nb_by_value_main = True


_CloudTracer: type | None = None
if _cloudpickle is not None:
    # cloudpickle subclasses the C pickler, whose ``save`` can't be hooked.
    # Its behaviour lives in ``reducer_override`` and ``dispatch_table``,
    # which the pure-Python pickler honours too, so we lend them to it.
    _borrowed: dict[str, Any] = {}
    for _attr, _value in vars(_cloudpickle.Pickler).items():
        if _attr in ("reducer_override", "dispatch_table") or (
            _attr.startswith("_") and not _attr.startswith("__") and callable(_value)
        ):
            _borrowed[_attr] = _value

    if "reducer_override" in _borrowed:

        class _PureCloudPickler(pickle._Pickler):  # type: ignore[misc]
            dispatch = _stdlib_dispatch()

            def __init__(self, file: Any, protocol: int = PROTOCOL, **kwds: Any) -> None:
                super().__init__(file, protocol, **kwds)
                self.globals_ref: dict[int, Any] = {}
                self.proto = int(protocol)

        for _attr, _value in _borrowed.items():
            setattr(_PureCloudPickler, _attr, _value)

        class _CloudTracerCls(_TraceMixin, _PureCloudPickler):
            _nb_by_value_main = True

        _CloudTracer = _CloudTracerCls

_TRACERS: dict[str, type | None] = {
    "pickle": _PickleTracer,
    "dill": _DillTracer,
    "cloudpickle": _CloudTracer,
}


def _main_ref_loads_in_child(obj: Any) -> bool:
    """True when a spawned child would find ``__main__.<obj>`` after all.

    multiprocessing's spawn re-runs a *script's* main module in the child, so
    a function defined in that file is found there. A notebook's ``__main__``
    has no file, and nothing defined in it survives.
    """
    main_file = _main_module_has_file()
    if main_file is None:
        return False
    if _is(obj, type):
        # a class is from the script if its methods are
        codes = [
            v.__code__ for v in vars(obj).values() if isinstance(v, types.FunctionType)
        ]
    else:
        codes = [getattr(obj, "__code__", None)]
    for code in codes:
        if code is None:
            return False
        try:
            if not os.path.samefile(code.co_filename, main_file):
                return False
        except OSError:
            return False
    return True


# ---------------------------------------------------------------------------
# Access paths
# ---------------------------------------------------------------------------


def _key_repr(key: Any) -> str:
    return short_repr(key, 60, f"<{_type_name(type(key))}>")


def _attr_label(name: Any) -> str:
    if isinstance(name, str) and name.isidentifier():
        return "." + name
    return f".__dict__[{_key_repr(name)}]"


def _code_names(code: types.CodeType, out: set[str]) -> set[str]:
    out.update(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code_names(const, out)
    return out


# Containers that serializers copy or rebuild rather than keep: labelling
# them would make paths like ``f.__globals__['x']`` instead of ``f.<global x>``.
_HIDDEN_DESCRIPTORS = frozenset(
    {"__dict__", "__weakref__", "__closure__", "__globals__", "__builtins__"}
)


def _child_labels(anchor: Any) -> dict[int, str]:
    """Map ``id(child) -> label`` for the members of ``anchor`` a user can name.

    Used only after a failure, to turn the pickler's stack into a path like
    ``model.loader.dataset._fh``. The first label for a child wins, so the
    most natural spelling is added first.
    """
    labels: dict[int, str] = {}

    def add(child: Any, label: str) -> None:
        labels.setdefault(id(child), label)

    with contextlib.suppress(Exception):
        if _is(anchor, types.FunctionType):
            code = anchor.__code__
            for var, cell in zip(code.co_freevars, anchor.__closure__ or (), strict=False):
                add(cell, f".<closure {var}>")
                with contextlib.suppress(ValueError):
                    add(cell.cell_contents, f".<closure {var}>")
            globs = anchor.__globals__
            for gname in sorted(_code_names(code, set())):
                if gname in globs:
                    add(globs[gname], f".<global {gname}>")
            for i, value in enumerate(anchor.__defaults__ or ()):
                add(value, f".__defaults__[{i}]")
            for k, value in (anchor.__kwdefaults__ or {}).items():
                add(value, f".__kwdefaults__[{k!r}]")
            add(code, ".__code__")
        elif _is(anchor, types.MethodType):
            add(anchor.__self__, ".__self__")
            add(anchor.__func__, ".__func__")
        elif _is(anchor, types.CellType):
            with contextlib.suppress(ValueError):
                add(anchor.cell_contents, "")
        if _is(anchor, dict):
            for k, v in anchor.items():
                add(v, f"[{_key_repr(k)}]")
            for k in anchor:
                add(k, f"<key {_key_repr(k)}>")
        elif _is(anchor, (list, tuple)):
            fields = getattr(type(anchor), "_fields", None) if _is(anchor, tuple) else None
            for i, v in enumerate(anchor):
                if fields and i < len(fields) and isinstance(fields[i], str):
                    add(v, "." + fields[i])
                else:
                    add(v, f"[{i}]")
        elif _is(anchor, (set, frozenset)):
            for v in anchor:
                add(v, "<set item>")
        elif _is(anchor, type):
            for k, v in vars(anchor).items():
                add(v, _attr_label(k))
            for i, base in enumerate(anchor.__bases__):
                add(base, f".__bases__[{i}]")
        else:
            _library_labels(anchor, add)
    with contextlib.suppress(Exception):
        if not _is(anchor, type):
            attrs = getattr(anchor, "__dict__", None)
            if isinstance(attrs, dict):
                for k, v in attrs.items():
                    add(v, _attr_label(k))
    with contextlib.suppress(Exception):
        # __slots__ and C-level attributes (functools.partial.func, ...):
        # data descriptors defined on the type. Reading them is side-effect
        # free, unlike properties, which we never call.
        cls = type(anchor)
        for klass in cls.__mro__:
            for dname, desc in vars(klass).items():
                if dname in _HIDDEN_DESCRIPTORS or not isinstance(
                    desc, (types.MemberDescriptorType, types.GetSetDescriptorType)
                ):
                    continue
                try:
                    value = desc.__get__(anchor, cls)
                except Exception:
                    continue
                add(value, "." + dname)
        add(cls, ".__class__")
    return labels


_ELEMENT_LIMIT = 1_000_000


def _library_labels(anchor: Any, add: Callable[[Any, str], None]) -> None:
    """Elements of object-dtype numpy arrays and pandas objects, by index.

    Both pickle their Python objects inside what ``__reduce__`` returns (a
    block manager, a flat list in the state), so without this the path to a
    lock in a DataFrame cell would read ``df._mgr.blocks[1].values<reduce>[4][0]``
    instead of ``df['col'].iloc[0]``.
    """
    t = type(anchor)
    module = _module_of(t)
    if module.startswith("numpy") and t.__name__ == "ndarray":
        if anchor.dtype.hasobject and anchor.size <= _ELEMENT_LIMIT:
            import numpy

            for index in numpy.ndindex(anchor.shape):
                label = ", ".join(map(str, index))
                add(anchor[index], f"[{label}]")
    elif module.startswith("pandas") and t.__name__ == "DataFrame":
        if anchor.size <= _ELEMENT_LIMIT:
            for col in anchor.columns:
                column = anchor[col]
                if getattr(getattr(column, "dtype", None), "kind", "") == "O":
                    for i, v in enumerate(column.to_numpy()):
                        add(v, f"[{_key_repr(col)}].iloc[{i}]")
    elif module.startswith("pandas") and t.__name__ == "Series":
        if anchor.dtype.kind == "O" and anchor.size <= _ELEMENT_LIMIT:
            for i, v in enumerate(anchor.to_numpy()):
                add(v, f".iloc[{i}]")


def _public_shortcut(anchor: Any) -> bool:
    """Anchors whose pickled internals are private: name culprits from the outside."""
    t = type(anchor)
    return _module_of(t).startswith("pandas") and t.__name__ in ("DataFrame", "Series")


class _LabelCache:
    """Label maps per anchor, built once: keeps path rendering linear in total."""

    def __init__(self) -> None:
        self._maps: dict[int, tuple[Any, dict[int, str]]] = {}

    def find(self, anchor: Any, child: Any) -> str | None:
        entry = self._maps.get(id(anchor))
        if entry is None or entry[0] is not anchor:
            entry = (anchor, _child_labels(anchor))
            self._maps[id(anchor)] = entry
        return entry[1].get(id(child))


def _render_path(root_name: str, stack: Sequence[Any], labels: _LabelCache) -> str:
    """Turn the pickler's stack of objects into ``root.attr['key'][3]``.

    The stack also holds objects the pickler made on the way (the argument
    tuple and state returned by ``__reduce_ex__``, dill's and cloudpickle's
    copies of a function's globals). Such artefacts are not reachable from
    the last user-visible object, so they are skipped: the next object is
    looked up from the last object that *was* reachable. A tail that can't be
    linked at all is shown after a ``<reduce>`` marker, with indexes inside
    what ``__reduce__`` returned where possible (``it<reduce>[0][12][1]``).
    """
    parts = [root_name]
    if not stack:
        return root_name
    anchor = prev = stack[0]
    culprit = stack[-1]
    tail: list[str] = []  # labels inside what the anchor's __reduce__ made
    for obj in stack[1:]:
        if _public_shortcut(anchor) and obj is not culprit:
            direct = labels.find(anchor, culprit)
            if direct is not None:
                parts.append(direct)
                return "".join(parts)
        label = labels.find(anchor, obj)
        if label is not None:
            parts.append(label)
            anchor = obj
            tail = []
        elif prev is anchor:
            tail = ["<reduce>"]
        else:
            tail.append(labels.find(prev, obj) or "")
        prev = obj
    if tail:
        parts.extend(tail)
        if not tail[-1] or tail[-1] == "<reduce>":
            parts.append(f"<{_type_name(type(stack[-1]))}>")
    return "".join(parts)


# ---------------------------------------------------------------------------
# Categories and fixes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Category:
    title: str
    why: str
    fix: str


_CATEGORIES: dict[str, _Category] = {
    "module": _Category(
        "module object",
        "a module can't be pickled by the standard library; only its name means anything in "
        "another process. Fine with %%isolate (re-imported by name), fails with plain pickle.",
        "Don't keep modules on objects you hand to workers: store the module's name (or "
        "nothing) and `import` it inside the function that runs in the worker. %%isolate "
        "already re-imports modules by name, so it needs no change there; plain "
        "multiprocessing, concurrent.futures and DataLoader workers do.",
    ),
    "open-file": _Category(
        "open file",
        "an open file is a handle in this process's table of file descriptors; another "
        "process can't use it.",
        "Keep the path (and offset, if you need it) instead of the open file, and open it "
        "inside the worker, e.g. lazily on first use or in `__setstate__`. dill (used by "
        "%%isolate) re-opens a file by name in the worker: that only works when the same "
        "path exists there, and the read position and unflushed writes are not shared.",
    ),
    "database": _Category(
        "database connection",
        "a database connection or cursor is a live session owned by this process; it can't "
        "be copied into another.",
        "Pass the connection string or database path instead, and connect inside the worker "
        "(for SQLite: `sqlite3.connect(path)` in the worker). Don't share one connection "
        "between processes.",
    ),
    "socket": _Category(
        "socket or network client",
        "a socket is an operating-system handle owned by this process.",
        "Pass the address or URL and create the socket or client inside the worker.",
    ),
    "lock": _Category(
        "lock",
        "a lock only has meaning inside one process: a copy would not exclude anybody.",
        "Create locks inside the worker; to coordinate processes use "
        "`multiprocessing.Manager().Lock()` or a file lock. dill (used by %%isolate) "
        "pickles a lock as a new, unlocked one: that works, but the copy is not shared "
        "with the notebook.",
    ),
    "thread": _Category(
        "thread, pool or executor",
        "a thread, pool or executor is a running activity of this process, not data.",
        "Start threads, pools and executors inside the worker; pass only the settings "
        "needed to create them.",
    ),
    "logging": _Category(
        "logging handler",
        "a logging handler holds a stream or file and a lock of this process.",
        "Set up logging inside the worker (`logging.basicConfig(...)`, or add the handler "
        "there); pass the logger's name, not the logger's handlers. A logger without "
        "handlers pickles by name.",
    ),
    "generator": _Category(
        "generator or iterator",
        "a generator is a paused function call; Python can't serialize its execution state.",
        "Pass what it iterates over (a list, a path, a range) or the function that makes "
        "it, and create the generator inside the worker; `list(gen)` if it is small and "
        "finite.",
    ),
    "frame": _Category(
        "frame or traceback",
        "frames and tracebacks are the live call stack of this process.",
        "Keep the text instead (`traceback.format_exc()`), or the exception without its "
        "`__traceback__`.",
    ),
    "lambda": _Category(
        "lambda",
        "standard pickle stores a function by its module and name, and a lambda has no name "
        "to be found by.",
        "Replace the lambda with a `def` in a .py module that you import (or "
        "`functools.partial` of such a function). %%isolate pickles with dill, which sends "
        "lambdas by value, so it works there; so does cloudpickle (joblib, loky).",
    ),
    "local-function": _Category(
        "function defined inside a function",
        "standard pickle stores a function by its module and name; a function defined inside "
        "another one can't be found that way (\"Can't get local object\").",
        "Move the function to the top level of a .py module next to the notebook and import "
        "it (a top-level notebook cell is not enough under spawn); pass extra data with "
        "`functools.partial`. %%isolate (dill) and cloudpickle (joblib, loky) send it by "
        "value, so it works there.",
    ),
    "local-class": _Category(
        "class defined inside a function",
        "standard pickle stores a class by its module and name; a class defined inside a "
        "function can't be found that way.",
        "Define the class at the top level of a .py module and import it. %%isolate (dill) "
        "and cloudpickle send it by value, so it works there.",
    ),
    "notebook-defined": _Category(
        "defined in the notebook",
        "standard pickle stores it as a reference to `__main__`. That loads in this kernel, "
        "but a spawned child (multiprocessing with spawn or forkserver, the default on macOS "
        "and Windows and on Linux from Python 3.14; ProcessPoolExecutor; DataLoader workers "
        "under spawn) is a fresh interpreter whose `__main__` has no such name: loading "
        "fails with \"Can't get attribute\".",
        "Fine with %%isolate, which sends notebook-defined functions and classes by value "
        "(dill). For plain multiprocessing, move it into a .py module next to the notebook "
        "and import it from there.",
    ),
    "not-findable": _Category(
        "class or function not findable by name",
        "pickle stores classes and functions as module plus name, and this one can't be "
        "found under its name (it was created at run time, or renamed).",
        "Define it at the top level of an importable .py module. dill (%%isolate) and "
        "cloudpickle can send some such classes by value.",
    ),
    "unimportable-module": _Category(
        "module a fresh process can't import",
        "it is pickled as a reference to a module that a freshly started interpreter "
        "can't import (loaded from a file under another name, created at run time, or "
        "not on the path).",
        "Make the module importable (put its directory on `sys.path` before the workers "
        "start, or install the package), or define the object in a module that is.",
    ),
    "unverified-reference": _Category(
        "reference not verified",
        "it is pickled as a reference to a module we could not prove a fresh interpreter "
        "can import.",
        "Confirm with `pickle_check(obj, verify_spawn=nbisolate.probe.spawn_loads)`, which "
        "asks a freshly started interpreter, or make sure the module can be imported by a "
        "new Python process.",
    ),
    "weakref": _Category(
        "weak reference",
        "a weak reference points into this process's memory.",
        "Send the object it refers to, or re-create the weak reference inside the worker.",
    ),
    "c-extension": _Category(
        "C-extension object without pickle support",
        "its type is implemented in C and defines no way to be pickled.",
        "Create the object inside the worker from plain data (arguments, a path, a config "
        "dict). If it comes from a library, look for a save/load or to-bytes method; or "
        "register a reducer with `copyreg.pickle(Type, ...)` that rebuilds it.",
    ),
    "unpicklable": _Category(
        "refuses to be pickled",
        "its class's `__reduce__`/`__getstate__` raised.",
        "Leave the member out in `__getstate__` and rebuild it in `__setstate__`, or "
        "construct the object inside the worker.",
    ),
    "load-fails": _Category(
        "pickles, but won't load",
        "the serializer wrote it, but loading it back failed.",
        "Build this object inside the worker from plain data, or use a serializer that "
        "round-trips it (see the table).",
    ),
    "recursion": _Category(
        "too deeply nested",
        "pickling recursed deeper than Python's recursion limit.",
        "Flatten the structure (e.g. a linked chain into a list), or raise "
        "`sys.setrecursionlimit` before shipping it.",
    ),
    "large": _Category(
        "very large object",
        "",
        "Load or compute the data inside the worker from its source (a path, a query), pass "
        "a smaller slice, or save it once (`np.save`, `df.to_parquet`) and open it in the "
        "worker (memory-mapped where possible).",
    ),
}

_DB_MODULES = (
    "sqlite3", "psycopg", "psycopg2", "pymysql", "MySQLdb", "mysql", "sqlalchemy",
    "pymongo", "redis", "duckdb", "cx_Oracle", "oracledb", "pyodbc", "snowflake",
    "asyncpg", "clickhouse", "cassandra", "elasticsearch",
)
_SOCKET_MODULES = ("socket", "ssl", "http.client", "urllib3", "requests", "zmq", "grpc")
_POOL_MODULES = ("concurrent.futures", "multiprocessing.pool", "multiprocessing.dummy")
_FILE_NAMES = frozenset({"mmap", "GzipFile", "BZ2File", "LZMAFile", "ZipFile", "TarFile"})
_LOCK_TYPES = tuple(
    {type(threading.Lock()), type(threading.RLock()), threading.Condition, threading.Semaphore,
     threading.Event, threading.Barrier}
)
_FILE_TYPES: tuple[type, ...] = (io.IOBase,)
_IN_MEMORY_IO = (io.BytesIO, io.StringIO)


def _type_name(t: type) -> str:
    module = getattr(t, "__module__", None)
    qual = getattr(t, "__qualname__", None) or getattr(t, "__name__", "?")
    if module in (None, "builtins"):
        return str(qual)
    return f"{module}.{qual}"


def _exc_text(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60


def _describe(obj: Any) -> str:
    if _is(obj, types.ModuleType):
        return f"module {obj.__name__}"
    if _is(obj, (types.FunctionType, types.BuiltinFunctionType)):
        return f"function {getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"
    if _is(obj, type):
        return f"class {_type_name(obj)}"
    try:
        return _short.repr(obj)
    except Exception:
        return f"<{_type_name(type(obj))} object>"


def _module_of(t: type) -> str:
    return getattr(t, "__module__", "") or ""


def _in_modules(mod: str, names: tuple[str, ...]) -> bool:
    return any(mod == m or mod.startswith(m + ".") for m in names)


def _resource_category(obj: Any) -> str | None:
    """The category of objects that *are* an OS or process resource, by type alone."""
    t = type(obj)
    mod = _module_of(t)
    if _is(obj, (sqlite3.Connection, sqlite3.Cursor)) or _in_modules(mod, _DB_MODULES):
        return "database"
    if (_is(obj, _FILE_TYPES) and not _is(obj, _IN_MEMORY_IO)) or t.__name__ in _FILE_NAMES:
        return "open-file"
    if _is(obj, threading.Thread) or _in_modules(mod, _POOL_MODULES):
        return "thread"
    if _is(obj, logging.Handler):
        return "logging"
    if _in_modules(mod, _SOCKET_MODULES):
        return "socket"
    return None


def _classify(obj: Any, error: str) -> str:
    """Pick the category whose explanation and fix fit this culprit."""
    t = type(obj)
    if _is(obj, types.ModuleType):
        return "module"
    if _is(obj, (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)):
        return "generator"
    if _is(obj, (types.FrameType, types.TracebackType)):
        return "frame"
    resource = _resource_category(obj)
    if resource is not None:
        return resource
    if _is(obj, _LOCK_TYPES):
        return "lock"
    if _is(obj, (types.FunctionType, type)):
        qual = getattr(obj, "__qualname__", "")
        if getattr(obj, "__name__", "") == "<lambda>":
            return "lambda"
        if "<locals>" in qual:
            return "local-class" if _is(obj, type) else "local-function"
    if "<locals>" in getattr(t, "__qualname__", ""):
        return "local-class"
    if _is(obj, _WEAKREF_TYPES):
        return "weakref"
    if "recursion" in error.lower():
        return "recursion"
    if _is(obj, (type, types.FunctionType, types.BuiltinFunctionType)) and (
        "not found as" in error or "attribute lookup" in error or "Can't get attribute" in error
    ):
        return "not-findable"
    if "iterator" in t.__name__:
        return "generator"
    # "cannot pickle 'X' object" comes from object.__reduce_ex__ refusing a
    # type with C-level fields: the signature of an extension type.
    if _C_REFUSAL.search(error) or not (t.__flags__ & _HEAPTYPE):
        return "c-extension"
    return "unpicklable"


_WEAKREF_TYPES = (weakref.ReferenceType, weakref.ProxyType, weakref.CallableProxyType)
_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: the type was made by a class statement
_C_REFUSAL = re.compile(
    r"cannot pickle '[^']+' (object|instances)|cannot pickle \w+ objects|containing pointers"
)


# ---------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------


@dataclass
class _Outcome:
    result: SerializerResult
    needs_trace: bool
    needs_refs: bool
    load_error: str | None = None


def _fast(ser: _Serializer, obj: Any, ctx: _Context, deadline: float) -> _Outcome:
    """Dump with the real (fast) serializer, counting bytes; load back if small enough."""
    # Serializers that send __main__ by value only need the module-name scan.
    sink = _Sink(ctx.pattern_refs if ser.by_value_main else ctx.pattern_all)
    buffers: list[Any] = []
    oob = 0

    def keep(buf: Any) -> None:
        nonlocal oob
        oob += memoryview(buf).nbytes
        buffers.append(buf)

    res = SerializerResult(ser.name, ser.label, ser.used_by, ok=None, dumps_ok=None)
    t0 = time.perf_counter()
    try:
        try:
            ser.dump(obj, sink, keep, deadline)
        except _OutOfTime:
            res.seconds = time.perf_counter() - t0
            res.note = "stopped: out of time before the pickle was complete"
            return _Outcome(res, needs_trace=False, needs_refs=False)
        except Exception as exc:
            res.seconds = time.perf_counter() - t0
            res.dumps_ok = False
            res.ok = False
            res.error = _exc_text(exc)
            return _Outcome(res, needs_trace=True, needs_refs=False)
        res.dumps_ok = True
        res.size = sink.size + oob
        res.oob_bytes = oob
        data = sink.value()
        load_error = None
        if data is None:
            res.note = "not loaded back here: pickle too large to keep for the check"
        else:
            try:
                ser.loads(data, buffers)
                res.loads_ok = True
            except Exception as exc:
                res.loads_ok = False
                load_error = res.error = _exc_text(exc)
        res.seconds = time.perf_counter() - t0
        res.ok = res.loads_ok is not False
        if res.loads_ok is None:
            res.ok = True
        return _Outcome(res, needs_trace=False, needs_refs=sink.hit, load_error=load_error)
    finally:
        for buf in buffers:
            with contextlib.suppress(Exception):
                buf.release()


@dataclass
class _TraceResult:
    findings: list[_Finding]
    out_of_time: bool = False
    depth_paths: list[str] = field(default_factory=list)
    unavailable: bool = False


def _trace(
    ser: _Serializer, obj: Any, name: str, ctx: _Context, deadline: float, max_depth: int,
    check_refs: bool,
) -> _TraceResult:
    cls = _TRACERS.get(ser.name)
    if cls is None:
        return _TraceResult([], unavailable=True)
    tracer = cls(_NullSink(), PROTOCOL, buffer_callback=lambda buf: None)
    tracer._nb_setup(name, ser.name, ctx, deadline, max_depth, check_refs)
    out = _TraceResult([])
    old_limit = sys.getrecursionlimit()
    # Each level of the pure-Python pickler costs a handful of Python frames;
    # make room for max_depth levels, and put the limit back afterwards.
    needed = len(_frames_in_use()) + 12 * max_depth + 200
    if needed > old_limit:
        sys.setrecursionlimit(needed)
    try:
        tracer.dump(obj)
    except _OutOfTime:
        out.out_of_time = True
    except RecursionError:
        out.depth_paths.append(f"{name} (Python's recursion limit)")
    except Exception as exc:  # a failure outside any save(): blame the root
        tracer._nb_stack[:] = [obj]
        tracer._nb_record(obj, "fail", _exc_text(exc))
    finally:
        if needed > old_limit:
            sys.setrecursionlimit(old_limit)
    out.findings = list(tracer._nb_found.values())
    out.depth_paths.extend(tracer._nb_depth_paths)
    return out


def _abbreviate(path: str, limit: int = 120) -> str:
    if len(path) <= limit:
        return path
    keep = limit // 2 - 2
    return f"{path[:keep]} ... {path[-keep:]}"


def _frames_in_use() -> list[Any]:
    frames = []
    frame = sys._getframe()
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames


def pickle_check(
    obj: Any,
    name: str = "obj",
    *,
    serializers: Sequence[str] | None = None,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    max_depth: int = DEFAULT_MAX_DEPTH,
    verify_spawn: _VerifySpawn | None = None,
    max_problems: int = DEFAULT_MAX_PROBLEMS,
    large_bytes: int = LARGE_BYTES,
    _ctx: _Context | None = None,
) -> Report:
    """Check whether ``obj`` can be sent to another process, and name every culprit.

    ``name`` is how the object is called in paths (``name.attr[0]``).
    ``serializers`` picks from :func:`available_serializers` (default: all of
    them: ``pickle``, ``dill`` as ``%%isolate`` uses it, ``cloudpickle``).
    ``max_seconds`` bounds the search for culprits. The first dump of each
    serializer gives the verdict and the size: with the C picklers it runs to
    the end, dill's (pure Python) gets at most another ``max_seconds`` and is
    reported as unknown past that. ``max_depth`` bounds how deep the search
    descends (each attribute, item or reduce step is a level).
    ``max_problems`` caps the listing (the rest is counted in ``omitted``);
    objects pickling to ``large_bytes`` or more get a cost warning.
    ``verify_spawn``, e.g.
    :func:`nbisolate.probe.spawn_loads`, is called with a small pickle when
    the static check can't tell whether a spawned child could load a
    reference; it returns None or the child's error text.

    The verdict per serializer comes from really dumping and loading (no
    guessing), the culprits from a walk that follows exactly what pickling
    follows; see the module docstring for the details.
    """
    started = time.perf_counter()
    deadline = started + max_seconds
    names = list(serializers) if serializers is not None else available_serializers()
    unknown = [n for n in names if n not in _SERIALIZERS]
    if unknown:
        raise ValueError(
            f"unknown serializer(s) {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(available_serializers())}"
        )
    ctx = _ctx if _ctx is not None else _Context(verify_spawn)
    if verify_spawn is not None and ctx.verify_spawn is None:
        ctx.verify_spawn = verify_spawn
    report = Report(name=name, type_name=_type_name(type(obj)), results={}, problems=[])
    collected: list[tuple[_Finding, str]] = []  # (finding, serializer)
    load_failures: dict[str, str] = {}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcomes = {}
        for sname in names:
            ser = _SERIALIZERS[sname]
            outcome = _fast(ser, obj, ctx, deadline + max_seconds)
            outcomes[sname] = outcome
            report.results[sname] = outcome.result
            if outcome.result.ok is None:
                report.truncated = True
                report.notes.append(f"{sname}: {outcome.result.note}")
            if outcome.load_error:
                load_failures[sname] = outcome.load_error

        to_trace = [s for s in names if outcomes[s].needs_trace or outcomes[s].needs_refs]
        depth_hits: list[tuple[str, str]] = []
        for i, sname in enumerate(to_trace):
            ser = _SERIALIZERS[sname]
            now = time.perf_counter()
            share = max(deadline - now, 0.0) / (len(to_trace) - i)
            tr = _trace(ser, obj, name, ctx, now + max(share, 0.05), max_depth, check_refs=True)
            if tr.unavailable:
                report.notes.append(f"{sname}: no tracing pickler available; culprits not located")
            if tr.out_of_time:
                report.truncated = True
                report.notes.append(
                    f"{sname}: stopped looking for culprits after the time limit "
                    f"(max_seconds={max_seconds:g}); the problems listed are real, more may exist"
                )
            if tr.depth_paths:
                report.truncated = True
                depth_hits.append((sname, tr.depth_paths[0]))
            for finding in tr.findings:
                collected.append((finding, sname))
        if depth_hits:
            report.notes.append(
                f"{', '.join(s for s, _ in depth_hits)}: did not descend deeper than "
                f"{max_depth} levels (max_depth), e.g. at {_abbreviate(depth_hits[0][1])}"
            )

    _apply_findings(report, obj, collected, load_failures, ctx, max_problems)
    _add_large(report, large_bytes)
    report.seconds = time.perf_counter() - started
    return report


def _apply_findings(
    report: Report, root: Any, collected: list[tuple[_Finding, str]],
    load_failures: dict[str, str], ctx: _Context, max_problems: int,
) -> None:
    """Merge the walks' findings into one problem per culprit; settle spawn verdicts."""
    merged: dict[Any, dict[str, Any]] = {}
    order: list[Any] = []

    def entry(key: Any, finding: _Finding, category: str, obj: Any, path: str) -> dict[str, Any]:
        if key not in merged:
            merged[key] = {
                "obj": obj, "path": path, "category": category, "errors": {},
                "also": [], "fails": [], "finding": finding,
            }
            order.append(key)
        return merged[key]

    for finding, sname in collected:
        obj = finding.obj
        path = finding.path
        if finding.kind == "fail":
            category = _classify(obj, finding.error)
            e = entry(("obj", id(obj)), finding, category, obj, path)
            e["errors"].setdefault(sname, finding.error)
            if sname not in e["fails"]:
                e["fails"].append(sname)
            for p in finding.also:
                if p != e["path"] and p not in e["also"]:
                    e["also"].append(p)
            continue
        # a by-reference spawn problem: report it at the instance when the
        # reference is the class of an instance
        instance_path = path[: -len(".__class__")] if path.endswith(".__class__") else None
        if finding.kind == "main":
            verdict: str | None = (
                f"AttributeError: Can't get attribute {getattr(obj, '__qualname__', '?')!r} "
                "on <module '__main__'>"
            )
            category = "notebook-defined"
        else:
            qual = getattr(obj, "__qualname__", getattr(obj, "__name__", "?"))
            probe = ctx.verify(obj, finding.module, qual)
            if probe is None:
                continue  # a fresh interpreter loads it: no problem after all
            if probe is False:
                if finding.error == "missing":
                    verdict = f"a fresh interpreter can't find module {finding.module!r}"
                    category = "unimportable-module"
                else:
                    verdict = None
                    category = "unverified-reference"
            else:
                verdict = str(probe)
                category = "unimportable-module"
        e = entry(("ref", id(obj)), finding, category, obj, instance_path or path)
        if instance_path is not None:
            e["instance_of"] = True
        e["errors"].setdefault(sname, verdict or "not verified")
        if verdict is not None and sname not in e["fails"]:
            e["fails"].append(sname)
            res = report.results.get(sname)
            if res is not None:
                res.spawn_ok = False
                res.ok = False
                if res.error is None:
                    res.error = f"fails in a spawned child: {verdict}"
        for p in finding.also:
            if p.endswith(".__class__"):
                p = p[: -len(".__class__")]
            if p != e["path"] and p not in e["also"]:
                e["also"].append(p)

    for sname, res in report.results.items():
        if res.dumps_ok and res.loads_ok and res.spawn_ok is None:
            res.spawn_ok = True if sname not in _spawn_unverified(merged) else None

    # failures the walk could not pin on a member: blame the root, honestly
    for sname, res in report.results.items():
        if res.ok is not False:
            continue
        located = any(sname in e["fails"] for e in merged.values())
        if located:
            continue
        if sname in load_failures:
            category = "load-fails"
        else:
            category = _classify(root, res.error or "")
        e = entry(("root", category), None, category, root, report.name)  # type: ignore[arg-type]
        e["errors"].setdefault(sname, res.error or "failed")
        e["fails"].append(sname)

    problems = _sort_problems([_make_problem(merged[k], report) for k in order])
    if len(problems) > max_problems:
        report.omitted = len(problems) - max_problems
        problems = problems[:max_problems]
        report.notes.append(
            f"listed the first {max_problems} problems; {report.omitted} more not shown "
            "(max_problems)"
        )
    report.problems = problems


# Problems that only bite in a spawned child, or are advice: listed after
# objects that can't be pickled at all.
_SOFT_CATEGORIES = frozenset(
    {"notebook-defined", "unimportable-module", "unverified-reference", "large"}
)


def _sort_problems(problems: list[Problem]) -> list[Problem]:
    """Errors for %%isolate first, then hard failures, then spawn-only; kinds kept together."""
    first: dict[str, int] = {}
    for i, p in enumerate(problems):
        first.setdefault(p.category, i)
    ranked = sorted(
        enumerate(problems),
        key=lambda ip: (
            ip[1].severity != "error", ip[1].category in _SOFT_CATEGORIES,
            first[ip[1].category], ip[0],
        ),
    )
    return [p for _, p in ranked]


def _spawn_unverified(merged: dict[Any, dict[str, Any]]) -> set[str]:
    out: set[str] = set()
    for e in merged.values():
        if e["category"] == "unverified-reference":
            out.update(e["errors"])
    return out


def _make_problem(e: dict[str, Any], report: Report) -> Problem:
    obj = e["obj"]
    category = e["category"]
    cat = _CATEGORIES[category]
    fails = tuple(s for s in report.results if s in e["fails"])
    if e.get("instance_of"):
        type_name = _type_name(obj) if _is(obj, type) else _type_name(type(obj))
        what = f"instance of class {type_name}"
    else:
        type_name = _type_name(type(obj))
        what = _describe(obj)
    # An error breaks %%isolate only if the dill column fails; with no dill
    # column we can't say it doesn't.
    breaks_isolate = "dill" in fails or ("dill" not in report.results and bool(fails))
    severity = "error" if breaks_isolate else "warning"
    errors = dict(e["errors"])
    distinct: dict[str, list[str]] = {}
    for sname, text in errors.items():
        distinct.setdefault(text, []).append(sname)
    said = "; ".join(f"{'/'.join(ss)}: {text}" for text, ss in distinct.items())
    reason = f"{cat.why} ({said})" if cat.why else said
    if e.get("instance_of"):
        reason = f"its class {type_name}: {reason}"
    return Problem(
        path=e["path"], type_name=type_name, category=category, title=cat.title,
        reason=reason, fix=cat.fix, fails_with=fails, severity=severity, what=what,
        also_at=tuple(e["also"][:5]), errors=errors,
    )


def _add_large(report: Report, large_bytes: int) -> None:
    size = report.size
    if size is None or size < large_bytes:
        return
    res = report.results.get("dill") or next(iter(report.results.values()))
    est = res.seconds + size / 1e9
    oob = res.oob_bytes
    how = (
        f"{_fmt_size(oob)} of it as raw buffers (arrays), which pickle without copying here "
        "but are still copied to the worker"
        if oob
        else "all of it pickled byte by byte"
    )
    reason = (
        f"{_fmt_size(size)} would be copied into the worker on every run ({how}); expect "
        f"roughly {est:.1f} s per run to pickle, send and load it, and as much memory again "
        "in the worker while it runs."
    )
    cat = _CATEGORIES["large"]
    report.problems.append(
        Problem(
            path=report.name, type_name=report.type_name, category="large", title=cat.title,
            reason=reason, fix=cat.fix, fails_with=(), severity="warning",
            what=f"{_fmt_size(size)} pickled",
        )
    )


# ---------------------------------------------------------------------------
# The namespace check
# ---------------------------------------------------------------------------

_IPYTHON_NAMES = frozenset(
    {"In", "Out", "_", "__", "___", "_oh", "_ih", "_dh", "exit", "quit", "get_ipython"}
)


def _is_user_variable(name: str) -> bool:
    return name not in _IPYTHON_NAMES and not name.startswith("_")


def _report_rank(report: Report) -> int:
    """Order for a namespace: breaks %%isolate, fails somewhere, spawn-only/advice, clean."""
    if report.errors or report.isolate_ok is False:
        return 0
    if any(p.category not in _SOFT_CATEGORIES for p in report.problems):
        return 1
    if report.problems or not report.ok:
        return 2
    return 3


def _within_budget(
    name: str, value: Any, serializers: Sequence[str] | None, seconds: float, check: Callable[[], Report]
) -> Report:
    """``check()`` in a helper thread, given up after ``seconds``: the budget holds even when
    serializing blocks in C or on the network (a proxy whose server is gone), where the
    checks' own deadlines are never reached. A check given up keeps its thread, blocked."""
    import threading

    box: list[Any] = []

    def run() -> None:
        try:
            box.append(check())
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True, name=f"pickle-check-{name}")
    thread.start()
    thread.join(seconds)
    if box:
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]
    note = (
        f"stopped: serializing {name!r} did not return within {seconds:.0f} s (it blocks, e.g. a "
        "proxy whose server is gone); %%isolate could not send it either"
    )
    names = list(serializers) if serializers is not None else available_serializers()
    results = {
        n: SerializerResult(n, _SERIALIZERS[n].label, _SERIALIZERS[n].used_by, ok=None, dumps_ok=None, note=note)
        for n in names if n in _SERIALIZERS
    }
    return Report(
        name=name, type_name=_type_name(type(value)), results=results, problems=[],
        truncated=True, notes=[note], seconds=seconds,
    )


def check_namespace(
    user_ns: dict[str, Any],
    names: Sequence[str] | None = None,
    *,
    serializers: Sequence[str] | None = None,
    max_seconds: float = 30.0,
    verify_spawn: _VerifySpawn | None = None,
) -> NamespaceReport:
    """Check notebook variables; with no ``names``, every user variable.

    Skips IPython's own names (``In``, ``Out``, ``_``, ``_i3``, ``exit``,
    ...) and anything starting with ``_``. Variables that hold modules are
    listed as fine: ``%%isolate`` re-imports them by name instead of
    pickling them. Names asked for explicitly are always checked (a module
    asked for by name gets a full report) and raise :class:`UnknownNameError`
    when missing. ``max_seconds`` is the budget for the whole namespace; each
    variable gets at most :data:`DEFAULT_MAX_SECONDS` of it for the search for
    culprits. Variables with problems come first in the result.
    """
    started = time.perf_counter()
    deadline = started + max_seconds
    explicit = names is not None and len(names) > 0
    if explicit:
        missing = [n for n in names if n not in user_ns]  # type: ignore[union-attr]
        if missing:
            raise UnknownNameError(missing)
        chosen = list(dict.fromkeys(names))  # type: ignore[arg-type]
    else:
        chosen = [n for n in list(user_ns) if _is_user_variable(n)]
    ctx = _Context(verify_spawn)
    reports: dict[str, Report] = {}
    modules: list[str] = []
    notes: list[str] = []
    for i, var in enumerate(chosen):
        value = user_ns[var]
        if not explicit and _is(value, types.ModuleType):
            modules.append(var)
            continue
        left = deadline - time.perf_counter()
        if left <= 0:
            notes.append(
                f"stopped after {max_seconds:g} s (max_seconds): {len(chosen) - i} variables "
                f"not checked: {', '.join(chosen[i:i + 10])}{' ...' if len(chosen) - i > 10 else ''}"
            )
            break
        limit = min(DEFAULT_MAX_SECONDS, left)
        reports[var] = _within_budget(
            var, value, serializers, min(2 * limit, left) + 1.0,
            lambda value=value, var=var, limit=limit: pickle_check(
                value, name=var, serializers=serializers, max_seconds=limit, _ctx=ctx,
            ),
        )
    ordered = dict(sorted(reports.items(), key=lambda kv: _report_rank(kv[1])))
    return NamespaceReport(
        reports=ordered, modules=modules, seconds=time.perf_counter() - started, notes=notes
    )


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def _fmt_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _fmt_time(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


_MARK = {"ok": "ok", "fails": "FAILS", "spawn": "FAILS under spawn", "unknown": "unknown"}


def _headline(report: Report) -> str:
    if report.ok:
        return f"{report.name} ({report.type_name}): crosses a process boundary with every serializer checked"
    works = [r.label for r in report.results.values() if r.ok]
    fails = [r.label for r in report.results.values() if r.ok is False]
    text = f"{report.name} ({report.type_name}): fails with {', '.join(fails) or 'none'}"
    if works:
        text += f"; works with {', '.join(works)}"
    return text


def _report_text(report: Report) -> str:
    lines = [_headline(report)]
    width = max((len(r.label) for r in report.results.values()), default=10)
    for r in report.results.values():
        extra = f"  {r.error}" if r.error and not r.ok else ""
        lines.append(
            f"  {r.label:<{width}}  {_MARK[r.verdict]:<17} {_fmt_size(r.size):>9}  "
            f"{_fmt_time(r.seconds):>9}{extra}"
        )
    if report.problems:
        n = len(report.problems) + report.omitted
        lines.append(f"{n} problem{'s' if n != 1 else ''}:")
        lines.extend(_problems_text(report.problems))
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _groups(problems: list[Problem]) -> list[list[Problem]]:
    """Runs of problems with the same kind and verdict: explained once, listed together."""
    out: list[list[Problem]] = []
    for p in problems:
        if out and (out[-1][0].category, out[-1][0].fails_with, out[-1][0].severity) == (
            p.category, p.fails_with, p.severity,
        ) and p.category != "large":
            out[-1].append(p)
        else:
            out.append([p])
    return out


def _problems_text(problems: list[Problem]) -> list[str]:
    lines: list[str] = []
    for group in _groups(problems):
        if len(group) == 1:
            lines.extend(_problem_text(group[0]))
            continue
        p0 = group[0]
        fails = f"fails with {', '.join(p0.fails_with)}" if p0.fails_with else p0.severity
        lines.append(f"  {len(group)} x {p0.title}; {fails}:")
        width = max(len(p.path) for p in group)
        for p in group:
            what = f"  {p.what}" if p.what and p.what != p.type_name else ""
            lines.append(f"    {p.path:<{width}}  [{p.type_name}]{what}")
            if p.also_at:
                lines.append(f"    {'':<{width}}  also reachable as: {', '.join(p.also_at)}")
        why = _CATEGORIES[p0.category].why or p0.reason
        lines.append(f"      why:  {why}")
        lines.append(f"      fix:  {p0.fix}")
    return lines


def _problem_text(p: Problem) -> list[str]:
    fails = f"fails with {', '.join(p.fails_with)}" if p.fails_with else p.severity
    out = [f"  {p.path}  [{p.type_name}]  {p.title}; {fails}"]
    if p.what and p.what != p.type_name:
        out.append(f"      what: {p.what}")
    out.append(f"      why:  {p.reason}")
    out.append(f"      fix:  {p.fix}")
    if p.also_at:
        out.append(f"      also reachable as: {', '.join(p.also_at)}")
    return out


# Inline styles: notebook front ends restyle tables (right-aligned cells) and
# may strip <style> blocks from outputs, but keep simple style attributes.
_CELL = "text-align:left;vertical-align:top;padding:2px 8px"
_COLOR = {"ok": "color:#1a7f37", "bad": "color:#cf222e;font-weight:bold", "warn": "color:#9a6700"}


def _td(content: str, kind: str | None = None, attrs: str = "") -> str:
    style = _CELL + (";" + _COLOR[kind] if kind else "")
    return f"<td style='{style}'{attrs}>{content}</td>"


def _th_row(*names: str) -> str:
    cells = "".join(f"<th style='{_CELL}'>{html.escape(n)}</th>" for n in names)
    return f"<thead><tr>{cells}</tr></thead>"


def _cell_class(verdict: str) -> str:
    return {"ok": "ok", "fails": "bad", "spawn": "bad"}.get(verdict, "warn")


def _problems_html(problems: list[Problem]) -> str:
    esc = html.escape
    rows = []
    for group in _groups(problems):
        n = len(group)
        for i, p in enumerate(group):
            fails = ", ".join(p.fails_with) or p.severity
            kind = "bad" if p.severity == "error" else "warn"
            also = f"<br><small>also: {esc(', '.join(p.also_at))}</small>" if p.also_at else ""
            cells = _td(f"<code>{esc(p.path)}</code>{also}") + _td(
                f"<code>{esc(p.type_name)}</code><br><small>{esc(p.what)}</small>"
            )
            if i == 0:
                why = p.reason if n == 1 else (_CATEGORIES[p.category].why or p.reason)
                span = f" rowspan='{n}'" if n > 1 else ""
                cells += (
                    _td(f"{esc(p.title)}<br><small>{esc(fails)}</small>", kind, span)
                    + _td(esc(why), None, span)
                    + _td(esc(p.fix), None, span)
                )
            rows.append(f"<tr>{cells}</tr>")
    return (
        "<table>" + _th_row("member", "type", "problem", "why", "fix")
        + "<tbody>" + "".join(rows) + "</tbody></table>"
    )


def _report_html(report: Report) -> str:
    esc = html.escape
    rows = []
    for r in report.results.values():
        detail = esc(r.error) if r.error and not r.ok else esc(r.note or "")
        rows.append(
            "<tr>"
            + _td(f"{esc(r.label)}<br><small>{esc(r.used_by)}</small>")
            + _td(esc(_MARK[r.verdict]), _cell_class(r.verdict))
            + _td(_fmt_size(r.size)) + _td(_fmt_time(r.seconds)) + _td(detail)
            + "</tr>"
        )
    parts = [
        "<div class='nbisolate-pickle-check'>",
        f"<p><b>{esc(_headline(report))}</b></p>",
        "<table>", _th_row("serializer", "result", "size", "time", "detail"),
        "<tbody>", "".join(rows), "</tbody></table>",
    ]
    if report.problems:
        parts.append(_problems_html(report.problems))
    for note in report.notes:
        parts.append(f"<p><small>note: {esc(note)}</small></p>")
    parts.append("</div>")
    return "".join(parts)


def _namespace_text(ns: NamespaceReport) -> str:
    single = _single(ns)
    if single is not None:
        return _report_text(single)
    bad = [n for n, r in ns.reports.items() if r.problems or not r.ok]
    lines = [
        f"pickle_check: {_plural(len(ns.reports), 'variable')} checked in "
        f"{_fmt_time(ns.seconds)}; {len(bad)} with problems"
    ]
    sers = list(next(iter(ns.reports.values())).results) if ns.reports else []
    if ns.reports:
        width = max(4, *(len(n) for n in ns.reports))
        tw = max(4, min(max(len(r.type_name) for r in ns.reports.values()), 30))
        labels = [_SERIALIZERS[s].label if s in _SERIALIZERS else s for s in sers]
        cw = max(*(len(m) for m in _MARK.values()), *(len(lb) for lb in labels))
        head = f"  {'name':<{width}}  {'type':<{tw}}  " + "  ".join(
            f"{lb:<{cw}}" for lb in labels
        )
        lines.append(head + "       size")
        for n, r in ns.reports.items():
            cols = "  ".join(
                f"{_MARK[r.results[s].verdict]:<{cw}}" if s in r.results else " " * cw
                for s in sers
            )
            lines.append(f"  {n:<{width}}  {r.type_name[:tw]:<{tw}}  {cols}  {_fmt_size(r.size):>9}")
    if ns.modules:
        lines.append(
            "modules (fine with %%isolate: re-imported by name, not pickled): "
            + ", ".join(ns.modules)
        )
    for n in bad:
        r = ns.reports[n]
        if r.problems:
            lines.append(f"{n}:")
            lines.extend(_problems_text(r.problems))
        for note in r.notes:
            lines.append(f"  note: {note}")
    for note in ns.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _single(ns: NamespaceReport) -> Report | None:
    """The one report of ``%pickle_check x``: shown in full rather than as a table row."""
    if len(ns.reports) == 1 and not ns.modules and not ns.notes:
        return next(iter(ns.reports.values()))
    return None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _namespace_html(ns: NamespaceReport) -> str:
    single = _single(ns)
    if single is not None:
        return _report_html(single)
    esc = html.escape
    sers = list(next(iter(ns.reports.values())).results) if ns.reports else []
    labels = [_SERIALIZERS[s].label if s in _SERIALIZERS else s for s in sers]
    bad = [n for n, r in ns.reports.items() if r.problems or not r.ok]
    parts = [
        "<div class='nbisolate-pickle-check'>",
        f"<p><b>pickle_check: {_plural(len(ns.reports), 'variable')} checked in "
        f"{_fmt_time(ns.seconds)}; {len(bad)} with problems</b></p>",
    ]
    if ns.reports:
        rows = []
        for n, r in ns.reports.items():
            cells = "".join(
                _td(esc(_MARK[r.results[s].verdict]), _cell_class(r.results[s].verdict))
                if s in r.results else _td("")
                for s in sers
            )
            rows.append(
                "<tr>" + _td(f"<code>{esc(n)}</code>") + _td(f"<code>{esc(r.type_name)}</code>")
                + cells + _td(_fmt_size(r.size)) + _td(str(len(r.problems))) + "</tr>"
            )
        parts.append(
            "<table>" + _th_row("name", "type", *labels, "size", "problems")
            + "<tbody>" + "".join(rows) + "</tbody></table>"
        )
    if ns.modules:
        parts.append(
            "<p>modules (fine with %%isolate: re-imported by name, not pickled): "
            + ", ".join(f"<code>{esc(m)}</code>" for m in ns.modules) + "</p>"
        )
    problems = [p for n in bad for p in ns.reports[n].problems]
    if problems:
        parts.append(_problems_html(problems))
    notes = [f"{n}: {note}" for n in bad for note in ns.reports[n].notes] + ns.notes
    for note in notes:
        parts.append(f"<p><small>note: {esc(note)}</small></p>")
    parts.append("</div>")
    return "".join(parts)
