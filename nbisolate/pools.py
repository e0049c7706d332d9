"""The user's own process pools, from notebooks: ``multiprocessing``, ``concurrent.futures``, ``multiprocess``.

A spawned (or forkserver) child is a fresh interpreter. multiprocessing
pickles a task's function by name (``__main__.sq``) and the child looks the
name up in *its* ``__main__``, which is not the notebook (spawn re-runs the
parent's ``__main__`` by path, and a notebook or a worker has none): ``Can't
get attribute 'sq'``. ``multiprocessing.Pool`` then restarts its broken
worker and waits for ever; ``ProcessPoolExecutor`` raises ``BrokenProcessPool``
with no word about why. Python 3.14 makes ``forkserver`` the default on Linux.

This module makes it work without changing the cell's code, in three parts:

**By value through multiprocessing's own pickler.** :func:`install` gives
``multiprocessing.reduction.ForkingPickler`` (and ``multiprocess``'s, dill's
kind) a ``reducer_override``: a function or class that a fresh interpreter
cannot find by name (:func:`nbisolate.travel.route` says ``BY_VALUE``:
defined in the notebook or the cell, a lambda, a closure) is written as
:func:`_load_by_value` of a small by-value pickle made by
:mod:`nbisolate.byvalue` (cloudpickle, with the sender's ``__main__`` as the
namespace its functions are rebuilt on). ``reducer_override`` runs before the
pickler's own ``save_global``, and only functions and classes reach the slow
path. Each such object carries a token: the receiving side rebuilds it once
and, when its own original comes back (a result of a task is an instance of
the cell's class), finds that original (``type(r) is P`` holds), so a class
is never redefined by a copy. joblib's loky already uses cloudpickle and needs
nothing.

**Children that start, and report.** multiprocessing's spawn tells the child
how to rebuild ``__main__``; where the parent's has neither path nor module
name, :func:`install` names :mod:`nbisolate._mpchild`, so every spawned or
forkserver child installs the same hooks before it loads anything: it sends
notebook objects back by token, and a pool worker that dies (it could not
load its task, its initializer raised) or a child that cannot load its
process object reports it on a datagram socket (``NBISOLATE_MP_REPORT``).

**Never a silent hang.** In an isolated cell, the worker listens on that
socket (:func:`arm`); a report stops the cell's main thread with
:class:`PoolChildError`, which names the child, what it could not load and
the fix, within a moment of the child's death. A pool that keeps restarting
broken workers is a hang, so it fails the cell too.

Ordinary notebook cells get the first two parts with
:func:`enable_multiprocessing` (``%isolate_config mp=on``), off by default.

Standard library only at import, and only what multiprocessing itself
imports: the worker imports this module (so the template has it preloaded)
and spawned children run it; :mod:`nbisolate.byvalue` (cloudpickle) is
imported the first time something travels by value.
"""

from __future__ import annotations

import io
import json

# Imported here so the template process has them loaded for every worker it forks.
import multiprocessing.process as _mp_process
import multiprocessing.reduction
import multiprocessing.spawn  # noqa: F401
import os
import pickle
import signal
import socket
import sys
import threading
import types
import weakref
from collections.abc import Callable
from typing import Any

from .travel import CACHED_FUNCTION, Route, route

__all__ = [
    "ENV_REPORT",
    "PoolChildError",
    "arm",
    "disable_multiprocessing",
    "disarm",
    "enable_multiprocessing",
    "enabled",
    "end_of_cell",
    "install",
]

ENV_REPORT = "NBISOLATE_MP_REPORT"
"""Where children report a failure: ``@name`` (a Linux abstract socket) or a socket path."""

CHILD_MAIN = "nbisolate._mpchild"
"""The module a spawned child runs as its ``__main__`` when the parent's has no path or name."""

_FunctionType = types.FunctionType
_BY_VALUE = Route.BY_VALUE


class PoolChildError(RuntimeError):
    """A process the cell started could not load its task or died at start: the pool would hang."""


# -- by value through ForkingPickler ---------------------------------------------------------

_BY_TOKEN: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
"""token -> what this process rebuilt from it, so a second arrival is the same object."""
_KNOWN: weakref.WeakSet[Any] = weakref.WeakSet()
"""Objects a stream resolved to an existing object here: their state is not re-applied."""


def _reducer_override(self: Any, obj: Any) -> Any:
    """``ForkingPickler.reducer_override``: notebook functions and classes by value, all else as before."""
    kind = type(obj)
    if kind is not _FunctionType and kind is not CACHED_FUNCTION and not issubclass(kind, type):
        return NotImplemented
    bv = sys.modules.get("nbisolate.byvalue")
    token = bv.arrived_token(obj) if bv is not None else None
    if token is None and route(obj) is not _BY_VALUE:
        return NotImplemented  # importable: pickle's own save_global, as before
    return by_value_reduce(obj, token)


def by_value_reduce(obj: Any, token: str | None = None) -> tuple[Any, tuple[Any, ...]]:
    """``(_load_by_value, (token, payload))`` for a function or class: any pickler can write it.

    The payload is a pickle of its own (cloudpickle's by-value copy, made by
    :mod:`nbisolate.byvalue` with this process's ``__main__`` as the notebook
    namespace), so the multiprocessing pickler needs no reducer for code
    objects or cells. The token is the one ``obj`` arrived with (it goes back
    to where it came from as itself) or one minted here.
    """
    from . import byvalue

    if token is None:
        token = byvalue.arrived_token(obj) or byvalue._token(obj)
    file = io.BytesIO()
    main = getattr(sys.modules.get("__main__"), "__dict__", None)
    _pool_pickler()(file, main=main).dump(obj)
    return _load_by_value, (token, file.getvalue())


def _known(token: str) -> Any:
    """What ``token`` names in this process: an original it sent, or what it rebuilt already."""
    found = _BY_TOKEN.get(token)
    if found is not None:
        return found
    bv = sys.modules.get("nbisolate.byvalue")
    if bv is None:
        return None
    found = bv._SENT.get(token)
    if found is None:  # arrived here another way (an isolated cell's inputs)
        for obj, arrived in list(bv._ARRIVED.items()):
            if arrived == token:
                found = obj
                break
    return found


def _load_by_value(token: str | None, payload: bytes) -> Any:
    """The loading side of :func:`by_value_reduce`: the object ``token`` names here, or the copy."""
    child_hooks()  # this process now holds notebook objects: they go back as themselves
    if token is not None:
        found = _known(token)
        if found is not None:
            return found
    from . import byvalue

    with byvalue.loads_into(None):  # functions are rebuilt on this process's __main__
        return pickle.loads(payload)


def _rebuild_known(token: str | None, make: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """byvalue's rebuild, unless ``token`` names an object here already (then that object)."""
    if token is not None:
        found = _known(token)
        if found is not None:
            _KNOWN.add(found)
            return found
    obj = make(token, *args)
    if token is not None:
        try:
            _BY_TOKEN[token] = obj
        except TypeError:
            pass
    return obj


def _apply_state(obj: Any, packed: tuple[Callable[[Any, Any], Any], Any]) -> None:
    """cloudpickle's state setter, skipped for an object that already existed here.

    Re-applying a copy's attributes to the original would replace its
    methods, globals and closure cells with the copy's.
    """
    if obj in _KNOWN:
        return
    setter, state = packed
    setter(obj, state)


_pool_pickler_class: type | None = None


def _pool_pickler() -> type:
    """:class:`nbisolate.ship.FastPickler` keyed by token on both sides (made on first use)."""
    global _pool_pickler_class
    if _pool_pickler_class is None:
        from . import byvalue
        from .ship import FastPickler

        makers = (byvalue._rebuild_function, byvalue._rebuild_class, byvalue._rebuild_cached)

        def keyed(rv: Any, obj: Any) -> Any:
            if not isinstance(rv, tuple) or rv[0] not in makers:
                return rv
            make, args, *rest = rv
            token = byvalue.arrived_token(obj) or args[0]
            rest += [None] * (4 - len(rest))
            state, items, pairs, setter = rest
            if state is not None and setter is not None:
                state, setter = (setter, state), _apply_state
            return (_rebuild_known, (token, make, tuple(args[1:])), state, items, pairs, setter)

        class PoolPickler(FastPickler):
            """Everything by value, with a token each; resolved on the loading side."""

            def sent_back(self, obj: Any) -> None:
                # Not byvalue's "send back by token": the receiver may be a pool child that
                # never saw this object. The token in keyed() lets it come back as itself.
                return None

            def by_value(self, obj: Any) -> Any:
                return keyed(super().by_value(obj), obj)

            def _dynamic_function_reduce(self, func: types.FunctionType) -> Any:
                return keyed(super()._dynamic_function_reduce(func), func)

        _pool_pickler_class = PoolPickler
    return _pool_pickler_class


# -- installing -----------------------------------------------------------------------------

_MISSING = object()
_saved: dict[tuple[Any, str], Any] = {}
_installed: set[str] = set()
_lock = threading.RLock()


def _set(owner: Any, name: str, value: Any) -> None:
    """Replace ``owner.name``, remembering the original once (for :func:`_restore`)."""
    key = (owner, name)
    if key not in _saved:
        _saved[key] = owner.__dict__.get(name, _MISSING) if isinstance(owner, type) else getattr(
            owner, name, _MISSING
        )
    setattr(owner, name, value)


def _restore() -> None:
    for (owner, name), value in _saved.items():
        if value is _MISSING:
            try:
                delattr(owner, name)
            except AttributeError:
                pass
        else:
            setattr(owner, name, value)
    _saved.clear()
    _installed.clear()


def _patch_pickler(reduction: types.ModuleType) -> None:
    cls = reduction.ForkingPickler
    if cls.__dict__.get("reducer_override") is not _reducer_override:
        _set(cls, "reducer_override", _reducer_override)
    dumps = cls.__dict__.get("dumps")
    if isinstance(dumps, classmethod) and not getattr(dumps.__func__, "_nbisolate", False):
        _set(cls, "dumps", classmethod(_explaining(dumps.__func__)))


def _explaining(dumps: Callable[..., Any]) -> Callable[..., Any]:
    """``ForkingPickler.dumps`` that, when a task cannot be pickled, says which member of which
    object could not be and what to do (the error alone names only a type: ``cannot pickle
    '_io.BufferedReader' object``, and nobody can say which attribute holds the file)."""

    def explaining_dumps(cls: type, obj: Any, protocol: int | None = None) -> Any:
        try:
            return dumps(cls, obj, protocol)
        except Exception as exc:
            note = _culprit_note(obj, exc)
            if note:
                _add_note(exc, note)
            raise

    explaining_dumps._nbisolate = True  # type: ignore[attr-defined]
    return explaining_dumps


def _culprit_note(obj: Any, exc: BaseException) -> str | None:
    """One paragraph naming the object and member a pool task could not pickle, and the fix."""
    import ast
    import re

    try:
        from .diagnose import pickle_check

        report = pickle_check(obj, name="task", serializers=["pickle"])
        found = getattr(report, "errors", None) or getattr(report, "problems", [])
        problems = [p for p in found if getattr(p, "path", None)]
        if not problems:
            return None
        said = str(exc)
        chosen = next((p for p in problems if said and said in p.reason), problems[0])
        indices, attrs = re.fullmatch(r"task((?:\[[^\]]+\])*)(.*)", chosen.path).groups()
        holder = obj
        for index in re.findall(r"\[([^\]]+)\]", indices):
            holder = holder[ast.literal_eval(index)]
    except Exception:  # an explanation is a help, never a second failure
        return None
    reason = chosen.reason.split(" (pickle:", 1)[0].rstrip(".")
    where = f"{type(holder).__qualname__}{attrs}" if attrs else "one of the task's arguments"
    return (
        f"nbisolate: the pool could not send a task to its worker: {where} is a "
        f"{chosen.type_name} ({reason}). Fix: {chosen.fix}"
    )


def _patch_spawn(spawn: types.ModuleType) -> None:
    """Spawned children run :data:`CHILD_MAIN` as ``__main__`` when the parent's cannot be re-run."""
    original = spawn.get_preparation_data
    if getattr(original, "_nbisolate", False):
        return

    def get_preparation_data(name: str) -> dict[str, Any]:
        data = original(name)
        if "init_main_from_name" not in data and "init_main_from_path" not in data:
            data["init_main_from_name"] = CHILD_MAIN
        return data

    get_preparation_data._nbisolate = True  # type: ignore[attr-defined]
    _set(spawn, "get_preparation_data", get_preparation_data)


def _new_prefix() -> None:
    """A forked child mints tokens of its own (it inherited its parent's prefix and counter)."""
    bv = sys.modules.get("nbisolate.byvalue")
    if bv is not None:
        bv._prefix = f"{os.getpid()}-{os.urandom(4).hex()}-"


def _tokenize_main() -> None:
    """Before a fork: give the notebook's functions and classes their tokens.

    A forked child has them already (the parent's memory) and uses them
    instead of the by-value copies it receives (a function's globals are set
    only where a name is free). Tokened before the fork, they go back to the
    parent as the parent's own objects: ``type(result) is P`` holds under
    fork too.
    """
    bv = sys.modules.get("nbisolate.byvalue")
    main = sys.modules.get("__main__")
    if bv is None or main is None or not (_installed or _enabled):
        return
    try:
        values = list(vars(main).values())
    except Exception:
        return
    for value in values:
        kind = type(value)
        if (kind is _FunctionType or kind is CACHED_FUNCTION or issubclass(kind, type)) and route(value) is _BY_VALUE:
            bv._token(value)


_at_fork_registered = False


def _patch_family(pkg: str, *, spawn: bool, report: bool) -> None:
    """Hooks for ``multiprocessing`` or ``multiprocess`` (the same layout, dill's pickler)."""
    with _lock:
        if pkg in _installed:
            return
        reduction = sys.modules.get(f"{pkg}.reduction")
        process = sys.modules.get(f"{pkg}.process")
        spawn_mod = sys.modules.get(f"{pkg}.spawn")
        if reduction is None or process is None:
            return
        _installed.add(pkg)
        _patch_pickler(reduction)
        if spawn and spawn_mod is not None:
            _patch_spawn(spawn_mod)
        if report:
            _patch_process(process.BaseProcess)


def _patch_process(base: type) -> None:
    """Pool workers report how they died; the first process started opens the report socket."""
    run, start = base.run, base.start
    if getattr(run, "_nbisolate", False):
        return

    def reporting_run(self: Any) -> None:
        try:
            return run(self)
        except Exception as exc:
            if _is_pool_worker(getattr(self, "_target", None)):
                _report(exc, "pool")
            raise

    def listening_start(self: Any) -> None:
        _listen()
        return start(self)

    reporting_run._nbisolate = True  # type: ignore[attr-defined]
    _set(base, "run", reporting_run)
    if _owner_pid == os.getpid():
        _set(base, "start", listening_start)


_POOL_WORKERS = {
    ("multiprocessing.pool", "worker"),
    ("multiprocess.pool", "worker"),
    ("concurrent.futures.process", "_process_worker"),
}


def _is_pool_worker(target: Any) -> bool:
    return (getattr(target, "__module__", None), getattr(target, "__qualname__", None)) in _POOL_WORKERS


class _AfterImport:
    """A ``sys.meta_path`` entry that runs a hook right after a watched module is executed.

    ``multiprocess`` is imported by the cell (if at all), after the worker set
    up: its pickler is patched the moment it exists, before the cell can use it.
    """

    def __init__(self) -> None:
        self.waiting: dict[str, Callable[[], None]] = {}
        # Names being looked up through the finders after us: another finder that wraps
        # loaders the same way (display_worker.AdaptOnImport) asks us in turn, and must
        # get None then, not a loop. Imports of one name never overlap (the import lock).
        self.resolving: set[str] = set()

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        hook = self.waiting.get(name)
        if hook is None or name in self.resolving:
            return None
        self.resolving.add(name)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self.resolving.discard(name)
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        waiting = self.waiting

        class Loader:
            def create_module(self, spec: Any) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: types.ModuleType) -> None:
                loader.exec_module(module)
                if waiting.pop(name, None) is not None:
                    hook()

        spec.loader = Loader()
        return spec


_after_import: _AfterImport | None = None


def _when_imported(name: str, hook: Callable[[], None]) -> None:
    global _after_import
    if name in sys.modules:
        hook()
        return
    if _after_import is None:
        _after_import = _AfterImport()
    earlier = _after_import.waiting.get(name)
    if earlier is not None:  # two hooks on one module (the random state, the settings): both run
        first, second = earlier, hook

        def hook() -> None:
            first()
            second()

    _after_import.waiting[name] = hook
    if _after_import not in sys.meta_path:
        sys.meta_path.insert(0, _after_import)


def _install(*, report: bool) -> None:
    global _at_fork_registered
    from . import byvalue  # noqa: F401  (tokens exist before the first fork: _tokenize_main)

    _patch_family("multiprocessing", spawn=True, report=report)
    # multiprocess is imported by the cell, if at all: patched the moment its package is
    # complete (its spawn module is imported here then; the package imports it lazily).
    def family() -> None:
        import multiprocess.spawn  # noqa: F401

        _patch_family("multiprocess", spawn=True, report=report)

    _when_imported("multiprocess", family)
    if not _at_fork_registered:
        os.register_at_fork(before=_tokenize_main, after_in_child=_new_prefix)
        _at_fork_registered = True


def child_hooks() -> None:
    """In a pool's child: send notebook objects back by token, and report a death (if asked)."""
    report = bool(os.environ.get(ENV_REPORT))
    _patch_family("multiprocessing", spawn=False, report=report)
    if "multiprocess.reduction" in sys.modules:
        _patch_family("multiprocess", spawn=False, report=report)
    if report and not getattr(sys.excepthook, "_nbisolate", False):
        sys.excepthook = _reporting_excepthook(sys.excepthook)


def _reporting_excepthook(original: Callable[..., Any]) -> Callable[..., Any]:
    def excepthook(kind: type, value: BaseException, tb: Any) -> Any:
        if isinstance(value, Exception) and os.getpid() != _owner_pid:
            _report(value, "start")
        return original(kind, value, tb)

    excepthook._nbisolate = True  # type: ignore[attr-defined]
    return excepthook


# -- the worker's side: install, listen, stop the cell --------------------------------------

_owner_pid: int | None = None
_sock: socket.socket | None = None
_listener: threading.Thread | None = None
_pending: list[dict[str, Any]] = []
_armed = False
_raised = False
_previous_sigint: Any = None
_seen = threading.Event()


def install() -> None:
    """Set up an isolated cell's worker: by value, spawned children that report, the listener.

    Called by the worker before the cell runs; cheap (attribute assignments):
    the socket and its thread exist only once the cell starts a process.
    """
    global _owner_pid
    _owner_pid = os.getpid()
    _install(report=True)
    if not getattr(sys.excepthook, "_nbisolate", False):
        sys.excepthook = _reporting_excepthook(sys.excepthook)


def _listen() -> None:
    """Open the report socket and its reader thread (once), and tell children where it is."""
    global _sock, _listener
    if _sock is not None or _owner_pid != os.getpid():
        return
    with _lock:
        if _sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if sys.platform.startswith("linux"):
            name = f"nbisolate-mp-{os.getpid()}-{os.urandom(6).hex()}"
            sock.bind("\0" + name)
            os.environ[ENV_REPORT] = "@" + name
        else:
            import tempfile

            path = os.path.join(tempfile.mkdtemp(prefix="nbisolate-mp-"), "report")
            sock.bind(path)
            os.environ[ENV_REPORT] = path
        _sock = sock
        _listener = threading.Thread(target=_read_reports, args=(sock,), daemon=True,
                                     name="nbisolate-pool-reports")
        _listener.start()


def _read_reports(sock: socket.socket) -> None:
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            return
        try:
            report = json.loads(data)
        except ValueError:
            continue
        _pending.append(report)
        _seen.set()
        if _armed and not _raised and signal.getsignal(signal.SIGINT) is _on_sigint:
            try:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # type: ignore[arg-type]
            except (OSError, TypeError):
                pass


def _report(exc: BaseException, where: str) -> None:
    """From a child: tell the worker what went wrong, by datagram (never blocks, never raises)."""
    address = os.environ.get(ENV_REPORT)
    if not address:
        return
    try:
        import traceback

        current = _current_process()
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        body = {
            "pid": os.getpid(),
            "name": getattr(current, "name", "?"),
            "where": where,
            "load": _is_load_failure(exc),
            "type": type(exc).__name__,
            "error": str(exc)[:2000],
            "missing": _what_was_missing(exc),
            "traceback": text[-6000:],
        }
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.sendto(json.dumps(body).encode(), "\0" + address[1:] if address[0] == "@" else address)
        finally:
            sock.close()
    except Exception:
        pass  # a report is a help; the child's own traceback still goes to stderr


def _current_process() -> Any:
    for pkg in ("multiprocess", "multiprocessing"):
        module = sys.modules.get(f"{pkg}.process")
        if module is not None and pkg + ".reduction" in sys.modules:
            current = module.current_process()
            if current.name != "MainProcess" or pkg == "multiprocessing":
                return current
    return _mp_process.current_process()


_LOADERS = {"loads", "load", "_load_by_value", "find_class", "get", "recv", "_main"}


def _is_load_failure(exc: BaseException) -> bool:
    """True when the exception came out of unpickling (the task, or the process object)."""
    if isinstance(exc, (pickle.UnpicklingError, ImportError)):
        return True
    tb = exc.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    if not frames:
        return False
    innermost = frames[-1]
    return isinstance(exc, AttributeError) and (
        innermost.co_name in _LOADERS or innermost.co_filename.endswith(("reduction.py", "queues.py"))
    )


def _what_was_missing(exc: BaseException) -> dict[str, str] | None:
    """The module and name a child looked for and did not find, read from the error."""
    import re

    if isinstance(exc, ImportError) and getattr(exc, "name", None):
        return {"module": str(exc.name), "name": ""}
    match = re.search(r"Can't get attribute '([^']+)' on <module '([^']+)'", str(exc))
    if match:
        return {"module": match.group(2), "name": match.group(1)}
    return None


def _describe(report: dict[str, Any]) -> str:
    """The message of :class:`PoolChildError`: the child, what it could not load, the fix."""
    who = f"{report.get('name', '?')} (pid {report.get('pid', '?')}), a process this cell started,"
    error = f"{report.get('type')}: {report.get('error')}"
    missing = report.get("missing")
    stopped = (
        "A pool would restart such workers for ever and the cell would hang, so it was "
        "stopped here; the child's traceback is below."
    )
    if report.get("load") or missing:
        what = "its task" if report.get("where") == "pool" else "the process it should run"
        text = f"{who} could not load {what}: {error}."
        if missing and missing.get("module") in ("__main__", "__mp_main__"):
            text += (
                f" It looked for {missing['name']!r} in its own __main__, which is not this "
                "cell's namespace: the object was pickled by name. nbisolate sends the cell's "
                "functions, lambdas, closures and classes by value, but not what a custom "
                "__reduce__, a TypeVar or a pickle made elsewhere refers to by name. Fix: define "
                "it in a .py module next to the notebook and import it, or pass plain data."
            )
        elif missing:
            module = missing["module"]
            name = f"{module}.{missing['name']}" if missing.get("name") else f"module {module!r}"
            text += (
                f" It could not find {name}: a fresh interpreter cannot import module "
                f"{module!r} (created at run time, or not on sys.path). Fix: make it importable "
                "(a .py file next to the notebook), or define the function or class in the cell, "
                "which nbisolate sends by value."
            )
        else:
            text += (
                " Fix: pass only what a fresh interpreter can rebuild (plain data, importable "
                "or cell-defined functions and classes); `%pickle_check NAME` in the notebook "
                "shows which member cannot travel."
            )
    else:
        text = (
            f"{who} died before it could finish starting its work: {error}. Fix that error "
            "(it is raised in the child, e.g. in the pool's initializer)."
        )
    return f"{text} {stopped}\n--- {report.get('name', 'child')} traceback ---\n{report.get('traceback', '')}"


def _on_sigint(signum: int, frame: Any) -> None:
    """SIGINT in the worker: a child's report if one is waiting, else Python's KeyboardInterrupt."""
    global _raised
    if _pending and _armed and not _raised:
        _raised = True
        handled = sys.exc_info()[1]
        message = _describe(_pending[0])
        if handled is not None:  # the cell is failing already (BrokenProcessPool): say why
            _add_note(handled, message)
            return
        raise PoolChildError(message)
    signal.default_int_handler(signum, frame)


def _add_note(exc: BaseException, message: str) -> None:
    if hasattr(exc, "add_note"):
        exc.add_note(message)
    elif exc.args and isinstance(exc.args[0], str):  # Python 3.10: no notes; the message says it
        exc.args = (f"{exc.args[0]}\n{message}", *exc.args[1:])


def arm() -> None:
    """The cell starts running (main thread): a child's report stops it from now on."""
    global _armed, _previous_sigint
    if threading.current_thread() is not threading.main_thread():
        return
    _previous_sigint = signal.signal(signal.SIGINT, _on_sigint)
    _armed = True


def disarm(exc: BaseException | None = None) -> None:
    """The cell ended: no more stopping. A failure gets the children's reports as a note.

    ``concurrent.futures`` raises ``BrokenProcessPool`` as soon as a worker
    dies, maybe before the dying child's report arrived: for such an error,
    wait a moment for it, so the message says which child and why.
    """
    global _armed
    _armed = False
    if _previous_sigint is not None and threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGINT) is _on_sigint:
            signal.signal(signal.SIGINT, _previous_sigint)
    if exc is None or _raised or isinstance(exc, PoolChildError):
        return
    if not _pending and _sock is not None and type(exc).__name__ in ("BrokenProcessPool",
                                                                      "BrokenExecutor"):
        _seen.wait(1.0)
    if _pending:
        _add_note(exc, _describe(_pending[0]))


# -- end of cell: let the resource trackers finish ------------------------------------------


def _close_tracker_fds() -> None:
    """Close this process's end of every resource tracker's pipe: its EOF means "clean up now"."""
    for name, module in list(sys.modules.items()):
        if module is None or not name.endswith("resource_tracker"):
            continue
        tracker = getattr(module, "_resource_tracker", None)
        fd = getattr(tracker, "_fd", None)
        if isinstance(fd, int):
            try:
                os.close(fd)
            except OSError:
                pass
            tracker._fd = None


def end_of_cell(timeout: float = 3.0) -> None:
    """Kill what the cell started, but let multiprocessing's resource trackers finish first.

    A tracker unlinks the named semaphores (``/dev/shm/sem.mp-*``) and shared
    memory segments (``psm_*``) still registered when every writer of its pipe
    has gone; killing it with the rest leaked them. So: kill every other
    process the cell started, close the worker's own end of the tracker pipes,
    and wait (at most ``timeout``) for the trackers to clean up and exit, then
    kill whatever is left.
    """
    from . import proctree

    trackers = proctree.kill_own_descendants_sparing(proctree.is_resource_tracker)
    if trackers:  # else no tracker waits on our end of a pipe: the exit closes them all
        _close_tracker_fds()
        proctree.wait_for_exit(trackers, timeout)
    proctree.kill_own_descendants()
    _remove_temp_dirs()


def _remove_temp_dirs() -> None:
    """Remove the ``pymp-*`` folders the cell's pools made (a forkserver's socket is in one).

    multiprocessing removes them as the interpreter exits, which a worker never does (it ends
    with ``os._exit``): each folder's own finalizer is run here, and a finalizer runs only in
    the process that made its folder, never in a template's or a spare's.
    """
    for family in ("multiprocessing", "multiprocess"):
        util = sys.modules.get(f"{family}.util")
        remove = getattr(util, "_remove_temp_dir", None)
        registry = getattr(util, "_finalizer_registry", None)
        if remove is None or not registry:
            continue
        for finalizer in list(registry.values()):
            if getattr(finalizer, "_callback", None) is remove:
                try:
                    finalizer()
                except Exception:
                    pass


# -- ordinary notebook cells: %isolate_config mp=on ------------------------------------------

_enabled = False


def enabled() -> bool:
    """True while :func:`enable_multiprocessing` is in effect."""
    return _enabled


def enable_multiprocessing() -> str:
    """Make the notebook's own pools work under spawn and forkserver; returns what changed.

    Functions, lambdas, closures and classes defined in the notebook travel by
    value to the workers of ``multiprocessing`` (``Pool``, ``Process``),
    ``concurrent.futures.ProcessPoolExecutor`` and ``multiprocess``.
    :func:`disable_multiprocessing` puts everything back.
    """
    global _enabled
    with _lock:
        _install(report=False)
        _enabled = True
    return (
        "multiprocessing: functions, lambdas, closures and classes defined in this notebook now "
        "travel by value to process pools (multiprocessing Pool and Process, "
        "concurrent.futures.ProcessPoolExecutor, multiprocess), so Pool.map(f, ...) works under "
        "spawn and forkserver. Changed: ForkingPickler.reducer_override of multiprocessing "
        "(and multiprocess, once imported), and spawned children whose parent has no __main__ "
        f"file start from {CHILD_MAIN}. `%isolate_config mp=off` undoes it."
    )


def disable_multiprocessing() -> str:
    """Undo :func:`enable_multiprocessing`; returns what changed back."""
    global _enabled
    with _lock:
        was = _enabled
        _restore()
        if _after_import is not None:
            _after_import.waiting.clear()
            if _after_import in sys.meta_path:
                sys.meta_path.remove(_after_import)
        _enabled = False
    if not was:
        return "multiprocessing: nbisolate had not changed it (mp=off already)."
    return (
        "multiprocessing: back to its own pickling; notebook-defined functions again fail in "
        "spawned pool workers (use %%isolate, or `%isolate_config mp=on`)."
    )


# What a cell leaves bound that belongs to the process that ran it (``with Pool() as pool``
# binds ``pool``): (module, class) pairs found along the value's type's MRO, never imported.
_ACTIVITIES = {
    ("multiprocessing.pool", "Pool"): "a process pool",
    ("multiprocess.pool", "Pool"): "a process pool",
    ("concurrent.futures._base", "Executor"): "an executor",
    ("multiprocessing.process", "BaseProcess"): "a child process",
    ("multiprocess.process", "BaseProcess"): "a child process",
    ("threading", "Thread"): "a thread",
}


def left_behind(values: dict[str, Any]) -> dict[str, str]:
    """The results that are pools, executors, processes or threads of this worker, and why
    each stays behind: they are running activities of the process that ran the cell, not
    data, and end with it. Taken out before serializing (pickling a pool fails in every
    engine, after a costly diagnosis), and named in one short line instead."""
    found: dict[str, str] = {}
    for name, value in values.items():
        for klass in type(value).__mro__:
            what = _ACTIVITIES.get((klass.__module__, klass.__name__))
            if what is not None:
                kind = type(value)
                found[name] = (  # "type: why", as every skipped result's reason
                    f"{kind.__module__}.{kind.__qualname__}: {what} of the worker process "
                    "that ran the cell, which ended with it; what it computed is in the "
                    "variables the cell assigned"
                )
                break
    return found
