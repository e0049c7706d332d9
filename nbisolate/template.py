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

* ``("fork", {"env": ..., "fresh": bool, "cwd": ...}, fds=[channel, stdout, stderr])``
  -> ``("forked", pid)``; with ``fresh`` the child execs a new interpreter
* ``("preload", {"names": [...], "sys_path": [...]})`` -> ``("preloaded", {name: error})``
* ``("exit", (pid, returncode))`` is sent whenever a worker is reaped.

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

from .wire import recv_frame, send_frame


def send(sock: socket.socket, kind: str, body: Any = None, fds: Sequence[int] = ()) -> None:
    """One control message, with file descriptors attached (SCM_RIGHTS) when given."""
    send_frame(sock, kind, body, fds=fds)


def recv(sock: socket.socket) -> tuple[str, Any, list[int]]:
    """One control message and the descriptors that came with it (``EOFError`` at the end)."""
    kind, body, _, fds = recv_frame(sock)
    return kind, body, fds


def _child(control: socket.socket, wake_fds: tuple[int, int], fds: list[int], job: dict[str, Any]) -> None:
    """In the forked child: become a clean worker and run one cell (never returns)."""
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        control.close()
        for fd in wake_fds:
            os.close(fd)
        chan_fd, out_fd, err_fd = fds
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        for fd in (out_fd, err_fd):
            if fd > 2:
                os.close(fd)
        env = job.get("env")
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
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


def main(fd: int) -> None:
    """Entry point of the template process."""
    os.set_inheritable(fd, False)
    control = socket.socket(fileno=fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    children: set[int] = set()
    # The worker imports these anyway; paying for them once here is the point.
    from . import proctree, ship, wire, worker  # noqa: F401

    worker._c_library()  # the C library handle for prctl and fflush, inherited by every fork

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

    try:
        while True:
            ready, _, _ = select.select([control, wake_r], [], [])
            if wake_r in ready:
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                reap()
            if control not in ready:
                continue
            kind, body, fds = recv(control)
            if kind == "fork":
                pid = os.fork()
                if pid == 0:
                    _child(control, (wake_r, wake_w), fds, body)
                for passed in fds:
                    os.close(passed)
                children.add(pid)
                send(control, "forked", pid)
            elif kind == "preload":
                outcome: dict[str, str | None] = {}
                sys.path[:] = body["sys_path"]
                for name in body["names"]:
                    try:
                        __import__(name)
                        outcome[name] = None
                    except BaseException as exc:  # a broken package must not kill the template
                        outcome[name] = f"{type(exc).__name__}: {exc}"
                send(control, "preloaded", outcome)
            elif kind == "ping":
                send(control, "pong", os.getpid())
    except (EOFError, OSError):
        pass
    for pid in list(children):
        # The group, and descendants that left it (setsid, double fork): a plain
        # killpg here would also kill the worker before its own watchdog could.
        proctree.kill_tree(pid)
    sys.exit(0)
