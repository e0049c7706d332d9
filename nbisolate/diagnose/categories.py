"""What a failure is and what to do about it.

Each culprit gets a category (open file, lock, notebook-defined function...)
chosen from its type and the serializer's error, and each category carries
one explanation and one fix worded for someone in the middle of a notebook.
Also the small helpers that name objects and types in reports.
"""

from __future__ import annotations

import io
import logging
import re
import reprlib
import sqlite3
import threading
import types
import weakref
from dataclasses import dataclass
from typing import Any

from ..travel import CACHED_FUNCTION, HEAPTYPE


def _is(obj: Any, classes: type | tuple[type, ...]) -> bool:
    """``isinstance`` by the real type.

    ``isinstance`` asks ``obj.__class__``, which a weak proxy forwards to its
    referent (and raises ReferenceError for once the referent is gone); we
    want to classify the object the pickler actually sees.
    """
    return issubclass(type(obj), classes)



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
        "%%isolate needs no change: it opens the same file again in the worker, at the same "
        "place and never truncated, and the notebook's file moves on to where the cell left "
        "it (the worker must see the same file system). For plain multiprocessing, "
        "concurrent.futures or DataLoader workers, keep the path (and offset, if you need "
        "it) instead of the open file, and open it inside the worker, e.g. lazily on first "
        "use or in `__setstate__`.",
    ),
    "database": _Category(
        "database connection",
        "a database connection or cursor is a live session owned by this process; it can't "
        "be copied into another.",
        "Pass the connection string or database path instead, and connect inside the worker "
        "(for SQLite: `sqlite3.connect(path)` in the worker). Don't share one connection "
        "between processes.",
    ),
    "kernel": _Category(
        "part of the Jupyter kernel",
        "it belongs to the running kernel (its output stream, session, shell or a comm): it "
        "exists only in the kernel process, and a worker has its own.",
        "Don't hand the kernel's objects to a worker: a worker's sys.stdout and sys.stderr "
        "already stream into the cell, so create loggers, handlers and anything that holds "
        "them inside the isolated cell (or the worker function).",
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
        "`functools.partial` of such a function). %%isolate sends lambdas by value, also to "
        "the cell's own pools; in ordinary cells `%isolate_config mp=on` makes multiprocessing "
        "and concurrent.futures do the same; cloudpickle (joblib, loky) does it anyway.",
    ),
    "local-function": _Category(
        "function defined inside a function",
        "standard pickle stores a function by its module and name; a function defined inside "
        "another one can't be found that way (\"Can't get local object\").",
        "Move the function to the top level of a .py module next to the notebook and import "
        "it (a top-level notebook cell is not enough under spawn); pass extra data with "
        "`functools.partial`. %%isolate and cloudpickle (joblib, loky) send it by "
        "value, so it works there; in ordinary cells `%isolate_config mp=on` makes "
        "multiprocessing and concurrent.futures pools send it by value too.",
    ),
    "local-class": _Category(
        "class defined inside a function",
        "standard pickle stores a class by its module and name; a class defined inside a "
        "function can't be found that way.",
        "Define the class at the top level of a .py module and import it. %%isolate "
        "and cloudpickle send it by value, so it works there; in ordinary cells "
        "`%isolate_config mp=on` makes multiprocessing pools send it by value too.",
    ),
    "notebook-defined": _Category(
        "defined in the notebook",
        "standard pickle stores it as a reference to `__main__`. That loads in this kernel, "
        "but a spawned child (multiprocessing with spawn or forkserver, the default on macOS "
        "and Windows and on Linux from Python 3.14; ProcessPoolExecutor; DataLoader workers "
        "under spawn) is a fresh interpreter whose `__main__` has no such name: loading "
        "fails with \"Can't get attribute\".",
        "Fine with %%isolate, which sends notebook-defined functions and classes by value, "
        "and so do the cell's own pools there. For your own pools in ordinary cells "
        "(multiprocessing, concurrent.futures, DataLoader workers under spawn or forkserver), "
        "turn on `%isolate_config mp=on` (`nbisolate.enable_multiprocessing()` in a script): "
        "it sends them by value too. Or move it into a .py module next to the notebook and "
        "import it from there.",
    ),
    "notebook-by-reference": _Category(
        "defined in the notebook, sent by name",
        "an Enum class or a TypeVar is pickled as a reference to `__main__` (module and name), "
        "even by %%isolate, which sends other notebook classes and functions by value. A "
        "worker's `__main__` is not the notebook, so loading fails there with \"Can't get "
        "attribute\"; so does a spawned multiprocessing child.",
        "Move it into a .py module next to the notebook and import it from there (the worker "
        "then imports it by name too), or define it inside the isolated cell. Plain values "
        "(an Enum member's `.value`, a string) travel anywhere.",
    ),
    "not-findable": _Category(
        "class or function not findable by name",
        "pickle stores classes and functions as module plus name, and this one can't be "
        "found under its name (it was created at run time, or renamed).",
        "Define it at the top level of an importable .py module. %%isolate and "
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
_KERNEL_MODULES = ("ipykernel", "jupyter_client", "comm", "IPython.core", "IPython.terminal")
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
    if _is(obj, (types.FunctionType, types.BuiltinFunctionType, CACHED_FUNCTION)):
        cached = " (under functools.lru_cache)" if _is(obj, CACHED_FUNCTION) else ""
        return f"function {getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}{cached}"
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
    if _in_modules(mod, _KERNEL_MODULES):
        return "kernel"
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
    if _C_REFUSAL.search(error) or not (t.__flags__ & HEAPTYPE):
        return "c-extension"
    return "unpicklable"


_WEAKREF_TYPES = (weakref.ReferenceType, weakref.ProxyType, weakref.CallableProxyType)
_C_REFUSAL = re.compile(
    r"cannot pickle '[^']+' (object|instances)|cannot pickle \w+ objects|containing pointers"
)

# Problems that only bite in a spawned child, or are advice: listed after
# objects that can't be pickled at all.
_SOFT_CATEGORIES = frozenset(
    {"notebook-defined", "notebook-by-reference", "unimportable-module", "unverified-reference", "large"}
)
