"""Process supervision: start a worker, watch it, stop its whole tree.

The supervisor knows processes, pipes and signals, and nothing of cells,
magics, widgets or front ends: it turns a job (a payload for the worker) into
a stream of :class:`Event` objects that whoever started the job consumes
(the ``local`` backend, :mod:`nbisolate.backends.local`, hands them to the run;
``backends.running`` lists running jobs for the JupyterLab status item).

Design points, each learned the hard way by users of process pools:

* One reader thread per job watches the channel, both output pipes and the
  process itself (a ``pidfd`` where the OS has one, else a waiter thread), so
  a dead worker is noticed at once from the process, never by waiting on a
  queue until some outer timeout fires.
* Each worker starts a new session, so it and everything it starts share a
  process group the kernel can signal as a unit, and an interrupt sent to
  the kernel's own group never reaches workers by accident; interrupts are
  relayed on purpose, once.
* Stopping is SIGINT (interrupt) or SIGTERM (timeout), a short grace period,
  then the sweep of :class:`nbisolate.proctree.Tree`: SIGSTOP to the group
  (nothing forks while we look), a listing of every descendant (the worker is
  their subreaper, so even ones that left the group are found), SIGKILL to the
  group and to each of them, identity-checked.  The worker itself kills what
  the cell left running when it ends normally, and its watchdog does the same
  when the kernel dies.
* Each job's reader thread is one :class:`_Supervision`: a loop of named
  steps (check requests, escalate, wait, take last words, stop the tree,
  reap, emit ``exit``), its state in one place.
* Whatever goes wrong in here (a result the kernel cannot allocate, a garbled
  message, a bug), the consumer still gets an ``error`` or ``exit`` event:
  a cell never waits for ever.
* Output floods are cut at a limit with a note saying how much was dropped,
  so a cell printing 100 MB cannot bloat the kernel.
"""

from __future__ import annotations

import codecs
import errno
import functools
import itertools
import os
import queue
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from . import proctree, settings
from .backends import HandleInfo
from .events import Event
from .options import DEFAULT_MAX_OUTPUT
from .plan import own_sources
from .protocol import (
    LET_GO,
    MSG_ASK,
    MSG_DISPLAY,
    MSG_ERROR,
    MSG_INPUTS,
    MSG_PLACE,
    MSG_RESULT,
    MSG_RUN,
    MSG_STREAM,
    MSG_UPDATE_DISPLAY,
    ask_reply,
    error_body,
    sync_mark,
)
from .template import bootstrap
from .wire import (
    SHM_THRESHOLD,
    Arena,
    Channel,
    ChannelClosed,
    frame_bytes,
    read_some,
    recv_frame,
    send_frame,
)

IOPUB_RATE = 1_000_000
"""Jupyter server's default ``iopub_data_rate_limit`` (bytes/s) ..."""
IOPUB_WINDOW = 3.0
"""... averaged over its default ``rate_limit_window`` (s)."""

GRACE_SECONDS = 2.0

SPARE_AFTER = 0.008
"""How long after its cell started (or its result arrived) a taken spare is replaced.

Forking and preparing the next spare costs the machine a few milliseconds of
work; done while the kernel replies to a quick cell, it slows the reply."""

LINGER_SECONDS = 0.5
"""A cell's worker waits at most this long after its outcome for the kernel to let it go
(:class:`_Departures`, :data:`nbisolate.protocol.LET_GO`).  A sweep's values exit at once."""


class _ReadyHint:
    """How much room to make ahead for large buffers of one kind that are likely to come again.

    The largest such transfer in the last :data:`SECONDS`, from ``above`` on,
    of the same ``key`` when there is one: a notebook that sends a large array
    to one cell usually sends it to the next, and a cell that returned a large
    result is usually run again. Copying into room faulted in ahead costs
    about a ``memcpy``; into fresh memory, the zeroing faults as well.  Two of
    them: the inputs a spare makes room for (``worker.get_ready``, any cell),
    the results the kernel does (:class:`_ResultRoom`, keyed by the cell's
    source: other cells would pay for room they never use).
    """

    SECONDS = 60.0

    def __init__(self, above: int) -> None:
        self.above = above
        self._sizes: list[tuple[float, Any, int]] = []
        self._lock = threading.Lock()

    def note(self, nbytes: int, key: Any = None) -> None:
        if nbytes >= self.above:
            with self._lock:
                self._sizes.append((time.monotonic(), key, nbytes))

    def size(self, key: Any = None) -> int:
        with self._lock:
            since = time.monotonic() - self.SECONDS
            self._sizes = [entry for entry in self._sizes if entry[0] >= since]
            return max((n for _, k, n in self._sizes if k == key), default=0)


_ready_hint = _ReadyHint(8 << 20)
_result_hint = _ReadyHint(64 << 20)


class _ResultRoom:
    """Room for the coming result, faulted in by a helper thread while the worker runs.

    Made only when the same cell (its source) returned at least as much in
    the last minute (:data:`_result_hint`) and the machine has twice that
    available, once the cell has run for :data:`AFTER`: the kernel then holds
    the room a little before it holds the result.  Any other cell makes none:
    faulting room in takes a core and memory bandwidth from its worker.  A
    result that fits takes it (:meth:`take`, see :func:`nbisolate.ship.room`);
    otherwise it is freed when the run ends (:meth:`release`).  Measured on a
    400 MB result: the copy out of the worker 17-22 ms into this room, 26-33
    ms into fresh memory.
    """

    def __init__(self, nbytes: int) -> None:
        self._stop = threading.Event()
        self._ready: Any = None
        self._thread = threading.Thread(target=self._fault, args=(nbytes,), daemon=True, name="nbisolate-room")
        self._thread.start()

    @classmethod
    def maybe(cls, cell: int) -> _ResultRoom | None:
        """Room for the result of ``cell`` (the hash of its source), or None: see above."""
        from . import ship

        nbytes = _result_hint.size(cell)
        if not nbytes:
            return None
        available = ship.available_memory()
        if available is None or 2 * nbytes > available:
            return None
        return cls(nbytes)

    AFTER = 0.005
    """Seconds the cell runs before the room is made: a quick cell (no large result) pays nothing."""

    def _fault(self, nbytes: int) -> None:
        from . import ship

        if self._stop.wait(self.AFTER):
            return
        try:
            ready = self._ready = ship.Ready(nbytes)
        except (OSError, ValueError, MemoryError):
            return
        while not self._stop.is_set() and ready.fault_some():
            pass

    def take(self) -> Any:
        """The room (a :class:`nbisolate.ship.Ready`, as much of it faulted in as there was time for)."""
        self._stop.set()
        self._thread.join()
        ready, self._ready = self._ready, None
        return ready

    def release(self) -> None:
        ready = self.take()
        if ready is not None:
            ready.release()


@functools.lru_cache(maxsize=1)
def _hostname() -> str:
    """This machine's name, for a handle's info: asked once (it costs a system call per cell)."""
    return socket.gethostname()

QUEUE_BYTES = 64 * 1024
"""A ``run`` message up to this size is put into the channel before the worker is asked for
(see :meth:`Job._queue_run`); a larger one is sent once the worker exists."""

_ids = itertools.count(1)


class _WakePipes:
    """A job's wake pipe, made ahead, off the next cell's path.

    ``os.pipe()`` lets go of the GIL, and as a cell starts the kernel's other
    threads are waiting for it (IOPub sending the cell's ``busy`` and
    ``execute_input``, IPython saving its history): the magic waited 0.1 ms
    to get it back, before its worker had the cell.  A job's reader thread
    makes the next one once its job is over; a job that finds none (the
    first, a sweep's many) makes its own.
    """

    AHEAD = 1

    def __init__(self) -> None:
        self._ready: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def take(self) -> tuple[int, int]:
        with self._lock:
            if self._ready:
                return self._ready.pop()
        return os.pipe()

    def make_ahead(self) -> None:
        with self._lock:
            if len(self._ready) >= self.AHEAD:
                return
        try:
            pipe = os.pipe()
        except OSError:  # out of descriptors: the next job says so when it makes its own
            return
        with self._lock:
            self._ready.append(pipe)


_wake_pipes = _WakePipes()


class _Arenas:
    """Warm shared-memory arenas for inputs, kept a while between cells.

    Reusing a pre-touched arena makes shipping a big array cost one memcpy;
    keeping it forever would hold that memory in the kernel, so an arena
    nobody took for ``IDLE_SECONDS`` is released.
    """

    IDLE_SECONDS = 30.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[tuple[float, Arena]] = []
        self._timer: threading.Timer | None = None

    def take(self) -> Arena:
        with self._lock:
            if self._free:
                self._free.sort(key=lambda item: item[1].size)
                return self._free.pop()[1]
        return Arena()

    def give_back(self, arena: Arena) -> None:
        with self._lock:
            self._free.append((time.monotonic(), arena))
            while len(self._free) > 2:
                self._free.sort(key=lambda item: item[1].size)
                self._free.pop(0)[1].close()
            if self._timer is None:
                self._timer = threading.Timer(self.IDLE_SECONDS, self.trim)
                self._timer.daemon = True
                self._timer.start()

    def trim(self) -> None:
        with self._lock:
            self._timer = None
            now = time.monotonic()
            keep = []
            for since, arena in self._free:
                if now - since >= self.IDLE_SECONDS:
                    arena.close()
                else:
                    keep.append((since, arena))
            self._free = keep
            if keep:
                self._timer = threading.Timer(self.IDLE_SECONDS, self.trim)
                self._timer.daemon = True
                self._timer.start()


_arenas = _Arenas()


class _Departures:
    """Workers whose cell is over, kept from exiting until the kernel is calm (see ``LET_GO``).

    A worker's exit is work for the machine, as is forking the next spare; done
    while the kernel replies to a cell, or while it runs the next one, it slows
    that cell.  So a job's reader thread, :data:`SPARE_AFTER` after its
    outcome, lets every waiting worker go only when no other cell is running,
    nor was over less than :data:`SPARE_AFTER` ago (the kernel may be replying
    to it); else they wait for that cell to be over and calm in turn, as the
    spares' successors do (:meth:`TemplateLauncher.spare_taken`).  Cells that come
    back to back keep at most :data:`WAITING` workers waiting: the oldest goes
    when another would wait.  A worker never waits more than
    :data:`LINGER_SECONDS`: it then leaves on its own.
    """

    WAITING = 2

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._calm_at = 0.0  # SPARE_AFTER after the last cell was over
        self._waiting: list[_Supervision] = []

    def running(self) -> None:
        """A cell whose worker will wait began."""
        with self._lock:
            self._running += 1

    def over(self, worker: _Supervision | None) -> None:
        """A cell began by :meth:`running` is over; ``worker`` (its supervision) waits, if given."""
        with self._lock:
            self._running = max(0, self._running - 1)
            self._calm_at = time.perf_counter() + SPARE_AFTER
            if worker is None:
                return
            self._waiting.append(worker)
            leaving = self._waiting[: -self.WAITING]
            del self._waiting[: -self.WAITING]
        for one in leaving:
            one.answer(LET_GO)

    def calm(self) -> None:
        """Let every waiting worker go, unless a cell is running or was over a moment ago."""
        with self._lock:
            if self._running or time.perf_counter() < self._calm_at - 0.001:
                return
            leaving, self._waiting = self._waiting, []
        for one in leaving:
            one.answer(LET_GO)

    def forget(self, worker: _Supervision) -> None:
        """``worker`` is gone (it left on its own, or was stopped)."""
        with self._lock:
            if worker in self._waiting:
                self._waiting.remove(worker)


_departures = _Departures()


class _Threads:
    """Daemon threads for the jobs' reader threads, each kept a while for the next job.

    ``Thread.start`` waits until the new thread runs: on a busy machine that
    handshake cost the kernel's thread most of a millisecond per cell, on
    the cell's path.  A thread that finished a job waits up to
    :data:`IDLE_SECONDS` for the next one (at most :data:`IDLE_THREADS` wait),
    so handing a job over is putting it in a queue.
    """

    IDLE_SECONDS = 5.0
    IDLE_THREADS = 2

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a job, less the jobs already handed to them
        self._tasks: queue.SimpleQueue[tuple[str, Callable[..., None], tuple[Any, ...]]] = queue.SimpleQueue()

    def run(self, name: str, target: Callable[..., None], *args: Any) -> None:
        """Run ``target(*args)`` in a thread called ``name``; returns at once."""
        task = (name, target, args)
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._tasks.put(task)
                return
        threading.Thread(target=self._serve, args=(task,), daemon=True, name=name).start()

    def _serve(self, task: tuple[str, Callable[..., None], tuple[Any, ...]]) -> None:
        me = threading.current_thread()
        while True:
            name, target, args = task
            me.name = name
            try:
                target(*args)
            except Exception:  # the target reports its own failures; never lose the thread's job
                pass
            me.name = "nbisolate-idle"
            with self._lock:
                if self._idle >= self.IDLE_THREADS:
                    return
                self._idle += 1
            try:
                task = self._tasks.get(timeout=self.IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    try:  # handed a job just as the wait ended
                        task = self._tasks.get_nowait()
                    except queue.Empty:
                        self._idle -= 1
                        return


_threads = _Threads()


_environ_seen: list[Any] = [None, None]


def _environ() -> dict[str, str]:
    """``dict(os.environ)``, rebuilt only when the environment changed (do not modify it).

    Decoding every variable cost each cell tens of microseconds; comparing
    the raw table is a fraction of that.
    """
    raw = getattr(os.environ, "_data", None)
    if raw is None:
        return dict(os.environ)
    if _environ_seen[0] != raw:
        _environ_seen[:] = [dict(raw), dict(os.environ)]
    return _environ_seen[1]




class _Template:
    """One template process and everything it told the kernel, guarded by the launcher's condition.

    Kept per process, so that when a template is replaced, the workers it
    forked still wait on *its* reports (and learn at once that they will never
    come) while new cells talk to the new one.
    """

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock
        self.alive = True
        self.lost: str | None = None  # why it was given up, in words for the user
        self.replies: dict[int, dict[str, Any]] = {}  # fork request id -> its reply
        self.waiting: set[int] = set()  # fork request ids someone still waits for
        self.claimed: set[int] = set()  # ids whose worker was taken from its channel's note
        self.status: dict[int, int] = {}  # worker pid -> return code, as reported
        self.settled: set[int] = set()  # workers whose code was read from their zombie: its report is dropped
        self.live: set[int] = set()  # workers forked and not reported yet
        self.orphans: set[int] = set()  # workers whose fork reply came too late: killed
        self.preloaded: set[str] = set()
        self.sources: dict[str, tuple[str, int, int]] = {}  # the user's own preloaded modules (refresh)
        self.threads: str | None = None  # a preloaded package that left a thread running
        self.pending = 0  # requests (fork, preload) sent and not answered yet
        self.busy_since = 0.0  # when it last made progress on them
        self.env: dict[str, str] | None = None  # the environment last sent: not sent again
        # The spare workers the template offered, given their channels and pipes ahead of
        # their cells, oldest first: a cell is handed to one directly (TemplateLauncher.take_spare).
        self.spares: list[_Spare] = []
        self.preloading = 0  # preloads sent and not answered: spares offered meanwhile lack them
        self.base_env = _environ()  # what the template, and so its spares, started with
        try:  # /proc/PID/stat, kept open: one read tells the state (see stopped_now)
            self._stat_fd: int | None = os.open(f"/proc/{proc.pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._stat_fd = None
        self.untold: set[int] = set()  # spares taken, the template not told yet (spare_taken)
        self.running = 0  # cells handed to spares and not over
        self.calm_at = 0.0  # when the last of them was over, and SPARE_AFTER more

    def drop_spares(self) -> None:
        """Close the held spares' channels: each reads the end and exits, having run nothing."""
        spares, self.spares = self.spares, []
        for spare in spares:
            spare.close()
            self.orphans.add(spare.pid)  # its exit, when reported, is nobody's

    def asked(self) -> None:
        """A request was sent (call with the launcher's condition held)."""
        if not self.pending:
            self.busy_since = time.monotonic()
        self.pending += 1

    def answered(self) -> None:
        self.pending = max(0, self.pending - 1)
        self.busy_since = time.monotonic()

    def wedged(self) -> bool:
        """Asked something and silent for :data:`WEDGED_SECONDS`."""
        return bool(self.pending) and time.monotonic() - self.busy_since >= WEDGED_SECONDS

    def state(self) -> bytes | None:
        """The process state letter from ``/proc`` (``T``: stopped), None when gone."""
        found = proctree._stat(self.proc.pid)
        return None if found is None else found[0]

    def stopped_now(self) -> bool:
        """:meth:`stopped`, in one read of a file kept open (each cell asks, on its path)."""
        fd = self._stat_fd
        if fd is None:
            return self.stopped()
        try:
            raw = os.pread(fd, 512, 0)
        except OSError:
            return self.stopped()
        state = raw.rpartition(b")")[2].split(None, 1)[:1]
        return state in ([b"T"], [b"t"])

    def close_stat(self) -> None:
        """Close the kept ``/proc`` file (the template is gone, or given up)."""
        fd, self._stat_fd = self._stat_fd, None
        if fd is not None:
            os.close(fd)

    def stopped(self) -> bool:
        return self.state() in (b"T", b"t")


class _Spare:
    """A spare worker the template offered, with its channel and pipes already handed to it.

    The kernel's thread that reads the template prepares it as the offer
    arrives: it creates the worker's channel and output pipes and sends them
    to the spare, which takes them and waits on the channel for its cell.  So
    a cell costs one write (its ``run`` message) to start; the process is the
    template's child, known by its pid, and has run nothing of any cell.
    """

    def __init__(self, pid: int, spare: socket.socket, env_changed: bool, ready: int = 0) -> None:
        self.pid = pid
        self.env_changed = env_changed  # the template's environment is not the kernel's any more
        self.ready = ready  # bytes of room for large inputs it makes ahead (see _ReadyHint)
        self.tree = proctree.Tree(pid)  # taken now, while the pid surely names the spare
        self.start = _start_of(pid)  # its start time, the same way
        self.chan, theirs = socket.socketpair()
        self.out_r, out_w = os.pipe()
        self.err_r, err_w = os.pipe()
        try:
            # The notebook's latest settings: the spare takes them while it waits (settings.py).
            job = {"id": None, "fresh": False, "ready": ready, "settings": settings.latest()}
            send_frame(spare, "job", job, fds=[theirs.fileno(), out_w, err_w])
        except OSError:
            self.close()
            raise
        finally:
            theirs.close()
            os.close(out_w)
            os.close(err_w)

    def close(self) -> None:
        self.chan.close()
        Job._close_fds(self.out_r, self.err_r)


class _ForkedProcess:
    """The ``Popen`` face of a worker forked by the template (not our child: it reports exits).

    Waiting is never unbounded: once the worker is gone from ``/proc`` (or a
    zombie nobody reaps), its template has :data:`REPORT_SECONDS` to report its
    exit; a template that is stopped, wedged or dead is given up and the
    return code stays unknown, with :attr:`lost` saying why.  With the
    worker's ``start`` time known, a zombie tells its own code
    (:func:`nbisolate.proctree.zombie_returncode`): a template busy importing a
    package for seconds does not hold up the report of a cell that crashed.
    """

    def __init__(
        self, pid: int, template: _Template, launcher: TemplateLauncher, start: int | None = None
    ) -> None:
        self.pid = pid
        self._start = start
        self.returncode: int | None = None
        self.lost: str | None = None
        self._template = template
        self._launcher = launcher
        self._done = False

    def poll(self) -> int | None:
        if not self._done:
            self._collect(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        if not self._done:
            self._collect(timeout)
        return self.returncode

    def _collect(self, timeout: float | None) -> None:
        launcher, t, pid = self._launcher, self._template, self.pid
        until = None if timeout is None else time.monotonic() + timeout
        gone_since: float | None = None
        with launcher._cond:
            while True:
                if pid in t.status:
                    self.returncode = t.status.pop(pid)
                    self._done = True
                    return
                if not t.alive or t.lost:
                    self.lost = t.lost or "the template process that started it ended before reporting it"
                    self._done = True
                    return
                now = time.monotonic()
                if until is not None and now >= until:
                    return
                stat = proctree._stat(pid)
                if stat is not None and stat[0] == b"Z" and self._start is not None:
                    code = proctree.zombie_returncode(pid, self._start)
                    if code is not None:
                        t.settled.add(pid)
                        self.returncode = code
                        self._done = True
                        return
                if stat is None or stat[0] == b"Z":
                    gone_since = gone_since or now
                    # A template busy importing a package reports when it is done (its
                    # time runs from its last answer); one that is idle, or busy far too
                    # long, is wedged.
                    if t.wedged() or (now - max(gone_since, t.busy_since) >= REPORT_SECONDS and not t.pending):
                        break
                if t.stopped():
                    break
                wait = 0.1 if until is None else max(0.0, min(0.1, until - now))
                launcher._cond.wait(wait)
        # The worker is gone and its template does not say how: it is stopped or wedged.
        if t.stopped():
            why = "was found stopped (SIGSTOP, perhaps sent by a cell to its parent)"
        elif t.wedged():
            why = f"answered nothing for {WEDGED_SECONDS:g} s"
        else:
            why = f"did not report the exit of worker {pid} within {REPORT_SECONDS:g} s"
        launcher._give_up(t, why)
        self.lost = t.lost
        self._done = True


def _start_of(pid: int) -> int | None:
    """The start time of a worker the template just reported forking (see :class:`_ForkedProcess`)."""
    stat = proctree._stat(pid)
    return stat[2] if stat is not None else None


FORK_SECONDS = 5.0
"""How long a cell waits for the template to fork; then it spawns a fresh interpreter instead."""
WEDGED_SECONDS = 30.0
"""A template that answered nothing this long while asked something is killed and replaced."""
REPORT_SECONDS = 3.0
"""How long the template has to report a worker's exit once the worker is gone."""


class _Ticket(NamedTuple):
    """A fork request sent to a template (:meth:`TemplateLauncher.ask`), its reply to come."""

    template: _Template
    id: int
    until: float


class TemplateLauncher:
    """Owns the template process (see :mod:`nbisolate.template`) and asks it for workers.

    Started in the background when the extension loads, so the first cell
    does not wait for it; if it cannot start or dies, jobs fall back to a
    plain spawn.  ``preload`` makes it import the packages the notebook uses,
    so a cell that uses them does not pay their import time.

    Every fork request carries an id and its reply is matched to it, so a late
    reply (the kernel stopped waiting) is never taken for another cell's
    worker: that worker is killed instead.  A template found stopped, or silent
    for :data:`WEDGED_SECONDS` while asked something, is killed and replaced;
    what happened is said once, as a note to the next cell (:meth:`take_notes`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._current: _Template | None = None
        self._ids = itertools.count(1)
        self._notes: list[str] = []
        self._refused: set[str] = set()  # packages that start threads: never preloaded again

    @property
    def alive(self) -> bool:
        t = self._current
        return t is not None and t.alive and not t.lost

    @property
    def pid(self) -> int | None:
        t = self._current
        return t.proc.pid if t is not None and t.alive else None

    def start(self) -> bool:
        """Start the template if it is not running; False when it cannot be had."""
        with self._lock:
            return self._ensure() is not None

    def _ensure(self) -> _Template | None:
        """The running template, started (or replaced) if need be; call with ``_lock`` held."""
        t = self._current
        if t is not None and t.alive and not t.lost:
            if not (t.threads and not t.live):
                return t
            # A package left a thread in it, so it could only exec fresh interpreters;
            # now that none of its workers runs, a clean one replaces it.
            self._retire(t)
        mine, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", bootstrap("template", theirs.fileno())],
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        except OSError:
            mine.close()
            return None
        finally:
            theirs.close()
        t = _Template(proc, mine)
        self._current = t
        threading.Thread(target=self._read, args=(t,), daemon=True, name="nbisolate-template").start()
        return t

    def _read(self, t: _Template) -> None:
        from .template import recv

        try:
            while True:
                kind, body, fds = recv(t.sock)
                late: int | None = None
                with self._cond:
                    if kind == "spare":
                        self._offered(t, body, fds)
                        continue
                    if kind in ("forked", "preloaded"):
                        t.answered()
                    if kind == "preloaded":
                        t.preloading = max(0, t.preloading - 1)
                    if kind == "forked":
                        rid, pid = body["id"], body["pid"]
                        t.live.add(pid)
                        if rid in t.waiting:
                            t.replies[rid] = body
                        elif rid in t.claimed:  # its pid came on the worker's channel first
                            t.claimed.discard(rid)
                        else:  # nobody waits for this worker any more: it must not run
                            t.orphans.add(pid)
                            late = pid
                    elif kind == "exit":
                        pid, code = body
                        t.live.discard(pid)
                        if pid in t.orphans:
                            t.orphans.discard(pid)
                        elif pid in t.settled:
                            t.settled.discard(pid)
                        else:
                            t.status[pid] = code
                    elif kind == "preloaded":
                        self._preloaded(t, body)
                    self._cond.notify_all()
                if late is not None:
                    proctree.kill_tree(late)
        except (EOFError, OSError):
            pass
        with self._cond:
            t.alive = False
            t.drop_spares()
            t.close_stat()
            self._cond.notify_all()
        t.proc.wait()
        t.sock.close()

    @staticmethod
    def _offered(t: _Template, body: dict[str, Any], fds: list[int]) -> None:
        """The template offers a spare worker: hand it its channel and keep it (condition held).

        Kept while nothing makes it unfit: a spare offered while a preload is
        on its way lacks the new imports, so it is dropped (the template
        offers a new one after the preload), as is one from a template given up.
        A spare that is gone already is dropped too; it is found out when a
        cell is handed to it (which then asks the template, as without spares).
        """
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return
        sock = socket.socket(fileno=fds[0])
        pid = int(body["pid"])
        try:
            if t.preloading or not t.alive or t.lost:
                t.orphans.add(pid)  # it reads the end of its socket and exits
                return
            # env: the template's environment is no longer the one it started with (an
            # import changed it), so the spare must be given the kernel's whole environment.
            # One spare at a time makes room for large inputs, if recent cells had them.
            ready = 0 if any(s.ready for s in t.spares) else _ready_hint.size()
            t.spares.append(_Spare(pid, sock, bool(body.get("env")), ready))
        except OSError:
            t.orphans.add(pid)
        finally:
            sock.close()

    def _preloaded(self, t: _Template, body: dict[str, Any]) -> None:
        culprit = body.get("threads")
        if culprit and not t.threads:
            t.threads = culprit
            self._refused.add(culprit)
            self._notes.append(
                f"nbisolate: importing {culprit!r} starts a thread, and a process with threads "
                "cannot be forked safely; workers start as fresh interpreters (slower) until "
                f"the template is renewed without {culprit!r}.\n"
            )

    def _give_up(self, t: _Template, why: str) -> None:
        """Kill a stopped or wedged template and say so once; the next fork starts a new one."""
        with self._cond:
            if t.lost:
                return
            t.lost = f"the template process (pid {t.proc.pid}) that starts workers {why}"
            self._notes.append(f"nbisolate: {t.lost}; it was killed and a new one replaces it.\n")
            t.drop_spares()
            self._cond.notify_all()
        try:
            t.proc.kill()  # SIGKILL ends a stopped process too; its workers keep running
        except OSError:
            pass

    def _retire(self, t: _Template) -> None:
        with self._cond:
            t.lost = t.lost or "the template process was renewed"
            t.drop_spares()
            self._cond.notify_all()
        try:
            t.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def take_notes(self) -> list[str]:
        """What happened to the template since the last call, for the user (each said once)."""
        with self._cond:
            notes, self._notes = self._notes, []
        return notes

    def fork(
        self, fds: Sequence[int], env: dict[str, str], fresh: bool = False, cwd: str | None = None
    ) -> _ForkedProcess | None:
        """A new worker process with ``fds`` as its channel, stdout and stderr; None on failure.

        ``fresh`` makes the child exec a new interpreter instead of running on
        the template's imports (for ``--mem``), still as the template's child.
        :meth:`ask` then :meth:`answer`: waits at most :data:`FORK_SECONDS`.
        """
        ticket = self.ask(fds, env, fresh=fresh, cwd=cwd)
        return None if ticket is None else self.answer(ticket)

    def ask(
        self,
        fds: Sequence[int],
        env: dict[str, str],
        fresh: bool = False,
        cwd: str | None = None,
        ahead: bool = False,
    ) -> _Ticket | None:
        """Send the template a fork request and return at once; None if it cannot be asked.

        The reply is waited for with :meth:`answer`, in whatever thread will
        supervise the worker, so the thread that asked (the kernel's) goes on
        while the template hands over its spare.  ``fds`` are in the request:
        the caller may close its copies as soon as this returns.  ``ahead``: a
        sweep's value, forked directly so the spare stays for the next cell.
        """
        from .template import send

        with self._lock:
            t = self._ensure()
            if t is None:
                return None
            rid = next(self._ids)
            with self._cond:
                t.waiting.add(rid)
                t.asked()
            request: dict[str, Any] = {"id": rid, "fresh": fresh, "cwd": cwd}
            if ahead:
                request["ahead"] = True
            if env != t.env:  # the template keeps the last one: most cells send none
                request["env"] = t.env = env
            try:
                send(t.sock, "fork", request, list(fds))
            except OSError:
                t.env = None
                with self._cond:
                    t.waiting.discard(rid)
                return None
            self._tell_taken(t)  # after the request: this fork first, then the next spare
        return _Ticket(t, rid, time.monotonic() + FORK_SECONDS)

    def answer_on(
        self, ticket: _Ticket, sock: socket.socket, taken: Callable[[], bool] | None = None
    ) -> _ForkedProcess | None:
        """:meth:`answer`, from the note the template writes on the worker's channel.

        The template writes its ``forked`` reply on the worker's end of the
        channel too, before the worker can write anything there: the thread
        that will read the channel learns the pid from it at once, instead of
        from the template's reader thread through a condition, a hand-over
        between threads that cost a busy kernel most of a millisecond.  The
        reply on the control socket, if it comes first, is taken instead.
        """
        t, rid, until = ticket.template, ticket.id, ticket.until
        body = None
        stopped = False
        while True:
            with self._cond:
                body = t.replies.pop(rid, None)
            if body is not None:  # the control reply came first; its note is in the channel
                if select.select([sock], [], [], 0)[0]:
                    self._note(sock)
                break
            if not t.alive or t.lost:
                break
            left = until - time.monotonic()
            if left <= 0:
                break
            if select.select([sock], [], [], min(0.1, left))[0]:
                body = self._note(sock)
                break
            if t.stopped():
                stopped = True
                break
        if body is None and taken is not None and taken():
            # A worker has its cell: the template wrote the note, and sent the reply, before.
            if select.select([sock], [], [], 0)[0]:
                body = self._note(sock)
            with self._cond:
                while body is None and rid not in t.replies and t.alive:
                    self._cond.wait(0.1)
                if body is None:
                    body = t.replies.pop(rid, None)
        if body is None:
            return self._no_answer(t, rid, stopped)
        with self._cond:
            t.waiting.discard(rid)
            if t.replies.pop(rid, None) is None:
                t.claimed.add(rid)  # its reply on the control socket is still to come
        return _ForkedProcess(body["pid"], t, self, _start_of(body["pid"]))

    @staticmethod
    def _note(sock: socket.socket) -> dict[str, Any] | None:
        """The template's ``forked`` note, the first frame on a worker's channel."""
        try:
            kind, body, _, fds = recv_frame(sock)
        except (EOFError, OSError):
            return None
        for fd in fds:
            os.close(fd)
        return body if kind == "forked" and isinstance(body, dict) else None

    def answer(self, ticket: _Ticket, taken: Callable[[], bool] | None = None) -> _ForkedProcess | None:
        """The worker the template forked for ``ticket``; None if no reply came in time.

        A template busy importing a slow package makes the cell spawn instead,
        and its late reply is matched to the request and the worker killed.
        ``taken`` says whether a worker already read the cell queued in its
        channel, and takes the cell back if not: then no worker can run it and
        a spawned one may.  If one did, the template told us its pid before
        handing it over, so that reply is waited for instead, whatever became
        of the template since: the cell must never run twice.
        """
        t, rid, until = ticket.template, ticket.id, ticket.until
        stopped = False
        with self._cond:
            while rid not in t.replies and t.alive and not t.lost:
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(0.1, left))
                if rid not in t.replies and t.stopped():
                    stopped = True
                    break
            if rid not in t.replies and taken is not None and taken():
                stopped = False
                while rid not in t.replies and t.alive:  # in the socket: the reader has it soon
                    self._cond.wait(0.1)
            t.waiting.discard(rid)
            reply = t.replies.pop(rid, None)
        if reply is not None:
            return _ForkedProcess(reply["pid"], t, self, _start_of(reply["pid"]))
        return self._no_answer(t, rid, stopped)

    def _no_answer(self, t: _Template, rid: int, stopped: bool) -> None:
        """No worker for request ``rid``: say why, give up a stopped or wedged template."""
        with self._cond:
            t.waiting.discard(rid)
            late = t.replies.pop(rid, None)  # came just as we gave up: its worker must not run
            if late is not None:
                t.orphans.add(late["pid"])
        if late is not None:
            proctree.kill_tree(late["pid"])
        if stopped:
            self._give_up(t, "was found stopped (SIGSTOP, perhaps sent by a cell to its parent)")
        elif t.alive and not t.lost and t.wedged():
            self._give_up(t, f"answered nothing for {WEDGED_SECONDS:g} s")
        elif t.alive and not t.lost:
            with self._cond:
                self._notes.append(
                    f"nbisolate: the template process was busy (importing the notebook's packages) "
                    f"for {FORK_SECONDS:g} s, so this cell started in a fresh interpreter instead.\n"
                )
        return None

    def preload(self, names: Sequence[str]) -> None:
        """Have the template import ``names`` (it answers later; forks queue behind it).

        The spare held meanwhile lacks them: it is dropped, and cells ask the
        template for their workers until it answered, as before spares were
        handed over directly.  The template imports them under the notebook's
        environment, working directory and ``sys.path`` as they are now:
        libraries read their settings when imported (thread counts from
        ``OMP_NUM_THREADS``, a config file in the working directory), and the
        notebook may have changed them since the template started.
        """
        t = self._current
        if t is None or not t.alive or t.lost:
            return
        todo = [n for n in names if n not in t.preloaded and n not in self._refused]
        if todo and self._send_preload(t, {"names": todo}):
            t.preloaded.update(todo)
            t.sources.update(own_sources(todo))

    def refresh(self) -> None:
        """Have the template reload the notebook's own modules whose files changed since it
        imported them; called before a worker is taken or asked for.

        Without it a module the user edited and reloaded (``importlib.reload``,
        ``%autoreload``) would run in the next isolated cells as the template
        imported it, however old, while ordinary cells run the new code.  An
        isolated cell runs the user's module as its file is now, as a worker
        that imported it itself would (reloaded or not in the kernel).  Like
        a preload, the reload drops the spares, and the cell's worker is forked
        after it.  One ``stat`` per watched file, and none at all in a notebook
        that preloads no module of its own.
        """
        t = self._current
        if t is None or not t.sources or not t.alive or t.lost:
            return
        changed = []
        for name, (path, mtime, size) in list(t.sources.items()):
            try:
                st = os.stat(path)
                now = (path, st.st_mtime_ns, st.st_size)
            except OSError:  # gone: the reload says so, and the worker imports what it finds
                now = (path, 0, -1)
            if now != (path, mtime, size):
                t.sources[name] = now
                changed.append(name)
        if changed:
            self._send_preload(t, {"names": [], "reload": changed})

    def _send_preload(self, t: _Template, request: dict[str, Any]) -> bool:
        """Send a ``preload`` with the notebook's path, environment and directory; False if it could not go."""
        from .template import send

        with self._lock:
            with self._cond:
                t.preloading += 1
                t.drop_spares()
            env = _environ()
            request.update(sys_path=list(sys.path), env=env)
            try:
                request["cwd"] = os.getcwd()
            except OSError:  # the working directory was deleted: the template keeps its own
                pass
            try:
                send(t.sock, "preload", request)
            except OSError:
                with self._cond:
                    t.preloading -= 1
                return False
            t.base_env = env  # the spares it offers from now on start with it
            with self._cond:
                t.asked()
            return True

    def take_spare(self, inputs: int = 0) -> tuple[_Template, _Spare] | None:
        """The spare worker the template offered, now this caller's to hand a cell; or None.

        The template is told to fork the next one later (:meth:`spare_taken`).
        A cell with ``inputs`` bytes of large inputs takes the spare that made
        room for them if there is one; any other takes a spare that made none
        if it can, keeping that room for the cell it was made for.
        None when there is no spare, or the template cannot be counted
        on to report the worker's exit (stopped, given up, busy with a
        preload): the caller then asks the template for a worker (:meth:`ask`),
        which notices all of that.
        """
        t = self._current
        if t is None or not t.spares:
            return None
        if t.stopped_now():  # it would never reap this worker: the slow path gives it up
            return None
        with self._cond:
            if not t.spares or t.preloading or not t.alive or t.lost:
                return None
            # The oldest that fits: the most likely to have prepared itself.
            fits = [i for i, s in enumerate(t.spares) if (s.ready >= inputs if inputs else not s.ready)]
            spare = t.spares.pop(fits[0] if fits else 0)
            t.live.add(spare.pid)
            t.untold.add(spare.pid)
            t.running += 1
        return t, spare

    def spare_over(self, t: _Template) -> None:
        """A cell handed to a spare is over: it no longer counts as running (see :meth:`spare_taken`)."""
        with self._cond:
            t.running = max(0, t.running - 1)
            t.calm_at = time.perf_counter() + SPARE_AFTER

    def spare_taken(self, t: _Template, calm: bool = False) -> None:
        """Tell the template which spares were taken: it forks their successors.

        With ``calm`` (the job's reader thread, :data:`SPARE_AFTER` after its
        quick cell was over) only if no cell handed to a spare ran since, so
        that forking competes neither with a quick cell nor with the kernel's
        reply to it (the other spare serves a cell that comes meanwhile).
        Without (a cell that runs on; a cell that found no spare tells at
        once, with its fork request), now.
        """
        with self._lock:
            if not calm or (not t.running and time.perf_counter() >= t.calm_at - 0.001):
                self._tell_taken(t)

    @staticmethod
    def _tell_taken(t: _Template) -> None:
        """Send ``taken`` for the spares not told of yet."""
        from .template import send

        for one in sorted(t.untold):
            t.untold.discard(one)
            try:
                send(t.sock, "taken", {"pid": one})
            except OSError:
                return  # the template went: its reader says so, and the worker's exit is unknown

    def spare_failed(self, t: _Template, spare: _Spare) -> None:
        """A taken spare could not be handed its cell (it was gone): its exit is nobody's."""
        spare.close()
        with self._cond:
            t.running = max(0, t.running - 1)
            t.live.discard(spare.pid)
            if t.status.pop(spare.pid, None) is None:
                t.orphans.add(spare.pid)

    def close(self) -> None:
        """Stop the template (it kills the workers it still has)."""
        with self._lock:
            t, self._current = self._current, None
        if t is None:
            return
        with self._cond:
            t.drop_spares()
            t.close_stat()
        try:
            t.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            t.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            t.proc.kill()
            t.proc.wait()


launcher = TemplateLauncher()


class Job:
    """One worker running one payload.

    ``payload`` is the job dict the worker expects and ``buffers`` its
    out-of-band parts. Events go to ``on_event``, called from the job's reader
    thread: consumers hand them over to their own thread.
    """

    def __init__(
        self,
        payload: dict[str, Any],
        buffers: Sequence[Any] = (),
        *,
        on_event: Callable[[Event], None],
        timeout: float | None = None,
        label: str = "",
        env: dict[str, str] | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
        use_template: bool = True,
        fresh: bool = False,
        lend: bool = False,
    ) -> None:
        self.id = f"w{next(_ids)}-{os.getpid()}"
        self.sync = os.urandom(8).hex()
        self.use_template = use_template
        self.fresh = fresh
        self.how_started = ""
        self.payload = payload
        self.buffers = list(buffers)
        self._lent: list[Any] = []  # large inputs the worker has copied in (see _lend)
        self._waited = lend  # a cell the kernel waits on (not --bg): see _lend and _ResultRoom
        if lend:
            self._lend()
        self.on_event = on_event
        self._held: list[Event] | None = None  # events of one read, passed on together (see release_events)
        self.timeout = timeout
        self.label = label
        self.env = env
        self.max_output = max_output
        self.proc: Any = None
        self.started_at = time.time()
        self._t0 = time.perf_counter()
        self._stop_reason: str | None = None
        self._wake_r, self._wake_w = _wake_pipes.take()
        # Guards the wake pipe: once the job is over its descriptors are closed, and a
        # late stop() must not write to a number the kernel has since reused for a file.
        self._wake_lock = threading.RLock()
        self._closed = False
        self.tree: proctree.Tree | None = None  # set once the worker exists
        # The run message put into the channel before the worker existed: the socket, and
        # what did not fit (see _queue_run).
        self._queued: tuple[socket.socket, bytes] | None = None
        # A sweep's next values are forked ahead and held here, having run nothing, until a
        # running value ends (see start_soon and release); None: never held.
        self._gate: threading.Event | None = None
        self._withhold = False  # stopped while held: its cell is never sent
        self._ahead = False  # a sweep's value: the template forks it, keeping its spare
        self._peer: socket.socket | None = None  # our copy of the worker's end, until it is known
        self._spare_of: _Template | None = None  # handed to its template's spare: tell it so
        self.lingers = True  # its worker waits to exit until let go (a sweep's value: at once)

    def _run_message(self) -> dict[str, Any]:
        """The body of the ``run`` message: the payload, the sync token, how long to linger."""
        body = dict(self.payload, sync=self.sync)
        if self.lingers:
            body["linger"] = LINGER_SECONDS
            if self._waited and "sweep" not in body:  # input() asks the kernel (and the front end),
                body["waited"] = True  # and the kernel shows the widgets the cell makes, as its own
        return body

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def info(self) -> HandleInfo:
        return HandleInfo(
            id=self.id,
            label=self.label,
            pid=self.pid,
            started=self.started_at,
            timeout=self.timeout,
            host=_hostname(),
        )

    # -- control ---------------------------------------------------------
    def start(self) -> None:
        """Start the worker and its reader thread; returns at once.

        From the template, only the fork request is sent here: the reader
        thread waits for the reply (and spawns a worker when none comes), so
        the caller goes on while the template hands over its spare, and the
        thread is started while the worker starts rather than after.
        """
        if self.use_template:
            launcher.refresh()  # a module of the user's edited and reloaded: the worker has the new one
            if not (self.fresh or self._ahead or self._gate is not None):
                handed = self._hand_to_spare()
                if handed is not None:
                    self._thread(_Supervision.start, *handed)
                    return
            asked = self._ask_template()
            if asked is not None:
                self._thread(_Supervision.start_forked, asked)
                return
        if self._gate is not None:  # a held value's fresh interpreter starts once released
            self._thread(Job._spawn_when_released)
            return
        self._thread(_Supervision.start, *self._spawn())

    def _spawn_when_released(self) -> None:
        """The reader thread of a held value with no template: spawn on release, or never."""
        assert self._gate is not None
        self._gate.wait()
        if self._stop_reason is not None:
            with self._wake_lock:
                self._closed = True
                self._close_fds(self._wake_r, self._wake_w)
            self._exit_without_worker("stop")
            return
        self._gate = None  # released: it runs as soon as it starts
        self._t0 = time.perf_counter()
        try:
            started = self._spawn()
        except OSError as exc:
            self._not_started(exc)
            return
        _Supervision.start(self, *started)

    def start_soon(self, held: bool = False) -> None:
        """Start a sweep's value: as :meth:`start`, and a failure to start arrives as events.

        With ``held`` the worker is started now but gets its cell only on
        :meth:`release`: a sweep forks its next values while others run, and
        still runs no more values at once than it was allowed.  A held worker
        has run nothing (it waits for its cell, as the template's spare does);
        its ``--timeout`` starts when it is released, and one stopped before
        that is ended without ever receiving its cell.  The template forks a
        sweep's value directly (``ahead``), keeping its spare for the next cell.
        """
        if held:
            self._gate = threading.Event()
        self._ahead = True
        self.lingers = False
        try:
            self.start()
        except OSError as exc:  # not even a fresh interpreter could be started
            self._not_started(exc)

    def release(self) -> None:
        """Let a job held by ``start_soon(held=True)`` send its cell to its worker."""
        if self._gate is not None:
            self._gate.set()

    def _thread(self, target: Callable[..., None], *args: Any) -> None:
        _threads.run(f"nbisolate-{self.id}", target, self, *args)

    def _spawn(self) -> tuple[socket.socket, int, int]:
        """Spawn a fresh interpreter as the worker; our ends of its channel and pipes."""
        mine, theirs = socket.socketpair()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        started = False
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", bootstrap("worker", theirs.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
                cwd=self.payload.get("cwd"),
                env=self.env,
            )
            self.how_started = "spawned"
            started = True
        finally:
            theirs.close()
            os.close(out_w)
            os.close(err_w)
            if not started:  # nothing will ever read these: close them now, not never
                mine.close()
                self._close_fds(out_r, err_r)
                with self._wake_lock:
                    self._closed = True
                    self._close_fds(self._wake_r, self._wake_w)
        self._now_running()
        return mine, out_r, err_r

    def _hand_to_spare(self) -> tuple[socket.socket, int, int] | None:
        """Hand the cell straight to the spare worker the template offered; our ends, or None.

        The spare already holds its channel and waits there (see :class:`_Spare`),
        and the kernel knew its pid before the cell existed: starting the cell
        is writing its ``run`` message, with no round trip to the template
        (told by the reader thread to fork the next spare, once the cell is
        over or has run a moment: :data:`SPARE_AFTER`).  A spare that is
        gone takes nothing (the write fails) and the template is asked
        instead, so a cell never runs twice.
        """
        taken = launcher.take_spare(sum(self.payload.get("lend", {}).get("sizes", ())))
        if taken is None:
            return None
        t, spare = taken
        env = _environ() if self.env is None else self.env
        if spare.env_changed or env != t.base_env:
            self.payload["env"] = env  # set by the worker before anything of the cell
        try:
            self._queue_run(spare.chan, strict=True)
        except OSError:  # the spare went: nothing ran; the template forks another
            self.payload.pop("env", None)
            launcher.spare_failed(t, spare)
            return None
        self.proc = _ForkedProcess(spare.pid, t, launcher, spare.start)
        self.how_started = "forked from template"
        self.tree = spare.tree
        self.started_at = time.time()
        self._spare_of = t
        self._emit_notes()
        self._emit("started", spare.pid)
        return spare.chan, spare.out_r, spare.err_r

    def _ask_template(self) -> tuple[_Ticket, socket.socket, int, int] | None:
        """Ask the template for a worker; the request, and our ends of its channel and pipes.

        None when the template cannot be asked.  The descriptors of a fork that
        fails (no reply in time) are closed and never reused: a late fork
        holding them must find them dead, not share them with the spawned
        worker that replaces it.
        """
        mine, theirs = socket.socketpair()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ticket = None
        if self._gate is None:  # a held cell goes only once released (_Supervision.send_run)
            self._queue_run(mine)
        if self._queued is not None:  # to take the cell back if no worker comes (_run_taken)
            self._peer = theirs.dup()
        try:
            env = dict(_environ() if self.env is None else self.env)
            ticket = launcher.ask(
                (theirs.fileno(), out_w, err_w), env, fresh=self.fresh, cwd=self.payload.get("cwd"),
                ahead=self._ahead,
            )
        finally:
            theirs.close()
            self._close_fds(out_w, err_w)
            if ticket is None:
                self._emit_notes()
                self._drop_peer()
                mine.close()
                self._close_fds(out_r, err_r)
        return None if ticket is None else (ticket, mine, out_r, err_r)

    def _run_taken(self) -> bool:
        """Whether a worker read the cell queued in its channel; if not, take it back.

        Reading it through our own copy of the worker's end empties the
        channel: a late worker then finds nothing but the end of the channel.
        A cell partly read is as good as unread: nobody can run half a frame.
        """
        peer = self._peer
        if peer is None:
            return False
        try:
            left = peer.recv(QUEUE_BYTES + 1, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True  # nothing left: a worker read all of it
        except OSError:
            return False
        return not left

    def _drop_peer(self) -> None:
        if self._peer is not None:
            self._peer.close()
            self._peer = None

    def _take_fork(self, asked: tuple[_Ticket, socket.socket, int, int]) -> tuple[socket.socket, int, int]:
        """In the reader thread: the worker the template forked, or a spawned one if none came."""
        ticket, mine, out_r, err_r = asked
        forked = None
        try:
            forked = launcher.answer_on(ticket, mine, self._run_taken)
        finally:
            self._drop_peer()
            self._emit_notes()
            if forked is None:
                mine.close()
                self._close_fds(out_r, err_r)
        if forked is None:
            return self._spawn()
        self.proc = forked
        self.how_started = "fresh interpreter" if self.fresh else "forked from template"
        self._now_running()
        return mine, out_r, err_r

    def _emit_notes(self) -> None:
        for note in launcher.take_notes():
            self._emit("note", note)

    def _now_running(self) -> None:
        self.tree = proctree.Tree(self.proc.pid)
        self.started_at = time.time()
        self._emit("started", self.proc.pid)

    def _exit_without_worker(self, reason: str, error: str | None = None) -> None:
        """The ``exit`` event of a job whose worker never existed (no process could be
        started, or a held value was stopped before its fresh interpreter was spawned)."""
        self._emit(
            "exit",
            {
                "returncode": None,
                "reason": reason,
                "error": error,
                "elapsed": time.perf_counter() - self._t0,
                "dropped": 0,
                "over_rate": 0,
                "max_output": self.max_output,
                "pid": None,
                "lost": None,
            },
        )

    def _not_started(self, exc: Exception) -> None:
        """No worker could be started (in the reader thread): the cell's error, then ``exit``."""
        from . import ship
        from .errors import IsolateError

        error = IsolateError(
            f"could not start the isolated worker process ({type(exc).__name__}: {exc}); "
            "nothing ran. Check that the working directory still exists and the machine "
            "has free memory and process slots, then run the cell again."
        )
        shipped = ship.dumps({"exc": error}, skip_failures=True)
        self._emit(
            MSG_ERROR,
            error_body(
                error,
                traceback=f"IsolateError: {error}",
                names=shipped.names,
                data=shipped.data,
                engine=shipped.engine,
            ),
            shipped.buffers,
        )
        self._exit_without_worker("error", f"{type(exc).__name__}: {exc}")

    def _lend(self) -> None:
        """Keep large input buffers here: the worker makes room and this process copies them in.

        The other way, through a shared segment, costs a copy into it here and
        then the worker mapping it page by page: shared memory gets 4 KiB
        pages, so a fresh process faults in 100,000 of them for 400 MB, more
        than the copy itself. Copied straight into the worker's own memory
        (:func:`nbisolate.ship.place`, huge pages there) it is one copy, the
        run message stays small enough to be queued before the fork, and no
        segment is held here. Only for a cell the kernel waits on: the buffers
        are the notebook's own objects, read while the worker starts, and a
        ``--bg`` cell's notebook runs on meanwhile and may change them.
        """
        sizes = [memoryview(b).nbytes for b in self.buffers]
        if sum(sizes) < SHM_THRESHOLD:
            return
        from . import ship

        if ship.pull_spans(self.buffers) is None:  # not contiguous, or no process_vm_writev
            return
        self.payload = dict(self.payload, lend={"sizes": sizes})
        self._lent, self.buffers = self.buffers, []
        _ready_hint.note(sum(sizes))

    def _queue_run(self, sock: socket.socket, strict: bool = False) -> None:
        """Put a small ``run`` message into the channel now, before the worker is asked for.

        The worker then finds its cell waiting the moment it takes the
        channel, instead of waiting while the kernel hears back from the
        template, notes the new pid and starts the reader thread, which sends
        it otherwise (and sends what did not fit here).  Never blocks: the
        socket's buffer is empty and the send is non-blocking.  If the template
        does not answer, the cell is taken back before a spawned worker gets
        it (:meth:`_run_taken`), so a late worker cannot run it too.
        """
        total = sum(memoryview(b).nbytes for b in self.buffers)
        if total >= QUEUE_BYTES:
            return
        frame = frame_bytes(MSG_RUN, self._run_message(), self.buffers)
        if frame is None or len(frame) > QUEUE_BYTES:
            return
        try:
            sent = sock.send(frame, socket.MSG_DONTWAIT)
        except BlockingIOError:  # no room after all: the reader thread sends it whole
            return
        except OSError:  # nobody at the other end (``strict``: the caller wants to know)
            if strict:
                raise
            return
        self._queued = (sock, frame[sent:])

    def stop(self, reason: str = "interrupt") -> None:
        """Ask the reader thread to stop the worker (thread- and signal-safe)."""
        if self._stop_reason is None:
            self._stop_reason = reason
        if self._gate is not None:
            self._gate.set()  # a held job ends without running its cell
        with self._wake_lock:
            if self._closed:
                return
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    # -- internals -----------------------------------------------------
    def _emit(self, kind: str, data: Any = None, buffers: list[Any] | None = None) -> None:
        event = Event(kind, data, buffers or [])
        if self._held is not None:
            self._held.append(event)
        else:
            self.on_event(event)

    def hold_events(self) -> None:
        """Keep the events emitted from now on until :meth:`release_events` (the reader thread's)."""
        if self._held is None:
            self._held = []

    def release_events(self) -> None:
        """Pass on the events held since :meth:`hold_events`, in order, and stop holding."""
        held, self._held = self._held, None
        for event in held or ():
            self.on_event(event)

    @staticmethod
    def _close_fds(*fds: int | None) -> None:
        for fd in fds:
            if isinstance(fd, int) and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _has_children(pid: int) -> bool | None:
    """Whether ``pid`` has a child process (Linux ``/proc/PID/task/*/children``); None if unknown."""
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", "rb") as f:
                if f.read().strip():
                    return True
    except OSError:
        return None
    return False


class _Supervision:
    """The reader thread of one job, from sending ``run`` to emitting ``exit``.

    Like the manager thread of a process pool executor, it is a loop of a few
    named steps, each a method: act on a stop request or a passed deadline
    (:meth:`check_requests`), end the tree when the grace period is over
    (:meth:`escalate`), wait for something and handle it (:meth:`wait`: pipe
    bytes, a message, a wake-up, the worker's exit), and once the worker is
    gone take its last words, stop the tree, reap and emit ``exit``
    (:meth:`run`).  All its state lives here, read and written by this one
    thread; :meth:`Job.stop` only sets a reason and writes the wake pipe, and
    another job's thread may only let its worker go (:meth:`answer`).
    """

    SCAN_SECONDS = 0.5
    """How often the tree's descendants are remembered while the cell runs."""

    BATCH_MESSAGES = 32
    """At most this many messages read at once are passed on together (:meth:`read_messages`)."""

    def __init__(self, job: Job, chan: Channel, out_r: int, err_r: int) -> None:
        assert job.proc is not None and job.tree is not None
        self.job = job
        self.proc = job.proc
        self.tree = job.tree
        self.chan = chan
        self.out_r, self.err_r = out_r, err_r
        self.sel = selectors.DefaultSelector()
        self.decoders = {
            out_r: ("stdout", codecs.getincrementaldecoder("utf-8")("replace")),
            err_r: ("stderr", codecs.getincrementaldecoder("utf-8")("replace")),
        }
        self.mark = sync_mark(job.sync)
        self.pending = {out_r: b"", err_r: b""}  # a tail that may be the start of the mark
        self.marked: set[str] = set()  # the streams whose mark has been read
        # --timeout counts the time the kernel spent serializing the inputs, too.
        spent = float(job.payload.get("spent") or 0.0)
        self.deadline = job._t0 + job.timeout - spent if job.timeout else None
        self.kill_at: float | None = None
        self.reason: str | None = None
        self.labelled = False  # output after a stop was said to be the cell's processes'
        self.finished = False  # a result or an error arrived
        self.exited = False
        self.waits = False  # counted as running by _departures, until its outcome
        self._answering = threading.Lock()  # answer() from another thread, and close()
        self.next_scan = time.perf_counter() + self.SCAN_SECONDS
        self.output_bytes = 0
        self.dropped = 0
        # Output sent faster than Jupyter's IOPub data rate limit allows: the notebook
        # server may drop that much more on its way to the browser (see forward()).
        self.over_rate = 0
        self._rate_room = IOPUB_RATE * IOPUB_WINDOW
        self._rate_at = time.perf_counter()
        self.arena: Arena | None = None
        # A cell that just returned a large result, run again: room for its result.
        waited = job._waited and not job._ahead and "sweep" not in job.payload
        self.cell = hash(job.payload.get("source"))  # whose result hints at the next run's room
        self.room = _ResultRoom.maybe(self.cell) if waited else None
        self.exit_fd: int | None = None
        self.waiter: tuple[int, int] | None = None
        for fd in self.decoders:
            self.sel.register(fd, selectors.EVENT_READ, "pipe")
        self.sel.register(chan.sock, selectors.EVENT_READ, "chan")
        self.sel.register(job._wake_r, selectors.EVENT_READ, "wake")
        self._watch_exit()

    def _watch_exit(self) -> None:
        """Be woken the moment the worker exits: a ``pidfd``, else a thread blocked in ``wait``.

        Noticing death from the process itself, not from a silent channel, is
        what makes a crashed worker reported at once instead of at a timeout.
        """
        if hasattr(os, "pidfd_open"):
            try:
                self.exit_fd = os.pidfd_open(self.proc.pid)
                self.sel.register(self.exit_fd, selectors.EVENT_READ, "exit")
                return
            except OSError:
                self.exit_fd = None
        waiter_r, waiter_w = os.pipe()
        self.waiter = (waiter_r, waiter_w)
        self.sel.register(waiter_r, selectors.EVENT_READ, "exit")
        proc = self.proc

        def wait_then_tell() -> None:
            proc.wait()
            os.write(waiter_w, b"x")

        threading.Thread(target=wait_then_tell, daemon=True).start()

    @classmethod
    def start(cls, job: Job, mine: socket.socket, out_r: int, err_r: int) -> None:
        """The body of the job's reader thread (set up there, so ``Job.start`` returns at once)."""
        chan = Channel(mine)
        cls(job, chan, out_r, err_r).run()

    @classmethod
    def start_forked(cls, job: Job, asked: tuple[_Ticket, socket.socket, int, int]) -> None:
        """The reader thread of a job the template was asked for: its reply first."""
        try:
            mine, out_r, err_r = job._take_fork(asked)
        except Exception as exc:  # no reply, and no spawn either (or a bug of ours)
            job._not_started(exc)
            return
        cls.start(job, mine, out_r, err_r)

    # -- the loop ---------------------------------------------------------------
    def run(self) -> None:
        """Send the job, loop until the worker is gone, end its tree, reap it, emit ``exit``.

        Whatever fails in here, the consumer still gets ``exit`` (with reason
        ``error``): a cell never waits for ever on a bug of ours.
        """
        failure: BaseException | None = None
        self.tell_at: float | None = time.perf_counter() + SPARE_AFTER
        if self.job.lingers:
            self.waits = True
            _departures.running()
        try:
            self.send_run()
            while True:
                now = time.perf_counter()
                self.check_requests(now)
                self.escalate(now)
                if self.exited:
                    break
                self.wait(now)
                if self.exited:
                    self.take_last_words()
            self.stop_tree()
            self.proc.wait()
        except Exception as exc:  # a bug here must never leave the cell waiting for ever
            failure = exc
            try:
                self.stop_tree()
                self.proc.wait(timeout=5)
            except Exception:
                pass
        finally:
            if self.waits:  # no outcome came: the cell is over all the same
                self.waits = False
                _departures.over(None)
            self.tell_taken()
            self.close()
        self.emit_exit(failure)
        _wake_pipes.make_ahead()  # for the next job, now that this one is over

    def send_run(self) -> None:
        """Send the payload, its buffers in a warm arena when they are large (one memcpy).

        A held job (a sweep's value forked ahead) waits here for its release;
        ``--timeout`` counts from then. Stopped while held, its cell never goes:
        the worker reads the end of its channel and exits, having run nothing.
        """
        job = self.job
        if job._gate is not None:
            job._gate.wait()
            job._t0 = time.perf_counter()
            job.started_at = time.time()
            if job.timeout:
                spent = float(job.payload.get("spent") or 0.0)
                self.deadline = job._t0 + job.timeout - spent
            if job._stop_reason is not None:
                job._withhold = True
                job._stop_reason = "stop"  # it never ran: stopped, whatever asked it to
        if job._withhold:
            try:
                self.chan.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            job.buffers = []
            job.payload = {}
            return
        queued, job._queued = job._queued, None
        try:
            if queued is not None and queued[0] is self.chan.sock:  # sent before the fork
                if queued[1]:
                    self.chan.sock.sendall(queued[1])
            else:
                if sum(memoryview(b).nbytes for b in job.buffers) >= SHM_THRESHOLD:
                    self.arena = _arenas.take()
                self.chan.send(MSG_RUN, job._run_message(), job.buffers, arena=self.arena)
        except OSError:
            pass  # the worker died at start; the exit step explains how
        job.buffers = []
        job.payload = {}  # sent: the inputs' pickle is not held for the rest of the run

    def check_requests(self, now: float) -> None:
        """Start stopping on a stop request or a passed deadline, unless the outcome is in.

        An interrupt is relayed as SIGINT to the group (the cell sees
        ``KeyboardInterrupt`` and may clean up); a timeout or any other
        reason is SIGTERM; either way :meth:`escalate` kills after a grace.
        """
        if self.reason is not None or self.finished:
            return
        requested = self.job._stop_reason
        if requested is not None:
            self.reason = requested
            self.tree.remember()
            if requested == "interrupt":
                self.tree.signal(signal.SIGINT)
                self.kill_at = now + GRACE_SECONDS
            else:
                self.tree.signal(signal.SIGTERM)
                self.kill_at = now + min(GRACE_SECONDS, 1.0)
            return
        if self.deadline is not None and now >= self.deadline:
            self.reason = "timeout"
            self.tree.remember()
            self.tree.signal(signal.SIGTERM)
            self.kill_at = now + min(GRACE_SECONDS, 1.0)

    def escalate(self, now: float) -> None:
        """The grace period is over: kill the whole tree, whatever the worker is doing."""
        if self.kill_at is not None and now >= self.kill_at:
            self.tree.remember()
            self.tree.sweep()
            self.kill_at = None

    def wait(self, now: float) -> None:
        """Sleep until something happens or the next deadline, then handle what happened.

        While the cell runs, the tree's descendants are remembered every
        :data:`SCAN_SECONDS`, so that processes that leave the group are known
        even if the worker dies before they could be listed from it.
        """
        deadline = self.deadline if not self.finished and self.reason is None else None
        if self.job._spare_of is not None and self.tell_at is not None:
            if now >= self.tell_at:  # a cell that is not over at once: the next spares now
                self.tell_at = None
                launcher.spare_taken(self.job._spare_of)
            else:
                deadline = min(deadline, self.tell_at) if deadline else self.tell_at
        waits = [t - now for t in (deadline, self.kill_at) if t]
        if now >= self.next_scan and not self.finished:
            self.remember()
            self.next_scan = now + self.SCAN_SECONDS
        waits.append(self.next_scan - now if not self.finished else 1.0)
        for key, _ in self.sel.select(max(0.0, min(waits))):
            what = key.data
            if what == "pipe":
                self.read_pipe(key.fd)
            elif what == "chan":
                self.read_messages()
            elif what == "wake":
                os.read(self.job._wake_r, 64)
            elif what == "exit":
                self.exited = True

    def read_messages(self) -> None:
        """Read every message the channel holds now, then pass their events on together.

        A quick cell's phases and result arrive in one write.  Passed on one by
        one, each would wake the kernel's waiting thread while this one parses the
        next, and the two would take turns at the interpreter's lock for every
        read; held, they reach it in one batch.  The outcome is never held back:
        it releases the batch itself (see :meth:`deliver_outcome`).
        """
        sock = self.chan.sock
        self.job.hold_events()
        try:
            for _ in range(self.BATCH_MESSAGES):  # a cell that writes without pause still streams
                if not (self.read_message() and sock in self.sel.get_map() and select.select([sock], [], [], 0)[0]):
                    break
        finally:
            self.job.release_events()

    def tell_taken(self, calm: bool = False) -> None:
        """The cell is over: the template is told of the spares taken (see :meth:`TemplateLauncher.spare_taken`)."""
        t, self.job._spare_of = self.job._spare_of, None
        if t is not None:
            launcher.spare_over(t)
        if calm and (t is not None or self.job.lingers):
            # The kernel now replies to the cell: forking the next spare, and the worker's exit
            # (see LET_GO), would compete with that.
            time.sleep(SPARE_AFTER)
        if t is not None:
            launcher.spare_taken(t, calm=calm)

    def take_last_words(self) -> None:
        """The worker is gone: read what it managed to send and write before it went."""
        while self.chan.sock in self.sel.get_map() and any(
            key.fileobj is self.chan.sock for key, _ in self.sel.select(0)
        ):
            self.read_message()
        self.drain_pipes(0.01)

    def stop_tree(self) -> None:
        """Kill what is left of the tree before reaping: a zombie's pid (the group id) cannot be reused."""
        self.tree.sweep()

    def close(self) -> None:
        """Release every descriptor and the arena."""
        for fd in list(self.sel.get_map()):
            try:
                self.sel.unregister(fd)
            except (KeyError, ValueError):
                pass
        self.sel.close()
        _departures.forget(self)
        with self._answering:
            self.chan.close()
        job = self.job
        with job._wake_lock:
            job._closed = True
        job._lent = []
        Job._close_fds(self.out_r, self.err_r, job._wake_r, job._wake_w, self.exit_fd)
        if self.waiter is not None:
            Job._close_fds(*self.waiter)
        if self.arena is not None:
            _arenas.give_back(self.arena)
        if self.room is not None:
            self.room.release()
            self.room = None

    def emit_exit(self, failure: BaseException | None) -> None:
        """The last event of the job: how it ended, and how much output was dropped."""
        if failure:
            reason = "error"
        else:
            reason = self.reason or ("done" if self.finished else "crashed")
        self.job._emit(
            "exit",
            {
                "returncode": self.proc.returncode,
                "reason": reason,
                "error": f"{type(failure).__name__}: {failure}" if failure else None,
                "elapsed": time.perf_counter() - self.job._t0,
                "dropped": self.dropped,
                "over_rate": self.over_rate,
                "max_output": self.job.max_output,
                "pid": self.proc.pid,
                # Why the return code is unknown, when it is (the template was lost).
                "lost": getattr(self.proc, "lost", None),
            },
        )

    # -- reading ------------------------------------------------------------------
    def forward(self, name: str, text: str) -> None:
        """Emit output text, cut at the job's limit; what is cut is counted for a note."""
        if not text:
            return
        room = self.job.max_output - self.output_bytes
        # Bytes, as the limit and the note say (and as the browser receives them), not
        # characters: non-ASCII text is several bytes a character.
        data = None if text.isascii() else text.encode("utf-8", "surrogatepass")
        size = len(text) if data is None else len(data)
        if room <= 0:
            self.dropped += size
            return
        if size > room:
            self.dropped += size - room
            text = text[:room] if data is None else data[:room].decode("utf-8", "ignore")
            size = room
        self.output_bytes += size
        self._count_rate(size)
        self.job._emit("stream", (name, text))

    def _count_rate(self, size: int) -> None:
        """Count output sent faster than Jupyter's default IOPub data rate limit lets through.

        The server averages over a window and drops stream output while the rate is
        over the limit; a note that counted only what nbisolate cut would claim a
        smaller loss than the user saw.  A token bucket of the window's allowance
        approximates what the server passes.
        """
        now = time.perf_counter()
        self._rate_room = min(
            IOPUB_RATE * IOPUB_WINDOW, self._rate_room + (now - self._rate_at) * IOPUB_RATE
        )
        self._rate_at = now
        if size > self._rate_room:
            self.over_rate += int(size - self._rate_room)
            self._rate_room = 0.0
        else:
            self._rate_room -= size

    def read_pipe(self, fd: int) -> bool:
        """Read one chunk of a pipe, minus the sync mark; False at EOF or when nothing was there.

        The pipes carry what bypasses ``sys.stdout`` (C code, subprocesses).  A
        tail that may be the start of the mark is kept for the next read, so
        a mark split across two reads is still found.
        """
        if fd not in self.sel.get_map():  # reached EOF earlier in this same round
            return False
        name, decoder = self.decoders[fd]
        data = read_some(fd)
        if data is None:
            return False
        if not data:
            self.sel.unregister(fd)
            self.forward(name, decoder.decode(self.pending[fd], final=True))
            self.pending[fd] = b""
            return False
        data = self.pending[fd] + data
        self.pending[fd] = b""
        mark = self.mark
        at = data.find(mark)
        if at >= 0:
            self.marked.add(name)
            data = data[:at] + data[at + len(mark) :]
        else:  # keep a possible beginning of the mark for the next read
            for keep in range(min(len(mark) - 1, len(data)), 0, -1):
                if mark.startswith(data[-keep:]):
                    self.pending[fd], data = data[-keep:], data[:-keep]
                    break
        text = decoder.decode(data)
        if text and self.reason in ("interrupt", "stop", "timeout") and not self.labelled:
            # After a stop, what reaches the pipes is what the cell's own processes say as
            # they are stopped (a child's KeyboardInterrupt traceback): not the cell's.
            self.labelled = True
            self.forward(
                "stderr", "\n[nbisolate: the output below comes from processes the cell started, "
                "as they were stopped]\n"
            )
        self.forward(name, text)
        return True

    def _open_pipes(self) -> list[int]:
        return [fd for fd in self.decoders if fd in self.sel.get_map()]

    def wait_for_marks(self, expected: dict[str, bool] | None) -> None:
        """Read the pipes up to the worker's sync marks: all its output, and no waiting after."""
        if not expected:  # a worker that could not mark: give stragglers a moment
            self.drain_pipes(0.005)
            return
        want = {name for name, ok in expected.items() if ok}
        until = time.perf_counter() + 2.0
        while want - self.marked and time.perf_counter() < until:
            fds = self._open_pipes()
            if not fds:
                return
            for key, _ in self.sel.select(max(0.0, until - time.perf_counter())):
                if key.fd in fds:
                    self.read_pipe(key.fd)
        self.drain_pipes(0.0)

    def drain_pipes(self, wait: float = 0.0) -> None:
        """Read what the pipes hold now; grandchildren may keep them open, so never wait for EOF."""
        until = time.perf_counter() + wait
        while True:
            fds = self._open_pipes()
            if not fds:
                return
            ready = [k.fd for k, _ in self.sel.select(0) if k.fd in fds]
            if not ready:
                if time.perf_counter() >= until:
                    return
                time.sleep(0.002)
                continue
            for fd in ready:
                self.read_pipe(fd)

    def read_message(self) -> bool:
        """Read one message and pass it on; False when the channel is finished.

        ``result``/``error`` is the outcome: the pipes are read up to the
        marks first, so every line the cell printed arrives before it.  A
        message that cannot be read ends the channel with an ``error``.
        """
        chan = self.chan
        if chan.sock not in self.sel.get_map():
            return False
        try:
            kind, body, buffers = chan.recv()
        except (ChannelClosed, OSError):
            self.sel.unregister(chan.sock)
            return False
        except Exception as exc:
            self.fail_receive(exc)
            return False
        if kind == "forked":  # the template's note, when nobody read it (never an event)
            return True
        if kind == MSG_PLACE:
            self.place_inputs(body)
            return True
        if kind in (MSG_RESULT, MSG_ERROR):
            if self.reason is None:
                if kind == MSG_RESULT and isinstance(body, dict) and "pull" in body:
                    self.job.release_events()  # what came before a large result is not kept waiting for its copy
                    pulled = self.pull_result(body)
                    if pulled is None:
                        return True  # sent again with its buffers, or the run ends without it
                    buffers = pulled
                self.deliver_outcome(kind, body, buffers)
            return True
        if kind == MSG_STREAM:
            self.forward(*body)
        elif kind == MSG_ASK:  # the waiting thread asks the front end, then calls reply
            self.job._emit(kind, dict(body, reply=self.reply))
        elif kind in (MSG_DISPLAY, MSG_UPDATE_DISPLAY) and not self.room_for(body, buffers):
            pass  # over the output limit: counted as dropped, said after the output
        else:
            self.job._emit(kind, body, buffers)
        return True

    def place_inputs(self, body: dict[str, Any]) -> None:
        """Copy the lent inputs into the room the worker made for them (else send them along).

        Whatever happens, the worker gets one ``inputs`` answer and this
        process lets go of the buffers. When the copy cannot be made (no
        ``process_vm_writev``, a policy that forbids it, no room in the
        worker) they go with the answer, the usual way.
        """
        from . import ship

        lent, self.job._lent = self.job._lent, []
        spans = body.get("spans") if isinstance(body, dict) else None
        placed = False
        if spans is not None:
            try:
                ship.place(self.proc.pid, spans, lent)
                placed = True
            except OSError:
                pass
        try:
            if placed:
                self.chan.send(MSG_INPUTS, {"placed": True})
            else:
                if self.arena is None and sum(memoryview(b).nbytes for b in lent) >= SHM_THRESHOLD:
                    self.arena = _arenas.take()
                self.chan.send(MSG_INPUTS, {"placed": False}, lent, arena=self.arena)
        except OSError:
            pass  # the worker is gone: its exit says how

    def pull_result(self, body: dict[str, Any]) -> list[Any] | None:
        """Copy a large result's buffers straight out of the waiting worker, then answer it.

        The worker sent where its buffers are instead of the buffers, and
        waits (see :func:`nbisolate.ship.pull` for why). The copy lands in
        private memory of this process, so what is bound belongs to the kernel
        and outlives the worker. None when there is nothing to deliver now:
        this process may not read the worker (it is asked to send the buffers
        with the message instead, and does), the worker is gone (its exit says
        how), or there is no memory for the copy (the cell gets an error).
        """
        import resource

        from . import ship

        where = body.pop("pull")
        t0 = time.perf_counter()
        faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        room, self.room = self.room, None
        ready = room.take() if room is not None else None
        roomy = ready.faulted if ready is not None else 0
        nbytes = sum(int(n) for _, n in where["spans"])
        _result_hint.note(nbytes, self.cell)
        try:
            buffers = ship.pull(self.proc.pid, where["spans"], ready)
        except MemoryError as exc:
            self.fail_receive(exc)
            return None
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                self.answer(ship.PULL_RESEND)
            return None
        self.answer(ship.PULL_TAKEN)  # a worker gone meanwhile had sent all of it: keep it
        body["transfer"] = {
            "pull_seconds": time.perf_counter() - t0,
            "pull_minflt": resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults,
            "pull_bytes": nbytes,
            "pull_room": roomy,  # bytes of it faulted in ahead (see _ResultRoom)
        }
        return buffers

    def reply(self, ok: bool, text: str) -> None:
        """Answer the worker's ``ask``: the line typed, or what asking raised (see :func:`~nbisolate.protocol.ask_reply`)."""
        self.answer(ask_reply(ok, text))

    def answer(self, word: bytes) -> None:
        """Send the worker one raw byte: how its pulled result went, or :data:`LET_GO` (nothing if it is gone)."""
        with self._answering:
            try:
                self.chan.sock.sendall(word)
            except OSError:  # gone, or closed here
                pass

    def room_for(self, body: Any, buffers: list[Any]) -> bool:
        """Count a display against the same output limit as text; False when it is over."""
        size = sum(memoryview(b).nbytes for b in buffers)
        data = body.get("data") if isinstance(body, dict) else None
        if isinstance(data, dict):
            size += sum(len(v) if isinstance(v, str | bytes) else len(repr(v)) for v in data.values())
        if self.output_bytes + size > self.job.max_output:
            self.dropped += size
            return False
        self.output_bytes += size
        return True

    def deliver_outcome(self, kind: str, body: Any, buffers: list[Any]) -> None:
        """Emit the result or error after all output (and the dropped-output note)."""
        self.wait_for_marks(body.get("marked") if isinstance(body, dict) else None)
        self.finished = True
        if self.dropped:  # the note goes after the output, before the outcome
            self.job._emit(
                "dropped",
                {"dropped": self.dropped, "over_rate": self.over_rate, "max_output": self.job.max_output},
            )
        self.job._emit(kind, body, buffers)
        self.job.release_events()  # the outcome, and what the same read brought before it: now
        waits, self.waits = self.waits, False
        if waits:
            _departures.over(self)  # its worker waits to exit until the kernel is calm
        self.tell_taken(calm=True)
        if waits:
            _departures.calm()
        # A safety net behind the worker's own cleanup, off the critical path.
        self.remember()

    def remember(self) -> None:
        """Remember the tree's descendants, unless the worker has no child at all.

        Listing descendants reads every process of the machine; a worker is its
        tree's subreaper, so one without children has no descendant to find, and
        most cells start none (a sweep of a thousand values would read /proc a
        thousand times for nothing).
        """
        if _has_children(self.proc.pid) is False:
            return
        self.tree.remember()

    def fail_receive(self, exc: BaseException) -> None:
        """A message could not be read: close the channel and give the cell an ``error``.

        MemoryError: a result the kernel cannot allocate; anything else: a
        garbled frame.  The channel is unusable either way: closing it makes the
        worker's watchdog end its tree, and the cell gets an error, not a hang.
        """
        self.sel.unregister(self.chan.sock)
        self.chan.close()
        if self.reason is None and not self.finished:
            self.finished = True
            self.job._emit(MSG_ERROR, error_body(exc, stage="receive"))
