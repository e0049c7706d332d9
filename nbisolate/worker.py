"""The worker: the child side of an isolated cell.

It is started by the kernel as ``python -c "from nbisolate.worker import
main; main(FD)"`` in a new session (its own process group), with the kernel's
``sys.path``, working directory and environment, and the worker's end of a
socketpair as FD.  It runs exactly one cell and exits: a process that ran a
cell is never reused, so nothing leaks from one cell to the next.

This module must start fast and stay small: it imports nothing of IPython,
the magics or the widgets.  ``dill`` is imported only when the payload holds a
function or class that travels by value, the diagnosis engine only when a
result cannot be sent back.

What it does, in order: receive the job; rebuild the inputs into a fresh
``__main__`` namespace; run the cell with ``sys.stdout``/``sys.stderr``
streamed to the kernel as they are written; send back the names the cell
bound and the value of its last expression, or the exception with a
traceback in the cell's own line numbers; kill whatever the cell started and
is still running; exit.  A watchdog thread kills the whole tree and exits as
soon as the kernel's end of the channel closes or the kernel process exits,
so a worker never outlives its kernel.  ``--mem`` becomes an rlimit applied
before the inputs load.
"""

from __future__ import annotations

import _signal
import ast
import builtins
import io
import linecache
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
import types
import weakref
from collections.abc import Callable
from typing import Any

from . import display_worker, pools, proctree
from .protocol import (
    CHANNEL_LOST,
    LET_GO,
    MSG_ASK,
    MSG_ERROR,
    MSG_INPUTS,
    MSG_PHASE,
    MSG_PLACE,
    MSG_RESULT,
    MSG_RUN,
    MSG_STREAM,
    MSG_SYSEXIT,
    RESULT,
    error_body,
    read_answers,
    sync_mark,
)
from .units import format_bytes
from .wire import Channel, ChannelClosed, frame_bytes, send_frame

__all__ = ["RESULT", "main", "sync_mark"]
# Results bigger than this are checked against the memory the machine has available.
_CHECK_AVAILABLE_ABOVE = 64 * 1024 * 1024

# What the worker is doing, for errors that are not the cell's own: "setup"
# (loading inputs), "run" (the cell) or "return" (sending results back).
_stage = "setup"


class _NoStdin(io.TextIOBase):
    def _refuse(self, *args: Any) -> str:
        raise display_worker.nobody_to_ask("input()")

    read = readline = _refuse

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        raise io.UnsupportedOperation("the isolated worker has no stdin")


# -- input(), getpass() and sys.stdin: asked of the kernel -------------------------------------
#
# In a cell the kernel waits on (the job says ``ask``), they ask the kernel, which asks the
# front end as it would for an ordinary cell: the input box, a password box for getpass().
# The question is a message (``ask``); the answer comes back on the channel among the
# kernel's single-byte answers, read by the watchdog thread (:func:`_watch_parent`), and is
# handed over here.  One question at a time, whichever thread asks.

_replies: queue.SimpleQueue[tuple[bool, str]] = queue.SimpleQueue()
_asking: Channel | None = None
_ask_lock = threading.Lock()


def _ask(prompt: str, password: bool, what: str) -> str:
    """Ask the kernel for a line of input for ``what`` (``input()``...); what it raised there is
    raised here as EOFError."""
    chan = _asking
    if chan is None:
        raise display_worker.nobody_to_ask(what)
    for stream in (sys.stdout, sys.stderr):  # what the cell printed comes before the question
        try:
            stream.flush()
        except Exception:
            pass
    with _ask_lock:
        chan.send(MSG_ASK, {"prompt": str(prompt), "password": bool(password)})
        ok, text = _replies.get()
    if not ok:
        raise EOFError(
            f"{what} in an isolated cell asked the kernel, which raised {text.rstrip('.')}. Where the "
            "front end takes no input (a script, nbclient), read the value in a normal cell or from an "
            "environment variable first, and use it here (it is shipped as an input)."
        )
    return text


def _input(prompt: object = "") -> str:
    return _ask(str(prompt), False, "input()")


def _getpass(prompt: str = "Password: ", stream: Any = None) -> str:
    return _ask(prompt, True, "getpass()")


class _AskStdin(_NoStdin):
    """``sys.stdin`` of a worker whose kernel answers: each line read is asked for."""

    def _refuse(self, *args: Any) -> str:
        return _ask("", False, "reading sys.stdin") + "\n"

    read = readline = _refuse


def _let_ask(chan: Channel) -> None:
    """From now on input(), getpass() and sys.stdin ask the kernel over ``chan`` (see above)."""
    global _asking
    import getpass

    _asking = chan
    builtins.input = _input
    getpass.getpass = _getpass
    sys.stdin = _AskStdin()


try:  # imported here, so the template has them: a worker importing them costs a millisecond
    import fcntl
    import termios

    _FIONREAD = termios.FIONREAD
except ImportError:  # not on Windows
    fcntl = None  # type: ignore[assignment]

# ``signal.pthread_sigmask`` turns every signal of the mask it returns into an enum member:
# restoring a mask that blocked 55 of them cost 54 us per message, against 2 us for the C
# function it wraps, which takes and returns plain numbers.
_sigmask = getattr(_signal, "pthread_sigmask", signal.pthread_sigmask)


class _WorkerChannel(Channel):
    """The worker's end of the channel: a send is never cut in half by a signal handler.

    Python runs signal handlers in the main thread between bytecodes, so a
    ``KeyboardInterrupt`` (the kernel relays "Interrupt" as SIGINT) raised in
    the middle of ``sendall`` would leave half a frame on the socket and garble
    every message after it.  The main thread blocks asynchronous signals for
    the length of one send; they are delivered the moment it ends.

    Any message other than stream text first sends the text still pending,
    so a display, a result or an error never overtakes what was printed
    before it.
    """

    output: _Output | None = None
    outcome_sent = False  # the result or error went: the kernel has what it waits for

    _BLOCK = frozenset(
        s
        for s in signal.valid_signals()
        if s
        not in {
            signal.SIGKILL,
            signal.SIGSTOP,
            signal.SIGSEGV,
            signal.SIGBUS,
            signal.SIGFPE,
            signal.SIGILL,
            signal.SIGABRT,
        }
    )

    HOLD_SECONDS = 0.05
    """How long after the job arrived phases may wait for the next message."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self._held: list[bytes] = []
        self.hold_until = 0.0  # set when the job arrives (time.monotonic())

    def phase(self, name: str, seconds: float, hold: bool = False) -> None:
        """Tell the kernel a phase ended: now, or with the next message (``hold``).

        Every message wakes the kernel's reader thread and its event loop, on
        a machine the cell shares with them; phases that end a moment before
        the next message (a fast cell's start and load, results that take no
        time to send) travel in the same write as that message.  The start and
        load are held only within :data:`HOLD_SECONDS` of the job's arrival,
        and the watchdog thread sends what is still held then
        (:meth:`send_held`), so the kernel learns of a long cell's start and
        load within that time; a held run phase is followed by its result.
        """
        if hold and (name == "run" or time.monotonic() < self.hold_until - 0.005):
            self._held.append(frame_bytes(MSG_PHASE, (name, seconds)) or b"")
        else:
            self.send(MSG_PHASE, (name, seconds))

    def send_held(self) -> None:
        """Send the phases still held, if any (the watchdog thread, at ``hold_until``)."""
        try:
            with self._lock:
                held, self._held = self._held, []
                if held:
                    self.sock.sendall(b"".join(held))
        except OSError:
            pass

    def send(self, kind: str, body: Any = None, buffers: Any = ()) -> None:
        if kind != MSG_STREAM and self.output is not None:
            self.output.flush()
        if threading.current_thread() is threading.main_thread():
            old = _sigmask(signal.SIG_BLOCK, self._BLOCK)
            try:
                self._send(kind, body, buffers)
            finally:
                _sigmask(signal.SIG_SETMASK, old)
        else:
            self._send(kind, body, buffers)
        if kind in (MSG_RESULT, MSG_ERROR):
            self.outcome_sent = True

    def _send(self, kind: str, body: Any, buffers: Any) -> None:
        """One message, after the phases held for it (in one write when it is small).

        The held phases are taken under the channel's lock, so the watchdog
        thread sending them meanwhile can never put them after this message.
        """
        if not self._held:
            return super().send(kind, body, buffers)
        with self._lock:
            held, self._held = self._held, []
            frame = frame_bytes(kind, body, buffers) if held else None
            if frame is not None:
                self.sock.sendall(b"".join([*held, frame]))
                return
            if held:
                self.sock.sendall(b"".join(held))
            send_frame(self.sock, kind, body, buffers)


class _Output:
    """Pending text of both streams, in the order it was written, sent as few messages as possible.

    A line is sent at once when nothing was sent in the last ``SOON`` seconds
    (so ``print`` then a long computation shows at once); otherwise it waits
    for the flusher thread (50 ms) or for ``BATCH`` characters to gather, so a
    cell printing a million short lines costs a few hundred messages, not a
    million.  Messages are cut at ``CHUNK`` characters, so the kernel never has
    to hold one huge string to find out it is over its output limit.
    """

    SOON = 0.02
    BATCH = 64 * 1024
    CHUNK = 1024 * 1024

    def __init__(self, chan: Channel) -> None:
        self._chan = chan
        self._parts: list[tuple[str, list[str]]] = []
        self._size = 0
        self._last = 0.0
        # Reentrant: a signal handler in the cell may print while the main thread is here.
        self._lock = threading.RLock()
        self._direct = False

    def forked(self) -> None:
        """In a child the cell forked (os.fork, multiprocessing): write straight to the pipes.

        The child shares the channel with the worker (its frames could interleave
        with the worker's) and has no flusher thread (text left pending would be
        lost at ``os._exit``), so each write goes to file descriptor 1 or 2 at
        once, which the kernel reads as the cell's output too.
        """
        self._lock = threading.RLock()  # another thread may have held it at the fork
        self._parts, self._size = [], 0
        if isinstance(self._chan, _WorkerChannel):
            self._chan._held = []  # the worker's phases: the worker sends them, not this child
        self._direct = True

    def write(self, name: str, text: str) -> None:
        if self._direct:
            data = text.encode("utf-8", "replace")
            fd = 1 if name == "stdout" else 2
            try:
                while data:
                    data = data[os.write(fd, data) :]
            except OSError:
                pass
            return
        with self._lock:
            if self._parts and self._parts[-1][0] == name:
                self._parts[-1][1].append(text)
            else:
                self._parts.append((name, [text]))
            self._size += len(text)
            due = self._size >= self.BATCH or (
                "\n" in text and time.monotonic() - self._last >= self.SOON
            )
            if due:
                self.flush()

    def flush(self, soon: bool = False) -> None:
        """Send the pending text; with ``soon``, leave it to the flusher if we sent just now."""
        with self._lock:
            if not self._parts:
                return
            if soon and time.monotonic() - self._last < self.SOON:
                return
            parts, self._parts, self._size = self._parts, [], 0
            self._last = time.monotonic()
            for name, pieces in parts:
                text = "".join(pieces)
                for start in range(0, len(text), self.CHUNK):
                    try:
                        self._chan.send(MSG_STREAM, (name, text[start : start + self.CHUNK]))
                    except OSError:
                        return


class _Stream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of the worker: text goes to the kernel as it is written.

    Both streams share one :class:`_Output`, so stdout and stderr text keep
    their relative order; a partial line (a progress bar) is sent by a flusher
    thread within 50 ms, so output is live without one message per ``write``
    call.  ``fileno()`` is the real descriptor, whose pipe the kernel also
    reads, so subprocesses given ``sys.stdout`` still reach the cell.
    """

    def __init__(self, name: str, output: _Output, fd: int) -> None:
        self.name_ = name
        self._output = output
        self._fd = fd
        self.flusher: _LazyFlusher | None = None

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fd

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if text:
            self._output.write(self.name_, text)
            if self.flusher is not None and not self.flusher.started:
                self.flusher.ensure()
        return len(text)

    def flush(self) -> None:
        # print(..., flush=True) in a loop must not mean one message per line; the
        # text still arrives within 50 ms, and before any display or result.
        self._output.flush(soon=True)


def _watch_parent(chan: Channel, kernel_pid: int | None) -> None:
    """Kill everything the cell started and exit, the moment the kernel is gone.

    Two signs, whichever comes first: the kernel's end of the channel closes
    (EOF), or the kernel process exits (a ``pidfd``, which also works when
    the kernel process forked and a child of it still holds the channel open,
    or when the worker's parent is not the kernel itself).  Without pidfds the
    parent pid is polled instead.
    """
    import select

    parent = os.getppid()
    pidfd = None
    if kernel_pid and hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(kernel_pid)
        except ProcessLookupError:
            pidfd = -1  # the kernel is gone already
        except OSError:
            pidfd = None
    # Phases held back for the next message go out by this time at the latest (see hold_until).
    flush_at: float | None = getattr(chan, "hold_until", None)
    tail = b""  # the start of an answer to an ask, the rest still on its way
    try:
        while pidfd != -1:
            watched = [chan.sock] + ([pidfd] if pidfd is not None else [])
            timeout = 0.25 if pidfd is None else None
            if flush_at is not None:
                left = max(0.0, flush_at - time.monotonic())
                timeout = left if timeout is None else min(timeout, left)
            ready, _, _ = select.select(watched, [], [], timeout)
            if flush_at is not None and time.monotonic() >= flush_at:
                flush_at = None
                chan.send_held()  # type: ignore[attr-defined]
            if pidfd is not None and pidfd in ready:
                break
            if chan.sock in ready:
                answer = chan.sock.recv(4096)
                if not answer:
                    break
                # One raw byte each (whether it took a result, let go), and answers to asks.
                tail = read_answers(tail + answer, _answers.put, lambda ok, text: _replies.put((ok, text)))
            if pidfd is None and os.getppid() != parent:
                break
    except OSError:
        pass
    try:
        # The cell's thread may still be starting processes while this one kills:
        # repeat until a round finds none (bounded), so a late one is caught too.
        proctree.kill_own_descendants_until_quiet()
    finally:
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os._exit(70)


def _limit_memory(limit: int | None) -> None:
    """Apply ``--mem``: cap the memory the worker (and each process it starts) may allocate.

    On Linux this is ``RLIMIT_DATA``: heap, anonymous mappings and thread
    stacks, i.e. what the cell allocates, but not shared libraries or address
    space merely reserved, so ``import numpy`` costs ~90 MB of it rather than
    the ~140 MB of address space it maps.  Elsewhere ``RLIMIT_AS``.  Both the
    soft and hard limits are set, so the cell cannot lift its own cap.  Going
    over it makes allocations fail: Python raises ``MemoryError``, which the
    kernel reports naming the limit.
    """
    if not limit:
        return
    import resource

    which = resource.RLIMIT_DATA if sys.platform.startswith("linux") else resource.RLIMIT_AS
    limit = int(limit)
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(which, (limit, limit))


def _flusher(streams: list[_Stream], stop: threading.Event) -> None:
    while not stop.wait(0.05):
        for stream in streams:
            stream.flush()


class _LazyFlusher:
    """Starts the flusher thread at the cell's first write: a cell that prints nothing
    (most fast cells) does not pay for starting a thread."""

    def __init__(self, streams: list[_Stream]) -> None:
        self.streams = streams
        self.stop = threading.Event()
        self.started = False
        self._lock = threading.Lock()

    def ensure(self) -> None:
        # Never blocks: a signal handler that prints while the thread is being started
        # must not wait on its own lock.
        if self.started or not self._lock.acquire(blocking=False):
            return
        try:
            if not self.started:
                self.started = True
                threading.Thread(
                    target=_flusher, args=(self.streams, self.stop), daemon=True, name="flusher"
                ).start()
        finally:
            self._lock.release()


_libc: Any = None


def _c_library() -> Any:
    """The C library, loaded once (the worker calls into it two or three times per cell)."""
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _become_subreaper() -> None:
    """Keep double-forked descendants in our tree, so the kernel can find and stop them."""
    if sys.platform.startswith("linux"):
        try:
            _c_library().prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        except Exception:
            pass


def _flush_c_stdio() -> None:
    try:
        _c_library().fflush(None)
    except Exception:
        pass


def _mark_pipes(token: str | None) -> dict[str, bool]:
    """Write the job's sync mark on fd 1 and 2, after everything the worker itself wrote there.

    A pipe keeps order, so when the kernel has read the mark it has read all
    the worker's C-level output before it, and can hand the result over at once
    instead of waiting a while for stragglers.  Returns which marks went out
    (a cell may have closed its descriptors).
    """
    _flush_c_stdio()
    marked = {"stdout": False, "stderr": False}
    if not token:
        return marked
    mark = sync_mark(token)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if _unread(fd) == 0:
            continue  # the kernel has read all of it already: a mark would only wake it
        try:
            marked[name] = os.write(fd, mark) == len(mark)
        except OSError:
            pass
    return marked


def _unread(fd: int) -> int | None:
    """Bytes written to pipe ``fd`` and not read yet (``FIONREAD`` works on either end); None if unknown.

    Most cells write nothing below Python (their prints travel on the
    channel), so the pipes are empty when the cell ends; the kernel, which
    reads them in the thread that takes the result, has then seen all of it.
    """
    if fcntl is None:
        return None
    try:
        return int.from_bytes(fcntl.ioctl(fd, _FIONREAD, b"\0\0\0\0"), sys.byteorder, signed=True)
    except (OSError, ValueError):
        return None


# IPython's colours for tracebacks (its default "Neutral"/"Linux" schemes agree on these).
_RED, _GREEN, _CYAN, _BOLD, _RESET = "\x1b[31m", "\x1b[32m", "\x1b[36m", "\x1b[1m", "\x1b[0m"
_CONTEXT = 2  # lines shown before the line that raised, as IPython does
_OWN_FILES = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _cell_traceback(
    exc: BaseException, filename: str, label: str | None = None, cells: dict[str, str] | None = None
) -> str:
    """The cell's traceback as IPython shows an ordinary cell's, without IPython.

    From the cell's first frame on (the worker's own frames are noise); the
    cell's frames are named like IPython names a cell (``Cell In[n], line k``),
    and so are those of notebook functions defined in other cells (``cells``:
    their file names, as the kernel's IPython names them), with a few lines of
    context and an arrow, other files as ``File path:line, in func()``; chained
    exceptions come first, as in Python.
    """
    label = label or filename
    cells = cells or {}
    parts: list[str] = []
    seen: set[int] = set()

    def one(err: BaseException) -> None:
        seen.add(id(err))
        cause, context = err.__cause__, err.__context__
        if cause is not None and id(cause) not in seen:
            one(cause)
            parts.append("\nThe above exception was the direct cause of the following exception:\n")
        elif context is not None and not err.__suppress_context__ and id(context) not in seen:
            one(context)
            parts.append("\nDuring handling of the above exception, another exception occurred:\n")
        parts.append(_one_traceback(err, filename, label, cells))

    one(exc)
    return "\n".join(parts)


_naming: tuple[str, str | None, dict[str, str] | None] | None = None
"""The running cell's file name, label and the notebook cells' labels (:func:`_cell_traceback`)."""


def shown_traceback(exc: BaseException) -> str:
    """``exc``'s traceback as the cell's own error's would show (for an exception the cell's code
    shows and goes on, as ``with out:`` does)."""
    if _naming is None:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return _cell_traceback(exc, *_naming)


def _one_traceback(exc: BaseException, filename: str, label: str, cells: dict[str, str]) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    frames = [  # nbisolate's own frames (input() refused, say) are not the user's business
        frame
        for frame in traceback.extract_tb(tb or exc.__traceback__)
        if not frame.filename.startswith(_OWN_FILES)
    ]
    name = type(exc).__name__
    out = [
        f"{_RED}{'-' * 75}{_RESET}",
        f"{_RED}{name}{_RESET}{' ' * max(1, 42 - len(name))}Traceback (most recent call last)",
    ]
    for frame in frames:
        lineno = frame.lineno or 0
        if frame.filename == filename:  # (a function of the cell's own is named, as IPython does)
            inside = "" if frame.name == "<module>" else f", in {_CYAN}{frame.name}(){_RESET}"
            out.append(f"{_CYAN}{label}{_RESET}, line {lineno}{inside}")
        elif frame.filename in cells:
            out.append(f"{_CYAN}{cells[frame.filename]}{_RESET}, line {lineno}, in {_CYAN}{frame.name}(){_RESET}")
        else:
            out.append(
                f"File {_GREEN}{frame.filename}:{lineno}{_RESET}, in {_CYAN}{frame.name}(){_RESET}"
            )
        first = max(1, lineno - _CONTEXT)
        width = len(str(lineno))
        for number in range(first, lineno + 1):
            text = linecache.getline(frame.filename, number).rstrip("\n")
            if number == lineno:
                out.append(f"{_GREEN}---> {number:>{width}}{_RESET} {text}")
            elif text.strip():
                out.append(f"     {_GREEN}{number:>{width}}{_RESET} {text}")
        out.append("")
    message = "".join(traceback.format_exception_only(type(exc), exc)).rstrip("\n")
    head, sep, rest = message.partition(":")
    out.append(f"{_RED}{head}{_RESET}{sep}{rest}" if sep else f"{_RED}{message}{_RESET}")
    return "\n".join(out)


def _compile_cell(
    source: str, filename: str, offset: int, has_result: bool
) -> tuple[types.CodeType, types.CodeType | None]:
    """Compile the cell, and its last expression separately when it has a value to show.

    Compiling from text, not from the AST, keeps CPython's own (much deeper)
    limits for long expressions; blank lines in front shift the line numbers
    so tracebacks match the lines the user sees in the notebook cell.
    """
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    pad = "\n" * offset
    tree = ast.parse(source, filename=filename)
    last = tree.body[-1] if has_result and tree.body else None
    if not isinstance(last, ast.Expr):
        return compile(pad + source, filename, "exec", flags=flags), None
    lines = source.splitlines(True)
    line = lines[last.lineno - 1]
    cut = len(line.encode("utf-8")[: last.col_offset].decode("utf-8", "replace"))
    head = "".join(lines[: last.lineno - 1]) + line[:cut]
    rest = line[cut:] + "".join(lines[last.lineno :])
    body = compile(pad + head, filename, "exec", flags=flags)
    tail_pad = "\n" * (offset + last.lineno - 1)
    return body, compile(tail_pad + rest.strip(), filename, "eval", flags=flags)




def compile_job(job: dict[str, Any]) -> tuple[types.CodeType, types.CodeType | None]:
    """A job's cell, compiled as :func:`_run` runs it (a sweep's leader does it once for all values)."""
    return _compile_cell(job["source"], job["filename"], job.get("line_offset", 0), job["has_result"])


def _fit_result(
    values: dict[str, Any],
    shipped: Any,
    max_result: int | None,
    main: dict[str, Any] | None = None,
    shared: list[Any] | None = None,
) -> tuple[Any, set[str]]:
    """Leave out the largest results until the rest fits the limit; returns the names left out.

    The limit is ``max_result`` (``CellRun(max_result=...)``) and, for a large
    shipment, the memory the machine has available: the kernel needs that much
    to receive it, and a kernel pushed into the out-of-memory killer is the one
    outcome worse than a missing result.  Left-out names are reported like
    results that cannot be pickled: the others still arrive.
    """
    from . import ship

    limits: list[tuple[int, str]] = []
    if max_result:
        why = f"over the result limit of {format_bytes(max_result)} (max_result)"
        limits.append((int(max_result), why))
    if shipped.nbytes > _CHECK_AVAILABLE_ABOVE:
        available = ship.available_memory()
        if available is not None:
            why = f"more than the {format_bytes(available)} of memory the machine has available"
            limits.append((available, why))
    if not limits:
        return shipped, set()
    limit, why = min(limits)
    left_out: set[str] = set()
    while shipped.nbytes > limit and shipped.names:
        total = shipped.nbytes
        name = max(shipped.names, key=lambda n: shipped.sizes.get(n, 0))
        left_out.add(name)
        skipped = dict(shipped.skipped)
        size = format_bytes(shipped.sizes.get(name, 0))
        skipped[name] = f"its {size} (of {format_bytes(total)} in all) is {why}"
        rest = {n: v for n, v in values.items() if n in shipped.names and n != name}
        shipped = ship.dumps(rest, skip_failures=True, main=main, returning=True, shared=shared or ())
        shipped.skipped = {**skipped, **shipped.skipped}
    return shipped, left_out


def _run(
    chan: Channel,
    job: dict[str, Any],
    buffers: list[bytearray],
    main: types.ModuleType | None = None,
    compiled: tuple[types.CodeType, types.CodeType | None] | None = None,
) -> None:
    global _stage
    from . import attributes, inplace, openfiles, rng, settings, ship

    t0 = time.perf_counter()
    os.chdir(job["cwd"])
    sys.path[:] = job["sys_path"]
    if "argv" in job:  # the kernel's: code that reads its arguments finds what it would there
        sys.argv = list(job["argv"])
    if main is None:  # else a sweep leader's __main__, its shared inputs loaded, no cell run
        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = builtins  # the module, as in a notebook's __main__
    sys.modules["__main__"] = main
    ns = main.__dict__
    for hook in job.get("startup", ()):
        __import__(hook)
    if job.get("waited"):  # the kernel waits on this cell: it asks the front end, shows the widgets
        _let_ask(chan)
        display_worker.relay_widgets()
    # Small inputs load at once: the kernel hears of the start and load with the next message.
    small = not buffers and not job.get("shared") and len(job["data"]) < _HOLD_BELOW
    chan.phase("start", time.perf_counter() - t0, hold=small)  # type: ignore[attr-defined]

    t1 = time.perf_counter()
    # The notebook's recursion limit, logging, NumPy's settings..., before the inputs load: a deep
    # input needs the recursion limit to be rebuilt, as it did to be built. (Its warning filters
    # hold around the cell's own code only: see below.)
    try:
        settings.restore(job.get("settings"))
    except Exception:  # a setting this process cannot take: its own stays, the cell still runs
        pass
    shared = job.get("shared")
    if shared:  # inputs serialized once for a whole sweep: first, with the first buffers
        count = shared["buffers"]
        ns.update(ship.loads(shared["inputs"], shared["data"], buffers[:count], shared["engine"], ns))
        buffers = buffers[count:]
    known = set(ns)
    ns.update(ship.loads(job["inputs"], job["data"], buffers, job["engine"], ns))
    del buffers
    # The inputs as they arrived: a result that is or holds one the cell left as it was goes back
    # as the notebook's own object (y = data, pair = (data, 1)), where the notebook still has it.
    # (Only where they are watched: an input changed unseen would come back as the unchanged one.)
    arrived = _as_arrived(ns, job["inputs"]) if job.get("waited") and job.get("watch") is not None else {}
    watch = job.get("watch")
    if watch is not None:  # and what the inputs' functions brought along: they may change it
        inputs = set(job["inputs"])
        brought = [name for name in ns if name not in known and name not in inputs and not _dunder(name)]
        watch = [*watch, *inplace.brought_along(ns, brought)] if brought else watch
    watched = inplace.snapshot(ns, watch or ())
    written = {name: ns[name] for name in job.get("written", ()) if name in ns}  # too large to watch
    inside = {name: inplace.identities(obj) for name, (obj, _) in watched.items()}  # what stays inside
    # And what the notebook functions among the inputs keep: defaults (seen=[]), closures.
    kept = inplace.watch_functions(ns, job["inputs"]) if watch is not None else {}
    rng.restore(job.get("rng"), lazily=True)
    if job.get("patches"):  # what the notebook set on its modules, set on the worker's
        attributes.patch(_patch_loaders(job["patches"], ns))
    chan.phase("load", time.perf_counter() - t1, hold=small)  # type: ignore[attr-defined]

    global _naming
    filename = job["filename"]
    _naming = (filename, job.get("cell_label"), job.get("cell_labels"))
    shown = job.get("display_source", job["source"])
    linecache.cache[filename] = (len(shown), None, shown.splitlines(True), filename)
    body, tail = compiled or compile_job(job)
    if "get_ipython" in job["source"]:  # IPython lines (!ls, %time), turned into calls
        from . import worker_shell

        worker_shell.install(ns, micro=job.get("micro"))

    # What the namespace holds as the cell starts: a name its text does not show it binds
    # (exec, globals()[...], ``from m import *``) is found bound, rebound or gone at its end.
    before = dict(ns) if job.get("discover") else None
    shared_attributes = attributes.watch(ns, job.get("attributes") or ())  # config.LR = 0.1 comes back
    classes = attributes.watch_classes(ns, job.get("classes") or {})  # and what methods set on their class
    environ = settings.environment() if job.get("settings_back") else None  # what it changes comes back
    threads = {thread.ident for thread in threading.enumerate()}  # those it starts are told apart
    t2 = time.perf_counter()
    value = None
    _stage = "run"
    pools.arm()
    try:
        with settings.cell_filters(job.get("settings")) as filters:  # the notebook's, for its code alone
            value = _execute(body, ns)
            if tail is not None:
                value = _execute(tail, ns)
    except BaseException as exc:  # the cell's exception, including KeyboardInterrupt
        pools.disarm(exc)
        if isinstance(exc, SystemExit):
            raise
        if not isinstance(exc, KeyboardInterrupt):
            display_worker.end_of_cell()  # figures left open show even when the cell failed
        _say_running_threads(threads, {})
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        files = openfiles.settle()  # what it wrote before it failed stays written, as in a cell
        shipped = ship.dumps({"exc": exc}, skip_failures=True, main=ns, returning=True)
        marked = _mark_pipes(job.get("sync"))
        body = error_body(
            exc,
            traceback=_cell_traceback(exc, filename, job.get("cell_label"), job.get("cell_labels")),
            names=shipped.names,
            data=shipped.data,
            engine=shipped.engine,
            seconds=time.perf_counter() - t2,
            marked=marked,
        )
        if files:
            body["files"] = files
        chan.send(MSG_ERROR, body, shipped.buffers)
        return
    pools.disarm()
    display_worker.end_of_cell()  # show open figures (and close them, so none travels back live)
    run_seconds = time.perf_counter() - t2
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    # (C-level output is flushed with the marks, after the results are serialized.)
    # Results that take no time to serialize: the kernel hears of the run's end with them.
    chan.phase("run", run_seconds, hold=_quick_to_send(ns, job["outputs"], value))  # type: ignore[attr-defined]

    t3 = time.perf_counter()
    _stage = "return"
    files = openfiles.settle()  # the notebook's open files: flushed, and where they stand now
    out = {name: ns[name] for name in job["outputs"] if name in ns}
    gone = _discover(ns, before, out) if before is not None else []
    set_on_shared, deleted_attributes, attributes_in_place = attributes.changed(ns, shared_attributes)
    if classes[0]:
        on_classes, deleted_on_classes, in_place_on_classes = attributes.classes_changed(ns, classes)
        set_on_shared.update(on_classes)
        deleted_attributes += deleted_on_classes
        attributes_in_place += in_place_on_classes
    out.update(set_on_shared)
    mutated, same = inplace.changed(ns, watched)
    mutated += [name for name, obj in written.items() if ns.get(name) is obj]  # arr[0] = 5 on 400 MB
    for name in [n for n in same if inside.get(n) is not None and inplace.moved(ns[n], inside[n])]:
        same.remove(name)  # equal again, but other objects inside: slots["x"] = Model()
        mutated.append(name)
    kept_inside = {name: inplace.same_objects(ns[name], inside[name]) for name in mutated if inside.get(name)}
    for name in same:  # still the notebook's object, unchanged: it keeps its own
        out.pop(name, None)
    for name in mutated:
        out[name] = ns[name]
    if kept:
        out.update(inplace.functions_changed(ns, kept))
    bundle = None
    if tail is not None and value is not None:
        out[RESULT] = value
    behind = pools.left_behind(out)
    for name in behind:
        del out[name]
    out.update(display_worker.widget_handlers())  # last: the widgets they name come back first
    kept, shared = _kept_inputs(ns, arrived, mutated, same, job["outputs"])
    shipped = ship.dumps(out, skip_failures=True, main=ns, returning=True, shared=shared)
    shipped, too_big = _fit_result(out, shipped, job.get("max_result"), ns, shared)
    _say_running_threads(threads, {name: ns.get(name) for name in behind})
    if RESULT in shipped.skipped and RESULT not in too_big:
        bundle = display_worker.result_bundle(value)  # the kernel's formatter, or _fallback_bundle
        shipped.skipped.pop(RESULT)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    marked = _mark_pipes(job.get("sync"))
    body = {
        "marked": marked,
        "names": shipped.names,
        "data": shipped.data,
        "engine": shipped.engine,
        "sizes": shipped.sizes,
        "starts": shipped.starts,
        "skipped": shipped.skipped,
        "left": behind,
        "mutated": [name for name in (*mutated, *attributes_in_place) if name in shipped.names],
        "unchanged": same,
        "inside": {name: pairs for name, pairs in kept_inside.items() if pairs and name in shipped.names},
        "deleted": [name for name in job.get("deletes", ()) if name not in ns] + gone + deleted_attributes,
        "rng": rng.changed_since(job.get("rng")),
        "settings": None if environ is None else settings.left_by_cell(job, environ, filters.left),
        "result_bundle": bundle,
        "files": files,
        "dump_seconds": time.perf_counter() - t3,
    }
    if kept:
        body["kept"] = kept
    _send_result(chan, body, shipped.buffers, ship)


_ATOMS = (int, float, bool, complex, type(None))
"""Written whole by the pickler wherever they are (never memo references): nothing to keep."""


def _as_arrived(ns: dict[str, Any], inputs: list[str]) -> dict[str, Any]:
    """Each input's object as it arrived, held weakly where it can be (a cell that deletes a large
    input to make room frees it, as it would in the notebook), else itself (a list, a dict)."""
    arrived: dict[str, Any] = {}
    for name in inputs:
        if name in ns:
            obj = ns[name]
            try:
                arrived[name] = (weakref.ref(obj), None)
            except TypeError:
                arrived[name] = (None, obj)
    return arrived


def _kept_inputs(
    ns: dict[str, Any], arrived: dict[str, Any], mutated: list[str], same: list[str], outputs: list[str]
) -> tuple[list[str], list[Any]]:
    """The inputs whose objects go back as references to the notebook's own, and those objects:
    still bound to the object that arrived, not changed by the cell (a changed one goes back
    whole, and the notebook's object takes the change), one name for each object. Not a large
    input (too large to watch) that the cell binds again under its own name (``rows.append(x)``
    then ``rows = rows``): it asks for it back as it is now."""
    kept: list[str] = []
    objects: list[Any] = []
    seen: set[int] = set()
    changed, unchanged, bound = set(mutated), set(same), set(outputs)
    for name, (ref, strong) in arrived.items():
        obj = ref() if ref is not None else strong
        if obj is None or name in changed or ns.get(name) is not obj or type(obj) in _ATOMS or id(obj) in seen:
            continue
        if name in bound and name not in unchanged:
            continue
        seen.add(id(obj))
        kept.append(name)
        objects.append(obj)
    return kept, objects


def _say_running_threads(before: set[int | None], bound: dict[str, Any]) -> None:
    """Say which threads the cell started to run the notebook's code are still running.

    In the notebook such a thread runs on after its cell; here it stops with the
    worker process, and what it would have done from then on (append to a list,
    write a file) silently never happens.  Threads of libraries (an executor's
    idle workers, a progress bar's monitor) are not the cell's work and are not
    named.  ``bound``: the results that stayed behind, by name (a thread among
    them is named by its variable too).
    """
    names = {id(value): name for name, value in bound.items()}
    for thread in threading.enumerate():
        if thread.ident in before or not thread.is_alive():
            continue
        target = getattr(thread, "_target", None)
        code = getattr(target, "func", target) if target is not None else type(thread).run
        if getattr(code, "__module__", None) != "__main__":
            continue
        what = f" to run {getattr(code, '__qualname__', 'its code')}()" if target is not None else ""
        called = f" ({names[id(thread)]})" if id(thread) in names else ""
        sys.stderr.write(
            f"nbisolate: thread {thread.name!r}{called}, which the cell started{what}, was still running when "
            "the cell ended: it stopped with the worker process, so nothing it would have done from "
            "then on happens. Wait for it in the cell (its .join()), or run the cell without "
            "%%isolate to let it run on.\n"
        )


def _patch_loaders(patches: list[Any], ns: dict[str, Any]) -> list[tuple[Any, Any]]:
    """The job's patches (:meth:`nbisolate.runner.CellRun._patches`) as :func:`nbisolate.attributes.patch`
    takes them: each value is loaded only when its module is imported, on the cell's ``__main__``."""
    from . import ship

    def loader(data: bytes, engine: str) -> Any:
        return lambda: ship.loads(["value"], data, [], engine, ns)["value"]

    return [((module, qualname, name), None if data is None else loader(data, engine))
            for module, qualname, name, data, engine in patches]


def _discover(ns: dict[str, Any], before: dict[str, Any], out: dict[str, Any]) -> list[str]:
    """Names the cell bound, rebound or deleted at run time, unseen in its text: added to
    ``out`` (to come back); the deleted are returned (to go from the notebook too).

    An ordinary cell's ``exec("y = 5")``, ``globals()["z"] = 1`` or ``from math import *``
    binds in the notebook; the plan reads the text and cannot know.  Python's own names
    (``__builtins__``, ``__name__``) are never the cell's results.
    """
    for name, value in ns.items():
        if name not in out and not _dunder(name) and (name not in before or before[name] is not value):
            out[name] = value
    return [name for name in before if name not in ns and not _dunder(name)]


def _dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


_answers: queue.SimpleQueue[bytes] = queue.SimpleQueue()
"""Bytes the kernel wrote on the channel after ``run``: its answers to a result it pulls."""

_PULL_ABOVE = 1 << 20
"""Results whose buffers add up to this or more are read by the kernel from this process."""


def _send_result(chan: Channel, body: dict[str, Any], buffers: list[Any], ship: Any) -> None:
    """Send the results; large buffers are copied by the kernel straight out of this process.

    The message then carries where the buffers are (``body["pull"]``) instead
    of the buffers, and this process keeps them untouched until the kernel
    answers (:data:`nbisolate.ship.PULL_TAKEN`, read by the watchdog thread,
    which owns the channel's incoming side). If it could not read them
    (:data:`~nbisolate.ship.PULL_RESEND`), they go with the message after all.
    Why this is faster, see :func:`nbisolate.ship.pull`.
    """
    spans = None
    if sum(memoryview(b).nbytes for b in buffers) >= _PULL_ABOVE:
        spans = ship.pull_spans(buffers)
    if spans is not None:
        chan.send(MSG_RESULT, dict(body, pull={"spans": spans}))
        answer = b""
        while answer not in (ship.PULL_TAKEN, ship.PULL_RESEND):
            try:
                answer = _answers.get(timeout=0.5)
            except queue.Empty:
                continue
        if answer == ship.PULL_TAKEN:
            return
    chan.send(MSG_RESULT, body, buffers)


_HOLD_BELOW = 64 * 1024
"""Inputs whose pickle is smaller than this (and that have no buffers) load at once."""
_QUICK_TYPES = frozenset({int, float, complex, bool, type(None)})


def _quick_to_send(ns: dict[str, Any], outputs: list[str], value: Any) -> bool:
    """Whether the cell's results serialize at once: numbers, None, short strings and bytes."""
    for item in (*(ns.get(name) for name in outputs), value):
        kind = type(item)
        if kind in _QUICK_TYPES:
            continue
        if kind in (str, bytes) and len(item) < 4096:
            continue
        return False
    return True


def _execute(code: types.CodeType, ns: dict[str, Any]) -> Any:
    result = eval(code, ns)
    if code.co_flags & 0x80:  # CO_COROUTINE: the cell used top-level await
        import asyncio

        result = asyncio.run(_await(result))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


class _Watchdog:
    """The watchdog thread, started before the job is known and armed when it arrives.

    Starting a thread costs a fresh process most of a millisecond (its stack,
    the first page faults, the handshake with the new thread); a spare worker
    pays it while it waits for its cell (:func:`prepare`), and the job only
    hands over the channel and the kernel's pid.
    """

    def __init__(self) -> None:
        self._args: tuple[Channel, int | None] | None = None
        self._go = threading.Lock()
        self._go.acquire()
        threading.Thread(target=self._wait, daemon=True, name="watch-parent").start()

    def _wait(self) -> None:
        self._go.acquire()
        assert self._args is not None
        _watch_parent(*self._args)

    def arm(self, chan: Channel, kernel_pid: int | None) -> None:
        self._args = (chan, kernel_pid)
        self._go.release()


_watchdog: _Watchdog | None = None


def prepare() -> None:
    """Everything a worker does before it knows its cell; once per process.

    A spare worker (:mod:`nbisolate.template`) calls this while it waits for
    its job, so none of it is on a cell's path: becoming the subreaper of its
    tree, refusing stdin, the cell's process-pool hooks, and the watchdog
    thread, which waits until the job names the channel and the kernel.  None
    of it runs code of any cell.
    """
    global _watchdog
    if _watchdog is not None:
        return
    _become_subreaper()
    sys.stdin = _NoStdin()
    pools.install()  # the cell's own process pools: by value, and children that report
    display_worker.prepare()  # display(), plots, widgets: all but the channel
    _watchdog = _Watchdog()


named_after_spare: str | None = None
"""The name a spare worker had before it was one (it takes it back when its cell arrives)."""


def _rename(name: str) -> None:
    """Set this process's name (``/proc/PID/comm``, Linux)."""
    try:
        _c_library().prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except Exception:
        pass


def set_environ(env: dict[str, str]) -> None:
    """Make ``os.environ`` exactly ``env`` (the kernel's), before anything of the cell runs.

    Only what differs: a putenv or unsetenv per variable, for the hundred that
    are usually the same, cost a millisecond of every worker's start.
    """
    current = os.environ
    for key in [k for k in current if k not in env]:
        del current[key]
    for key, value in env.items():
        if current.get(key) != value:
            current[key] = value


def import_run_path() -> None:
    """Import every module a cell's run needs (:func:`_run` imports them where it uses them).

    Called once by each process that forks workers, the template and a sweep's
    leader, so that no forked worker imports one again: an import is a file
    read, and a compile too where no bytecode is cached (``PYTHONDONTWRITEBYTECODE``),
    about 5 ms for one module, which a sweep of a thousand values would pay a
    thousand times.
    """
    import getpass  # noqa: F401  (a cell that asks for a password finds it replaced: _let_ask)

    from . import attributes, inplace, openfiles, rng, settings, ship  # noqa: F401


def preimport() -> None:
    """Import what every worker would import at its start; called by the template.

    With ``multiprocess`` preloaded (the notebook uses it), the pool hooks of
    :func:`prepare` import its ``spawn`` module in each worker: a millisecond
    of a fresh fork's time, and a fraction of it once in the template.  With
    pyplot preloaded, each worker switches it to the Agg backend and a figure
    is drawn through PIL; with IPython, each sets up IPython's display formatter.
    """
    if "multiprocess" in sys.modules:
        try:
            import multiprocess.spawn  # noqa: F401
        except Exception:
            pass  # the worker's hooks meet the same error, and report it there
    if "matplotlib.pyplot" in sys.modules:  # each worker switches pyplot to Agg (display_worker)
        try:
            import matplotlib.backends.backend_agg  # noqa: F401
            import PIL.Image

            PIL.Image.preinit()  # the image plugins a figure's first PNG would import
        except Exception:
            pass
    if "IPython.core.formatters" in sys.modules:  # a worker's display formatter needs it
        try:
            import IPython.core.pylabtools  # noqa: F401
        except Exception:
            pass


def rehearse() -> None:
    """Take a trivial cell's steps once, on a value of our own, before any cell arrives.

    A forked process pays a page fault for every page of its parent's memory
    it first writes to, and merely using an object writes its reference
    count: the first serialization, compilation and message of a worker cost
    it far more than the next.  A spare worker (:mod:`nbisolate.template`)
    rehearses them while it waits, so its cell finds those pages its own.
    Nothing of any cell runs here, and nothing is kept.
    """
    from . import inplace, settings, ship

    scratch = _round_trip(0)
    watched = inplace.snapshot(scratch, ["_"])
    body, tail = _compile_cell("_ = 0\n_\n", "<nbisolate>", 0, True)
    eval(body, scratch)
    if tail is not None:
        eval(tail, scratch)
    inplace.changed(scratch, watched)
    _quick_to_send(scratch, ["_"], 0)
    out = {"_": scratch["_"]}
    pools.left_behind(out)
    _fit_result(out, ship.dumps(out, skip_failures=True, main=scratch, returning=True), None, scratch)
    _discover(scratch, dict(scratch), {})
    # What the cell changed of its process: NumPy's settings are read only when the kernel sent some.
    settings.left_by_cell({"settings": {"numpy": {}}, "cwd": os.getcwd(), "sys_path": list(sys.path)},
                          settings.environment(), None)
    output = _Output(None)  # type: ignore[arg-type]  # never written to: no channel needed
    _LazyFlusher([_Stream("stdout", output, 1), _Stream("stderr", output, 2)])
    _flush_c_stdio()
    _unread(1)
    old = _sigmask(signal.SIG_BLOCK, _WorkerChannel._BLOCK)
    _sigmask(signal.SIG_SETMASK, old)
    frame_bytes(MSG_PHASE, ("start", 0.0))
    error_body(ValueError("rehearsal"))


def _round_trip(value: Any) -> dict[str, Any]:
    """Send ``value`` out and back as a cell's input would travel, in a scratch ``__main__``
    of our own (returned, holding it as ``_``)."""
    from . import ship

    scratch: dict[str, Any] = types.ModuleType("__main__").__dict__
    scratch["__builtins__"] = builtins
    shipped = ship.dumps({"_": value}, skip_failures=True, main=scratch, returning=True)
    scratch.update(ship.loads(shipped.names, shipped.data, shipped.buffers, shipped.engine, scratch))
    return scratch


def _rehearse_numpy(np: Any) -> Any:
    from . import rng

    state = rng.capture()  # the notebook's random state is set here, then compared at the end
    rng.restore(state, lazily=True)
    rng.changed_since(state)
    values = np.arange(4.0)
    return (values * 2).sum(), values


def _rehearse_pandas(pd: Any) -> Any:
    frame = pd.DataFrame({"i": [1, 2], "f": [0.5, 1.5], "s": ["a", "b"]})
    return frame["i"].sum(), frame.sum(numeric_only=True), frame


_PACKAGE_REHEARSALS: dict[str, Callable[[Any], Any]] = {"numpy": _rehearse_numpy, "pandas": _rehearse_pandas}
"""The common steps of a cell that uses a preloaded package, on values of our own."""


def rehearse_packages(busy: Callable[[], bool]) -> None:
    """Take the common steps of cells that use the preloaded packages, as :func:`rehearse` does
    for every cell: making a small DataFrame and sending it back costs a fresh fork 3.3 ms of
    page faults, 0.5 ms once rehearsed.  Stops when ``busy()`` says a cell has come."""
    for name, steps in _PACKAGE_REHEARSALS.items():
        module = sys.modules.get(name)
        if module is None or busy():
            continue
        try:
            _round_trip(steps(module))
        except Exception:
            pass  # an unusual version: its cells take these steps themselves


_ready: Any = None
"""Room a spare made, and faulted in, for its cell's large inputs (a :class:`nbisolate.ship.Ready`)."""
READY_IDLE_SECONDS = 60.0
"""A spare that waited this long for its cell gives the room back: the notebook moved on."""


def get_ready(nbytes: int, chan_fd: int) -> None:
    """In a spare that holds its channel: make room for ``nbytes`` of inputs, faulted in ahead.

    The kernel asks for it when recent cells sent that much (``ready`` in the
    spare's job). The faults are taken a piece at a time until the cell
    arrives, so a cell never waits for more than one piece; what is not
    faulted in yet is still room, just slower to copy into. Given back if
    no cell comes for :data:`READY_IDLE_SECONDS`.
    """
    global _ready
    from . import ship

    try:
        _ready = ship.Ready(nbytes)
    except (OSError, ValueError, MemoryError):
        return
    while not select.select([chan_fd], [], [], 0)[0] and _ready.fault_some():
        pass
    if not select.select([chan_fd], [], [], READY_IDLE_SECONDS)[0]:
        _ready.release()
        _ready = None


def _borrow(chan: Channel, sizes: list[int]) -> list[Any]:
    """The inputs' large buffers, which the kernel kept: room made here, and the kernel copies them in.

    Before the watchdog owns the channel's incoming side, so the answer is
    read as a frame: ``placed``, or the buffers themselves when the kernel
    could not write into this process. No room here (``MemoryError``) asks
    for them the usual way, where the same shortage is reported as the
    inputs' error.
    """
    global _ready
    from . import ship

    ready, _ready = _ready, None
    try:
        views, spans = ship.room(sizes, ready)
    except MemoryError:
        views, spans = [], None
    try:
        chan.send(MSG_PLACE, {"spans": spans})
        kind, body, buffers = chan.recv()
    except (ChannelClosed, OSError):
        os._exit(0)  # the kernel went away before the cell could start
    if kind != MSG_INPUTS:
        os._exit(2)
    return views if body.get("placed") else buffers


def main(fd: int) -> None:
    """Entry point of a worker process; ``fd`` is the worker's end of the socketpair."""
    prepare()  # a no-op in a spare, which did it while waiting
    os.set_inheritable(fd, False)
    chan = _WorkerChannel(socket.socket(fileno=fd))
    try:
        kind, job, buffers = chan.recv()
    except ChannelClosed:
        os._exit(0)
    if kind != MSG_RUN:
        os._exit(2)
    if named_after_spare:  # a spare handed its channel before its cell: a worker from now on
        _rename(named_after_spare)
    if job.get("env") is not None:  # the kernel's environment, if the spare's is not it
        set_environ(job["env"])
    if "lend" in job:
        buffers = _borrow(chan, job.pop("lend")["sizes"])
    elif _ready is not None:  # room made for inputs this cell does not have: not the cell's to carry
        _ready.release()
    chan.hold_until = time.monotonic() + chan.HOLD_SECONDS
    assert _watchdog is not None
    _watchdog.arm(chan, job.get("kernel_pid"))
    if job.get("sweep") is not None:  # a sweep's leader: forks one child per value
        from . import sweep_leader

        sweep_leader.lead(chan, job, buffers)  # never returns
    serve(chan, job, buffers)


def serve(
    chan: _WorkerChannel,
    job: dict[str, Any],
    buffers: list[bytearray],
    main: types.ModuleType | None = None,
    compiled: tuple[types.CodeType, types.CodeType | None] | None = None,
) -> None:
    """Run one cell on an armed channel and exit (never returns): the one run path.

    A worker calls it with its job; a sweep leader's child (:mod:`nbisolate.sweep_leader`)
    with its value's job, the leader's ``main``, whose shared inputs are loaded, and the
    cell as the leader compiled it (from :func:`compile_job`), once for every value.
    A worker whose job asks it to linger exits once the kernel lets it go (:func:`_linger`).
    """
    output = _Output(chan)
    chan.output = output
    os.register_at_fork(after_in_child=output.forked)
    streams = [_Stream("stdout", output, 1), _Stream("stderr", output, 2)]
    sys.stdout, sys.stderr = streams
    display_worker.install(chan)  # display(), plots, widgets: before inputs load (they may import)
    flusher = _LazyFlusher(streams)
    for stream in streams:
        stream.flusher = flusher
    stop = flusher.stop
    code = 0
    try:
        _limit_memory(job.get("mem"))  # before the inputs load: they count against --mem
        _run(chan, job, buffers, main, compiled)
    except SystemExit as exc:
        # The cell called sys.exit(): the worker ends with that status, as a script would, and
        # the kernel raises SystemExit(arg) where the cell ran, as IPython shows it for an
        # ordinary cell ("An exception has occurred ... SystemExit: 3"); its argument goes
        # as itself when it is plain, else as its repr.
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        said: dict[str, Any] = {"code": repr(exc.code), "status": code}
        if exc.args:  # sys.exit() and sys.exit(None) read differently
            said["arg"] = exc.code if exc.code is None or isinstance(exc.code, (int, str)) else repr(exc.code)
        try:
            output.flush()
            chan.send(MSG_SYSEXIT, said)
        except OSError:
            pass
    except BaseException:
        # Our own failure (a bad input, an import error while loading inputs):
        # report it as the cell's error, so the kernel shows it instead of a crash.
        exc = sys.exc_info()[1]
        assert exc is not None
        try:
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            chan.send(MSG_ERROR, error_body(exc, traceback=text, stage=_stage))
        except OSError:
            code = CHANNEL_LOST  # the kernel could hear nothing: say so by the exit code
    stop.set()
    output.flush()
    _flush_c_stdio()
    # Nothing the cell started outlives it, even on success; resource trackers first clean up
    # the semaphores and shared memory the cell's multiprocessing registered.
    pools.end_of_cell()
    if main is None and chan.outcome_sent:  # a sweep's children go at once: their leader reaps them
        _linger(job.get("linger"))
    os._exit(code)


def _linger(seconds: float | None) -> None:
    """Wait, at most ``seconds``, for the kernel to let this worker go (:data:`~nbisolate.protocol.LET_GO`).

    The cell is over and nothing it started is left; only the exit is put off,
    until the kernel has replied to the cell (see ``LET_GO``).  A kernel that
    goes away meanwhile closes the channel, and the watchdog ends this process
    as it would at any other time.
    """
    if not seconds:
        return
    until = time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0:
        try:
            if _answers.get(timeout=left) == LET_GO:
                return
        except queue.Empty:
            return
