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
  run; every fork request is forked directly: the spares are the kernel's)
  -> ``("forked", {"id": n, "pid": pid, "fresh": bool, "threads": name or None})``; with
  ``fresh`` the child execs a new interpreter.  The request's ``id`` comes back so
  the kernel matches each reply to its request: a reply that arrives after the
  kernel stopped waiting must never be taken for the next cell's worker.
* ``("preload", {"names": [...], "reload": [...], "sys_path": [...], "env": {...}, "cwd": "..."})`` ->
  ``("preloaded", {"errors": {name: error or None}, "threads": name or None})``
  (``reload``: the notebook's own modules whose files changed since they were imported here)
* ``("exit", (pid, returncode))`` is sent whenever a worker (or spare) is reaped.
* ``("spare", {"pid": pid, "env": bool}, fds=[socket])``: the next spare, offered.
* ``("taken", {"pid": pid})`` from the kernel: it took that spare; fork the next.

The template keeps :data:`SPARES` *spares*: children forked ahead of time that
have run no code of any cell.  Each is offered to the kernel at once, with the spare's end
of a socket of its own, and the template keeps no copy: only the kernel sends
it anything.  The kernel sends it ``("job", {...}, fds=[channel, stdout,
stderr])`` as the offer arrives, and the spare, its first steps taken
(:func:`nbisolate.worker.prepare` and :func:`nbisolate.worker.rehearse`),
waits on that channel for its cell's ``run`` message: starting a cell is one
write from the kernel, which knew the worker's pid before the cell existed.
The kernel says ``taken`` once the cell is over (or has run a moment), and
only then is the next spare forked, so that the fork does not compete with a
quick cell and the kernel's reply to it; the other spare serves a cell that
comes meanwhile (a cell that finds none asks for a ``fork``, and says
``taken`` at once).  A ``preload`` makes the kernel drop the spares (they lack the
new imports) and the next ones are offered after the ``preloaded`` reply.  A
``preload`` carries the kernel's environment and working directory: the
template imports under them, as the notebook would now.  ``env`` says that
the template's environment is no longer the one the kernel last gave it (an
import set variables): the kernel then sends its own with the cell.

A worker the kernel asks for with ``fork`` (no spare was at hand, a sweep's
value, ``--mem``) is forked on the spot.  The ``forked`` reply goes out before
the worker gets its descriptors (a child
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

import importlib
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
    """A worker forked ahead of its cell: it waits for its channel, then its cell (never returns).

    Forking, and a new process's first steps, cost milliseconds that a cell
    that runs for a few would wait for; the template keeps :data:`SPARES` such spares,
    forked from its imports as they are and having run no code of any cell,
    and offers each to the kernel, which sends it its channel and pipes ahead of
    the cell (see :func:`main`).  It keeps the name :data:`SPARE_NAME` until
    its cell arrives.
    """
    try:
        _detach(control, wake_fds, ())
        name = _set_name(SPARE_NAME)
        from . import worker

        try:
            # The worker's own first steps, none of them a cell's, while nobody waits.
            worker.prepare()
        except Exception:
            pass  # the worker's main() tries again, and reports what fails
        try:
            kind, body, fds = recv(sock)
        except (EOFError, OSError):  # the kernel dropped this spare, or went
            os._exit(0)
        sock.close()
        if kind != "job":
            os._exit(0)
        try:
            # Warming up pays only while nobody waits: a cell already in the channel (the
            # cells come faster than spares) is better served cold at once.
            def busy() -> bool:
                return bool(select.select([fds[0]], [], [], 0)[0])

            if not busy():
                worker.rehearse()
                worker.rehearse_packages(busy)
            if body.get("settings") and not busy():  # the notebook's, so its cell finds them in place
                from . import settings

                settings.restore(body["settings"])
            if body.get("ready"):  # recent cells sent this much: room for the inputs, ahead
                worker.get_ready(int(body["ready"]), fds[0])
        except Exception:
            pass
        # Its channel came before its cell: it is named a worker once the cell arrives.
        worker.named_after_spare = name
        _become(fds, body)
    finally:
        os._exit(71)


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
            from .worker import set_environ

            set_environ(env)
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


SPARES = 2
"""Spares kept offered: a cell takes one while the other serves the next cell at once, so the
one taken is replaced only once its quick cell is over (see ``taken``)."""

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
    start_env = dict(os.environ)  # the kernel's, when it started this process or last asked a preload
    # The worker imports these anyway; paying for them once here is the point.
    from . import proctree, wire, worker  # noqa: F401

    worker.import_run_path()

    worker._c_library()  # the C library handle for prctl and fflush, inherited by every fork
    worker.preimport()

    # The spare workers (see _spare) offered to the kernel, by pid: the kernel holds their
    # sockets and hands each a cell directly; the next one is forked once the kernel says it
    # took one (``taken``), or asks for a preload (it drops them: the imports changed).
    offered: set[int] = set()

    def make_spare() -> None:
        while len(offered) < SPARES and threads_by is None and thread_count() <= 1:
            if not fork_spare():
                return

    def fork_spare() -> bool:
        ours, theirs = socket.socketpair()
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            return False
        if pid == 0:
            ours.close()
            _spare(control, (wake_r, wake_w), theirs)
        theirs.close()
        children.add(pid)
        # Offered at once, before it has prepared itself: a cell handed to it meanwhile
        # waits in its socket. Our copy of the socket goes: only the kernel may send it a job.
        try:
            changed = os.environ != start_env  # a preloaded package set variables
            send(control, "spare", {"pid": pid, "env": changed}, [ours.fileno()])
            offered.add(pid)
        except OSError:  # the kernel went: the loop below ends at its next read
            ours.close()
            return False
        ours.close()
        return True

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)
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
                # Forked here, directly: the spare (a sweep's "ahead" value, or a cell that
                # found no spare) is the kernel's, and stays for the next cell. The child
                # waits for a byte on go_r, sent once the kernel was told its pid.
                go_r, go_w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(go_w)
                    _child(control, (wake_r, wake_w), fds, dict(body, fresh=fresh), (), go_r)
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
                os.write(go_w, b"x")
                os.close(go_w)
                for passed in fds:
                    os.close(passed)
                make_spare()  # for the next cell, while this one runs
            elif kind == "taken":
                # The kernel handed the offered spare a cell (or found it gone): the next one.
                # Told once the cell is over or has run a moment: this fork must not compete
                # with a quick cell, nor with the kernel's reply to it.
                offered.discard(body.get("pid"))
                make_spare()
            elif kind == "preload":
                # The kernel drops the spares offered before the new imports: they lack them.
                offered.clear()
                outcome: dict[str, str | None] = {}
                # As the notebook would import them now: its settings, its directory, its path.
                if body.get("env") is not None:
                    worker.set_environ(body["env"])
                    start_env = dict(os.environ)  # what an import changes from here is told with spares
                if body.get("cwd"):
                    try:
                        os.chdir(body["cwd"])
                    except OSError:
                        pass  # gone or closed to us: relative imports fail here, and workers import them
                sys.path[:] = body["sys_path"]
                # The notebook's own modules whose files changed: in place, as importlib.reload
                # does in the kernel, submodules before the packages that may import from them.
                for name in sorted(body.get("reload", ()), key=lambda n: -n.count(".")):
                    module = sys.modules.get(name)
                    try:
                        if module is not None:
                            importlib.reload(module)
                        else:  # its last edit did not import: this one may
                            __import__(name)
                        outcome[name] = None
                    except BaseException as exc:  # an edit that does not import: the worker says so
                        sys.modules.pop(name, None)  # and imports it afresh, as it would without us
                        outcome[name] = f"{type(exc).__name__}: {exc}"
                    if threads_by is None and thread_count() > 1:
                        threads_by = name
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
                # The spare was forked without these imports (the kernel dropped it): the
                # next one has them. It is offered after the reply, which tells the kernel
                # to take spares again.
                send(control, "preloaded", {"errors": outcome, "threads": threads_by})
                make_spare()
            elif kind == "ping":
                send(control, "pong", os.getpid())
    except (EOFError, OSError):
        pass
    for pid in list(children):
        # The group, and descendants that left it (setsid, double fork): a plain
        # killpg here would also kill the worker before its own watchdog could.
        proctree.kill_tree(pid)
    sys.exit(0)
