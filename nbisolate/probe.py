"""Ask a freshly started interpreter whether it can load a pickle.

``pickle.dumps`` succeeding in the kernel proves little about a *spawned*
worker: functions and classes are stored by reference (``module`` plus
``qualname``), and the worker has to find them again by importing the module.
A notebook's ``__main__`` is not importable, a module loaded from a file under
a made-up name is not importable, an attribute added to a module at run time
does not exist after a fresh import. Static reasoning gets most cases right;
for the rest, the only honest answer comes from trying. This module does the
trying, so that :mod:`nbisolate.diagnose` can stay free of processes and take
the check as an injected callable (``verify_spawn=spawn_loads``).

It also runs ``%pickle_check``'s load-back check (:class:`Loader`, offered as
``spawn_loads.start_loader``): loading a pickle runs the object's own
reconstruction code, which must never run in the kernel, so one loader
process per check does every load, writes no file, and is killed at a load's
deadline and when the check ends.

The child gets the kernel's ``sys.path`` (through ``PYTHONPATH``) and its
working directory, like a ``multiprocessing`` spawn child would, and nothing
else: no ``__main__`` of ours, no already imported modules.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from . import proctree

__all__ = ["Loader", "spawn_loads", "start_loader"]

PROTOCOL = 5

# What the child runs. It reads the pickle from stdin, loads it, and reports
# the exception on stderr after a marker line, so that anything the loaded
# objects print cannot be mistaken for our answer. ``os._exit`` skips
# interpreter shutdown: a loaded object may have started a thread or hold a
# resource whose finalizer blocks, and we only care whether loading worked.
_MARK = "--nbisolate-probe-error--"
_CHILD = f"""
import os, sys
data = sys.stdin.buffer.read()
try:  # a load may re-run a constructor that writes files: it must not touch the user's
    from nbisolate.probe import _guard_files
    _guard_files()
except Exception:
    pass
try:
    import {{module}} as _ser
    _ser.loads(data)
except BaseException as exc:
    t = type(exc)
    name = t.__qualname__ if t.__module__ == "builtins" else t.__module__ + "." + t.__qualname__
    sys.stderr.write("\\n{_MARK}\\n" + name + ": " + str(exc) + "\\n")
    sys.stderr.flush()
    os._exit(3)
os._exit(0)
"""


def _child_env() -> dict[str, str]:
    """The kernel's environment, with its import path made explicit.

    ``sys.path`` of the kernel may differ from what a fresh interpreter would
    compute (a notebook that did ``sys.path.append("../src")``, the notebook's
    directory as ``''``); multiprocessing's spawn start method sends the
    parent's ``sys.path`` to the child, so the probe does the same.
    """
    env = dict(os.environ)
    cwd = os.getcwd()
    entries: list[str] = []
    for entry in sys.path:
        if not isinstance(entry, str):
            continue
        path = entry or cwd
        if path not in entries:
            entries.append(path)
    env["PYTHONPATH"] = os.pathsep.join(entries)
    # A startup hook or inspect mode would run code we did not ask for.
    for var in ("PYTHONSTARTUP", "PYTHONINSPECT"):
        env.pop(var, None)
    return env


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill whatever is left in the child's process group (it leads its own session).

    Called even after the child exited: loading a pickle runs arbitrary
    reducers, which may have started processes of their own, and those stay
    in the child's process group, which keeps the group's id from reuse.
    """
    proctree.signal_group(proc.pid, signal.SIGKILL)


def spawn_loads(data: bytes, timeout: float = 10.0, *, module: str = "pickle") -> str | None:
    """Load ``data`` in a freshly started Python process; return None or the error.

    Returns ``None`` when ``module.loads(data)`` succeeded in the child, and
    otherwise one line saying why not, e.g. ``"AttributeError: Can't get
    attribute 'work' on <module '__main__' (built-in)>"``. A child that runs
    longer than ``timeout`` seconds is killed (with everything it started)
    and reported as such; no process is ever left behind, even when the
    caller is interrupted.

    ``module`` names the loader to use in the child: ``"pickle"`` (the
    default: what multiprocessing, concurrent.futures and DataLoader workers
    use), or ``"dill"``.
    """
    if module not in ("pickle", "dill", "cloudpickle"):
        raise ValueError(f"spawn_loads: unknown loader module {module!r}")
    cmd = [sys.executable, "-c", _CHILD.format(module=module)]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=os.getcwd(),
        env=_child_env(),
        start_new_session=True,
    )
    try:
        try:
            _, err = proc.communicate(input=data, timeout=timeout)
        except subprocess.TimeoutExpired:
            proctree.kill_tree(proc.pid)  # not reaped yet: the pid surely is our child
            proc.communicate()
            return (
                f"a fresh Python process was still loading the pickle after {timeout:g} s "
                "and was killed"
            )
        text = err.decode("utf-8", "replace")
        if proc.returncode == 0:
            return None
        if _MARK in text:
            lines = text.rsplit(_MARK, 1)[1].strip().splitlines()
            return lines[0] if lines else "unknown error while loading"
        tail = " ".join(text.strip().splitlines()[-3:])
        how = (
            f"signal {-proc.returncode}"
            if proc.returncode < 0
            else f"exit code {proc.returncode}"
        )
        return f"a fresh Python process died with {how} while loading the pickle" + (
            f": {tail}" if tail else ""
        )
    finally:
        if proc.returncode is None:  # interrupted: not reaped, so the pid surely is our child
            proctree.kill_tree(proc.pid)
        else:
            _kill_group(proc)
        if proc.poll() is None:  # pragma: no cover - killed just above
            proc.wait()
        for stream in (proc.stdin, proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()


# --- the loader process: %pickle_check's load-back check, out of the kernel --------------

_SEND_LIMIT = 64 * 2**20
"""Bytes of out-of-band buffers sent as they are per load; larger ones are stood in for.

A 1 GB array would otherwise be copied into the loader (a second or more, and as
much memory again) to learn what its size and layout already say: it rebuilds."""

_HEADER = "<I"


class Loader:
    """One loader process for one ``%pickle_check``: loads pickles so the kernel never does.

    Loading runs the object's own reconstruction code (a ``__reduce__`` that
    re-runs a constructor, a ``__setstate__``), which may open the user's
    files for writing, block for ever or exit the process. Here it runs in a
    freshly started interpreter (:func:`_loader_main`) that writes no file,
    resolves what only the notebook's ``__main__`` defines to stand-ins,
    and is killed with everything it started when a load outlives its
    deadline (a new one starts for the next load) or when the check ends
    (:meth:`close`). One process serves every variable and serializer of a
    call: starting a fresh interpreter per load would cost a hundred times
    the load itself.

    Thread-safe: ``%pickle_check`` gives up on a variable whose check blocks
    and goes on with the next, while the given-up thread may still reach
    :meth:`loads` later; after :meth:`close` no process is started again.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = False
        self._lock = threading.Lock()
        self._closed = False

    def begin(self, imports: Sequence[str] = ()) -> None:
        """Start the process now rather than at the first load, importing ``imports`` (top-level
        packages) as it starts: a check serializes its first large values while the loader
        imports what loading them will need (pandas alone takes half a second to import), on
        another core. An import that fails is left for the load that needs it to report."""
        with self._lock:
            if not self._closed and self._proc is None:
                self._proc = _start_loader_process(imports)
                self._ready = False

    def loads(
        self, serializer: str, data: bytes, buffers: Sequence[Any], engine: str, timeout: float
    ) -> tuple[str, str | None]:
        """Load ``data`` with ``serializer``'s loader in the loader process.

        Returns ``("ok", None)``, ``("error", text)`` when loading raised (or
        killed the process), ``("timeout", text)`` when it did not finish
        within ``timeout`` seconds (the process was killed),
        ``("unavailable", text)`` when the loader process could not start, or
        ``("closed", text)`` after :meth:`close`.
        """
        deadline = time.monotonic() + timeout
        views = [_raw(b) for b in buffers]
        sent = 0
        sizes = []
        for view in views:
            real = sent + view.nbytes <= _SEND_LIMIT
            sent += view.nbytes if real else 0
            sizes.append((view.nbytes, real))
        header = pickle.dumps((serializer, engine, len(data), sizes), protocol=PROTOCOL)
        parts: list[Any] = [struct.pack(_HEADER, len(header)) + header + data]
        parts += [view for view, (_, real) in zip(views, sizes, strict=True) if real]
        if sent < 2**16 and len(parts) > 1:  # small: one write, one wake-up of the loader
            parts = [b"".join(parts)]
        if not self._lock.acquire(timeout=max(timeout, 0.0)):
            return "timeout", f"did not finish within {timeout:.1f} s (the loader was busy)"
        try:
            if self._closed:
                return "closed", "the check had ended"
            proc = self._proc
            if proc is None or proc.poll() is not None:
                if proc is not None:
                    self._end()
                proc = self._proc = _start_loader_process()
                self._ready = False  # until it says it is (one byte, once)
            try:
                _send_all(proc, parts, deadline)
                if not self._ready:
                    _read_exact(proc.stdout.fileno(), 1, _poller(proc), deadline)  # type: ignore[union-attr]
                    self._ready = True
                reply = _receive(proc, deadline)
            except TimeoutError:
                self._end()
                return "timeout", f"did not finish within {timeout:.1f} s"
            except (OSError, EOFError):  # the loader went while starting, reading or loading
                if not self._ready:
                    return "unavailable", self._died().replace(
                        "loading it died", "to load it in could not start"
                    ) + f"; `{sys.executable} -c 'import nbisolate.probe'` shows why"
                return "error", self._died()
            if reply is None:
                return "ok", None
            return "error", reply
        finally:
            self._lock.release()

    def _died(self) -> str:
        proc = self._proc
        assert proc is not None
        try:
            code = proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            code = None
        self._end()
        how = (
            "it did not exit" if code is None
            else f"signal {-code}" if code < 0
            else f"exit code {code}"
        )
        return f"a fresh Python process loading it died ({how})"

    def _end(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            if stream is not None and not stream.closed:
                with contextlib.suppress(OSError):
                    stream.close()
        if proc.returncode is None and proc.poll() is None:
            proctree.kill_tree(proc.pid)  # not reaped yet: the pid surely is our child
        else:
            _kill_group(proc)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)

    def close(self) -> None:
        """Kill the loader process and everything it started; later loads answer "closed"."""
        self._closed = True
        if not self._lock.acquire(blocking=False):
            # a check given up on is still waiting for a load: end the process under it,
            # so that its wait ends now rather than at its deadline
            proc = self._proc
            if proc is not None and proc.returncode is None:
                proctree.kill_tree(proc.pid)
            self._lock.acquire()
        try:
            self._end()
        finally:
            self._lock.release()


def start_loader() -> Loader:
    """A :class:`Loader` for one check; its process starts with the first load."""
    return Loader()


# ``%pickle_check`` gets ``spawn_loads`` from the magic; a verifier that also offers a
# loader makes the check load back there instead of in the kernel (see diagnose.spawn).
spawn_loads.start_loader = start_loader  # type: ignore[attr-defined]


def _raw(buf: Any) -> memoryview:
    raw = getattr(buf, "raw", None)
    view = raw() if raw is not None else memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _start_loader_process(imports: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "from nbisolate.probe import _loader_main; _loader_main()", *imports],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=os.getcwd(),
        env=_child_env(),
        start_new_session=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    os.set_blocking(proc.stdin.fileno(), False)
    return proc


def _send_all(proc: subprocess.Popen[bytes], parts: list[Any], deadline: float) -> None:
    assert proc.stdin is not None
    fd = proc.stdin.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    for part in parts:
        view = memoryview(part).cast("B")
        while view.nbytes:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                n = 0
            view = view[n:]
            if view.nbytes and not _ready(poller, deadline):
                raise TimeoutError


def _receive(proc: subprocess.Popen[bytes], deadline: float) -> str | None:
    """The loader's answer: None when it loaded, else the error text."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    poller = _poller(proc)
    (size,) = struct.unpack(_HEADER, _read_exact(fd, 4, poller, deadline))
    text = _read_exact(fd, size, poller, deadline).decode("utf-8", "replace")
    return text or None


def _poller(proc: subprocess.Popen[bytes]) -> Any:
    assert proc.stdout is not None
    poller = select.poll()
    poller.register(proc.stdout.fileno(), select.POLLIN)
    return poller


def _read_exact(fd: int, n: int, poller: Any, deadline: float) -> bytes:
    chunks = []
    while n:
        if not _ready(poller, deadline):
            raise TimeoutError
        chunk = os.read(fd, n)
        if not chunk:
            raise EOFError("the loader process closed its pipe")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _ready(poller: Any, deadline: float) -> bool:
    left = deadline - time.monotonic()
    return left > 0 and bool(poller.poll(left * 1000))


# --- inside the loader process -------------------------------------------------------------


def _loader_main() -> None:  # pragma: no cover - runs in the loader process (tested through it)
    """The loader process: answer load requests on stdin until the kernel closes the pipe.

    fds 0 and 1 are kept as private request and reply channels and replaced
    by /dev/null, so nothing a loaded object prints or reads can be mistaken
    for the protocol. The process is its tree's subreaper (what a load starts
    stays findable for :func:`proctree.kill_tree`) and ends its group when the
    kernel goes. Loaded objects are dropped at once: only whether loading
    worked matters.
    """
    import mmap

    requests = os.fdopen(os.dup(0), "rb", buffering=0)
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    parent = os.getppid()

    def watchdog() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watchdog, daemon=True, name="nbisolate-loader-watchdog").start()

    from .diagnose import serializers
    from .diagnose.categories import _exc_text

    serializers._on_missing = _stand_in
    _guard_files()
    replies.write(b"R")  # ready: what fails from here on is a load's doing
    # What the check's loads will import anyway (Loader.begin), before the first arrives. Not
    # in a thread beside the loads: two threads importing one package at once can meet on its
    # import locks, and a thread that only imports holds the GIL from the loads for its
    # switch interval at every turn (a 0.5 ms load took 10).
    for package in sys.argv[1:]:
        try:
            __import__(package)
        except BaseException:  # the load that needs it reports it
            pass

    def read_exact(n: int) -> bytearray | None:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = requests.readinto(view[got:])
            if not k:
                return None
            got += k
        return buf

    while True:
        head = read_exact(4)
        if head is None:
            os._exit(0)
        header = read_exact(struct.unpack(_HEADER, head)[0])
        assert header is not None
        name, engine, size, sizes = pickle.loads(header)
        data = read_exact(size)
        buffers: list[Any] = []
        for nbytes, real in sizes:
            if real:
                buffers.append(read_exact(nbytes))
            else:  # zero pages of the same size: cost nothing until touched
                buffers.append(mmap.mmap(-1, nbytes) if nbytes else bytearray())
        try:
            loaded = serializers._SERIALIZERS[name].loads(bytes(data), buffers, engine)
            del loaded
            text = ""
        except BaseException as exc:  # SystemExit too: it would end a worker's load
            try:
                text = _exc_text(exc) or type(exc).__name__
            except BaseException:
                text = type(exc).__name__
        del data, buffers
        out = text.encode("utf-8", "replace")
        replies.write(struct.pack(_HEADER, len(out)) + out)


_STAND_INS: dict[tuple[str, str], type] = {}


class _StandIn:
    """What a reference the loader process cannot resolve loads as (``__main__.Model``).

    The kernel resolved it when it pickled it (a by-reference pickle checks
    that); the loader has no notebook ``__main__``. Whether a spawned child
    resolves it is the spawn check's question, asked apart; this load only
    asks whether the rest rebuilds. So the stand-in takes whatever the pickle
    does with it: being called or instantiated with any arguments, state,
    items.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def add(self, item: Any) -> None:
        pass


def _stand_in(module: str, qualname: str) -> type:
    key = (module, qualname)
    found = _STAND_INS.get(key)
    if found is None:
        found = _STAND_INS[key] = type(
            qualname.rpartition(".")[2], (_StandIn,), {"__module__": module, "__qualname__": qualname}
        )
    return found


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _guard_files() -> None:  # pragma: no cover - runs in the loader process
    """Make this process unable to change a file, while loads that write still work.

    A constructor re-run by a load may ``open(path, "w")``, truncating the
    user's file. Opening for writing (``open``, ``io.open``, ``os.open``) gets
    a private in-memory file instead (``memfd``: a real descriptor, no name on
    disk), holding a copy of the file when the mode keeps its contents; the
    errors a real open would raise (no such directory, a directory, no
    permission, exists under ``"x"``) are raised as they would be. Removing,
    renaming, truncating, creating directories and links, changing modes and
    times succeed without doing anything.
    """
    import builtins
    import errno
    import io

    real_open = io.open
    real_os_open = os.open

    def refuse(code: int, path: Any) -> OSError:
        return OSError(code, os.strerror(code), path)

    def scratch(path: Any, exists: bool, keep: bool, exclusive: bool) -> int:
        if exists and os.path.isdir(path):
            raise refuse(errno.EISDIR, path)
        if exists and exclusive:
            raise refuse(errno.EEXIST, path)
        parent = os.path.dirname(os.path.abspath(path)) or "."
        if not exists and not os.path.isdir(parent):
            raise refuse(errno.ENOENT, path)
        if not os.access(path if exists else parent, os.W_OK):
            raise refuse(errno.EACCES, path)
        fd = os.memfd_create("nbisolate-loader-scratch")
        if keep:
            with contextlib.suppress(OSError), real_open(path, "rb") as f:
                os.write(fd, f.read())
                os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def guarded_open(
        file: Any, mode: str = "r", buffering: int = -1, encoding: Any = None, errors: Any = None,
        newline: Any = None, closefd: bool = True, opener: Any = None,
    ) -> Any:
        if isinstance(file, int) or opener is not None or not any(c in mode for c in "wax+"):
            # an opener opens with os.open, guarded below (tempfile's unnamed files do)
            return real_open(file, mode, buffering, encoding, errors, newline, closefd, opener)
        path = os.fspath(file)
        exists = os.path.exists(path)
        if "r" in mode and not exists:
            raise refuse(errno.ENOENT, path)
        keep = exists and ("a" in mode or ("+" in mode and "w" not in mode))
        fd = scratch(path, exists, keep, "x" in mode)
        f = real_open(fd, mode.replace("x", "w"), buffering, encoding, errors, newline, True)
        raw = getattr(getattr(f, "buffer", f), "raw", getattr(f, "buffer", f))
        with contextlib.suppress(Exception):
            raw.name = path
        return f

    def guarded_os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: Any = None) -> int:
        if not flags & _WRITE_FLAGS:
            return real_os_open(path, flags, mode, dir_fd=dir_fd)
        tmpfile = getattr(os, "O_TMPFILE", 0)
        if tmpfile and (flags & tmpfile) == tmpfile:  # an unnamed file in a directory: no name at all
            return os.memfd_create("nbisolate-loader-scratch")
        full = path if dir_fd is None else os.path.join(f"/proc/self/fd/{dir_fd}", os.fsdecode(path))
        exists = os.path.exists(full)
        if not exists and not flags & os.O_CREAT:
            raise refuse(errno.ENOENT, path)
        fd = scratch(
            full, exists, exists and not flags & os.O_TRUNC,
            bool(flags & os.O_CREAT and flags & os.O_EXCL),
        )
        if flags & os.O_APPEND:
            os.lseek(fd, 0, os.SEEK_END)
        return fd

    def pretend(*args: Any, **kwargs: Any) -> None:
        return None

    import _io

    builtins.open = guarded_open
    io.open = guarded_open
    _io.open = guarded_open  # what a pickled reference to open names on Python 3.12+
    os.open = guarded_os_open
    for name in (
        "remove", "unlink", "rmdir", "rename", "replace", "truncate", "mkdir", "symlink", "link",
        "chmod", "chown", "utime",
    ):
        if hasattr(os, name):
            setattr(os, name, pretend)
