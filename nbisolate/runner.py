"""Running one cell isolated: plan, ship, start on a backend, then apply or raise.

This is the one place where the pieces meet, in the order data flows::

    cell text --plan.plan_cell--> Plan (inputs, outputs)
              --ship.dumps-----> Shipment --> Launch (payload, buffers, RunOptions)
              --backend.start--> RunHandle: events from the worker
              --feed / outcome-> the notebook namespace, and the listeners

:class:`CellRun` is a state machine over :class:`~nbisolate.events.Event`
objects; :mod:`nbisolate.wait` drives it (blocking or awaiting), and
:class:`nbisolate.sweep.Sweep` drives many.  Listeners (the panel, a test)
learn everything from events: ``planned``, ``phase``, ``shipped``, the
worker's own, ``applied`` and ``done`` last.

Whatever happens, the namespace changes only after a result arrived and was
rebuilt completely: a failing, timed-out, interrupted or crashed cell changes
nothing.
"""

from __future__ import annotations

import contextvars
import logging
import os
import signal
import sys
import threading
import time
from collections import ChainMap
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import replace
from typing import Any

from . import attributes, backends, byvalue, inplace, openfiles, rng, settings, ship, widgetrelay
from .backends import Backend, Launch, RunHandle
from .errors import IsolateError, IsolateTimeout, RemoteError, ShipError, WorkerCrashed
from .events import Event
from .options import RunOptions
from .plan import Plan, cell_packages, plan_cell, user_packages
from .protocol import CHANNEL_LOST, RESULT, safe_str
from .sink import StdSink
from .units import format_bytes, shorten
from .wait import wait_async, wait_sync

Listener = Callable[[Event], None]

INSPECT_SECONDS = 5.0
"""How long looking at one input may take before it is named as one that cannot be inspected.

Looking means what any serialization does first (its type, ``__reduce_ex__``):
instant for real data, for ever for a proxy whose server is gone."""


_QUICK_TYPES = frozenset({int, float, complex, bool, type(None)})
"""Input types that serialize in microseconds and cannot block (see ``_prepares_at_once``)."""
_QUICK_LENGTH = 4096
"""Strings and bytes up to this length count as quick inputs too."""


def inspect_value(name: str, value: Any) -> None:
    """Touch ``value`` the way serializing it will, raising a :class:`ShipError` naming ``name``.

    A lazy proxy whose ``__class__`` raises, or whose attribute access raises,
    fails here with its own exception named; one whose access blocks is caught
    by the caller's deadline (:meth:`CellRun.prepare`, :mod:`nbisolate.wait`).
    """
    try:
        value.__class__  # noqa: B018 - isinstance() reads it, so every pickler does
        value.__reduce_ex__  # noqa: B018 - the first thing a pickler asks for
    except Exception as exc:
        raise ShipError(
            f"notebook variable {name!r} cannot be inspected: looking at it raised "
            f"{type(exc).__name__}: {exc} (a lazy proxy or remote object that cannot be "
            f"loaded?). Nothing ran. Load or rebuild {name!r} in a normal cell, or leave it "
            "out of this cell.",
            name=name,
        ) from None


_PLAIN = frozenset(
    {int, float, complex, bool, type(None), str, bytes, bytearray, list, tuple, dict, set, frozenset, range}
)
"""Types whose ``__class__`` and ``__reduce_ex__`` are the interpreter's own: inspecting cannot fail or block."""


def _blocked(name: str, seconds: float) -> ShipError:
    return ShipError(
        f"notebook variable {name!r} did not answer within {seconds:g} s when nbisolate looked "
        "at it to send it to the worker (a proxy whose server is gone?). Nothing ran and no "
        f"worker was started. Rebuild {name!r} in a normal cell, or leave it out of this cell.",
        name=name,
    )


def type_name(value: Any) -> str:
    """``list``, ``pandas.DataFrame``, ``__main__.Experiment``: builtins short, the rest qualified."""
    kind = type(value)
    module = getattr(kind, "__module__", "") or ""
    qualname = getattr(kind, "__qualname__", kind.__name__)
    return qualname if module == "builtins" else f"{module}.{qualname}"


def _shipped(
    shipment: ship.Shipment, namespace: Mapping[str, Any], shared: ship.Shipment | None = None
) -> dict[str, Any]:
    """The ``shipped`` event's data: per input its type, size, how it travels, seconds."""
    if shared is not None:
        rows = [*_shipped(shared, namespace)["rows"], *_shipped(shipment, namespace)["rows"]]
        return {"nbytes": shared.nbytes + shipment.nbytes, "engine": shipment.engine, "rows": rows}
    return {
        "nbytes": shipment.nbytes,
        "engine": shipment.engine,
        "rows": [
            {
                "name": name,
                "type": type_name(namespace.get(name)),
                "size": shipment.sizes.get(name),
                "how": shipment.how.get(name),
                "seconds": shipment.seconds.get(name),
            }
            for name in shipment.names
        ],
    }


def _raisable(exc: BaseException) -> bool:
    """Whether a rebuilt exception can be raised in the kernel as itself.

    ``StopIteration`` raised through the awaited cell would become
    ``RuntimeError: coroutine raised StopIteration``, and an exception whose
    ``__str__`` raises cannot even be shown: both are shown as a
    :class:`RemoteError` with the worker's traceback instead.
    """
    if isinstance(exc, StopIteration | StopAsyncIteration):
        return False
    try:
        str(exc)
    except Exception:
        return False
    return True


class _Failed:
    """An item for the wait: preparing in the background failed with ``exc``."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class RemoteTraceback(Exception):
    """Carries the worker's formatted traceback as the ``__cause__`` of a rebuilt exception."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text


class RemoteValue:
    """The display of a last-expression value that could not travel back itself."""

    def __init__(self, bundle: dict[str, Any]) -> None:
        self.bundle = bundle

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return self.bundle

    def __repr__(self) -> str:
        return str(self.bundle.get("text/plain", "<value computed in the worker>"))


def _one_paragraph(exc: BaseException) -> BaseException:
    """Show ``exc`` in IPython as its message alone: nbisolate's own frames would only bury it."""
    exc._render_traceback_ = lambda: [f"{type(exc).__name__}: {exc}"]  # type: ignore[attr-defined]
    return exc


def _cwd() -> str:
    """The kernel's working directory, for the worker; a clear error if it was deleted."""
    try:
        return os.getcwd()
    except FileNotFoundError:
        raise IsolateError(
            "the notebook's working directory no longer exists (it was deleted or moved), so the "
            "isolated worker has no directory to start in; nothing ran. Change to an existing "
            "directory in a normal cell (os.chdir(...) or %cd) and run the cell again."
        ) from None


def _raised_in(exc: BaseException) -> str:
    """`` in Bad.__setstate__``: the innermost frame of a rebuild failure, the user's code."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return ""
    frame = tb.tb_frame
    code = frame.f_code
    name = getattr(code, "co_qualname", None)  # Python 3.11+
    if name is None:  # earlier: the method's class from its first argument
        owner = frame.f_locals.get("self", frame.f_locals.get("cls"))
        kind = owner if isinstance(owner, type) else type(owner) if owner is not None else None
        name = f"{kind.__qualname__}.{code.co_name}" if kind is not None else code.co_name
    return f", raised in {name}"


def _label(source: str) -> str:
    for line in source.splitlines():
        if line.strip():
            return shorten(line.strip(), 60)
    return "(empty cell)"


class CellRun:
    """One isolated execution of ``source`` against ``namespace``, with :class:`RunOptions`.

    ``options`` may also be given as keywords (``timeout=5``, ``mem="2G"``...),
    as :func:`run_isolated` does; ``backend`` is a :class:`~nbisolate.backends.Backend`
    to use instead of the one the options choose (a sweep shares one).
    """

    def __init__(
        self,
        source: str,
        namespace: MutableMapping[str, Any],
        options: RunOptions | None = None,
        *,
        available: Iterable[str] | None = None,
        label: str | None = None,
        line_offset: int = 0,
        display_source: str | None = None,
        sink: Any = None,
        filename: str = "<isolated cell>",
        cell_label: str | None = None,
        backend: Backend | None = None,
        shared: ship.Shipment | None = None,
        settings_of: settings.Settings | None = None,
        **option_values: Any,
    ) -> None:
        if options is None:
            options = RunOptions(**option_values)
        elif option_values:
            options = replace(options, **option_values)
        self.options = options
        self.source = source
        self.namespace = namespace
        # The notebook's own namespace (a sweep reads through a ChainMap over it): the
        # globals of its functions, which functions coming back are rebuilt on.
        self.main_namespace = namespace.maps[-1] if isinstance(namespace, ChainMap) else namespace
        self.available = set(namespace) if available is None else set(available)
        self.label = label or _label(source)
        self.line_offset = line_offset
        self.display_source = display_source
        self.sink = sink if sink is not None else StdSink()
        self.filename = filename
        self.cell_label = cell_label or filename  # how tracebacks name the cell: Cell In[n]
        # How the notebook names the cell a file name stands for (Cell In[2]), if it can tell:
        # tracebacks through notebook functions name their cells so (see _cell_labels).
        self.label_cells: Callable[[str], str | None] | None = None
        self.backend = backend
        # Inputs serialized once for many runs (a sweep's, apart from the swept name): sent
        # as they are, beside this run's own shipment, never serialized again.
        self.shared = shared
        # In-place changes to inputs come back (inplace.py); not for a job that ends while
        # the notebook goes on (--bg), nor for the values of a sweep.
        self.watch = not options.background
        # How the kernel's IPython writes microseconds, for %time in the cell (set by the magic).
        self.micro: str | None = None
        # The notebook's global random state goes with the cell (rng.py); not to the values of
        # a sweep, which would all draw the same numbers.
        self.carry_random = True
        # What the cell changes of the settings, the environment, the working directory and
        # sys.path comes back (settings.py), as it stays after an ordinary cell: not for a job
        # that ends while the notebook goes on, nor for a sweep's values, nor from another machine.
        self.settings_back = not options.background
        # What the cell sets on modules, classes and functions comes back (attributes.py); not
        # from a sweep's values, each of which would set it its own way.
        self.attributes_back = True
        # The notebook's warning filters, recursion limit and NumPy settings (settings.py), read
        # here, in the thread the cell would run in: NumPy 2 keeps its own per thread (context).
        # A sweep reads them once for all its values (``settings_of``).
        self.settings = settings.capture() if settings_of is None else settings_of
        # The notebook's packages, for the template to preload; a sweep looks them up once
        # for all its runs (reading every notebook variable's type per value cost milliseconds).
        self.packages: list[str] | None = None
        self.listeners: list[Listener] = []
        self.phases: dict[str, float] = {}
        self.plan: Plan | None = None
        self.shipment: ship.Shipment | None = None
        self.sent: dict[str, Any] = {}  # the inputs as they were sent (the notebook's own objects)
        self.launch: Launch | None = None
        self.handle: RunHandle | None = None
        self.interrupted = False
        self.skipped: dict[str, str] = {}
        self.returned: list[str] = []
        self._start_clock = 0.0
        self._final: Event | None = None
        self._exit: Event | None = None
        self._sysexit: dict[str, Any] | None = None
        self._asking = False  # the waiting thread is asking the front end (see _ask_front_end)
        self._ask_lock = threading.Lock()
        self._noted_dropped = False
        self._done_sent = False
        # Preparing in the background (the magic in a kernel): what is being done since
        # when, and the exception that ended the run before a worker said anything.
        self._lock = threading.Lock()
        self._began = 0.0
        self._spent = 0.0  # seconds spent inspecting and serializing the inputs
        self._stage: tuple[str, str | None, float] | None = None
        self._failed: BaseException | None = None

    # -- stages ---------------------------------------------------------------
    def prepare(self, check: bool = True, ship: bool = True) -> None:
        """Choose the backend, plan the cell, serialize its inputs; raises before any process exists.

        Listeners hear ``planned`` and ``phase`` as planning ends, ``phase`` and
        ``shipped`` as serializing ends (so a panel can name the inputs while a
        large one is still being pickled), and ``done`` with the exception if
        anything fails.  ``check=False`` leaves the backend's check to the
        caller (a sweep checks once for all its values).

        ``ship=False`` only plans: the inputs are then inspected and serialized
        when the run begins, in a thread of their own, so that the wait covers
        them: ``--timeout`` counts their time and an interrupt stops them (the
        magic in a kernel does this).  Either way an input that cannot be looked
        at within :data:`INSPECT_SECONDS` is named before any worker starts.
        """
        try:
            if self.backend is None:
                self.backend = backends.choose(self.options, self.note)
            if self.plan is None:  # a sweep plans once for all its runs
                self.plan = self._plan()
            if ship:
                t0 = time.perf_counter()
                self._inspect_within(INSPECT_SECONDS)
                self._finish_preparing(check, self._notify)
                self._spent = time.perf_counter() - t0
        except BaseException as exc:
            self.done(exc)
            raise

    def _inspect_within(self, seconds: float) -> None:
        """Inspect every input (:func:`inspect_value`) in a helper thread, each within ``seconds``."""
        assert self.plan is not None
        if all(type(self.namespace[name]) in _PLAIN for name in self.plan.inputs):
            return  # nothing to look at: a builtin value answers at once (a thread costs more)
        where: list[Any] = [None, time.perf_counter()]
        failure: list[BaseException] = []

        def look() -> None:
            try:
                for name in self.plan.inputs:  # type: ignore[union-attr]
                    where[:] = [name, time.perf_counter()]
                    inspect_value(name, self.namespace[name])
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=look, daemon=True, name="nbisolate-inspect")
        thread.start()
        while thread.is_alive():
            thread.join(0.05)
            name, since = where
            if thread.is_alive() and name is not None and time.perf_counter() - since > seconds:
                raise _blocked(name, seconds)
        if failure:
            raise failure[0]

    def _finish_preparing(self, check: bool, tell: Callable[[Event], None]) -> None:
        """Serialize the inputs and build the launch; events go to ``tell``."""
        assert self.plan is not None and self.backend is not None
        self.shipment = self._ship(self.plan, tell)
        shared = self.shared
        self.launch = Launch(
            payload=self._payload(),
            buffers=[*(shared.buffers if shared is not None else ()), *self.shipment.buffers],
            options=self.options,
            label=self.label,
            shipment=self.shipment,
            shared=shared,
        )
        if check:
            self.backend.check(self.launch)

    def _plan(self) -> Plan:
        t0 = time.perf_counter()
        opts = self.options
        plan = plan_cell(
            self.source,
            self.available,
            inputs=None if opts.inputs is None else list(opts.inputs),
            outputs=None if opts.outputs is None else list(opts.outputs),
            first_line=self.line_offset + 1,
            filename=self.filename,
        )
        self.phases["plan"] = time.perf_counter() - t0
        types = {name: type_name(self.namespace.get(name)) for name in plan.inputs}
        self._notify(
            Event(
                "planned",
                {
                    "label": self.label,
                    "inputs": list(plan.inputs),
                    "outputs": list(plan.outputs),
                    "types": types,
                    "options": self.options,
                },
            )
        )
        self._notify(Event("phase", ("plan", self.phases["plan"])))
        if plan.whole_namespace and opts.inputs is None:
            sent = ", ".join(plan.inputs) or "none"
            self.note(
                f"nbisolate: the cell reads the notebook's namespace as a whole ({plan.whole_namespace}), "
                f"which its text cannot name: only the variables it names travel ({sent}), so that is "
                "all the worker's namespace holds. Name the others after %%isolate to send them too "
                "(%%isolate name1 name2 ...).\n"
            )
        return plan

    def _ship(self, plan: Plan, tell: Callable[[Event], None] | None = None) -> ship.Shipment:
        tell = tell or self._notify
        t1 = time.perf_counter()
        sent = set(self.shared.names) if self.shared is not None else set()
        self.sent = {name: self.namespace[name] for name in plan.inputs if name not in sent}
        shipment = ship.dumps(self.sent, main=self.main_namespace, uses=plan.names)
        self.phases["serialize"] = time.perf_counter() - t1
        tell(Event("phase", ("serialize", self.phases["serialize"])))
        tell(Event("shipped", _shipped(shipment, self.namespace, self.shared)))
        return shipment

    def _payload(self) -> dict[str, Any]:
        assert self.plan is not None and self.shipment is not None
        opts = self.options
        return {
            "source": self.source,
            "display_source": self.display_source or self.source,
            "micro": self.micro,
            "line_offset": self.line_offset,
            "filename": self.filename,
            "cell_label": self.cell_label,
            "cell_labels": self._cell_labels(),
            "inputs": self.shipment.names,
            "data": self.shipment.data,
            "engine": self.shipment.engine,
            "outputs": list(self.plan.outputs),
            # Unless --out chose them, the names the cell binds at run time come back too.
            "discover": opts.outputs is None,
            # None: nothing is watched, not even what the inputs' functions bring along.
            "watch": (watch := inplace.watchable(
                {n: self.namespace[n] for n in self.shipment.names}, self.shipment.sizes
            ) if self.watch else None),
            # Too large to watch, but written into by the cell's text (arr[0] = 5): taken as changed.
            "written": [n for n in self.plan.written if n not in watch and n in self.shipment.names]
            if watch is not None else [],
            "has_result": self.plan.has_result,
            "deletes": list(self.plan.deletes),
            "rng": rng.capture() if self.carry_random else None,
            "attributes": list(self.plan.attributes) if self.attributes_back else [],
            "classes": attributes.class_roots(self.namespace, self.shipment.names) if self.attributes_back else {},
            # Into a worker of our own only: a Dask worker's modules serve every task it runs.
            "patches": self._patches() if getattr(self.backend, "here", False) else [],
            "settings": self.settings,
            "settings_back": self.settings_back and getattr(self.backend, "here", False),
            "sys_path": list(sys.path),
            "argv": list(sys.argv),
            "cwd": _cwd(),
            "mem": opts.mem,
            "max_result": opts.max_result,
            # The worker watches this process (not its parent, which may be the
            # template) and kills its own tree when the kernel is gone.
            "kernel_pid": os.getpid(),
            # Loaded first, from the first ``buffers`` of the launch's buffers.
            "shared": None
            if self.shared is None
            else {
                "inputs": self.shared.names,
                "data": self.shared.data,
                "engine": self.shared.engine,
                "buffers": len(self.shared.buffers),
            },
        }

    def _cell_labels(self) -> dict[str, str]:
        """The names of the notebook cells whose functions and classes the inputs carry by value
        (``Cell In[2]``), by file name: the worker's tracebacks name them as IPython does."""
        label, shipment = self.label_cells, self.shipment
        if label is None or shipment is None:
            return {}
        files = [*shipment.cells, *(self.shared.cells if self.shared is not None else ())]
        return {name: said for name in files if (said := label(name)) is not None}

    def _patches(self) -> list[tuple[str, str, str, bytes | None, str]]:
        """What cells set on modules, and on classes and functions of modules
        (:data:`nbisolate.attributes.registry`), as it is now: (module, qualified name,
        attribute, the value serialized or None once deleted, engine).  A value that cannot
        travel is left out, and said once: the worker has the module's own."""
        out: list[tuple[str, str, str, bytes | None, str]] = []
        for where, value in attributes.registry.current():
            if attributes.is_missing(value):
                out.append((*where, None, "pickle"))
                continue
            try:
                data = ship.in_band(value, self.main_namespace)
            except Exception as exc:
                if attributes.registry.first_failure(where):
                    self.sink.stream(
                        "stderr",
                        f"nbisolate: {where[0]}.{where[1] + '.' if where[1] else ''}{where[2]}, which the "
                        f"notebook set, cannot travel to the worker ({type(exc).__name__}: {safe_str(exc)}); "
                        "isolated cells see the module's own value. Set it inside the isolated cell.\n",
                    )
                continue
            out.append((*where, data, "pickle"))
        return out

    def start(self, deliver: Callable[[Event], None]) -> RunHandle:
        """Start the worker; events are handed to ``deliver`` from the backend's threads.

        The time spent serializing the inputs counts against ``--timeout``: the
        worker gets what is left of it.
        """
        if self.launch is None:
            self.prepare()
        assert self.launch is not None and self.backend is not None
        launch = self.launch
        if self.options.timeout:
            if self.options.timeout - self._spent <= 0:
                raise self._timed_out("serializing its inputs")
            launch.payload["spent"] = self._spent
        self._start_clock = time.perf_counter()
        handle = backends.start_tracked(self.backend, launch, self._watching_asks(deliver))
        preload = getattr(self.backend, "preload", None)
        if preload is not None:
            # The next cells that use the notebook's packages should not pay their import.  Found
            # once the worker has its cell: looking at every notebook variable takes a moment.
            if self.packages is None:
                learned = cell_packages(self.plan.imports) if self.plan is not None else []
                preload([*user_packages(self.namespace), *learned])
            else:
                preload(self.packages)
        with self._lock:
            self.handle = handle
            stop = self._failed is not None
        if stop:  # interrupted while it started: it must not run on
            handle.stop("interrupt")
        return handle

    def _timed_out(self, doing: str) -> IsolateTimeout:
        timeout = self.options.timeout or 0.0
        return IsolateTimeout(
            timeout,
            self._spent,
            None,
            message=(
                f"the isolated cell was stopped after {timeout:g} s while {doing}: it exceeded "
                f"--timeout {timeout:g} s, which counts that time too; no worker ran and no "
                "notebook variable was changed. Raise --timeout, or ship less (name the inputs, "
                "or build large values in the cell)."
            ),
        )

    def _prepares_at_once(self) -> bool:
        """Whether serializing the inputs and starting the worker take no time worth a thread.

        True on this machine's backend (whose start returns at once) when every
        input is a number, ``None`` or a short string or bytes: looking at
        those cannot block and pickling them takes microseconds, while handing
        the work to a thread of its own costs a fast cell a thread start and
        the switches between threads.
        """
        assert self.plan is not None
        if getattr(self.backend, "name", None) != "local" or self.shared is not None:
            return False
        for name in self.plan.inputs:
            value = self.namespace.get(name)
            kind = type(value)
            if kind in _QUICK_TYPES:
                continue
            if kind in (str, bytes) and len(value) <= _QUICK_LENGTH:
                continue
            return False
        return True

    def _begin_here(self, put: Callable[[Any], None]) -> None:
        """Serialize and start in this thread (see :meth:`_prepares_at_once`).

        An interrupt meanwhile ends the run as it does in the background
        (:meth:`stop` sees the stage), and a worker started after it is
        stopped at once: a ``KeyboardInterrupt`` raised in the middle of
        starting could lose the worker, so Ctrl-C only asks for the stop here.
        """
        previous = None
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                previous = signal.signal(signal.SIGINT, lambda signum, frame: self.interrupt())
        try:
            self._serialize_and_start(put)
        except BaseException as exc:
            self._abandon(exc)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _begin_in_background(self, put: Callable[[Any], None]) -> None:
        """Inspect, serialize and start in a thread, so the wait covers every phase."""

        def work() -> None:
            assert self.plan is not None
            try:
                for name in self.plan.inputs:
                    self._stage = ("inspect", name, time.perf_counter())
                    inspect_value(name, self.namespace[name])
                self._serialize_and_start(put)
            except BaseException as exc:
                put(_Failed(exc))

        # In the cell's context: a context variable among the inputs travels with the value the
        # cell sees (as do decimal's context and NumPy's print options), not a fresh thread's.
        cell_context = contextvars.copy_context()
        threading.Thread(target=cell_context.run, args=(work,), daemon=True, name="nbisolate-prepare").start()

    def _serialize_and_start(self, put: Callable[[Any], None]) -> None:
        """Serialize the inputs and start the worker, each stage noted for a stop meanwhile."""
        self._stage = ("serialize", None, time.perf_counter())
        self._finish_preparing(True, put)
        self._spent = time.perf_counter() - self._began
        self._stage = ("start", None, time.perf_counter())
        if self._failed is None:
            self.start(put)

    def _abandon(self, exc: BaseException) -> None:
        """End the run before its worker said anything; a worker that starts later is stopped."""
        with self._lock:
            if self._failed is None:
                self._failed = exc
            handle = self.handle
        if handle is not None:
            handle.stop("interrupt")

    def stop(self, reason: str = "interrupt") -> None:
        """Stop the worker and everything it started (the panel's Stop, an interrupt).

        Before the worker exists (inspecting, serializing, starting) the run
        ends at once; what is still being prepared is dropped, and a worker
        that starts after all is stopped right away.
        """
        self.interrupted = True
        with self._lock:
            handle = self.handle
        if handle is not None:
            handle.stop(reason)
        elif self._stage is not None:
            doing = {"inspect": "inspecting its inputs", "serialize": "serializing its inputs"}.get(
                self._stage[0], "starting its worker"
            )
            interrupt = KeyboardInterrupt(
                f"the isolated cell was interrupted while {doing}; no worker ran and no notebook "
                "variable was changed."
            )
            interrupt._render_traceback_ = lambda: [f"KeyboardInterrupt: {interrupt}"]  # type: ignore[attr-defined]
            self._abandon(interrupt)

    def feed(self, event: Event) -> None:
        """Process one event in the waiting thread; :attr:`busy` turns False once the run is over."""
        if isinstance(event, _Failed):
            with self._lock:
                if self._failed is None:
                    self._failed = event.exc
            return
        kind = event.kind
        if kind == "ask":
            self._ask_front_end(event.data)
            return
        if kind == "stream":
            self.sink.stream(*event.data)
        elif kind in ("display", "update_display", "clear_output", "error_output"):
            self.sink.display(kind, event.data)
        elif kind == "comm":  # a widget the cell made: a sink that cannot show it drops it
            relay = getattr(self.sink, "comm", None)
            if relay is not None:
                relay(event.data, event.buffers)
        elif kind == "phase":
            name, seconds = event.data
            if name == "start":  # as the kernel saw it: from asking for a worker to its first word
                seconds = event.time - self._start_clock
                event.data = (name, seconds)
            self.phases[name] = seconds
        elif kind == "dropped":
            self._note_dropped(event.data)
        elif kind == "sysexit":
            self._sysexit = event.data
        self._notify(event)
        if kind in ("result", "error"):
            self._final = event
        elif kind == "exit":
            self._exit = event

    def _ask_front_end(self, ask: dict[str, Any]) -> None:
        """The cell called ``input()`` or ``getpass()``: ask here, as an ordinary cell would, and answer.

        In a kernel that is ipykernel's own ``input``, an input request to the
        front end (a password box for ``getpass``); a front end that takes no
        input makes it raise, and the cell gets that as its ``EOFError``.
        Ctrl-C (the interrupt button) while it waits stops the cell, as it does
        an ordinary one: the wait's own SIGINT handler steps aside meanwhile,
        since the request waits for an interrupt to raise ``KeyboardInterrupt``.
        A worker that ends meanwhile (``--timeout``, a crash) ends the question
        the same way (:meth:`_watching_asks`): nobody is left to take the answer.
        """
        import builtins
        import getpass

        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            try:
                with self._ask_lock:
                    self._asking = previous is not None
                asking = getpass.getpass if ask.get("password") else builtins.input
                text, ok = asking(ask.get("prompt", "")), True
            finally:
                with self._ask_lock:
                    self._asking = False
        except KeyboardInterrupt:
            self.interrupt()  # a worker already gone is not stopped again
            return
        except Exception as exc:
            text, ok = f"{type(exc).__name__}: {exc}", False
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        ask["reply"](ok, str(text))

    def _watching_asks(self, deliver: Callable[[Event], None]) -> Callable[[Event], None]:
        """``deliver``, which also ends a question to the front end once the worker is gone."""

        def watched(event: Event) -> None:
            if event.kind == "exit":
                with self._ask_lock:
                    if self._asking:  # the main thread waits in the input request: end it
                        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            deliver(event)

        return watched

    @property
    def busy(self) -> bool:
        return self._final is None and self._exit is None and self._failed is None

    # -- what nbisolate.wait drives ------------------------------------------------
    def begin(self, put: Callable[[Event], None]) -> None:
        self._began = time.perf_counter()
        if self.launch is None and self.plan is not None:
            if self._prepares_at_once():
                self._begin_here(put)
            else:
                self._begin_in_background(put)
        else:
            self.start(put)

    def interrupt(self) -> None:
        self.stop("interrupt")

    def tick(self) -> None:
        """Called every TICK_SECONDS while waiting, for listeners that show time passing.

        While the inputs are prepared in the background, it also holds the
        deadlines: an input that cannot be looked at, and ``--timeout``.
        """
        stage = self._stage
        if stage is not None and self.handle is None and self._failed is None:
            what, name, since = stage
            now = time.perf_counter()
            if what == "inspect" and name is not None and now - since > INSPECT_SECONDS:
                self._abandon(_blocked(name, INSPECT_SECONDS))
            elif self.options.timeout and now - self._began > self.options.timeout:
                self._spent = now - self._began
                doing = "inspecting its inputs" if what == "inspect" else (
                    "serializing its inputs" if what == "serialize" else "starting its worker"
                )
                self._abandon(self._timed_out(doing))
        self._notify(Event("tick"))

    def note(self, text: str) -> None:
        """A message from nbisolate itself (a backend's) for the user: an event, so the
        listeners decide how to show it (``--quiet`` and ``panel=off`` hide it)."""
        self._notify(Event("note", text))

    def _notify(self, event: Event) -> None:
        """Hand ``event`` to every listener; a broken listener is logged, never fatal to the cell."""
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                logging.getLogger(__name__).exception("nbisolate: a run listener failed")

    def done(self, error: BaseException | None) -> None:
        """Tell listeners, once, that the run is over: ``Event("done", exception or None)``."""
        self.sent = {}  # (see outcome)
        if not self._done_sent:
            self._done_sent = True
            self._notify(Event("done", error))

    # -- outcome ----------------------------------------------------------------
    def outcome(self) -> Any:
        """Apply the results to the namespace and return the cell's value, or raise."""
        # The run lets go of the inputs it sent (a run may live on until the cyclic GC finds it,
        # and must not keep a variable the notebook deletes); the results may refer to them.
        sent, self.sent = self.sent, {}
        if self._failed is not None and self._final is None and self._exit is None:
            raise self._failed
        if self._final is None:
            return self._raise_for_exit()
        body = self._final.data
        if body.get("files"):  # the notebook's open files move on to where the cell left them
            openfiles.catch_up(body["files"], byvalue.sent)
        logs = (self.settings or {}).get("logging") or {}
        if any(packed[1] == "file" for packed in logs.get("handlers", ())):
            settings.catch_up_logs()  # and its log files, past what the cell appended
        if self._final.kind == "error":
            raise self._rebuild_error(body, self._final.buffers)
        t0 = time.perf_counter()
        broken: dict[str, BaseException] = {}
        buffers, data = self._final.buffers, body["data"]
        # From here the rebuilt values hold the memory they use, and only they: a run
        # (kept until the cyclic GC finds it) or a listener holding the event must not
        # keep a rebound result's pages alive, or the kernel would hold it twice over.
        self._final.buffers, body["data"] = [], b""
        try:
            values = ship.loads(
                body["names"], data, buffers, body["engine"],
                self.main_namespace, starts=body.get("starts"), failed=broken,
                shared=[sent.get(name) for name in body.get("kept") or ()],  # the notebook's own
            )
        except MemoryError:
            raise _one_paragraph(
                MemoryError(
                    "the isolated cell finished, but the kernel ran out of memory rebuilding its "
                    f"results ({', '.join(body['names']) or 'none'}). No notebook variable was "
                    "changed. Copy back less (--out NAME), or save large results to a file in "
                    "the cell and load what you need here."
                )
            ) from None
        except Exception as exc:
            names = ", ".join(n for n in body["names"] if n != RESULT) or "none"
            raise IsolateError(
                "the isolated cell finished, but rebuilding its results in the kernel failed "
                f"({type(exc).__name__}: {exc}{_raised_in(exc)}); none of them ({names}) was "
                "copied back and no notebook variable was changed. Leave the one that cannot be "
                "rebuilt out with --out, or create it in a normal cell."
            ) from None
        self.phases["return"] = body.get("dump_seconds", 0.0) + (time.perf_counter() - t0)
        self._apply_in_place(values, body.get("mutated") or (), body.get("inside") or {})
        self._apply_function_state(values)
        handlers = {name: values.pop(name) for name in list(values) if name.startswith(widgetrelay.HANDLERS)}
        value = values.pop(RESULT, None)
        set_attributes = {name: values.pop(name) for name in list(values) if attributes.chain_of(name)}
        if body.get("result_bundle") is not None:
            value = RemoteValue(body["result_bundle"])
        self.skipped = dict(body.get("skipped") or {})
        for name, exc in broken.items():  # rebuilt here, it raised: named like the others
            self.skipped[name] = (
                f"rebuilding it in the kernel raised {type(exc).__name__}: "
                f"{safe_str(exc)}{_raised_in(exc)}"
            )
        lost = {n: self.skipped.pop(n) for n in list(self.skipped) if n.startswith(widgetrelay.HANDLERS)}
        for name, why in self.skipped.items():
            what = "the value of the last expression" if name == RESULT else attributes.describe(name)
            self.sink.stream(
                "stderr",
                f"nbisolate: {what} was not copied back: {why.rstrip('.')}. The other results "
                "arrived; create such objects in a normal cell, or leave them out with --out.\n",
            )
        for name, why in (body.get("left") or {}).items():
            kind, _, what = why.partition(": ")
            self.sink.stream("stderr", f"nbisolate: {name!r} ({kind}) stayed in the worker: it is {what}.\n")
            self.skipped[name] = why
        self.namespace.update(values)
        self._take_handlers(handlers, lost)  # on the kernel's widgets, now the cell's are bound
        byvalue.release_referents()  # copies that only weak references held are gone, as they would be
        deleted = body.get("deleted") or ()
        for name in deleted:  # `del name` in the cell: gone here too
            self.namespace.pop(name, None)
        # config.LR = 0.1, on the notebook's own module (after the results: the cell may import it)
        in_place = body.get("mutated") or ()
        for problem in attributes.apply(self.namespace, set_attributes, deleted, attributes.registry, in_place):
            self.sink.stream("stderr", f"nbisolate: {problem}; it is as it was here. Set it in a normal cell.\n")
        if not self.options.background:  # a job's state would rewind a notebook that went on
            rng.restore(body.get("rng"))
        if self.settings_back and body.get("settings"):
            for part in settings.apply(body["settings"]):
                self.sink.stream(
                    "stderr",
                    f"nbisolate: the cell changed {part}, which the kernel could not take: it is "
                    "as it was here. Change it in a normal cell.\n",
                )
        self.returned = list(values)
        self._note_unbound(values, body.get("unchanged") or ())
        self._notify(
            Event("applied", {"returned": self.returned, "skipped": self.skipped, "phases": self.phases})
        )
        return value

    def _take_handlers(self, handlers: Mapping[str, Any], lost: dict[str, str]) -> None:
        """Register what the cell registered on its widgets on the kernel's widgets
        (:func:`widgetrelay.take_handlers`), and name what could not come back (``lost``: why)."""
        for name, found in handlers.items():
            try:
                problem = widgetrelay.take_handlers(name, found)
            except Exception as exc:
                problem = f"{type(exc).__name__}: {safe_str(exc)}"
            if problem:
                lost[name] = problem
        for name, why in lost.items():
            what, why = widgetrelay.describe(name, self.namespace, why)
            self.sink.stream(
                "stderr",
                f"nbisolate: {what} could not come back: {why.rstrip('.')}. The widget shows and keeps "
                "its values, but the page's clicks and changes run nothing there; register them in a "
                "normal cell.\n",
            )

    def _apply_in_place(
        self, values: dict[str, Any], mutated: Iterable[str], inside: Mapping[str, Any] | None = None
    ) -> None:
        """Inputs the cell changed in place: the notebook's own objects take the change, and so
        do the objects inside them that stayed there (``inside``: see :func:`inplace.keep_identities`);
        another name the cell bound to a changed input (``data.append(4); y = data``) is the
        notebook's object too."""
        originals = {n: self.namespace[n] for n in mutated if n in values and n in self.namespace}
        swap = {id(values[n]): obj for n, obj in originals.items()}
        if inside:
            inplace.keep_identities(originals, values, inside, swap)
        took: dict[int, Any] = {}
        for name, original in originals.items():
            copy = values[name]
            if inplace.apply_in_place(original, copy, swap):
                values[name] = original
                took[id(copy)] = original
        for name, value in values.items():
            if name not in originals and id(value) in took:
                values[name] = took[id(value)]

    def _apply_function_state(self, values: dict[str, Any]) -> None:
        """What notebook functions keep that the cell changed (``def log(x, seen=[])`` then
        ``log(1)``, a closure's ``nonlocal n``): the notebook's own function takes it; none of
        it is bound as a variable."""
        for key in [k for k in values if k.startswith(inplace.STATE)]:
            if not inplace.take_function_state(self.namespace, key, values.pop(key)):
                self.sink.stream(
                    "stderr",
                    f"nbisolate: the cell changed {inplace.describe_state(key)}, which the kernel "
                    "could not take: it is as it was here. Change it in a normal cell.\n",
                )

    def _note_unbound(self, values: Mapping[str, Any], unchanged: Iterable[str] = ()) -> None:
        """``--out reslt``: say which names were asked for and not bound (a typo, a branch not
        taken); an input the cell left as it was is bound already (the notebook's own)."""
        asked = self.options.outputs or ()
        kept = set(unchanged)
        unbound = [n for n in asked if n not in values and n not in self.skipped and n not in kept]
        if not unbound:
            return
        try:
            binds = plan_cell(self.source, set(), first_line=self.line_offset + 1).outputs
        except Exception:
            binds = ()
        bound = ", ".join(binds) if binds else "nothing at top level"
        self.sink.stream(
            "stderr",
            f"nbisolate: --out asked for {', '.join(map(repr, unbound))}, which the cell did not "
            f"bind, so nothing was copied back for {'it' if len(unbound) == 1 else 'them'}. The cell "
            f"binds: {bound}. Check the spelling after --out.\n",
        )

    def _raise_for_exit(self) -> Any:
        assert self._exit is not None
        info = self._exit.data
        reason = info["reason"]
        if info.get("dropped") and not self._noted_dropped:
            self._note_dropped(info)
        if reason == "timeout":
            raise IsolateTimeout(self.options.timeout or 0.0, info["elapsed"] + self._spent, info["pid"])
        if reason in ("interrupt", "stop"):
            interrupt = KeyboardInterrupt(
                f"the isolated cell was interrupted; worker pid {info['pid']} and every process it "
                "started were stopped. No notebook variable was changed."
            )
            interrupt._render_traceback_ = lambda: [f"KeyboardInterrupt: {interrupt}"]  # type: ignore[attr-defined]
            raise interrupt
        if reason == "error":
            raise IsolateError(
                f"nbisolate failed while supervising the isolated cell ({info.get('error')}); "
                f"worker pid {info['pid']} and every process it started were stopped. No "
                "notebook variable was changed. Run the cell again; please report this if it "
                "happens again."
            )
        if self._sysexit is not None:
            # As in an ordinary cell: SystemExit where the cell ran, which IPython shows
            # without a traceback, and nothing bound (the worker is gone, as after any failure).
            raise SystemExit(*([self._sysexit["arg"]] if "arg" in self._sysexit else []))
        cause = None
        if info.get("returncode") == CHANNEL_LOST:
            cause = (
                "the worker's connection to the kernel was closed from inside the cell (it closed "
                "file descriptors it did not open, e.g. os.closerange(3, ...)), so it could not "
                "send its results. Close only descriptors the cell opened itself"
            )
        elif self.options.mem and (info.get("returncode") or 0) > 0:
            cause = (
                f"most likely a C library that could not get memory under --mem "
                f"{format_bytes(self.options.mem)} gave up and exited (its message, if any, is "
                "above). Raise --mem and run it again"
            )
        elif info.get("returncode") is None:
            cause = (
                f"unknown, because {info['lost']}" if info.get("lost")
                else "unknown: nothing reported how the worker ended"
            )
        raise WorkerCrashed(info["returncode"], info["pid"], self._mem_hint(info), cause=cause)

    def _mem_hint(self, info: dict[str, Any]) -> str:
        """Point at --mem when the worker died the way programs die when memory runs out."""
        dying = (-signal.SIGKILL, -signal.SIGABRT, -signal.SIGSEGV, -signal.SIGBUS)
        if self.options.mem and self._sysexit is None and info.get("returncode") in dying:
            return (
                f"It ran capped at {format_bytes(self.options.mem)} by --mem: code that cannot get memory "
                "may die like this instead of raising MemoryError. Raise --mem and run it again."
            )
        return ""

    def _memory_message(self, original: str) -> str:
        assert self.options.mem is not None
        return (
            f"the isolated cell ran out of memory: it is capped at {format_bytes(self.options.mem)} by "
            "--mem; raise --mem, or make the cell use less memory. No notebook variable was "
            "changed." + (f" ({original})" if original else "")
        )

    def _note_dropped(self, info: dict[str, Any]) -> None:
        self._noted_dropped = True
        fast = int(info.get("over_rate") or 0)
        more = (
            f" Besides, {format_bytes(fast)} of what was sent came faster than Jupyter's IOPub "
            "data rate limit lets through: the notebook server may have dropped up to that much "
            "more (it says \"IOPub data rate exceeded\")."
            if fast > 0
            else ""
        )
        self.sink.stream(
            "stderr",
            f"\nnbisolate: {format_bytes(info['dropped'])} of output was dropped: the limit is "
            f"{format_bytes(info['max_output'])} per cell.{more} Write large output to a file "
            "instead.\n",
        )

    def _rebuild_error(self, body: dict[str, Any], buffers: list[Any]) -> BaseException:
        exc: BaseException | None = None
        if body.get("names"):
            try:
                exc = ship.loads(
                    body["names"], body["data"], buffers, body["engine"], self.main_namespace
                ).get("exc")
            except Exception:
                exc = None
        text = body.get("traceback", "")
        stage = body.get("stage")
        if stage == "receive":
            return self._receive_error(body)
        if isinstance(exc, BaseException) and not _raisable(exc):
            exc = None
        if not isinstance(exc, BaseException):
            exc = RemoteError(body["type"], body["message"], text)
        lines = text.rstrip("\n").splitlines()
        if self.options.mem and (isinstance(exc, MemoryError) or body["type"] == "builtins.MemoryError"):
            message = self._memory_message(str(exc) if isinstance(exc, MemoryError) else "")
            cause = exc
            exc = MemoryError(message)
            exc.__context__ = cause
            lines.append(f"MemoryError: {message}")
        if stage == "setup":
            lines.append(
                "nbisolate: the worker failed while preparing the cell (loading its inputs), "
                "before any of the cell ran."
            )
        elif stage == "return":
            lines.append(
                "nbisolate: the cell ran, but sending its results back failed; no notebook "
                "variable was changed."
            )

        def render() -> list[str]:
            return lines

        try:
            exc._render_traceback_ = render  # type: ignore[attr-defined]
            exc.__cause__ = RemoteTraceback(text)
        except (AttributeError, TypeError):
            exc = RemoteError(body["type"], body["message"], text)
            exc._render_traceback_ = render  # type: ignore[attr-defined]
        return exc

    def _receive_error(self, body: dict[str, Any]) -> BaseException:
        """The kernel could not take the worker's results in (out of memory, a broken channel)."""
        what = f"{body['type'].rpartition('.')[2]}: {body['message']}".rstrip(": ")
        if body["type"] == "builtins.MemoryError":
            return _one_paragraph(
                MemoryError(
                    "the isolated cell finished, but the kernel ran out of memory receiving its "
                    "results, so none was copied back and no notebook variable was changed. "
                    "Copy back less (--out NAME), or save large results to a file in the cell "
                    "and load what you need here."
                )
            )
        return IsolateError(
            f"the isolated cell finished, but its results could not be received ({what}); the "
            "worker was stopped and no notebook variable was changed. Run the cell again."
        )

    # -- waiting ------------------------------------------------------------------
    def run_sync(self) -> Any:
        """Run and block until the cell is over; Ctrl-C stops the worker and raises."""
        return wait_sync(self)

    async def run_async(self) -> Any:
        """Run while awaiting on the running event loop; SIGINT stops the worker."""
        return await wait_async(self)


def run_isolated(
    source: str,
    namespace: MutableMapping[str, Any],
    inputs: Iterable[str] | None = None,
    outputs: Iterable[str] | None = None,
    timeout: float | None = None,
    **options: Any,
) -> Any:
    """Run ``source`` in a fresh worker process and copy its results into ``namespace``.

    ``inputs`` names the variables to ship (default: the free names the code
    reads that exist in ``namespace``); ``outputs`` narrows which bound names
    come back (default: all top-level bindings).  Returns the value of a last
    expression statement.  Raises what the cell raised (or
    :class:`~nbisolate.RemoteError`), :class:`~nbisolate.IsolateTimeout`,
    :class:`~nbisolate.WorkerCrashed`, :class:`~nbisolate.ShipError` or
    :class:`~nbisolate.IsolateUsageError`; on any of them ``namespace`` is
    unchanged.  ``options`` go to :class:`CellRun` (``mem``, ``max_output``,
    ``sink``...).
    """
    run = CellRun(source, namespace, inputs=inputs, outputs=outputs, timeout=timeout, **options)
    run.prepare()
    return run.run_sync()
