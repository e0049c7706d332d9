"""The template process: forks a brand-new worker for every cell in milliseconds.

Starting a Python interpreter and importing ``dill``, ``numpy`` and
``pandas`` costs hundreds of milliseconds; ``fork()`` of a process that has
already done it costs a few.  The kernel itself must never be forked (it has
threads, sockets and user state), so nbisolate starts one small *template*
process per kernel, from a clean interpreter, that imports what the notebook
uses and then does nothing but fork on request.  Each fork becomes exactly one
worker, runs exactly one cell and exits; the template never runs user code,
so nothing leaks from one cell to the next (the multiprocessing
``forkserver`` idea, applied per cell).

The template stays single-threaded so that forking it is safe: it starts no
threads, and imports only what the kernel asks for (the packages the
notebook itself imported), never anything that initializes a GPU.

Protocol, over a socketpair inherited from the kernel, in the frames of
:mod:`nbisolate.wire` (kinds listed in :data:`nbisolate.protocol.TEMPLATE_KINDS`):

* ``("fork", {"id": n, "env": ..., "fresh": bool, "cwd": ..., "ahead": bool}, fds=[channel, stdout, stderr])``
  (``env`` only when it changed since the previous fork: the template keeps the last one;
  ``ahead``: a sweep's worker, asked for without waiting and forked while other values
  run, which is forked directly and leaves the spare for the next cell)
  -> ``("forked", {"id": n, "pid": pid, "fresh": bool, "threads": name or None})``; with
  ``fresh`` the child execs a new interpreter.  The request's ``id`` comes back so
  the kernel matches each reply to its request: a reply that arrives after the
  kernel stopped waiting must never be taken for the next cell's worker.
* ``("preload", {"names": [...], "sys_path": [...]})`` ->
  ``("preloaded", {"errors": {name: error or None}, "threads": name or None})``
* ``("exit", (pid, returncode))`` is sent whenever a worker is reaped.

The template keeps one *spare*: a child forked ahead of time that waits on a
socket of its own for ``("job", <the fork request>, fds=[...])``, so a fork
request is answered by handing the spare its descriptors (no fork, and the
child's first steps already taken: :func:`nbisolate.worker.prepare` and
:func:`nbisolate.worker.rehearse`), and the next spare is forked while that
worker starts.  A spare has run no code of any cell; after a ``preload`` it is
dropped (it lacks the new imports) and a new one is forked.

The ``forked`` reply goes out before the worker gets its descriptors (a child
forked on the spot waits for a byte on a pipe): the kernel may have put the
cell in the channel already, and the kernel must know the worker before the
cell can run, since the cell may stop or kill this process.  It is written on
the worker's end of the channel as well, ahead of anything the worker sends,
so the kernel thread that reads the channel learns the pid from there.

Two rules keep forking safe whatever the preloaded packages do:

* A fork of a process with other threads inherits their locks held for ever,
  so once an import left a thread running (``threads`` names the package),
  every later fork execs a fresh interpreter in the child at once.
* A package may reset ``SIGCHLD`` or the wake-up descriptor at import; the
  handlers are re-armed after every preload, and exited workers are reaped at
  least once a second whatever the signals say, so exits are always reported.

When the kernel's end closes, the template kills the process groups of the
workers it still has and exits.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from .wire import frame_bytes, recv_frame, send_frame


def send(sock: socket.socket, kind: str, body: Any = None, fds: Sequence[int] = ()) -> None:
    """One control message, with file descriptors attached (SCM_RIGHTS) when given."""
    send_frame(sock, kind, body, fds=fds)


def recv(sock: socket.socket) -> tuple[str, Any, list[int]]:
    """One control message and the descriptors that came with it (``EOFError`` at the end)."""
    kind, body, _, fds = recv_frame(sock)
    return kind, body, fds


def _detach(control: socket.socket, wake_fds: tuple[int, int], others: Sequence[socket.socket]) -> None:
    """In a forked child: leave the template's session, signals and descriptors behind."""
    os.setsid()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    control.close()
    for sock in others:
        sock.close()
    for fd in wake_fds:
        os.close(fd)


def _child(
    control: socket.socket,
    wake_fds: tuple[int, int],
    fds: list[int],
    job: dict[str, Any],
    others: Sequence[socket.socket] = (),
    go: int | None = None,
) -> None:
    """In the forked child: become a clean worker and run one cell (never returns).

    With ``go``, it first waits until the template has told the kernel about it
    (a byte on that pipe; end of file means the template went, and the kernel
    never will hear of it: it runs nothing).
    """
    try:
        if go is not None:
            told = os.read(go, 1)
            os.close(go)
            if not told:
                os._exit(0)
        _detach(control, wake_fds, others)
        _become(fds, job)
    finally:
        os._exit(71)


def _spare(control: socket.socket, wake_fds: tuple[int, int], sock: socket.socket) -> None:
    """A worker forked ahead of its cell: it waits for its job (never returns).

    Forking, and a new process's first steps, cost milliseconds that a cell
    that runs for a few would wait for; the template keeps one such spare,
    forked from its imports as they are and having run no code of any cell,
    and hands it the next cell's descriptors (see :func:`main`).
    """
    try:
        _detach(control, wake_fds, ())
        name = _set_name(SPARE_NAME)
        from . import worker

        try:
            # The worker's own first steps, none of them a cell's, while nobody waits.
            worker.prepare()
            worker.rehearse()
        except Exception:
            pass  # the worker's main() tries again, and reports what fails
        try:
            kind, body, fds = recv(sock)
        except (EOFError, OSError):  # the template went, or dropped this spare
            os._exit(0)
        sock.close()
        if kind != "job":
            os._exit(0)
        if name:
            _set_name(name)
        _become(fds, body)
    finally:
        os._exit(71)


def _waiting(sock: socket.socket) -> bool:
    """Whether the spare at the other end of ``sock`` still waits for its job."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True  # nothing to read and not closed: it waits
    except OSError:
        return False


SPARE_NAME = "nbisolate-spare"
"""The process name (``/proc/PID/comm``) of a spare while it waits: it is no worker yet."""


def _set_name(name: str) -> str | None:
    """Set this process's name (Linux); returns the previous one, or None if unknown."""
    try:
        with open("/proc/self/comm") as f:
            previous = f.read().strip()
        from .worker import _c_library

        _c_library().prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
        return previous
    except Exception:
        return None


def _become(fds: list[int], job: dict[str, Any]) -> None:
    """Take the job's descriptors and environment, then run the worker (never returns)."""
    try:
        chan_fd, out_fd, err_fd = fds
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        for fd in (out_fd, err_fd):
            if fd > 2:
                os.close(fd)
        env = job.get("env")
        if env is not None:
            # Only what differs: a putenv or unsetenv per variable, for the hundred that
            # are usually the same, cost a millisecond of every worker's start.
            current = os.environ
            for key in [k for k in current if k not in env]:
                del current[key]
            for key, value in env.items():
                if current.get(key) != value:
                    current[key] = value
        if job.get("fresh"):
            # A fresh interpreter (a --mem cell must not start with the template's
            # imports), still the template's child: if the kernel dies while this
            # worker's main thread is stuck in C code, the template kills it.
            os.set_inheritable(chan_fd, True)
            if job.get("cwd"):
                os.chdir(job["cwd"])
            os.execv(sys.executable, [sys.executable, "-c", bootstrap("worker", chan_fd)])
        from .worker import main

        main(chan_fd)
    finally:
        os._exit(71)


def bootstrap(module: str, fd: int) -> str:
    """The ``-c`` code that starts ``nbisolate.<module>.main(fd)`` in a new interpreter."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return f"import sys; sys.path.insert(0, {root!r}); from nbisolate.{module} import main; main({fd})"


REAP_SECONDS = 1.0
"""Exited workers are reaped at least this often, even if ``SIGCHLD`` never arrives."""


def thread_count() -> int:
    """Threads of this process that run Python code (and so may hold Python locks).

    Thread pools of C libraries (OpenBLAS, MKL) are not counted: they install
    ``pthread_atfork`` handlers and are safe to fork; a Python thread holding a
    lock at the fork leaves it held for ever in the child.
    """
    return len(sys._current_frames())


def _arm(wake_w: int) -> None:
    """(Re)install the template's signal handling; an imported package may have changed it."""
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def main(fd: int) -> None:
    """Entry point of the template process."""
    os.set_inheritable(fd, False)
    control = socket.socket(fileno=fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    _arm(wake_w)
    children: set[int] = set()
    threads_by: str | None = None  # the preloaded package that left a thread running
    last_env: dict[str, str] | None = None  # the kernel's environment, as last sent
    # The worker imports these anyway; paying for them once here is the point.
    from . import inplace, proctree, rng, ship, wire, worker  # noqa: F401

    worker._c_library()  # the C library handle for prctl and fflush, inherited by every fork
    worker.preimport()

    # The spare worker (see _spare): its pid and our end of its socket. Spares that were
    # dropped unused (the imports changed) are reaped without a word to the kernel.
    spare: list[Any] = [None]
    unused: set[int] = set()

    def make_spare() -> None:
        if spare[0] is not None or threads_by is not None or thread_count() > 1:
            return
        ours, theirs = socket.socketpair()
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            return
        if pid == 0:
            ours.close()
            _spare(control, (wake_r, wake_w), theirs)
        theirs.close()
        children.add(pid)
        spare[0] = (pid, ours)

    def drop_spare() -> None:
        if spare[0] is not None:
            pid, ours = spare[0]
            spare[0] = None
            ours.close()  # it reads EOF and exits
            unused.add(pid)

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)
            if pid in unused:
                unused.discard(pid)
                continue
            send(control, "exit", (pid, os.waitstatus_to_exitcode(status)))

    make_spare()

    try:
        while True:
            ready, _, _ = select.select([control, wake_r], [], [], REAP_SECONDS)
            if wake_r in ready:
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            reap()  # every round: a lost SIGCHLD must never hide an exit
            if control not in ready:
                continue
            kind, body, fds = recv(control)
            if kind == "fork":
                # The kernel sends its environment only when it changed since the last fork.
                body["env"] = last_env = body.get("env", last_env)
                # Never fork a process that has other threads: the child would start
                # with their locks held for ever. Exec a fresh interpreter instead.
                fresh = bool(body.get("fresh")) or thread_count() > 1
                pid = None
                handover: socket.socket | None = None  # the spare's socket, to send it the job
                go_w: int | None = None  # a child forked now waits for this before it runs
                # A sweep's worker forked ahead ("ahead") is forked here directly: the spare
                # stays for the next cell, which waits for its worker, where a sweep does not.
                if not fresh and spare[0] is not None and not body.get("ahead"):
                    pid, handover = spare[0]
                    spare[0] = None
                    if not _waiting(handover):  # the spare is gone (killed from outside): fork anew
                        unused.add(pid)
                        handover.close()
                        pid = handover = None
                if pid is None:
                    go_r, go_w = os.pipe()
                    pid = os.fork()
                    if pid == 0:
                        os.close(go_w)
                        others = [spare[0][1]] if spare[0] is not None else []
                        _child(control, (wake_r, wake_w), fds, dict(body, fresh=fresh), others, go_r)
                    os.close(go_r)
                children.add(pid)
                # The kernel hears of the worker before the worker can run anything: its cell
                # may be waiting in its channel already, and may stop this very process.
                reply = {"id": body.get("id"), "pid": pid, "fresh": fresh, "threads": threads_by}
                try:  # on the worker's channel first: the kernel's thread that reads it learns the pid
                    os.write(fds[0], frame_bytes("forked", reply) or b"")
                except (OSError, IndexError):
                    pass  # the kernel gave up on it: the control reply below tells it the rest
                send(control, "forked", reply)
                if handover is not None:
                    try:
                        send(handover, "job", body, fds)
                    except OSError:  # it went just now: the kernel hears its exit, nothing ran
                        pass
                    handover.close()
                if go_w is not None:
                    os.write(go_w, b"x")
                    os.close(go_w)
                for passed in fds:
                    os.close(passed)
                make_spare()  # for the next cell, while this one runs
            elif kind == "preload":
                outcome: dict[str, str | None] = {}
                sys.path[:] = body["sys_path"]
                for name in body["names"]:
                    try:
                        __import__(name)
                        outcome[name] = None
                    except BaseException as exc:  # a broken package must not kill the template
                        outcome[name] = f"{type(exc).__name__}: {exc}"
                    if threads_by is None and thread_count() > 1:
                        threads_by = name
                _arm(wake_w)
                worker.preimport()  # what the new imports make every worker import
                # The spare was forked without these imports: the next one has them.
                drop_spare()
                make_spare()
                send(control, "preloaded", {"errors": outcome, "threads": threads_by})
            elif kind == "ping":
                send(control, "pong", os.getpid())
    except (EOFError, OSError):
        pass
    for pid in list(children):
        # The group, and descendants that left it (setsid, double fork): a plain
        # killpg here would also kill the worker before its own watchdog could.
        proctree.kill_tree(pid)
    sys.exit(0)
