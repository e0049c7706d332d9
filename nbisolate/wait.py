"""The wait: one loop for every way a run is waited on.

A single cell and a sweep of many values wait the same way: events arrive
from backend threads into a queue; the waiting thread hands each to the run,
ticks the listeners every :data:`TICK_SECONDS` (even while output streams, so
a clock keeps moving), turns an interrupt into a stop of everything the run
started, and at the end asks the run for its outcome.  Only *how* the thread
waits differs:

* :func:`wait_sync` blocks the calling thread (terminal IPython, plain Python,
  ``run_cell_magic`` by hand); Ctrl-C arrives as ``KeyboardInterrupt``.
* :func:`wait_async` awaits on the running event loop, so a kernel keeps
  serving front-end messages (the panel's Stop button) meanwhile.  It installs
  its own SIGINT handler for the whole wait, from before the run begins (its
  inputs may still be serialized, its worker still starting) to the outcome:
  an interrupt that merely cancelled the awaiting task would leave the worker
  running, and in current ipykernel can take effect only when the awaited call
  returns, so the cell would run on and change the namespace.

Either way the run's listeners hear ``done`` exactly once, last, with the
exception that ended the wait or None (:meth:`Waitable.done`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

TICK_SECONDS = 0.25
"""Listeners get ``Event("tick")`` this often while a run is waited on."""


class Waitable(Protocol):
    """What :func:`wait_sync` and :func:`wait_async` drive (a ``CellRun`` or a ``Sweep``)."""

    def begin(self, put: Any) -> None:
        """Start the work; ``put(item)`` may be called from any thread with each event."""

    def feed(self, item: Any) -> None:
        """Handle one item that ``put`` received, in the waiting thread."""

    @property
    def busy(self) -> bool:
        """True while more items are expected."""

    def tick(self) -> None:
        """Time passed with nothing else to say."""

    def interrupt(self) -> None:
        """Stop everything started (Ctrl-C, the kernel's interrupt, a cancelled task)."""

    def outcome(self) -> Any:
        """The value, or raise; called once the run is no longer busy."""

    def done(self, error: BaseException | None) -> None:
        """Tell the listeners, once, that the run is over."""


@contextlib.contextmanager
def _ending(run: Waitable) -> Iterator[None]:
    """Tell ``run`` it is done when the wait ends: with the exception that ended it, if any."""
    try:
        yield
    except BaseException as exc:
        run.done(exc)
        raise
    run.done(None)


def wait_sync(run: Waitable) -> Any:
    """Run ``run`` to its end in this thread; Ctrl-C stops it (and raises its outcome)."""
    with _ending(run):
        items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        run.begin(items.put)
        next_tick = time.perf_counter() + TICK_SECONDS
        while run.busy:
            now = time.perf_counter()
            if now >= next_tick:
                run.tick()
                next_tick = now + TICK_SECONDS
            try:
                item = items.get(timeout=max(0.0, next_tick - now))
            except queue.Empty:
                continue
            except KeyboardInterrupt:
                run.interrupt()
                continue
            run.feed(item)
        value = run.outcome()
    return value


async def wait_async(run: Waitable) -> Any:
    """Run ``run`` to its end while awaiting on the running loop; SIGINT stops it."""
    with _ending(run):
        value = await _wait_async(run)
    return value


async def _wait_async(run: Waitable) -> Any:
    loop = asyncio.get_running_loop()
    # Events arrive from backend threads: appended to a deque, and the loop is woken at
    # most once per batch. A fast cell's dozen events thus cost a few wake-ups, and no
    # task or timer per event (asyncio.wait_for made one of each).
    items: collections.deque[Any] = collections.deque()
    waiter: list[asyncio.Future[None] | None] = [None]
    scheduled = [False]

    def resolve() -> None:
        future = waiter[0]
        if future is not None and not future.done():
            future.set_result(None)

    def wake() -> None:
        scheduled[0] = False
        resolve()

    loop_thread = threading.get_ident()
    over = [False]

    def put(item: Any) -> None:
        if over[0]:
            # The wait is over (the worker's exit, after its result): nobody feeds this item,
            # and waking the loop now would only take time from the kernel's reply.
            return
        items.append(item)
        # From the loop's own thread (a run that prepares at once): the loop looks at the
        # items before it awaits, so no wake-up (a write to the loop's pipe) is needed.
        if not scheduled[0] and threading.get_ident() != loop_thread:
            scheduled[0] = True
            try:
                loop.call_soon_threadsafe(wake)
            except RuntimeError:  # the loop closed under us: nobody is waiting any more
                pass

    previous = None
    if threading.current_thread() is threading.main_thread():
        # Before begin: an interrupt while the inputs are serialized or the worker
        # starts must stop the run, not be queued behind it by ipykernel.
        previous = signal.signal(signal.SIGINT, lambda signum, frame: run.interrupt())
    try:
        run.begin(put)
        next_tick = time.perf_counter() + TICK_SECONDS
        while run.busy:
            now = time.perf_counter()
            if now >= next_tick:
                run.tick()
                next_tick = now + TICK_SECONDS
            if items:
                run.feed(items.popleft())
                continue
            future = waiter[0] = loop.create_future()
            timer = loop.call_later(max(0.0, next_tick - now), resolve)
            try:
                if not items:  # an item that came in meanwhile needs no waiting
                    await future
            finally:
                timer.cancel()
                waiter[0] = None
        over[0] = True  # before the results are rebuilt: the worker's exit comes meanwhile
        if previous is not None:
            # Rebuilding the results: an interrupt now raises at once, before anything is bound.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return run.outcome()
    except asyncio.CancelledError:
        run.interrupt()
        raise
    finally:
        over[0] = True
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
