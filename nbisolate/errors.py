"""The exceptions a user of nbisolate can meet.

Every message says what happened, where (variable, member path, signal, exit
code, limit) and what to do next, because the person reading it is in the
middle of a notebook and should not need to read our source to recover.
"""

from __future__ import annotations

import signal


class IsolateError(Exception):
    """Base class of everything nbisolate raises on purpose.

    In IPython these show as their one-paragraph message: the frames of
    nbisolate's own machinery would only bury the part the user needs.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class IsolateUsageError(IsolateError, ValueError):
    """The magic or the API was called wrongly; nothing ran."""


class ShipError(IsolateError, TypeError):
    """An input variable cannot be sent to the worker; nothing ran."""

    def __init__(self, message: str, name: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.path = path


class RemoteError(IsolateError):
    """The cell raised an exception in the worker that cannot be rebuilt in the kernel.

    ``remote_type`` is the qualified name of the original exception type and
    ``remote_traceback`` the traceback as the worker formatted it, with the
    cell's own line numbers and source lines.
    """

    def __init__(self, remote_type: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.remote_message = message
        self.remote_traceback = remote_traceback


class IsolateTimeout(IsolateError, TimeoutError):
    """The cell ran longer than ``--timeout``; its process tree was killed."""

    def __init__(self, timeout: float, elapsed: float, pid: int | None, message: str | None = None) -> None:
        super().__init__(
            message
            or f"the isolated cell was stopped after {elapsed:.1f} s: it exceeded --timeout "
            f"{timeout:g} s (worker pid {pid} and every process it started were killed). "
            "No notebook variable was changed. Raise --timeout, or make the cell do less."
        )
        self.timeout = timeout
        self.elapsed = elapsed
        self.pid = pid


_LIKELY = {
    "SIGKILL": "often the out-of-memory killer (check `dmesg`, or cap memory with --mem)",
    "SIGSEGV": "a crash in C code (an extension module or ctypes call)",
    "SIGABRT": "an abort() in C code, often a failed assertion in an extension module",
    "SIGBUS": "a bad memory access in C code, or a memory-mapped file that shrank",
    "SIGFPE": "an arithmetic fault in C code",
    "SIGTERM": "something outside nbisolate terminated the worker",
    "SIGILL": "an extension module built for another CPU",
}


def describe_exit(returncode: int | None) -> str:
    """Turn a ``Popen.returncode`` into words: ``exit code 3`` or ``signal SIGSEGV (11)``."""
    if returncode is None:
        return "an exit status nbisolate could not learn"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"signal {name} ({-returncode})"
    return f"exit code {returncode}"


class WorkerCrashed(IsolateError):
    """The worker process died before it reported a result.

    ``cause``, when the worker said why before it went (the cell called
    ``sys.exit``), replaces the guess from the exit code or signal.
    """

    def __init__(
        self, returncode: int | None, pid: int | None, detail: str = "", cause: str | None = None
    ) -> None:
        how = describe_exit(returncode)
        signame = None
        if returncode is not None and returncode < 0:
            try:
                signame = signal.Signals(-returncode).name
            except ValueError:
                signame = None
        likely = _LIKELY.get(signame or "")
        if likely is None:
            if returncode is not None and returncode > 0:
                likely = "the cell (or a library it called) called os._exit(), or a C library called exit()"
            elif returncode == 0:
                likely = "the cell ended the process (sys.exit(0) or os._exit(0))"
            else:
                likely = "unknown"
        said = f"cause: {cause}" if cause else f"likely cause: {likely}"
        msg = (
            f"the isolated worker (pid {pid}) died with {how} before it returned; {said}. "
            "No notebook variable was changed; the kernel is fine and the next cell "
            "gets a fresh worker."
        )
        if detail:
            msg += f" {detail}"
        super().__init__(msg)
        self.returncode = returncode
        self.signal = signame
        self.pid = pid
