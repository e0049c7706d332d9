"""Where an isolated run executes: one small interface, and a registry of backends.

A backend turns a prepared run (a :class:`Launch`: the worker's payload, its
out-of-band buffers, the options) into a running worker, and feeds what
happens to it back as :class:`~nbisolate.events.Event` objects.  It knows no
cell, no namespace and no UI::

    CellRun.prepare()  plan + ship         -> Launch
    backend.check(launch)                  raise now if it could not run there
    backend.start(launch, deliver)         -> RunHandle; deliver(Event) from any thread:
                                              started, phase, stream, display..., result|error,
                                              and exit last
    handle.stop(reason)                    interrupt / stop / timeout; thread- and signal-safe

``local`` (:mod:`nbisolate.backends.local`) forks a fresh worker here;
``dask`` (:mod:`nbisolate.backends.dask`) runs the same worker on a node of a
Dask cluster.  A new backend (SSH, a batch scheduler...) is one module with a
class implementing :class:`Backend` plus one :func:`register` call below; the
``--backend`` choices and ``%isolate_config backend=`` come from here.

Running handles are listed in :data:`running`, whatever their backend, for
anything that shows or stops workers (the JupyterLab status item).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import IsolateUsageError
from ..events import Event
from ..options import RunOptions

Deliver = Callable[[Event], None]


@dataclass
class Launch:
    """Everything a backend needs to start one run, and nothing of the notebook.

    ``payload`` is the worker's run message (see :mod:`nbisolate.protocol`),
    ``buffers`` its out-of-band parts; ``modules`` (lazy, from the shipment)
    names what the worker will import, for backends that check a remote
    environment first.
    """

    payload: dict[str, Any]
    buffers: list[Any]
    options: RunOptions
    label: str
    shipment: Any = None
    shared: Any = None
    """Inputs serialized once for several launches (a sweep's), sent beside ``shipment``."""

    @property
    def modules(self) -> set[str]:
        found = set(getattr(self.shipment, "modules", ()) or ())
        return found | set(getattr(self.shared, "modules", ()) or ())


@dataclass
class HandleInfo:
    """What the outside world may know of a running worker (the status item's row)."""

    id: str
    label: str
    pid: int | None
    started: float
    timeout: float | None
    host: str


@runtime_checkable
class RunHandle(Protocol):
    """One started run: an id, where it runs, and a way to stop it."""

    id: str

    @property
    def pid(self) -> int | None: ...

    @property
    def info(self) -> HandleInfo: ...

    def stop(self, reason: str = "interrupt") -> None:
        """Stop the worker and everything it started; returns at once, safe from a signal handler.

        ``reason`` (``interrupt``, ``stop``, ``timeout``) comes back in the ``exit`` event.
        """


@runtime_checkable
class Backend(Protocol):
    """Runs launches somewhere; see the module doc for the event contract."""

    name: str
    here: bool
    """Its workers run on this machine, in the kernel's environment and directories: what a
    cell changes of its process (the environment, the working directory, ``sys.path``, the
    settings) may then come back to the kernel (:mod:`nbisolate.settings`)."""

    def check(self, launch: Launch) -> None:
        """Raise (an :class:`~nbisolate.errors.IsolateError` saying what to do) if ``launch``
        could not run here; called before anything runs, once per sweep."""

    def start(self, launch: Launch, deliver: Deliver) -> RunHandle:
        """Start the worker and return at once; every later event goes to ``deliver``."""

    def concurrency(self, runs: int) -> int:
        """How many of ``runs`` runs of one sweep may run at the same time."""


# -- the registry of backends ------------------------------------------------------------


@dataclass
class _Entry:
    module: str
    factory: str
    help: str
    scheduler: bool  # takes --scheduler ADDRESS


_backends: dict[str, _Entry] = {}
settings: dict[str, Any] = {"backend": "local"}
"""The default backend (``%isolate_config backend=``); options without ``--backend`` use it."""


def register(
    name: str, module: str, factory: str, help: str = "", scheduler: bool = False
) -> None:
    """Make ``--backend NAME`` call ``module.factory(options, note) -> Backend`` (imported on
    first use); ``scheduler``: the backend reads ``--scheduler``."""
    _backends[name] = _Entry(module, factory, help, scheduler)


def names() -> tuple[str, ...]:
    """The registered backend names, for ``--backend`` choices and messages."""
    return tuple(_backends)


def described() -> list[tuple[str, str]]:
    """(name, what it is) per registered backend, for help texts."""
    return [(name, entry.help) for name, entry in _backends.items()]


def chosen_name(options: RunOptions) -> str:
    """The backend ``options`` asks for: ``--backend``, else ``dask`` with ``--scheduler``,
    else the configured default."""
    name = options.backend or ("dask" if options.scheduler else settings["backend"])
    if name not in _backends:
        raise IsolateUsageError(
            f"--backend {name!r} is not one of {', '.join(names())}; nothing ran."
        )
    if options.scheduler and not _backends[name].scheduler:
        takes = [n for n, entry in _backends.items() if entry.scheduler]
        raise IsolateUsageError(
            f"--scheduler needs --backend {' or '.join(takes)} (or no --backend): a {name} run "
            "has no scheduler; nothing ran."
        )
    return name


def choose(options: RunOptions, note: Callable[[str], None] | None = None) -> Backend:
    """The backend that runs cells with ``options``; raises (nothing ran) when it cannot be had.

    ``note(text)`` is how a backend tells the user something on its own (a
    cluster it started, workers it left out): through the run's event stream,
    so ``--quiet`` and the panel modes hold for every backend.
    """
    name = chosen_name(options)
    entry = _backends[name]
    module = importlib.import_module(entry.module)
    return getattr(module, entry.factory)(options, note or _ignore)


def _ignore(text: str) -> None:
    pass


def start_tracked(backend: Backend, launch: Launch, deliver: Deliver) -> RunHandle:
    """``backend.start(launch, deliver)``, listing the handle in :data:`running` from its
    ``started`` event (the worker exists: it can be shown and stopped) to its ``exit``.

    Done here, for every backend, and in the backend's thread rather than the
    waiting one: a run stops listening once its result arrived, but the
    status item must list the worker until it is really gone.
    """
    lock = threading.Lock()
    box: dict[str, Any] = {}

    def tell(event: Event) -> None:
        kind = event.kind
        if kind in ("started", "exit"):
            with lock:  # held while announcing: "ended" can never overtake "started"
                handle = box.get("handle")
                if handle is None:  # from inside backend.start: announced on its return
                    box[kind] = True
                else:
                    running.announce("started" if kind == "started" else "ended", handle)
        deliver(event)

    handle = backend.start(launch, tell)
    with lock:
        box["handle"] = handle
        if box.get("started"):
            running.announce("started", handle)
        if box.get("exit"):
            running.announce("ended", handle)
    return handle


def set_default(name: str) -> None:
    """``%isolate_config backend=NAME``."""
    name = name.strip().lower()
    if name not in _backends:
        raise IsolateUsageError(f"backend={name!r} is not one of {', '.join(names())}")
    settings["backend"] = name


register("local", "nbisolate.backends.local", "LocalBackend", "a fresh process on this machine")
register(
    "dask", "nbisolate.backends.dask", "backend_for", "a fresh process on a Dask worker", scheduler=True
)


# -- the handles that run now ---------------------------------------------------------------


@dataclass
class _Running:
    """Running handles of every backend, and callbacks told when one starts or ends."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _handles: dict[str, RunHandle] = field(default_factory=dict)
    _subscribers: list[Callable[[str, HandleInfo], None]] = field(default_factory=list)

    def subscribe(self, callback: Callable[[str, HandleInfo], None]) -> Callable[[], None]:
        """Call ``callback(event, info)`` on "started"/"ended"; returns an unsubscribe function."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def running(self) -> list[HandleInfo]:
        with self._lock:
            handles = list(self._handles.values())
        return [handle.info for handle in handles]

    def stop(self, handle_id: str) -> bool:
        """Stop a running handle as an interrupt would; False when there is no such handle."""
        with self._lock:
            handle = self._handles.get(handle_id)
        if handle is None:
            return False
        handle.stop("interrupt")
        return True

    def stop_all(self) -> None:
        with self._lock:
            handles = list(self._handles.values())
        for handle in handles:
            handle.stop("interrupt")

    def announce(self, event: str, handle: RunHandle) -> None:
        """``started`` or ``ended``: called by the run that owns ``handle``, once each."""
        with self._lock:
            if event == "started":
                if handle.id in self._handles:
                    return
                self._handles[handle.id] = handle
            elif self._handles.pop(handle.id, None) is None:
                return
            subscribers = list(self._subscribers)
        info = handle.info
        for callback in subscribers:
            try:
                callback(event, info)
            except Exception:  # a broken listener must not break the run
                pass


running = _Running()
"""Every running handle, whatever its backend (see :class:`_Running`)."""
