"""The leader of a local ``--over`` sweep: one worker that forks a child per value.

A sweep of a thousand trivial values spent most of its time on the kernel's
side of each value (a fork request to the template, a supervision thread, the
run message, the reply) and on forking a template that carries the
notebook's heavy imports.  The leader takes that off the per-value path: the
kernel starts ONE worker for the whole sweep and sends it the cell, the shared
inputs and every value's (small) shipment in one ``run`` message with a
``sweep`` section.  The leader loads the shared inputs once, then forks one
child per value, at most ``concurrency`` at a time.

Each child has run no cell code: it starts from the leader's state (inputs
loaded, nothing run), binds its value and runs the ordinary worker run path
(:func:`nbisolate.worker.serve`: output capture, display, errors, results,
the result limit), on a channel of its own to the leader.  The leader reads
every child's messages and relays them to the kernel in batches, each tagged
with its value's index (``values``, see :mod:`nbisolate.protocol`), and says
when a child started and how it ended.  A value's ``--timeout`` is enforced
here: its child's whole tree is killed and the value reported as timed out.
Stop, an interrupt or the kernel's death end the leader's whole tree from the
kernel's side (the leader is its tree's subreaper), so no child survives it.

Worker side: the standard library and nbisolate's worker modules only.
"""

from __future__ import annotations

import builtins
import codecs
import os
import select
import selectors
import signal
import socket
import sys
import time
import types
from typing import Any

from . import proctree, worker
from .protocol import MSG_ERROR, MSG_PHASE, MSG_RESULT, MSG_STREAM, MSG_VALUES
from .wire import Channel, ChannelClosed, read_some

FLUSH_SECONDS = 0.01
"""How long relayed messages may gather before they go to the kernel in one frame."""
FLUSH_COUNT = 256
"""A batch of this many messages goes at once."""
_OUTCOMES = (MSG_RESULT, MSG_ERROR)
_PR_SET_PDEATHSIG = 1


class _Child:
    """One value's process, as the leader sees it."""

    __slots__ = (
        "index", "pid", "sock", "chan", "pidfd", "started", "deadline", "outcome", "reason", "output", "dropped",
        "open", "pipes",
    )

    def __init__(self, index: int, pid: int, sock: socket.socket, pidfd: int, timeout: float | None) -> None:
        self.index = index
        self.pid = pid
        self.sock = sock
        self.chan = Channel(sock)
        self.pidfd = pidfd
        self.started = time.perf_counter()
        self.deadline = self.started + timeout if timeout else None
        self.outcome = False  # its result or error was relayed
        self.reason: str | None = None  # "timeout" once the leader killed it
        self.output = 0  # bytes of text relayed, against the output limit
        self.dropped = 0
        self.open = True  # its channel may still carry messages
        # Its own stdout and stderr below Python (C code, subprocesses): read end -> (name, decoder).
        self.pipes: dict[int, tuple[str, Any]] = {}


class _Leader:
    def __init__(self, chan: Any, job: dict[str, Any], buffers: list[Any]) -> None:
        self.chan = chan
        spec = job.pop("sweep")
        self.base = job
        self.values: list[tuple[list[str], bytes, str, int]] = spec["values"]
        self.order: list[int] = spec["order"]  # the values to run (the others could not travel)
        self.concurrency = max(1, int(spec.get("concurrency") or 1))
        self.timeout: float | None = spec.get("timeout")
        self.max_output = int(spec.get("max_output") or 0)
        self.preload: list[str] = list(spec.get("preload") or ())
        shared = job.get("shared")
        count = shared["buffers"] if shared else 0
        self.shared_buffers = buffers[:count]
        self.value_buffers: list[list[Any]] = []
        at = count
        for _names, _data, _engine, nbuf in self.values:
            self.value_buffers.append(buffers[at : at + nbuf])
            at += nbuf
        self.compiled: tuple[types.CodeType, types.CodeType | None] | None = None
        self.settings = self.child_settings(job.get("settings"))
        self.sel = selectors.DefaultSelector()
        self.children: dict[int, _Child] = {}  # by pid
        self.batch: list[tuple[int, str, Any, int]] = []
        self.batch_buffers: list[Any] = []
        self.first_at = 0.0

    # -- setup: the shared inputs, once ------------------------------------------------
    def load(self) -> types.ModuleType:
        from . import settings, ship

        job = self.base
        os.chdir(job["cwd"])
        sys.path[:] = job["sys_path"]
        if "argv" in job:
            sys.argv = list(job["argv"])
        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = builtins  # the module, as in a notebook's __main__
        sys.modules["__main__"] = main
        for hook in job.get("startup", ()):
            __import__(hook)
        worker.import_run_path()  # what every child would import: once here, not once per value
        worker._c_library()
        # The notebook's settings, once for every value (a deep shared input needs the recursion
        # limit): each child starts with them in place, and takes only its logging handlers,
        # which write to its own output (see child).
        try:
            settings.restore(job.get("settings"))
        except Exception:
            pass
        for name in self.preload:
            try:
                __import__(name)
            except Exception:
                pass  # the value that imports it meets the same error, and reports it
        shared = job.get("shared")
        if shared:
            main.__dict__.update(
                ship.loads(shared["inputs"], shared["data"], self.shared_buffers, shared["engine"], main.__dict__)
            )
        self.shared_buffers = []
        try:  # once, not once per value: compiling costs a fresh child 50 page faults and 0.2 ms
            self.compiled = worker.compile_job(job)
        except Exception:
            pass  # each value reports the error, as it would in a cell of its own
        return main

    @staticmethod
    def child_settings(settings: dict[str, Any] | None) -> dict[str, Any] | None:
        """What of the notebook's settings each child takes again (the leader took them all, and
        the children inherit what it took): the warning filters, which hold around the cell's
        own code only (:func:`nbisolate.settings.cell_filters`; the leader made them once, so
        taking them costs a child next to nothing), and the root logger's handlers, made again
        to write to the child's own output.  Not the logging levels: comparing them again cost
        every value a quarter of a millisecond."""
        if not settings:
            return None
        mine: dict[str, Any] = {}
        if "warnings" in settings:
            mine["warnings"] = settings["warnings"]
        logs = settings.get("logging")
        if logs and logs["handlers"]:
            mine["logging"] = dict(logs, levels={})
        return mine or None

    # -- the children ------------------------------------------------------------------
    def fork(self, index: int, main: types.ModuleType) -> None:
        mine, theirs = socket.socketpair()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            try:
                mine.close()
                # Its own pipes, so what it writes below Python is its value's output too.
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                for fd in (out_r, out_w, err_r, err_w):
                    os.close(fd)
                self.child(index, theirs, main)
            finally:
                os._exit(71)
        theirs.close()
        os.close(out_w)
        os.close(err_w)
        pidfd = os.pidfd_open(pid)
        child = _Child(index, pid, mine, pidfd, self.timeout)
        self.children[pid] = child
        self.sel.register(mine, selectors.EVENT_READ, child)
        self.sel.register(pidfd, selectors.EVENT_READ, child)
        for fd, name in ((out_r, "stdout"), (err_r, "stderr")):
            os.set_blocking(fd, False)
            child.pipes[fd] = (name, codecs.getincrementaldecoder("utf-8")("replace"))
            self.sel.register(fd, selectors.EVENT_READ, child)
        self.value_buffers[index] = []
        self.add(index, "started", pid)

    def child(self, index: int, sock: socket.socket, main: types.ModuleType) -> None:
        """In the forked child: leave the leader's descriptors behind, then run the value."""
        os.setpgid(0, 0)  # its own group: a timeout kills this value's processes only
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the leader ignores it
        self.chan.sock.close()
        for child in self.children.values():
            child.sock.close()
            os.close(child.pidfd)
            for fd in child.pipes:
                os.close(fd)
        # Its descriptor only: dropping the leader's objects here would write to every page they
        # are on (a fault each, shared with the leader), for memory the exit gives back anyway.
        os.close(self.sel.fileno())
        worker._become_subreaper()  # not inherited: what the cell leaves is found again
        worker._PULL_ABOVE = 1 << 62  # results travel with the message: the leader relays them
        names, data, engine, _ = self.values[index]
        job = dict(self.base, inputs=names, data=data, engine=engine, shared=None, settings=self.settings)
        job.pop("sync", None)  # the leader's pipes are marked by the leader
        buffers = self.value_buffers[index]
        chan = worker._WorkerChannel(sock)
        chan.hold_until = time.monotonic() + chan.HOLD_SECONDS
        # No watchdog thread of its own (a thread costs a fork a millisecond): the leader's
        # watches the kernel and ends every child's tree when it goes, and a child whose
        # leader is gone is killed by the system (the parent-death signal).
        leader = os.getppid()
        worker._c_library().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != leader:  # the leader went before the signal was set
            os._exit(0)
        worker.serve(chan, job, buffers, main, self.compiled)

    def read(self, child: _Child) -> None:
        """One message of a child, relayed (phases are not: a sweep shows its runs as one)."""
        try:
            kind, body, buffers = child.chan.recv()
        except (ChannelClosed, OSError):
            self.sel.unregister(child.sock)
            child.open = False
            return
        if kind == MSG_PHASE or child.reason is not None:
            return
        if kind == MSG_STREAM:
            self.stream(child, *body)
            return
        if kind in _OUTCOMES:
            self.drain(child)  # what it wrote below Python comes before its outcome
            if child.dropped:
                self.add(child.index, "dropped", {"dropped": child.dropped, "over_rate": 0, "max_output": self.max_output})
            child.outcome = True
        self.add(child.index, kind, body, buffers)

    def stream(self, child: _Child, name: str, text: str) -> None:
        """Relay a child's text, within the output limit (what is over it is counted as dropped)."""
        if self.max_output:
            room = self.max_output - child.output
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > room:
                child.dropped += size - max(room, 0)
                if room <= 0:
                    return
                text = text.encode("utf-8", "surrogatepass")[:room].decode("utf-8", "ignore")
                size = room
            child.output += size
        self.add(child.index, MSG_STREAM, (name, text))

    def read_pipe(self, child: _Child, fd: int) -> bool:
        """Relay what one of a child's pipes holds now; False at its end (then it is closed)."""
        name, decoder = child.pipes[fd]
        data = read_some(fd)
        if data is None:
            return True
        if not data:
            self.sel.unregister(fd)
            os.close(fd)
            del child.pipes[fd]
            text = decoder.decode(b"", final=True)
        else:
            text = decoder.decode(data)
        if text and child.reason is None:
            self.stream(child, name, text)
        return bool(data)

    def drain(self, child: _Child) -> None:
        """Relay all a child's pipes hold now (a grandchild may keep them open: never wait for their end)."""
        for fd in list(child.pipes):
            while fd in child.pipes and self.read_pipe(child, fd):
                if not select.select([fd], [], [], 0)[0]:
                    break

    def ended(self, child: _Child) -> None:
        """A child exited: take its last words, reap it, say how it ended (unless its outcome did)."""
        while child.open and child.reason is None:
            ready, _, _ = select.select([child.sock], [], [], 0)
            if not ready:
                break
            self.read(child)
        if child.open:
            self.sel.unregister(child.sock)
        self.drain(child)
        for fd in list(child.pipes):  # a grandchild may still hold them: what it writes now is lost
            self.sel.unregister(fd)
            os.close(fd)
        child.pipes.clear()
        self.sel.unregister(child.pidfd)
        child.sock.close()
        os.close(child.pidfd)
        del self.children[child.pid]
        _, status = os.waitpid(child.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if child.outcome and child.reason is None:
            return
        reason = child.reason or ("done" if code == 0 else "crashed")
        self.add(
            child.index,
            "exit",
            {
                "returncode": code,
                "reason": reason,
                "error": None,
                "elapsed": time.perf_counter() - child.started,
                "dropped": child.dropped,
                "over_rate": 0,
                "max_output": self.max_output,
                "pid": child.pid,
                "lost": None,
            },
        )

    def expire(self, now: float) -> None:
        for child in list(self.children.values()):
            if child.reason is None and child.deadline is not None and now >= child.deadline:
                child.reason = "timeout"
                proctree.kill_tree(child.pid)

    # -- relaying ----------------------------------------------------------------------
    def add(self, index: int, kind: str, body: Any, buffers: list[Any] = ()) -> None:  # type: ignore[assignment]
        if not self.batch:
            self.first_at = time.perf_counter()
        self.batch.append((index, kind, body, len(buffers)))
        self.batch_buffers.extend(buffers)

    def flush(self) -> None:
        if self.batch:
            batch, buffers = self.batch, self.batch_buffers
            self.batch, self.batch_buffers = [], []
            self.chan.send(MSG_VALUES, batch, buffers)

    # -- the loop ----------------------------------------------------------------------
    def run(self, main: types.ModuleType) -> None:
        pending = list(reversed(self.order))
        while pending or self.children:
            while pending and len(self.children) < self.concurrency:
                self.fork(pending.pop(), main)
            now = time.perf_counter()
            waits = [c.deadline - now for c in self.children.values() if c.deadline and c.reason is None]
            if self.batch:
                waits.append(self.first_at + FLUSH_SECONDS - now)
            timeout = max(0.0, min(waits)) if waits else None
            for key, _ in self.sel.select(timeout):
                child = key.data
                if child.pid not in self.children:
                    continue
                if key.fileobj is child.sock:
                    if child.open:
                        self.read(child)
                elif key.fd in child.pipes:
                    self.read_pipe(child, key.fd)
                elif key.fd == child.pidfd:
                    self.ended(child)
                # else: a pipe this round already read to its end (draining before an outcome)
            now = time.perf_counter()
            self.expire(now)
            if self.batch and (len(self.batch) >= FLUSH_COUNT or now - self.first_at >= FLUSH_SECONDS):
                self.flush()
        self.flush()


def lead(chan: Any, job: dict[str, Any], buffers: list[Any]) -> None:
    """Run a sweep's values, each in a child forked from this process (never returns)."""
    code = 0
    try:
        leader = _Leader(chan, job, buffers)
        del buffers
        try:
            main = leader.load()
        except BaseException as exc:
            import traceback

            from .protocol import error_body

            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            chan.send(MSG_ERROR, error_body(exc, traceback=text, stage="setup"))
            os._exit(0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the kernel stops the whole tree instead
        leader.run(main)
        chan.send(MSG_RESULT, {"marked": worker._mark_pipes(job.get("sync")), "names": [], "data": b"", "engine": "pickle"})
    except BaseException:
        import traceback

        code = 1
        try:
            traceback.print_exc()
        except Exception:
            pass
    proctree.kill_own_descendants_until_quiet()
    os._exit(code)
