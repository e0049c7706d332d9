"""Background cells: ``%%isolate --bg`` returns a :class:`Job` at once and runs on.

A background cell is an ordinary isolated run (a :class:`~nbisolate.runner.CellRun`,
or a :class:`~nbisolate.sweep.Sweep` with ``--over``) that nobody awaits.  One
driver task on the kernel's event loop feeds every job the events its backend
delivers, ticks its listeners and, when a run is over, asks for its outcome,
exactly as :mod:`nbisolate.wait` does for a foreground cell.  It does not use
``wait_async`` because a job must also be driven by a *synchronous* waiter
(``job.wait()``, ``%isolate_wait``): such a wait holds the loop, so it pumps
the same queue itself, and the jobs keep going while it blocks.

**Where the output goes.** ipykernel sends each output with the parent header
of the request being handled; a job's output belongs to the cell that started
it, which is long over.  Every event of a job is handled with that cell's
parent set for the current context only (``shell.set_thread_parent``): its
stream text, displays, panel and traceback land in its own output area while
other cells run.

**What the job sees and binds.** The inputs are read from a shallow copy of the
namespace taken when the cell ran (a queued job does not see later
assignments), and the results are bound when the job ends, between or during
other cells.  A name the notebook changed meanwhile (assigned or deleted since
the cell ran) keeps the notebook's newer value: the job's value stays in
``job.result()`` and a line under the job's cell names each such name.  A name
the cell deleted (``del tmp``) is deleted in the notebook too, by the same rule.

**Limits.** At most :data:`settings` ``["bg_limit"]`` jobs run at once (default:
the number of cores); the others wait, shown as ``queued``.  Unloading the
extension and the kernel's exit stop every job (and the worker's watchdog ends
any worker whose kernel died).
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
import queue
import signal
import threading
import time
from collections.abc import Iterable, MutableMapping
from typing import Any

from .units import shorten
from .wait import TICK_SECONDS

REPLAY_BYTES = 1024 * 1024
"""Output kept per job for a page that reloads while it runs; the rest only goes live."""

settings: dict[str, Any] = {"bg_limit": max(1, os.cpu_count() or 1)}
"""``bg_limit``: how many background jobs run at once (``%isolate_config bg_limit=N``)."""

_MISSING = object()
_ids = itertools.count(1)


class JobNotDone(RuntimeError):
    """``job.result()`` before the job ended."""


class Job:
    """A background cell: ``%%isolate --bg`` returns one at once.

    ``job.done()``, ``job.result()`` (the dict of values the cell bound, or the
    exception that ended it), ``await job``, ``job.wait(timeout)`` and
    ``job.stop()``.  ``state`` is ``queued``, ``running``, ``done``, ``failed``
    or ``stopped``.

    Binding: when the job ends, each name it binds goes into the notebook
    unless the notebook changed that name (assigned or deleted it) since the
    cell ran; the notebook's newer value then wins, the job's value stays in
    ``job.result()``, and ``job.kept`` plus a line under the cell name it.
    A name the cell deleted is deleted in the notebook (``job.deleted``) unless
    the notebook assigned it since (``job.kept_deleted``).
    """

    def __init__(
        self, run: Any, namespace: MutableMapping[str, Any], start: dict[str, Any],
        first_line: str, parent: dict[str, Any] | None, shell: Any,
    ) -> None:
        self.id = next(_ids)
        self.run = run
        self.label = first_line
        self.namespace = namespace
        self._start = start  # the namespace as the cell saw it (shallow): the conflict rule
        self.parent = parent
        self.shell = shell
        self.state = "queued"
        self.submitted = time.time()
        self.started: float | None = None
        self.ended: float | None = None
        self.value: Any = None
        self.values: dict[str, Any] = {}
        self.bound: list[str] = []
        self.kept: list[str] = []
        self.deleted: list[str] = []  # names the cell deleted (`del name`), deleted here too
        self.kept_deleted: list[str] = []  # ...but assigned by the notebook meanwhile: kept
        self.error: BaseException | None = None
        self._stop_asked = False
        self._event: asyncio.Event | None = None
        self._next_tick = 0.0
        self._where = ("", "")
        # The ids of its workers' handles, kept when the run is let go: a worker outlives its
        # result for a moment (it exits once the kernel lets it go), and the status item must
        # name it this job's, not take it for a cell running in the foreground.
        self.handle_ids: list[str] = []
        self.outputs: list[dict[str, Any]] = []
        """The cell's output so far, for a view that opens later (:func:`replay`)."""
        self._kept_bytes = 0
        self._displays: dict[str, int] = {}
        self.cell: dict[str, Any] = {"msg_id": None, "id": "", "count": None}
        """The cell that started it, as the JupyterLab status item names and scrolls to it."""

    # -- the handle ---------------------------------------------------------------
    def done(self) -> bool:
        """True once the job ended (done, failed or stopped)."""
        return self.state in ("done", "failed", "stopped")

    def result(self) -> dict[str, Any]:
        """The values the cell bound (all of them, kept or not); raises what ended a failed job."""
        if not self.done():
            raise JobNotDone(
                f"background job {self.id} is still {self.state}; wait for it first: "
                f"`await job`, job.wait() or %isolate_wait {self.id}"
            )
        if self.error is not None:
            raise self.error
        return dict(self.values)

    def stop(self) -> None:
        """Stop the job and every process it started; nothing is bound."""
        _table.stop(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends or ``timeout`` seconds pass; True if it ended.

        It drives the jobs itself while it blocks (the kernel's loop cannot), and
        an interrupt ends the wait, not the job.
        """
        return _table.wait([self], timeout)

    def __await__(self) -> Any:
        return self._await().__await__()

    async def _await(self) -> dict[str, Any]:
        while not self.done():
            if self._event is None:
                self._event = asyncio.Event()
            await self._event.wait()
        return self.result()

    # -- what the table shows -------------------------------------------------------
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or time.time()) - self.started

    def where(self) -> tuple[str, str]:
        """(host, pid) of the job's worker(s), as far as known."""
        if self.run is None:  # ended and released: as it was at the end
            return self._where
        runs = getattr(self.run, "runs", None) or [self.run]
        handles = [getattr(r, "handle", None) for r in runs]
        handles = [h for h in handles if h is not None]
        if not handles:
            return "", ""
        infos = []
        for h in handles:
            try:
                infos.append(h.info)
            except Exception:
                continue
        hosts = sorted({i.host for i in infos if i.host})
        pids = [str(i.pid) for i in infos if i.pid is not None]
        pid = pids[0] if len(pids) == 1 else (f"{len(pids)} workers" if pids else "")
        return ", ".join(hosts), pid

    def __repr__(self) -> str:
        return f"<nbisolate Job {self.id} {self.state}: {self.label}>"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        how = {
            "queued": f"queued: {settings['bg_limit']} background jobs already run (bg_limit)",
            "running": "started in the background",
        }.get(self.state, self.state)
        p.text(
            f"Job {self.id} {how}: {self.label}\n"
            f"Its output and results arrive in this cell. "
            f"%isolate_jobs lists jobs, %isolate_wait {self.id} waits, %isolate_stop {self.id} stops."
        )

    def keep(self, output: dict[str, Any], display_id: str | None = None) -> None:
        """Keep one output (nbformat) for :func:`replay`, up to :data:`REPLAY_BYTES`."""
        size = len(repr(output))
        if self._kept_bytes + size > REPLAY_BYTES:
            if self._kept_bytes <= REPLAY_BYTES:
                self._kept_bytes = REPLAY_BYTES + 1
                self.outputs.append({"output": {
                    "output_type": "stream", "name": "stderr",
                    "text": "nbisolate: the rest of this job's output was not kept for pages "
                            "opened later (the limit is 1 MB); it went to the page that was open.\n",
                }})
            return
        self._kept_bytes += size
        if (
            output["output_type"] == "stream" and self.outputs
            and self.outputs[-1]["output"].get("output_type") == "stream"
            and self.outputs[-1]["output"].get("name") == output["name"]
        ):
            self.outputs[-1]["output"]["text"] += output["text"]
            return
        if display_id:
            self._displays[display_id] = len(self.outputs)
        self.outputs.append({"output": output, "display_id": display_id})

    def keep_event(self, event: Any) -> None:
        """Keep what a worker event puts in the cell's output area."""
        kind, data = getattr(event, "kind", None), getattr(event, "data", None)
        if kind == "stream":
            name, text = data
            self.keep({"output_type": "stream", "name": name, "text": text})
        elif kind in ("display", "update_display") and isinstance(data, dict):
            display_id = (data.get("transient") or {}).get("display_id")
            output = {"output_type": "display_data", "data": data.get("data", {}),
                      "metadata": data.get("metadata") or {}}
            if kind == "update_display":
                index = self._displays.get(display_id or "")
                if index is not None and index < len(self.outputs):
                    self.outputs[index]["output"] = output
            else:
                self.keep(output, display_id)
        elif kind == "error_output" and isinstance(data, dict):
            self.keep({"output_type": "error", "ename": data.get("ename", ""), "evalue": data.get("evalue", ""),
                       "traceback": list(data.get("traceback") or ())})
        elif kind == "clear_output":
            self.outputs.clear()
            self._displays.clear()
            self._kept_bytes = 0

    def _notify_waiters(self) -> None:
        if self._event is not None:
            self._event.set()


class _Table:
    """Every job of this kernel, and the one queue their events arrive on."""

    def __init__(self) -> None:
        self.jobs: dict[int, Job] = {}
        self.items: queue.SimpleQueue[tuple[Job, Any]] = queue.SimpleQueue()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task[None] | None = None
        self._pumping = False

    # -- submitting -----------------------------------------------------------------
    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> Job:
        self.jobs[job.id] = job
        if self.loop is not loop:
            self.loop, self.wake, self.task = loop, None, None
        self._start_queued()
        self._ensure_driver()
        return job

    def active(self) -> list[Job]:
        return [j for j in self.jobs.values() if not j.done()]

    def running(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.state == "running"]

    def _start_queued(self) -> None:
        limit = max(1, int(settings["bg_limit"]))
        for job in list(self.jobs.values()):
            if len(self.running()) >= limit:
                return
            if job.state == "queued":
                self._begin(job)

    def _begin(self, job: Job) -> None:
        job.state = "running"
        job.started = time.time()
        _lab_changed()
        job._next_tick = time.perf_counter() + TICK_SECONDS

        def put(item: Any, job: Job = job) -> None:
            self.items.put((job, item))
            loop, wake = self.loop, self.wake
            if loop is not None and wake is not None:
                try:
                    loop.call_soon_threadsafe(wake.set)
                except RuntimeError:  # the loop closed: the kernel is going
                    pass

        try:
            with _parent(job):
                job.run.begin(put)
        except BaseException as exc:  # nothing started: the job failed at once
            self._finish(job, failure=exc)

    # -- driving --------------------------------------------------------------------
    def _ensure_driver(self) -> None:
        if self.loop is None or (self.task is not None and not self.task.done()):
            return
        self.wake = asyncio.Event()
        self.task = self.loop.create_task(self._drive())

    async def _drive(self) -> None:
        """The driver task: runs on the kernel's loop while any job is queued or running."""
        assert self.wake is not None
        while self.active():
            try:
                await asyncio.wait_for(self.wake.wait(), TICK_SECONDS)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()
            try:
                self.pump(0.0)
            except KeyboardInterrupt:
                # An interrupt meant for a cell that happened to land in the driver: the
                # jobs are not that cell's; the event being fed may be lost, never the job.
                continue

    def pump(self, block: float) -> None:
        """Feed every queued event to its job (waiting up to ``block`` s for the first),
        tick the jobs, finish those that are over and start queued ones."""
        if self._pumping:  # a listener waited on a job from inside a feed: no re-entry
            return
        self._pumping = True
        try:
            try:
                first = self.items.get(timeout=block) if block > 0 else self.items.get_nowait()
            except queue.Empty:
                first = None
            item: tuple[Job, Any] | None = first
            while item is not None:
                job, event = item
                if job.state == "running":
                    try:
                        with _parent(job):
                            job.run.feed(event)
                        job.keep_event(event)
                    except Exception as exc:
                        self._finish(job, failure=exc)
                    if getattr(event, "kind", None) == "started":
                        _lab_changed()  # the status item now knows its worker is this job's
                try:
                    item = self.items.get_nowait()
                except queue.Empty:
                    item = None
            for job in list(self.jobs.values()):
                if job.state == "queued" and job._stop_asked:  # stopped from another thread
                    self._finish(job, failure=_stopped_before_start(job))
            now = time.perf_counter()
            for job in self.running():
                if job.run.busy and now >= job._next_tick:
                    job._next_tick = now + TICK_SECONDS
                    with _parent(job):
                        job.run.tick()
                if not job.run.busy:
                    self._finish(job)
            self._start_queued()
        finally:
            self._pumping = False

    def wait(self, jobs: Iterable[Job], timeout: float | None = None) -> bool:
        """Block until ``jobs`` end (or ``timeout``), driving every job meanwhile; an interrupt
        ends the wait (KeyboardInterrupt), never the jobs."""
        jobs = list(jobs)
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._pumping:
            raise RuntimeError(
                "cannot wait for a background job from inside the handling of a job's event "
                "(a run listener); wait in a cell instead."
            )
        if threading.current_thread() is not threading.main_thread():
            # Another thread: the driver on the kernel's loop keeps the jobs going; only watch.
            while not all(j.done() for j in jobs):
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)
            return True
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while not all(j.done() for j in jobs):
                left = TICK_SECONDS if deadline is None else min(TICK_SECONDS, deadline - time.monotonic())
                if left <= 0:
                    return False
                try:
                    self.pump(left)
                except KeyboardInterrupt:
                    raise _wait_interrupted() from None
            return True
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            self._ensure_driver()

    # -- ending ---------------------------------------------------------------------
    def stop(self, job: Job) -> None:
        if job.done():
            return
        job._stop_asked = True
        if job.state == "queued":
            if threading.current_thread() is threading.main_thread() and not self._pumping:
                self._finish(job, failure=_stopped_before_start(job))
            elif self.loop is not None and self.wake is not None:  # the driver finishes it
                try:
                    self.loop.call_soon_threadsafe(self.wake.set)
                except RuntimeError:
                    pass
            return
        job.run.stop("interrupt")

    def stop_all(self) -> None:
        """Stop every job (the extension's unload, the kernel's exit)."""
        for job in list(self.jobs.values()):
            try:
                self.stop(job)
            except Exception:
                pass

    def _finish(self, job: Job, failure: BaseException | None = None) -> None:
        """The run is over: bind its results under the conflict rule, or show why it failed."""
        if job.done():
            return
        with _parent(job):
            before = dict(job.namespace)
            try:
                if failure is not None:
                    raise failure
                value = job.run.outcome()
            except BaseException as exc:
                job.error = exc
                job.state = "stopped" if (job._stop_asked or isinstance(exc, KeyboardInterrupt)) else "failed"
                job.ended = time.time()
                _safely(job.run.done, exc)
                if failure is None:
                    # As in a foreground cell: a failed cell bound nothing, a sweep with a
                    # failing value bound the values that arrived before it raised.
                    self._bind(job, before)
                _show_error(job, exc)
            else:
                job.value = value
                _safely(job.run.done, None)
                self._bind(job, before)
                job.state = "done"
                job.ended = time.time()
                _show_end(job)
        # The table keeps every job; the namespace copies and the run (its panel, its
        # shipment) would keep the notebook's old values alive with it.
        job._where = job.where()
        job.handle_ids = _handle_ids(job)
        job.run = None
        job.namespace = {}
        job._start = {}
        job._notify_waiters()
        _lab_changed()

    def _bind(self, job: Job, before: dict[str, Any]) -> None:
        scratch = job.namespace
        changed = [
            n for n in scratch if before.get(n, _MISSING) is not scratch[n]
        ] + [n for n in getattr(job.run, "returned", None) or () if n in scratch]
        ns = job.shell.user_ns
        for name in dict.fromkeys(changed):
            value = scratch[name]
            job.values[name] = value
            if ns.get(name, _MISSING) is job._start.get(name, _MISSING):
                ns[name] = value
                job.bound.append(name)
            else:
                job.kept.append(name)
        # `del name` in the cell (the run took it out of the job's copy): out of the notebook
        # too, under the same rule: a name the notebook assigned meanwhile keeps its value.
        for name in [n for n in before if n not in scratch]:
            if name not in ns:
                continue
            if ns[name] is job._start.get(name, _MISSING):
                del ns[name]
                job.deleted.append(name)
            else:
                job.kept_deleted.append(name)


def _stopped_before_start(job: Job) -> KeyboardInterrupt:
    interrupt = KeyboardInterrupt(
        f"background job {job.id} was stopped before it started; nothing ran and no notebook "
        "variable was changed."
    )
    interrupt._render_traceback_ = lambda: [f"KeyboardInterrupt: {interrupt}"]  # type: ignore[attr-defined]
    return interrupt


def _lab_changed() -> None:
    """Tell the JupyterLab status item (nbisolate.labcomm) that the jobs changed."""
    import sys

    lab = sys.modules.get("nbisolate.labcomm")
    if lab is not None:
        try:
            lab.refresh()
        except Exception:
            pass


def _wait_interrupted() -> KeyboardInterrupt:
    """A KeyboardInterrupt shown as its one sentence (the jobs are fine, nothing to debug)."""
    interrupt = KeyboardInterrupt(
        "the wait was interrupted; the background jobs keep running "
        "(%isolate_jobs lists them, %isolate_stop ID stops one)."
    )
    interrupt._render_traceback_ = lambda: [f"KeyboardInterrupt: {interrupt}"]  # type: ignore[attr-defined]
    return interrupt


_table = _Table()


class _parent:
    """Publish as the job's own cell: its parent header for the current context only."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.tokens: Any = None

    def __enter__(self) -> None:
        shell, parent = self.job.shell, self.job.parent
        setter = getattr(shell, "set_thread_parent", None)
        if parent is not None and setter is not None:
            self.tokens = setter(parent)

    def __exit__(self, *exc: Any) -> None:
        if self.tokens is not None:
            self.job.shell.reset_thread_parent(self.tokens)


def _pretty(job: Job) -> str:
    from IPython.lib.pretty import pretty

    return pretty(job)


def _safely(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        pass


def _stamp(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t or time.time()))


def _say(text: str, job: Job | None = None) -> None:
    from IPython.display import display

    display({"text/plain": text}, raw=True)
    if job is not None:
        job.keep({"output_type": "display_data", "data": {"text/plain": text}, "metadata": {}})


def _show_end(job: Job) -> None:
    """A line under the job's cell: when it ended, what it bound, what it left to the notebook."""
    from .panel import fmt_seconds

    parts = [f"nbisolate: background job {job.id} done at {_stamp(job.ended)} "
             f"after {fmt_seconds(job.elapsed())}"]
    parts.append("; bound " + ", ".join(job.bound) if job.bound else "; bound nothing")
    if job.deleted:
        parts.append("; deleted " + ", ".join(job.deleted))
    if job.kept_deleted:
        parts.append(
            f"; did not delete {', '.join(job.kept_deleted)}: the notebook assigned "
            f"{'it' if len(job.kept_deleted) == 1 else 'them'} while the job ran"
        )
    if job.kept:
        parts.append(
            f"; kept the notebook's newer {', '.join(job.kept)} (changed while the job ran): "
            f"the job's value is in job.result()[{job.kept[0]!r}]"
        )
    _say("".join(parts) + ".", job)
    if job.value is not None:
        from IPython.display import display

        display(job.value)


def _show_error(job: Job, exc: BaseException) -> None:
    """The traceback under the job's cell: it cannot raise into a cell that is over."""
    what = "stopped" if job.state == "stopped" else "failed"
    changed = (
        f"bound what arrived: {', '.join(job.bound)}" if job.bound else "no notebook variable was changed"
    )
    _say(f"nbisolate: background job {job.id} {what} at {_stamp(job.ended)}; {changed}.", job)
    shell = job.shell
    try:
        shell.showtraceback((type(exc), exc, exc.__traceback__))
    except Exception:
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__)


# -- what the magics call ---------------------------------------------------------------
def kernel_loop() -> asyncio.AbstractEventLoop | None:
    """The kernel's running loop, which keeps jobs going between cells (None outside one)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def scratch_namespace(user_ns: MutableMapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what the run reads and binds into, the namespace as the cell saw it): two shallow copies."""
    return dict(user_ns), dict(user_ns)


def submit(run: Any, shell: Any, scratch: dict[str, Any], start: dict[str, Any], cell: str) -> Job:
    """Queue ``run`` as a background job of this kernel and return its handle at once."""
    loop = kernel_loop()
    if loop is None:
        raise RuntimeError("no running event loop")
    kernel = getattr(shell, "kernel", None)
    parent = kernel.get_parent() if kernel is not None else None
    first = next((ln.strip() for ln in cell.splitlines() if ln.strip()), "(empty cell)")
    job = Job(run, scratch, start, shorten(first, 60), parent, shell)
    metadata = (parent or {}).get("metadata") or {}
    job.cell = {
        "msg_id": ((parent or {}).get("header") or {}).get("msg_id"),
        "id": str(metadata.get("cellId") or "") if isinstance(metadata, dict) else "",
        "count": getattr(shell, "execution_count", None),
    }
    _table.submit(job, loop)
    job.keep({"output_type": "execute_result", "execution_count": job.cell["count"],
              "data": {"text/plain": _pretty(job)}, "metadata": {}})
    return job


def find(ids: Iterable[str]) -> list[Job]:
    """Jobs by id (``3`` or ``all``); raises ValueError naming an unknown id and the known ones."""
    ids = list(ids)
    if not ids or ids == ["all"]:
        return list(_table.jobs.values())
    found = []
    for text in ids:
        try:
            found.append(_table.jobs[int(text)])
        except (ValueError, KeyError):
            known = ", ".join(map(str, _table.jobs)) or "none yet"
            raise ValueError(f"no background job {text!r} (the jobs are: {known})") from None
    return found


def wait(jobs: Iterable[Job], timeout: float | None = None) -> bool:
    return _table.wait(jobs, timeout)


def stop_all() -> None:
    _table.stop_all()


def jobs() -> list[Job]:
    return list(_table.jobs.values())


LAB_JOBS = 20
"""Jobs the JupyterLab status item is told about: every unfinished one and the newest ended."""


def _handle_ids(job: Job) -> list[str]:
    """The ids of the handles of the workers ``job``'s run started (a sweep's: one per value)."""
    runs = getattr(job.run, "runs", None) or ([job.run] if job.run is not None else [])
    return [str(handle.id) for handle in (getattr(run, "handle", None) for run in runs) if handle is not None]


def lab_snapshot() -> tuple[dict[str, Job], list[dict[str, Any]]]:
    """For nbisolate.labcomm (any thread): which worker handle belongs to which job, and one
    row per job (unfinished ones, then the newest ended) for the status item."""
    owners: dict[str, Job] = {}
    rows = []
    listed = list(_table.jobs.values())
    ended = [j for j in listed if j.done()][-LAB_JOBS:]
    for job in [j for j in listed if not j.done()] + ended:
        for handle_id in _handle_ids(job) if job.run is not None else job.handle_ids:
            owners[handle_id] = job
        error = job.error
        rows.append({
            "id": job.id,
            "label": job.label,
            "state": job.state,
            "started": job.started,
            "ended": job.ended,
            "cell": dict(job.cell),
            "error": None if error is None else f"{type(error).__name__}: {error}"[:300],
            "bound": list(job.bound),
            "kept": list(job.kept),
        })
    return owners, rows


def replay(job_id: Any) -> list[dict[str, Any]]:
    """The output a job's cell has had so far (nbformat outputs with their display ids), for
    a page that reloaded or reopened the notebook while the job runs (any thread)."""
    try:
        job = _table.jobs[int(job_id)]
    except (KeyError, TypeError, ValueError):
        return []
    return [dict(item) for item in list(job.outputs)]


def stop_by_id(job_id: Any) -> bool:
    """Stop a job from the status item (any thread); False if there is no such job."""
    try:
        job = _table.jobs[int(job_id)]
    except (KeyError, TypeError, ValueError):
        return False
    _table.stop(job)
    return True


class JobTable:
    """``%isolate_jobs``: one row per job (id, first line, state, started, elapsed, host, pid)."""

    COLUMNS = ("id", "cell", "state", "started", "elapsed", "host", "pid")

    def __init__(self, jobs: list[Job]) -> None:
        from .panel import fmt_seconds

        self.rows = []
        for j in jobs:
            host, pid = j.where()
            self.rows.append((
                str(j.id), j.label, j.state, _stamp(j.started) if j.started else "",
                fmt_seconds(j.elapsed()) if j.started else "", host, pid,
            ))

    def __repr__(self) -> str:
        if not self.rows:
            return "no background jobs (start one with %%isolate --bg)"
        table = [self.COLUMNS, *self.rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(self.COLUMNS))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                         for r in table)

    def _repr_html_(self) -> str:
        import html

        if not self.rows:
            return "<i>no background jobs (start one with %%isolate --bg)</i>"
        head = "".join(f"<th>{c}</th>" for c in self.COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in self.rows
        )
        return f"<table class='nbisolate-jobs'><tr>{head}</tr>{body}</table>"


atexit.register(stop_all)
