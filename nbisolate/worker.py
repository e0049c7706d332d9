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
traceback in the cell's own line numbers; exit.  A watchdog thread exits the
whole process group as soon as the kernel's end of the channel closes, so a
worker never outlives its kernel.
"""

from __future__ import annotations

import ast
import io
import linecache
import os
import signal
import sys
import threading
import time
import traceback
import types
from typing import Any

from . import display_worker
from .wire import Channel, ChannelClosed

RESULT = "\x00result"  # the reserved shipment name of the last expression's value


class NoStdinError(EOFError):
    """Raised by ``input()`` in a worker, which has no stdin to read from."""


class _NoStdin(io.TextIOBase):
    def _refuse(self, *args: Any) -> str:
        raise NoStdinError(
            "input() is not available in an isolated cell: the worker process has no stdin. "
            "Read the value in a normal cell first and use it here (it is shipped as an input)."
        )

    read = readline = _refuse

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        raise io.UnsupportedOperation("the isolated worker has no stdin")


class _Stream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of the worker: text goes to the kernel as it is written.

    Whole lines are sent at once; a partial line (a progress bar) is sent by a
    flusher thread within 50 ms, so output is live without one message per
    ``write`` call.  ``fileno()`` is the real descriptor, whose pipe the kernel
    also reads, so subprocesses given ``sys.stdout`` still reach the cell.
    """

    def __init__(self, name: str, chan: Channel, fd: int) -> None:
        self.name_ = name
        self._chan = chan
        self._fd = fd
        self._parts: list[str] = []
        self._lock = threading.Lock()

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
            with self._lock:
                self._parts.append(text)
            if "\n" in text or len(text) > 8192:
                self.flush()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if not self._parts:
                return
            text, self._parts = "".join(self._parts), []
            try:
                self._chan.send("stream", (self.name_, text))
            except OSError:
                pass


def _watch_parent(chan: Channel) -> None:
    """Exit the whole process group the moment the kernel's end of the channel closes."""
    try:
        while chan.sock.recv(4096):
            pass
    except OSError:
        pass
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(70)


def _flusher(streams: list[_Stream], stop: threading.Event) -> None:
    while not stop.wait(0.05):
        for stream in streams:
            stream.flush()


def _become_subreaper() -> None:
    """Keep double-forked descendants in our tree, so the kernel can find and stop them."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        except Exception:
            pass


def _flush_c_stdio() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except Exception:
        pass


def _cell_traceback(exc: BaseException, filename: str) -> str:
    """The traceback from the cell's first frame on; the worker's own frames are noise."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))


def _fallback_bundle(value: Any) -> dict[str, Any]:
    """A display bundle for a value that cannot travel back: its ``_repr_*_`` methods and repr."""
    bundle: dict[str, Any] = {}
    mimebundle = getattr(value, "_repr_mimebundle_", None)
    if callable(mimebundle):
        try:
            got = mimebundle()
            if isinstance(got, tuple):
                got = got[0]
            bundle.update(got or {})
        except Exception:
            pass
    for mime, attr in (
        ("text/html", "_repr_html_"),
        ("text/markdown", "_repr_markdown_"),
        ("image/png", "_repr_png_"),
        ("image/svg+xml", "_repr_svg_"),
        ("text/latex", "_repr_latex_"),
        ("application/json", "_repr_json_"),
    ):
        method = getattr(value, attr, None)
        if mime not in bundle and callable(method):
            try:
                got = method()
            except Exception:
                continue
            if got is not None:
                if mime == "image/png" and isinstance(got, bytes):
                    import base64

                    got = base64.b64encode(got).decode("ascii")
                bundle[mime] = got
    try:
        bundle["text/plain"] = repr(value)
    except Exception as exc:
        bundle["text/plain"] = f"<{type(value).__qualname__} object; repr failed: {exc!r}>"
    return bundle


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


def _run(chan: Channel, job: dict[str, Any], buffers: list[bytearray]) -> None:
    from . import ship

    t0 = time.perf_counter()
    os.chdir(job["cwd"])
    sys.path[:] = job["sys_path"]
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = main
    ns = main.__dict__
    for hook in job.get("startup", ()):
        __import__(hook)
    chan.send("phase", ("start", time.perf_counter() - t0))

    t1 = time.perf_counter()
    ns.update(ship.loads(job["inputs"], job["data"], buffers, job["engine"]))
    del buffers
    chan.send("phase", ("load", time.perf_counter() - t1))

    filename = job["filename"]
    offset = job.get("line_offset", 0)
    shown = job.get("display_source", job["source"])
    linecache.cache[filename] = (len(shown), None, shown.splitlines(True), filename)
    body, tail = _compile_cell(job["source"], filename, offset, job["has_result"])

    t2 = time.perf_counter()
    value = None
    try:
        value = _execute(body, ns)
        if tail is not None:
            value = _execute(tail, ns)
    except BaseException as exc:  # the cell's exception, including KeyboardInterrupt
        if isinstance(exc, SystemExit):
            raise
        if not isinstance(exc, KeyboardInterrupt):
            display_worker.end_of_cell()  # figures left open show even when the cell failed
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        _flush_c_stdio()
        shipped = ship.dumps({"exc": exc}, skip_failures=True)
        chan.send(
            "error",
            {
                "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
                "message": str(exc),
                "traceback": _cell_traceback(exc, filename),
                "seconds": time.perf_counter() - t2,
                "names": shipped.names,
                "data": shipped.data,
                "engine": shipped.engine,
            },
            shipped.buffers,
        )
        return
    display_worker.end_of_cell()  # show open figures (and close them, so none travels back live)
    run_seconds = time.perf_counter() - t2
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    _flush_c_stdio()
    chan.send("phase", ("run", run_seconds))

    t3 = time.perf_counter()
    out = {name: ns[name] for name in job["outputs"] if name in ns}
    bundle = None
    if tail is not None and value is not None:
        out[RESULT] = value
    shipped = ship.dumps(out, skip_failures=True)
    display_worker.explain_skipped(shipped.skipped, out)
    if RESULT in shipped.skipped:
        bundle = display_worker.result_bundle(value)  # the kernel's formatter, or _fallback_bundle
        shipped.skipped.pop(RESULT)
    chan.send(
        "result",
        {
            "names": shipped.names,
            "data": shipped.data,
            "engine": shipped.engine,
            "sizes": shipped.sizes,
            "skipped": shipped.skipped,
            "result_bundle": bundle,
            "dump_seconds": time.perf_counter() - t3,
        },
        shipped.buffers,
    )


def _execute(code: types.CodeType, ns: dict[str, Any]) -> Any:
    result = eval(code, ns)
    if code.co_flags & 0x80:  # CO_COROUTINE: the cell used top-level await
        import asyncio

        result = asyncio.run(_await(result))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


def main(fd: int) -> None:
    """Entry point of a worker process; ``fd`` is the worker's end of the socketpair."""
    import socket

    os.set_inheritable(fd, False)
    chan = Channel(socket.socket(fileno=fd))
    _become_subreaper()
    sys.stdin = _NoStdin()
    try:
        kind, job, buffers = chan.recv()
    except ChannelClosed:
        os._exit(0)
    if kind != "run":
        os._exit(2)
    threading.Thread(target=_watch_parent, args=(chan,), daemon=True, name="watch-parent").start()
    streams = [_Stream("stdout", chan, 1), _Stream("stderr", chan, 2)]
    sys.stdout, sys.stderr = streams
    display_worker.install(chan)  # display(), plots, widgets: before inputs load (they may import)
    stop = threading.Event()
    threading.Thread(target=_flusher, args=(streams, stop), daemon=True, name="flusher").start()
    code = 0
    try:
        _run(chan, job, buffers)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            sys.stderr.write(f"{exc.code}\n")
    except BaseException:
        # Our own failure (a bad input, an import error while loading inputs):
        # report it as the cell's error, so the kernel shows it instead of a crash.
        exc = sys.exc_info()[1]
        assert exc is not None
        try:
            chan.send(
                "error",
                {
                    "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
                    "message": str(exc),
                    "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                    "stage": "setup",
                    "names": [],
                    "data": b"",
                    "engine": "pickle",
                },
            )
        except OSError:
            pass
    stop.set()
    for stream in streams:
        stream.flush()
    _flush_c_stdio()
    os._exit(code)
