"""Kernel side of the JupyterLab status comm.

The JupyterLab extension (``labextension/``) opens a comm with the target
``nbisolate.status``.  On open and on every change of the supervisor's worker
registry the kernel sends the list of running isolated workers::

    {"workers": [{"id": str, "label": str, "pid": int | None, "started": float,
                  "timeout": float | None, "host": str}, ...]}

The front end may send ``{"action": "refresh"}`` or ``{"action": "stop", "id": ...}``.

Registry events may come from any thread, and a "stop" request usually arrives
while the main thread is busy running the very cell whose worker is to be stopped.
So:

* every snapshot is taken and sent by one publisher thread; sends go through the
  kernel's IOPub socket, which queues them on the IOPub thread, so any thread may
  send, and one sending thread keeps the snapshots in order;
* messages from the front end are routed to whatever subshell the front end sent
  them on (JupyterLab 4.6+ sends comm messages over a kernel subshell when the
  kernel supports JEP 91, as ipykernel 7 does), so a "stop" is handled at once
  instead of after the running cell.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

TARGET = "nbisolate.status"
# A browser tab that goes away never closes its comm; keep only this many.
MAX_COMMS = 16
# Registry events closer together than this are sent as one snapshot.
COALESCE_SECONDS = 0.02

log = logging.getLogger(__name__)


def _default_registry() -> Any:
    from nbisolate.backends import running

    return running


def _worker_dict(job: Any, cell: dict[str, Any] | None = None) -> dict[str, Any]:
    pid = getattr(job, "pid", None)
    timeout = getattr(job, "timeout", None)
    return {
        "id": str(job.id),
        "label": str(getattr(job, "label", "") or ""),
        "pid": int(pid) if pid is not None else None,
        "started": float(getattr(job, "started", 0.0) or 0.0),
        "timeout": float(timeout) if timeout is not None else None,
        "host": str(getattr(job, "host", "") or ""),
        # The cell that runs it, so the front end can show "[13] first line", scroll to
        # it, and after a page reload put the cell's output where it belongs.
        "cell": cell,
    }


def _route_by_header(data: Any, default: Any) -> Any:
    """Handle a front end message on the subshell it was sent to.

    ipykernel 7 otherwise routes comm messages to the subshell of the last
    message this comm published, which for a publisher thread is the main shell:
    a "stop" would then wait for the running cell to end.
    """
    return default


class _Publisher:
    """Keeps the open status comms and sends them registry snapshots.

    Lock order: ``_sub_lock`` may be held while calling into the registry; ``_lock``
    is never held while calling into the registry, since the registry may call
    ``_on_event`` (which takes ``_lock``) while it holds a lock of its own.
    """

    def __init__(self, registry_getter: Callable[[], Any] = _default_registry) -> None:
        self._registry_getter = registry_getter
        self._pid = os.getpid()
        self._sub_lock = threading.Lock()
        self._registry: Any = None
        self._unsubscribe: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._comms: dict[str, Any] = {}
        self._dirty = False
        self._thread: threading.Thread | None = None
        self._cells: dict[str, dict[str, Any]] = {}  # job id -> the cell that started it

    # -- comm target ------------------------------------------------------------------

    def open(self, comm: Any, msg: dict[str, Any]) -> None:
        """Comm target callback: a front end opened an ``nbisolate.status`` comm."""
        self._subscribe(self._registry_getter())
        comm._reply_subshell_for = _route_by_header
        comm.on_msg(self._on_msg)
        comm.on_close(self._on_close)
        dropped = []
        with self._lock:
            self._comms[comm.comm_id] = comm
            while len(self._comms) > MAX_COMMS:
                dropped.append(self._comms.pop(next(iter(self._comms))))
            self._start_thread()
            self._mark_dirty()
        for old in dropped:
            try:
                old.close()
            except Exception:
                log.debug("closing a stale status comm failed", exc_info=True)

    def _subscribe(self, registry: Any) -> None:
        # Subscribed once for the kernel's lifetime: an event with no comm open
        # only sets a flag.
        with self._sub_lock:
            if registry is self._registry:
                return
            if self._unsubscribe is not None:
                try:
                    self._unsubscribe()
                except Exception:
                    log.debug("unsubscribing from the registry failed", exc_info=True)
            self._unsubscribe = registry.subscribe(self._on_event)
            self._registry = registry

    def _on_msg(self, msg: dict[str, Any]) -> None:
        data = msg.get("content", {}).get("data") or {}
        action = data.get("action")
        if action == "stop_job":  # a background job (nbisolate.background), queued or running
            background = sys.modules.get("nbisolate.background")
            if background is not None:
                try:
                    background.stop_by_id(data.get("job"))
                except Exception:
                    log.exception("nbisolate: stopping background job %s failed", data.get("job"))
        elif action == "stop":
            job_id = data.get("id")
            if isinstance(job_id, str) and self._registry is not None:
                try:
                    self._registry.stop(job_id)
                except Exception:
                    log.exception("nbisolate: stopping worker %s failed", job_id)
        elif action in ("lookup", "mirror", "replay_job"):
            self._answer(msg, action, data)
            return
        elif action != "refresh":
            log.warning("nbisolate: unknown status comm action %r", action)
        with self._lock:
            self._mark_dirty()

    def _answer(self, msg: dict[str, Any], action: str, data: dict[str, Any]) -> None:
        """A page that lost sight of panels asks about them (nbisolate.panel.lookup/mirror)."""
        import sys

        panel = sys.modules.get("nbisolate.panel")  # no panel module: no panel ever shown
        comm_id = msg.get("content", {}).get("comm_id")
        with self._lock:
            comm = self._comms.get(comm_id)
        if comm is None:
            return
        if action == "replay_job":  # a page that reloaded while a background job runs
            background = sys.modules.get("nbisolate.background")
            outputs = background.replay(data.get("job")) if background is not None else []
            reply: dict[str, Any] = {"replay": {"job": data.get("job"), "outputs": outputs}}
        elif action == "lookup":
            ids = [d for d in data.get("display_ids") or [] if isinstance(d, str)]
            found = panel.lookup(ids) if panel is not None else {"live": [], "outcomes": {}}
            reply = {"lookup": found}
        else:
            request_id = data.get("msg_id")
            shown = panel is not None and isinstance(request_id, str) and panel.mirror(request_id)
            reply = {"mirror": {"msg_id": request_id, "shown": bool(shown)}}
        try:
            comm.send(reply)
        except Exception:
            log.debug("answering on a status comm failed", exc_info=True)

    def _on_close(self, msg: dict[str, Any]) -> None:
        comm_id = msg.get("content", {}).get("comm_id")
        with self._lock:
            self._comms.pop(comm_id, None)
            self._wake.notify_all()

    def _on_event(self, event: str, info: Any) -> None:
        if os.getpid() != self._pid:  # a forked child inherited this object
            return
        job_id = str(getattr(info, "id", ""))
        with self._lock:
            if event == "started":
                # Announced from a backend thread while the cell that started it still
                # runs: that cell is the newest isolated cell running.
                cell = _busy.current() if _busy is not None else None
                if cell is not None:
                    self._cells[job_id] = cell
            else:
                self._cells.pop(job_id, None)
            self._mark_dirty()

    def cell_over(self, msg_id: str | None) -> None:
        """The cell of request ``msg_id`` is over: a worker of its still listed (it exits a
        moment after its result, once the kernel lets it go) no longer names it, so no page
        takes it for a cell still running and marks it so ([*]) with nothing to end the mark."""
        if not msg_id:
            return
        with self._lock:
            over = [job_id for job_id, cell in self._cells.items() if cell.get("msg_id") == msg_id]
            for job_id in over:
                del self._cells[job_id]
            if over:
                self._mark_dirty()

    # -- publisher thread ---------------------------------------------------------------

    def _mark_dirty(self) -> None:  # under _lock
        self._dirty = True
        self._wake.notify_all()

    def _start_thread(self) -> None:  # under _lock
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="nbisolate-labcomm", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._dirty and self._comms:
                    self._wake.wait()
                if not self._comms:
                    self._thread = None
                    return
            # Let a burst of events (a worker starting and ending at once) settle.
            time.sleep(COALESCE_SECONDS)
            with self._lock:
                self._dirty = False
                comms = list(self._comms.values())
            payload = self.snapshot()
            for comm in comms:
                try:
                    comm.send(payload)
                except Exception:
                    log.debug("sending on a status comm failed", exc_info=True)

    def snapshot(self) -> dict[str, Any]:
        """The message the front end gets now."""
        registry = self._registry
        if registry is None:
            return {"workers": []}
        try:
            jobs = list(registry.running())
        except Exception:
            log.exception("nbisolate: reading the worker registry failed")
            jobs = []
        with self._lock:
            cells = dict(self._cells)
        # Background jobs (%%isolate --bg): listed apart, and their workers name the job and
        # the cell that started it (not the cell that happened to run when they started).
        owners: dict[str, Any] = {}
        rows: list[dict[str, Any]] = []
        background = sys.modules.get("nbisolate.background")
        if background is not None:
            try:
                owners, rows = background.lab_snapshot()
            except Exception:
                log.exception("nbisolate: reading the background jobs failed")
        workers = []
        for job in jobs:
            owner = owners.get(str(job.id))
            row = _worker_dict(job, dict(owner.cell) if owner is not None else cells.get(str(job.id)))
            if owner is not None:
                row["job"] = owner.id
            workers.append(row)
        if not rows:  # no background job ever: the message as it always was
            return {"workers": workers}
        return {"workers": workers, "jobs": rows}


_publisher = _Publisher()


def refresh() -> None:
    """Send the open status comms a new snapshot (a background job started or ended)."""
    with _publisher._lock:
        if _publisher._comms:
            _publisher._mark_dirty()


# -- "Busy" while an isolated cell runs ------------------------------------------------


def _is_isolated(raw_cell: str) -> bool:
    """Whether a cell's text is an ``%%isolate`` cell (blank lines before it are dropped,
    as IPython's cleanup transformers drop them)."""
    for line in raw_cell.splitlines():
        if line.strip():
            rest = line.lstrip()[len("%%isolate") :]
            return line.lstrip().startswith("%%isolate") and (not rest or rest[0].isspace())
    return False


METADATA_KEY = "nbisolate"
"""Cell metadata the JupyterLab extension writes: ``{"isolate": true, "options": "--timeout 5"}``.
``isolate`` marks a cell run with "Run Cell Isolated", so that running it again any way
(Shift+Enter, Run All) runs it isolated; ``options`` keeps the magic line's options while
"Toggle %%isolate" has taken the line away."""


def marked_options(parent: Any) -> str | None:
    """The options of a request whose cell is marked to run isolated, or None.

    JupyterLab and Notebook 7 send a cell's metadata with its execute request.
    """
    metadata = parent.get("metadata") if isinstance(parent, dict) else None
    mark = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
    if not isinstance(mark, dict) or mark.get("isolate") is not True:
        return None
    options = mark.get("options")
    return " ".join(str(options).split()) if isinstance(options, str) else ""


def _request_is_isolated(code: str, parent: Any) -> bool:
    return _is_isolated(code) or marked_options(parent) is not None


def _isolated_request(request: Any) -> bool:
    """Whether ``request`` is an ``execute_request`` for an isolated cell."""
    try:
        if request["header"]["msg_type"] != "execute_request":
            return False
        return _request_is_isolated(str(request["content"].get("code") or ""), request)
    except (KeyError, TypeError, AttributeError):
        return False


class MarkedCells:
    """An input transformer: a cell marked to run isolated gets its ``%%isolate`` line.

    Runs before the ``%%isolate`` transformer, in the kernel only, and only for a
    request whose cell metadata carries the mark (see :data:`METADATA_KEY`).
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel

    def __call__(self, lines: list[str]) -> list[str]:
        try:
            parent = self.kernel.get_parent("shell")
        except TypeError:
            parent = self.kernel.get_parent()
        except Exception:
            return lines
        options = marked_options(parent)
        if options is None or _is_isolated("".join(lines)) or not "".join(lines).strip():
            return lines
        return [f"%%isolate {options}".rstrip() + "\n", *lines]


def _msg_id(parent: Any) -> str | None:
    if not isinstance(parent, dict):
        return None
    header = parent.get("header") or {}
    return header.get("msg_id") if isinstance(header, dict) else None


class BusyStatus:
    """Keeps the front end's kernel status at "busy" while an isolated cell runs.

    Why it is needed: a front end shows the *last* ``status`` message on IOPub,
    whatever message it was about.  An isolated cell awaits its worker on the
    kernel's loop, so the kernel keeps handling other messages meanwhile, and
    ipykernel publishes ``busy`` then ``idle`` around each one it handles on a
    subshell or on the control channel: JupyterLab 4.6 sends every comm message
    (a widget update, the status item's ``refresh`` when its popup opens, a
    click on Stop) over a subshell, and creates that subshell with a control
    request.  The ``idle`` about that comm message arrives after the cell's own
    ``busy``, and the status bar reads "Idle" although the cell is still at
    ``[*]``.

    So while an isolated cell runs, every ``idle`` the kernel publishes about
    another message is followed at once, from the same thread (so in order), by
    a ``busy`` whose parent is the running cell's request: the front end's
    status ends at "busy" until the cell's own ``idle``.  The ``idle`` itself is
    still sent, since front ends settle a request when its ``idle`` arrives.
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self._lock = threading.Lock()
        self._cells: dict[str, Any] = {}  # msg_id -> the running isolated cell's request
        self._info: dict[str, dict[str, Any]] = {}  # msg_id -> what the front end is told
        self._original = kernel._publish_status
        self._original_input = kernel._publish_execute_input
        self._counts: dict[str, Any] = {}  # msg_id -> execution count, from execute_input
        self.shell: Any = None

    def _parent(self, channel: str = "shell") -> Any:
        try:
            return self.kernel.get_parent(channel)
        except TypeError:  # ipykernel before the channel argument
            return self.kernel.get_parent()

    def pre_run_cell(self, info: Any = None) -> None:
        parent = self._parent()
        if not _request_is_isolated(getattr(info, "raw_cell", "") or "", parent):
            return
        msg_id = _msg_id(parent)
        if msg_id:
            with self._lock:
                self._cells[msg_id] = parent
                metadata = parent.get("metadata") or {}
                self._info[msg_id] = {
                    "msg_id": msg_id,
                    "id": str(metadata.get("cellId") or "") if isinstance(metadata, dict) else "",
                    "count": self._counts.pop(msg_id, None),
                }

    def publish_input(self, code: str, parent: Any, execution_count: Any) -> None:
        """Replaces the kernel's ``_publish_execute_input``: notes the count the front end
        shows as ``In [n]`` (IPython 8 and 9 differ in when the shell's own count moves)."""
        msg_id = _msg_id(parent)
        if msg_id and _request_is_isolated(code or "", parent):
            with self._lock:
                self._counts[msg_id] = execution_count
                while len(self._counts) > 16:  # never run (an error before the cell started)
                    del self._counts[next(iter(self._counts))]
        self._original_input(code, parent, execution_count)

    def current(self) -> dict[str, Any] | None:
        """The newest isolated cell running: its request id, cell id and execution count."""
        with self._lock:
            return dict(list(self._info.values())[-1]) if self._info else None

    def post_run_cell(self, result: Any = None) -> None:
        msg_id = _msg_id(self._parent())
        with self._lock:
            self._cells.pop(msg_id, None)
            self._info.pop(msg_id, None)
        _publisher.cell_over(msg_id)

    def publish(self, status: str, channel: str = "shell", parent: Any = None) -> None:
        """Replaces the kernel's ``_publish_status``."""
        request = parent if parent is not None else self._parent(channel)
        about = _msg_id(request)
        if status == "busy" and channel == "shell" and _isolated_request(request):
            # Noted before its "busy" goes out: an "idle" about another message that another
            # thread publishes next (before the cell reaches pre_run_cell) is followed by "busy".
            with self._lock:
                self._cells.setdefault(about, request)
        self._original(status, channel, parent)
        if status != "idle":
            return
        with self._lock:
            over = about in self._cells  # the cell's own idle (post_run_cell did not run)
            if over:
                del self._cells[about]
                self._info.pop(about, None)
            running = list(self._cells.values())
        if over:
            _publisher.cell_over(about)
        elif running:
            self._original("busy", "shell", running[-1])

    def install(self, shell: Any) -> None:
        global _busy
        self.shell = shell
        _busy = self
        self.kernel._publish_status = self.publish
        self.kernel._publish_execute_input = self.publish_input
        shell.events.register("pre_run_cell", self.pre_run_cell)
        shell.events.register("post_run_cell", self.post_run_cell)

    def uninstall(self, shell: Any) -> None:
        for name, method in (
            ("_publish_status", self.publish),
            ("_publish_execute_input", self.publish_input),
        ):
            if self.kernel.__dict__.get(name) == method:
                delattr(self.kernel, name)
        for name, callback in (
            ("pre_run_cell", self.pre_run_cell),
            ("post_run_cell", self.post_run_cell),
        ):
            try:
                shell.events.unregister(name, callback)
            except ValueError:
                pass


_busy: BusyStatus | None = None


def _install_busy_status(shell: Any, kernel: Any) -> None:
    if not callable(getattr(kernel, "_publish_status", None)) or not callable(
        getattr(kernel, "_publish_execute_input", None)
    ):
        return
    if isinstance(getattr(kernel._publish_status, "__self__", None), BusyStatus):
        return  # installed already (the extension was loaded twice)
    try:
        BusyStatus(kernel).install(shell)
    except Exception:
        log.debug("nbisolate: cannot keep the kernel status busy while cells run", exc_info=True)


def _uninstall_busy_status(shell: Any, kernel: Any) -> None:
    busy = getattr(getattr(kernel, "_publish_status", None), "__self__", None)
    if isinstance(busy, BusyStatus):
        busy.uninstall(shell)


def register(shell: Any, registry: Any = None) -> None:
    """Register the ``nbisolate.status`` comm target with the shell's kernel.

    A no-op when there is no kernel (terminal IPython).  ``registry`` defaults to
    ``nbisolate.backends.running``; tests may pass another object with the same
    ``subscribe``/``running``/``stop`` methods.
    """
    global _publisher
    kernel = getattr(shell, "kernel", None)
    if kernel is None:
        return
    manager = getattr(kernel, "comm_manager", None)
    if manager is None:
        try:
            import comm

            manager = comm.get_comm_manager()
        except Exception:
            log.debug("no comm manager: the JupyterLab status item stays off", exc_info=True)
            return
    if registry is not None:
        _publisher = _Publisher(lambda: registry)
    manager.register_target(TARGET, _publisher.open)
    _install_busy_status(shell, kernel)
    cleanup = getattr(shell, "input_transformers_cleanup", None)
    if isinstance(cleanup, list) and not any(isinstance(t, MarkedCells) for t in cleanup):
        cleanup.insert(0, MarkedCells(kernel))  # before the %%isolate transformer
    try:  # from now on, so a page opened mid-run learns which cell each worker belongs to
        _publisher._subscribe(_publisher._registry_getter())
    except Exception:
        log.debug("nbisolate: subscribing to the worker registry failed", exc_info=True)


def unregister(shell: Any) -> None:
    """Remove the comm target again (for ``unload_ipython_extension``)."""
    kernel = getattr(shell, "kernel", None)
    manager = getattr(kernel, "comm_manager", None) if kernel is not None else None
    if manager is not None:
        try:
            manager.unregister_target(TARGET, _publisher.open)
        except Exception:
            log.debug("unregistering the status comm target failed", exc_info=True)
    if kernel is not None:
        _uninstall_busy_status(shell, kernel)
    cleanup = getattr(shell, "input_transformers_cleanup", None)
    if isinstance(cleanup, list):
        cleanup[:] = [t for t in cleanup if not isinstance(t, MarkedCells)]
