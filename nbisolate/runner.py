"""Running one cell isolated: plan, ship, supervise, then apply or raise.

This is the one place where the pieces meet, in the order data flows: cell
text -> :func:`plan.plan_cell` -> :func:`ship.dumps` -> a supervised worker ->
events -> the notebook namespace.  The magic and the Python API both use
:class:`CellRun`; they differ only in how they wait:

* :meth:`CellRun.run_sync` blocks the calling thread (terminal IPython, plain
  Python, ``run_cell_magic`` called by hand); Ctrl-C stops the worker.
* :meth:`CellRun.run_async` awaits on the kernel's event loop, so the kernel
  keeps handling front-end messages (the panel's Stop button) while the cell
  runs.  It installs its own SIGINT handler for the wait, because an
  interrupt that merely cancels the awaiting task would leave the worker
  running and, in current ipykernel, can take effect only when the awaited
  call returns.

Whatever happens, the namespace changes only after a result arrived and was
rebuilt completely: a failing, timed-out, interrupted or crashed cell changes
nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
import sys
import threading
import time
import types
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any

from . import ship
from .errors import IsolateError, IsolateTimeout, IsolateUsageError, RemoteError, WorkerCrashed
from .events import Event
from .plan import Plan, plan_cell
from .protocol import RESULT
from .supervisor import DEFAULT_MAX_OUTPUT, Job, launcher
from .units import format_bytes, shorten

Listener = Callable[[Event], None]

# Listeners get Event("tick") this often while a cell runs, even while output streams.
TICK_SECONDS = 0.25


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


class StdSink:
    """Where a cell's output goes: the kernel's own streams and display machinery."""

    def stream(self, name: str, text: str) -> None:
        stream = sys.stdout if name == "stdout" else sys.stderr
        stream.write(text)
        # A kernel's stream publishes on its own within 0.2 s, and a flush there is a
        # round trip to its IO thread (about 1 ms): flush only real files.
        if getattr(stream, "pub_thread", None) is None:
            stream.flush()

    def display(self, kind: str, data: dict[str, Any]) -> None:
        # Text written before a display must show before it; in a kernel,
        # publishing a display flushes the streams itself.
        if getattr(sys.stdout, "pub_thread", None) is None:
            sys.stdout.flush()
            sys.stderr.flush()
        try:
            from IPython import get_ipython
            from IPython.display import clear_output, publish_display_data
        except ImportError:  # pragma: no cover - IPython is a dependency
            get_ipython = None  # type: ignore[assignment]
        if get_ipython is None or get_ipython() is None:
            if kind != "clear_output":
                print(data.get("data", {}).get("text/plain", ""))
            return
        if kind == "clear_output":
            clear_output(wait=bool(data.get("wait")))
            return
        transient = data.get("transient") or {}
        publish_display_data(
            data=data.get("data", {}),
            metadata=data.get("metadata") or {},
            transient=transient or None,
            update=kind == "update_display",
        )


# A worker needs about 30 MB of data just to run Python and load nbisolate;
# a --mem below this could only end in a confusing crash.
MIN_MEM = 32 * 1024 * 1024


def parse_size(text: str) -> int:
    """``2G``, ``500M``, ``1.5GB``, ``1024`` (bytes) -> bytes; a clear error otherwise."""
    units = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    raw = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    number = raw.rstrip("KMGT")
    unit = raw[len(number) :]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise IsolateUsageError(
            f"cannot read size {text!r}: use a number with K, M, G or T, like 500M or 2G; nothing ran."
        ) from None
    if value <= 0:
        raise IsolateUsageError(f"size {text!r} must be more than zero; nothing ran.")
    return int(value)


# Packages a template must not import before forking: they start threads or
# initialize devices at import, which a forked child cannot inherit safely, or
# pick a GUI backend.  The worker imports them itself when the cell needs them.
_NEVER_PRELOAD = frozenset(
    {"torch", "tensorflow", "jax", "jaxlib", "cupy", "numba", "matplotlib", "ray", "dask",
     "distributed", "IPython", "ipykernel", "ipywidgets", "nbisolate", "zmq", "tornado"}
)


def user_packages(namespace: Mapping[str, Any]) -> list[str]:
    """Third-party top-level packages the notebook has imported (modules, or things from them).

    Only what the user imported counts, never what the kernel itself loaded,
    so the template imports nothing the user did not.
    """
    stdlib = getattr(sys, "stdlib_module_names", frozenset())
    found: dict[str, None] = {}
    for name, value in list(namespace.items()):
        if name.startswith("_"):
            continue
        if isinstance(value, types.ModuleType):
            module = value.__name__
        else:
            module = getattr(type(value), "__module__", None) if not callable(value) else getattr(value, "__module__", None)
        if not isinstance(module, str):
            continue
        top = module.partition(".")[0]
        if top and top not in stdlib and top not in _NEVER_PRELOAD and top != "__main__" and top != "builtins" and top in sys.modules:
            found[top] = None
    return list(found)


def _one_paragraph(exc: BaseException) -> BaseException:
    """Show ``exc`` in IPython as its message alone: nbisolate's own frames would only bury it."""
    exc._render_traceback_ = lambda: [f"{type(exc).__name__}: {exc}"]  # type: ignore[attr-defined]
    return exc


def _label(source: str) -> str:
    for line in source.splitlines():
        if line.strip():
            return shorten(line.strip(), 60)
    return "(empty cell)"




def finish(wait: Callable[[], Any], done: Callable[[BaseException | None], None]) -> Any:
    """``wait()``, then ``done`` with the exception that ended it, or None: listeners always hear."""
    try:
        value = wait()
    except BaseException as exc:
        done(exc)
        raise
    done(None)
    return value


async def finish_async(
    wait: Callable[[], Awaitable[Any]], done: Callable[[BaseException | None], None]
) -> Any:
    """:func:`finish` for a coroutine."""
    try:
        value = await wait()
    except BaseException as exc:
        done(exc)
        raise
    done(None)
    return value


class CellRun:
    """One isolated execution of ``source`` against ``namespace``."""

    def __init__(
        self,
        source: str,
        namespace: MutableMapping[str, Any],
        *,
        inputs: Iterable[str] | None = None,
        outputs: Iterable[str] | None = None,
        timeout: float | None = None,
        available: Iterable[str] | None = None,
        label: str | None = None,
        line_offset: int = 0,
        display_source: str | None = None,
        sink: Any = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
        mem: int | str | None = None,
        filename: str = "<isolated cell>",
        backend: Any = None,
        max_result: int | str | None = None,
    ) -> None:
        if timeout is not None and not (timeout > 0):
            raise IsolateUsageError(
                f"--timeout must be a number of seconds above zero, not {timeout!r}; nothing ran."
            )
        self.source = source
        self.namespace = namespace
        self.inputs = None if inputs is None else list(inputs)
        self.outputs = None if outputs is None else list(outputs)
        self.timeout = timeout
        self.available = set(namespace) if available is None else set(available)
        self.label = label or _label(source)
        self.line_offset = line_offset
        self.display_source = display_source
        self.sink = sink if sink is not None else StdSink()
        self.max_output = max_output
        self.mem = parse_size(mem) if isinstance(mem, str) else mem
        if self.mem is not None and self.mem < MIN_MEM:
            raise IsolateUsageError(
                f"--mem {mem} is too small: a worker needs about 30 MB just to run Python; "
                "use 32M or more. Nothing ran."
            )
        # Results larger than this are left out (named, like unpicklable ones); None: no limit
        # but the memory the machine has available.
        self.max_result = parse_size(max_result) if isinstance(max_result, str) else max_result
        self._sysexit: dict[str, Any] | None = None
        self._noted_dropped = False
        self.filename = filename
        # Where the worker runs when not here: an object whose ``start(run, deliver)``
        # returns a job-like object (``stop``, ``pid``) feeding the same events to
        # ``deliver`` (nbisolate.dask_backend). prepare/handle/outcome stay shared.
        self.backend = backend
        self.listeners: list[Listener] = []
        self.phases: dict[str, float] = {}
        self.plan: Plan | None = None
        self.shipment: ship.Shipment | None = None
        self.job: Job | None = None
        self._start_clock = 0.0
        self._final: Event | None = None
        self._exit: Event | None = None
        self.interrupted = False
        self.skipped: dict[str, str] = {}
        self.returned: list[str] = []
        self._done_sent = False

    # -- stages ---------------------------------------------------------------
    def prepare(self) -> None:
        """Plan the cell and serialize its inputs; raises before any process exists.

        Listeners hear a ``phase`` event as planning and as serializing end (so
        a panel can name the inputs while a large one is still being pickled),
        and ``done`` with the exception if either fails.
        """
        try:
            t0 = time.perf_counter()
            self.plan = plan_cell(
                self.source,
                self.available,
                inputs=self.inputs,
                outputs=self.outputs,
                first_line=self.line_offset + 1,
            )
            self.phases["plan"] = time.perf_counter() - t0
            self._notify(Event("phase", ("plan", self.phases["plan"])))
            t1 = time.perf_counter()
            self.shipment = ship.dumps({name: self.namespace[name] for name in self.plan.inputs})
            self.phases["serialize"] = time.perf_counter() - t1
            self._notify(Event("phase", ("serialize", self.phases["serialize"])))
        except BaseException as exc:
            self._done(exc)
            raise

    def _payload(self) -> dict[str, Any]:
        assert self.plan is not None and self.shipment is not None
        return {
            "source": self.source,
            "display_source": self.display_source or self.source,
            "line_offset": self.line_offset,
            "filename": self.filename,
            "inputs": self.shipment.names,
            "data": self.shipment.data,
            "engine": self.shipment.engine,
            "outputs": list(self.plan.outputs),
            "has_result": self.plan.has_result,
            "sys_path": list(sys.path),
            "cwd": os.getcwd(),
            "mem": self.mem,
            "max_result": self.max_result,
            # The worker watches this process (not its parent, which may be the
            # template) and kills its own tree when the kernel is gone.
            "kernel_pid": os.getpid(),
        }

    def start(self, deliver: Callable[[Event], None]) -> Job:
        """Start the worker; events are handed to ``deliver`` from the job's thread."""
        if self.plan is None:
            self.prepare()
        assert self.shipment is not None
        self._start_clock = time.perf_counter()
        if self.backend is not None:
            self.job = self.backend.start(self, deliver)
            return self.job
        self.job = Job(
            self._payload(),
            self.shipment.buffers,
            on_event=deliver,
            timeout=self.timeout,
            label=self.label,
            max_output=self.max_output,
            # A memory cap must hold from the first byte: a fork of the template
            # already carries its imports, so a capped cell gets a new interpreter
            # (exec'd by the template, which still kills it if the kernel dies).
            fresh=self.mem is not None,
        )
        try:
            self.job.start()
        except OSError as exc:
            raise IsolateError(
                f"could not start the isolated worker process ({type(exc).__name__}: {exc}); "
                "nothing ran. Check that the working directory still exists and the machine "
                "has free memory and process slots, then run the cell again."
            ) from exc
        launcher.preload(user_packages(self.namespace))
        return self.job

    def handle(self, event: Event) -> bool:
        """Process one event in the consumer's thread; True once the run is over."""
        kind = event.kind
        if kind == "stream":
            self.sink.stream(*event.data)
        elif kind in ("display", "update_display", "clear_output"):
            self.sink.display(kind, event.data)
        elif kind == "phase":
            name, seconds = event.data
            if name == "start":
                self.phases["start"] = event.time - self._start_clock
            else:
                self.phases[name] = seconds
        elif kind == "dropped":
            self._note_dropped(event.data)
        elif kind == "sysexit":
            self._sysexit = event.data
        self._notify(event)
        if kind in ("result", "error"):
            self._final = event
            return True
        if kind == "exit":
            self._exit = event
            return True
        return False

    def tick(self) -> None:
        """Called every TICK_SECONDS while waiting, for listeners that show time passing."""
        self._notify(Event("tick"))

    def _notify(self, event: Event) -> None:
        """Hand ``event`` to every listener; a broken listener is logged, never fatal to the cell."""
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                logging.getLogger(__name__).exception("nbisolate: a run listener failed")

    def _done(self, error: BaseException | None) -> None:
        """Tell listeners, once, that the run is over: ``Event("done", exception or None)``."""
        if not self._done_sent:
            self._done_sent = True
            self._notify(Event("done", error))

    # -- outcome ----------------------------------------------------------------
    def outcome(self) -> Any:
        """Apply the results to the namespace and return the cell's value, or raise."""
        if self._final is None:
            return self._raise_for_exit()
        body = self._final.data
        if self._final.kind == "error":
            raise self._rebuild_error(body, self._final.buffers)
        t0 = time.perf_counter()
        try:
            values = ship.loads(body["names"], body["data"], self._final.buffers, body["engine"])
        except MemoryError:
            raise _one_paragraph(
                MemoryError(
                    "the isolated cell finished, but the kernel ran out of memory rebuilding its "
                    f"results ({', '.join(body['names']) or 'none'}). No notebook variable was "
                    "changed. Copy back less (--out NAME), or save large results to a file in "
                    "the cell and load what you need here."
                )
            ) from None
        self.phases["return"] = body.get("dump_seconds", 0.0) + (time.perf_counter() - t0)
        value = values.pop(RESULT, None)
        if body.get("result_bundle") is not None:
            value = RemoteValue(body["result_bundle"])
        self.skipped = dict(body.get("skipped") or {})
        for name, why in self.skipped.items():
            what = "the value of the last expression" if name == RESULT else f"result {name!r}"
            self.sink.stream(
                "stderr",
                f"nbisolate: {what} was not copied back: {why.rstrip('.')}. The other results "
                "arrived; create such objects in a normal cell, or leave them out with --out.\n",
            )
        self.namespace.update(values)
        self.returned = list(values)
        return value

    def _raise_for_exit(self) -> Any:
        assert self._exit is not None
        info = self._exit.data
        reason = info["reason"]
        if info.get("dropped") and not self._noted_dropped:
            self._note_dropped(info)
        if reason == "timeout":
            raise IsolateTimeout(self.timeout or 0.0, info["elapsed"], info["pid"])
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
        cause = None
        if self._sysexit is not None:
            code = self._sysexit.get("code", "")
            cause = f"the cell called sys.exit({'' if code == 'None' else code})"
        raise WorkerCrashed(info["returncode"], info["pid"], self._mem_hint(info), cause=cause)

    def _mem_hint(self, info: dict[str, Any]) -> str:
        """Point at --mem when the worker died the way programs die when memory runs out."""
        dying = (-signal.SIGKILL, -signal.SIGABRT, -signal.SIGSEGV, -signal.SIGBUS)
        if self.mem and self._sysexit is None and info.get("returncode") in dying:
            return (
                f"It ran capped at {format_bytes(self.mem)} by --mem: code that cannot get memory "
                "may die like this instead of raising MemoryError. Raise --mem and run it again."
            )
        return ""

    def _memory_message(self, original: str) -> str:
        assert self.mem is not None
        return (
            f"the isolated cell ran out of memory: it is capped at {format_bytes(self.mem)} by "
            "--mem; raise --mem, or make the cell use less memory. No notebook variable was "
            "changed." + (f" ({original})" if original else "")
        )

    def _note_dropped(self, info: dict[str, Any]) -> None:
        self._noted_dropped = True
        self.sink.stream(
            "stderr",
            f"\nnbisolate: {format_bytes(info['dropped'])} of output was dropped: the limit is "
            f"{format_bytes(info['max_output'])} per cell. Write large output to a file instead.\n",
        )

    def _rebuild_error(self, body: dict[str, Any], buffers: list[Any]) -> BaseException:
        exc: BaseException | None = None
        if body.get("names"):
            try:
                exc = ship.loads(body["names"], body["data"], buffers, body["engine"]).get("exc")
            except Exception:
                exc = None
        text = body.get("traceback", "")
        stage = body.get("stage")
        if stage == "receive":
            return self._receive_error(body)
        if not isinstance(exc, BaseException):
            exc = RemoteError(body["type"], body["message"], text)
        lines = text.rstrip("\n").splitlines()
        if self.mem and (isinstance(exc, MemoryError) or body["type"] == "builtins.MemoryError"):
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
        """Run and block until the cell is over; Ctrl-C stops the worker and raises.

        Listeners get ``tick`` every TICK_SECONDS, and ``done`` at the very end.
        """
        return finish(self._wait_sync, self._done)

    def _wait_sync(self) -> Any:
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        job = self.start(events.put)
        next_tick = time.perf_counter() + TICK_SECONDS
        while True:
            now = time.perf_counter()
            if now >= next_tick:
                self.tick()
                next_tick = now + TICK_SECONDS
            try:
                event = events.get(timeout=next_tick - now)
            except queue.Empty:
                continue
            except KeyboardInterrupt:
                self.interrupted = True
                job.stop("interrupt")
                continue
            if self.handle(event):
                break
        return self.outcome()

    async def run_async(self) -> Any:
        """Run while awaiting on the running event loop; SIGINT stops the worker.

        Listeners get ``tick`` every TICK_SECONDS, and ``done`` at the very end.
        """
        return await finish_async(self._wait_async, self._done)

    async def _wait_async(self) -> Any:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop closed under us: nobody is waiting any more
                pass

        job = self.start(deliver)
        previous = None
        if threading.current_thread() is threading.main_thread():

            def on_sigint(signum: int, frame: Any) -> None:
                self.interrupted = True
                job.stop("interrupt")

            previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            next_tick = time.perf_counter() + TICK_SECONDS
            while True:
                now = time.perf_counter()
                if now >= next_tick:
                    self.tick()
                    next_tick = now + TICK_SECONDS
                try:
                    event = await asyncio.wait_for(events.get(), next_tick - now)
                except asyncio.TimeoutError:
                    continue
                if self.handle(event):
                    break
        except asyncio.CancelledError:
            job.stop("interrupt")
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        return self.outcome()


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
