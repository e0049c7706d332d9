"""Let front-end comm messages through while an isolated cell waits, on every ipykernel.

An ``%%isolate`` cell awaits its worker on the kernel's event loop so that the
panel's Stop button and the JupyterLab status item's "stop" request can act
while the cell runs.  Both are comm messages on the main shell channel, and
only ipykernel 7.4+ (which needs Python 3.11+) dispatches comm messages while
an execute request is still in progress.  Older kernels handle main-shell
messages strictly one after another (ipykernel 6 through a queue that waits for
each handler, ipykernel 7.0-7.3 through a lock held for the whole execute
request), so a Stop click waited in line behind the very cell it was meant to
stop, and only took effect when the cell had ended by itself.

:func:`let_comms_through` gives those kernels what 7.4 does, for the duration
of one wait: comm messages arriving on the main shell are dispatched at once;
every other message still waits for the cell and keeps its order.  A comm
message dispatched this way publishes no busy/idle status (the kernel is still
busy with the cell), and afterwards the cell's parent message and SIGINT
handler are put back, so the cell's later output, its reply and its final
idle status go where they belong.  On ipykernel 7.4+, outside a kernel, or on
a kernel whose internals look unfamiliar, it does nothing.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

COMM_TYPES = frozenset({"comm_open", "comm_msg", "comm_close"})

log = logging.getLogger(__name__)


def _nothing() -> None:
    return None


def let_comms_through() -> Callable[[], None]:
    """Dispatch comm messages during the running cell; returns the function that stops it.

    Call it on the kernel's event loop, in the main thread, while the cell's
    execute request is being handled.  Never raises: if anything about the
    kernel is not as expected, comm messages simply wait for the cell as before.
    """
    if threading.current_thread() is not threading.main_thread():
        return _nothing  # a subshell: its messages never wait for the main shell
    try:
        from IPython import get_ipython

        shell = get_ipython()
        kernel = getattr(shell, "kernel", None) if shell is not None else None
        if kernel is None or getattr(kernel, "session", None) is None:
            return _nothing
        dispatch = kernel.dispatch_shell
        if "concurrent" in inspect.signature(dispatch).parameters:
            return _nothing  # ipykernel 7.4+ dispatches comm messages during a cell itself
        lock = getattr(kernel, "_main_asyncio_lock", None)
        if isinstance(lock, asyncio.Lock):  # ipykernel 7.0-7.3
            return _bypass_lock(kernel, lock) if lock.locked() else _nothing
        queue = getattr(kernel, "msg_queue", None)
        if queue is not None and callable(getattr(queue, "put_nowait", None)):  # ipykernel 6
            return _intercept_queue(kernel, queue)
    except Exception:
        log.debug("nbisolate: cannot let comm messages through during the cell", exc_info=True)
    return _nothing


def _is_comm(kernel: Any, raw: Any) -> bool:
    """Whether a raw shell message (its ZMQ frames) is a comm message; reads only the header."""
    try:
        _, frames = kernel.session.feed_identities(raw, copy=False)
        header = kernel.session.deserialize(frames, content=False, copy=False)["header"]
    except Exception:
        return False
    return header.get("msg_type") in COMM_TYPES


class _Quiet:
    """While a comm message is dispatched: no busy/idle status on the main shell."""

    NAMES = ("_publish_status", "_publish_status_and_flush")

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel

    def __enter__(self) -> None:
        main = threading.current_thread()
        for name in self.NAMES:
            original = getattr(self.kernel, name, None)
            if original is None:
                continue

            def quiet(status: Any, channel: Any, *args: Any, _o: Any = original, **kw: Any) -> Any:
                if channel == "shell" and threading.current_thread() is main:
                    return None
                return _o(status, channel, *args, **kw)

            setattr(self.kernel, name, quiet)

    def __exit__(self, *exc: Any) -> None:
        for name in self.NAMES:
            self.kernel.__dict__.pop(name, None)


async def _dispatch_comm(kernel: Any, call: Callable[[], Awaitable[Any]], parent: tuple[Any, Any]) -> None:
    """Dispatch one comm message now, then restore what the cell needs."""
    # Output the cell wrote and the kernel has not sent yet must go with the cell.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    # The kernel's handler hooks save the SIGINT handler in force (the cell's own)
    # over the one the kernel restores after the cell: keep the kernel's.
    saved_sigint = getattr(kernel, "saved_sigint_handler", None)
    try:
        with _Quiet(kernel):
            await call()
    finally:
        if saved_sigint is not None:
            kernel.saved_sigint_handler = saved_sigint
        kernel.set_parent(parent[0], parent[1], channel="shell")


def _cell_parent(kernel: Any) -> tuple[Any, Any]:
    return kernel._parent_ident["shell"], kernel.get_parent("shell")


class _NoLock:
    """Stands in for the main shell's lock while the cell holds the real one."""

    def __init__(self, held: asyncio.Lock) -> None:
        self.held = held

    def locked(self) -> bool:
        return self.held.locked()

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: Any) -> bool:
        return False


def _bypass_lock(kernel: Any, held: asyncio.Lock) -> Callable[[], None]:
    """ipykernel 7.0-7.3: each main-shell message waits for ``held`` before its dispatch.

    While the cell waits, new messages pass a stand-in lock and reach our
    dispatch: comm messages run at once, the others wait for the real lock, in
    the order they came, exactly as they would have.
    """
    original = kernel.dispatch_shell
    parent = _cell_parent(kernel)

    async def dispatch_shell(msg: Any, *args: Any, subshell_id: Any = None, **kw: Any) -> Any:
        if subshell_id is None and _is_comm(kernel, msg):
            await _dispatch_comm(
                kernel, lambda: original(msg, *args, subshell_id=None, **kw), parent
            )
            return None
        if subshell_id is None:
            async with held:
                return await original(msg, *args, subshell_id=None, **kw)
        return await original(msg, *args, subshell_id=subshell_id, **kw)

    kernel.dispatch_shell = dispatch_shell
    kernel._main_asyncio_lock = _NoLock(held)

    def release() -> None:
        kernel._main_asyncio_lock = held
        kernel.__dict__.pop("dispatch_shell", None)

    return release


def _intercept_queue(kernel: Any, queue: Any) -> Callable[[], None]:
    """ipykernel 6: messages wait in ``kernel.msg_queue`` until the cell's handler returns.

    While the cell waits, a comm message put on the queue is dispatched in a
    task of its own instead; the others are queued as before.  A comm message
    whose task has not started when the cell ends goes back to the queue.
    """
    loop = asyncio.get_running_loop()
    original_put = queue.put_nowait
    parent = _cell_parent(kernel)
    pending: dict[asyncio.Task[None], Any] = {}

    def put_nowait(item: Any) -> Any:
        try:
            _, dispatch, args = item
            comm = bool(args) and _is_comm(kernel, args[0])
        except Exception:
            comm = False
        if not comm:
            return original_put(item)

        async def run() -> None:
            pending.pop(task, None)
            await _dispatch_comm(kernel, lambda: dispatch(*args), parent)

        task = loop.create_task(run())
        pending[task] = item
        task.add_done_callback(lambda t: pending.pop(t, None))
        return None

    queue.put_nowait = put_nowait

    def release() -> None:
        queue.__dict__.pop("put_nowait", None)
        for task, item in list(pending.items()):
            task.cancel()
            original_put(item)
        pending.clear()

    return release
