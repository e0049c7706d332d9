"""``%%isolate --over NAME=EXPR``: one cell, run once per value, in parallel.

Each value gets its own fresh worker process (here, at most ``os.cpu_count()``
at a time; with ``--backend dask``, as many at a time as the cluster has
threads) with ``NAME`` bound to that value and the same inputs as a plain
``%%isolate`` would ship.  Every other option means what it means for one
run: ``--timeout`` limits each run, ``--out`` narrows what each returns.

What comes back, decided for the person who runs a 2-hour sweep and sees one
value fail:

* every name the cell binds becomes a **list in the order of the values**,
  and the cell's last expression value (``Out``) too; a module the cell
  imports comes back as the module (not a list of the same module);
* a failed run (exception, timeout, crash) leaves ``None`` at its position,
  so the successful runs are never thrown away; ``NAME`` itself is never
  rebound in the notebook;
* after binding, if any run failed, the cell **raises** :class:`SweepError`,
  listing every failure (``seed=3: ZeroDivisionError: division by zero``)
  and showing the first one's remote traceback, so "Run all" stops and the
  failure cannot go unnoticed.  ``err.errors`` maps each failed position to
  its exception; ``err.results`` is the list ``Out`` would have been;
* if every run failed, nothing is bound;
* an interrupt (Ctrl-C, the Stop button) stops every run and binds nothing.

Output of parallel runs is interleaved line by line, each line prefixed with
``[NAME=value]``.  Progress goes to the listeners of the cell's run (the live
panel) as ``Event("sweep", {...})`` with ``total``, ``done``, ``failed``,
``running``, ``index``, ``value`` (a short repr), ``state`` (``started``,
``done``, ``failed``) and ``host`` where known; the ``started`` events of the
runs are forwarded too, so the panel shows where the latest one runs.
"""

from __future__ import annotations

import ast
import itertools
import re
import sys
import time
import types
from collections import ChainMap
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from . import backends, ship
from .errors import IsolateError, IsolateUsageError
from .events import Event
from .options import RunOptions
from .plan import plan_cell, user_packages
from .runner import CellRun, _shipped, type_name
from .units import short_repr
from .wait import wait_async, wait_sync

MAX_VALUES = 10_000
LEADER_FROM = 8
"""A local sweep of this many values or more runs them under one leader worker
(:mod:`nbisolate.sweep_leader`), which forks a child per value; fewer values
(and ``--mem``) get a worker each from the template, one run per value."""
SLIM_FROM = 64
"""A leader's sweep of this many values or more whose inputs and cell need no third-party
package starts its leader as a fresh interpreter (slim: the python and nbisolate's worker
modules only) instead of forking it from the template: forking a process costs in
proportion to its mappings, and a template that preloaded pandas makes every value's fork
cost ~3 ms of the leader's time instead of ~0.5 ms, which outweighs the ~80 ms a fresh
interpreter takes to start from a few dozen values on."""
PROGRESS_SECONDS = 0.1
"""A leader's sweep draws its progress at most this often, not once per value."""
_LEADER = -1  # the index of the leader's own events in the wait's queue


class SweepError(IsolateError):
    """Some runs of an ``--over`` sweep failed; the others' results were bound.

    ``errors`` maps the position of each failed value to its exception (with
    its remote traceback), ``labels`` gives ``NAME=value`` per position, and
    ``results`` is the list the cell's value would have been.
    """

    def __init__(
        self,
        name: str,
        labels: list[str],
        errors: dict[int, BaseException],
        bound: list[str],
        results: list[Any] | None = None,
    ) -> None:
        total = len(labels)
        lines = [f"  {labels[i]}: {_one_line(exc)}" for i, exc in sorted(errors.items())]
        if len(errors) < total:
            others = total - len(errors)
            kept = (
                f"The results of the other {others} run{'s' if others > 1 else ''} were bound as "
                "lists in the order of the values, with None where a run failed "
                f"({', '.join(bound) or 'no names'})."
            )
        else:
            kept = "No notebook variable was changed."
        super().__init__(
            f"{len(errors)} of {total} runs of --over {name} failed:\n"
            + "\n".join(lines)
            + f"\n{kept} Each failure's exception is in .errors (e.g. sys.last_value.errors); "
            "fix the cell and rerun, or rerun only the failed values with --over."
        )
        self.name = name
        self.labels = labels
        self.errors = errors
        self.bound = bound
        self.results = results

    def _render_traceback_(self) -> list[str]:
        lines = [f"SweepError: {self}"]
        first = min(self.errors)
        exc = self.errors[first]
        render = getattr(exc, "_render_traceback_", None)
        detail: list[str] = []
        if callable(render):
            try:
                detail = list(render())
            except Exception:
                detail = []
        if detail:
            lines.append(f"\n--- {self.labels[first]} ---")
            lines.extend(detail)
        return lines


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 200:
        first = first[:197] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _short(value: Any) -> str:
    return short_repr(value, 30)


_OVER = re.compile(r"(?:^|\s)--over(?:=|\s+)(.*?)(?=\s+--[A-Za-z]|\s*$)")


def split_over(line: str) -> tuple[str, str | None]:
    """Take ``--over SPEC`` out of a magic line: (the rest, SPEC or None).

    SPEC runs to the next ``--option`` or the end of the line, so an
    expression with spaces (``--over lr=[0.1, 0.01]``) needs no quotes;
    surrounding quotes are removed.
    """
    match = _OVER.search(line)
    if match is None:
        return line, None
    spec = match.group(1).strip()
    if len(spec) >= 2 and spec[0] == spec[-1] and spec[0] in "'\"":
        spec = spec[1:-1]
    return (line[: match.start()] + " " + line[match.end() :]).strip(), spec


def parse_over(spec: str, namespace: dict[str, Any]) -> tuple[str, list[Any]]:
    """``NAME=EXPR`` -> (NAME, the values of EXPR evaluated in the notebook); usage errors name the problem."""
    name, sep, expr = spec.partition("=")
    name, expr = name.strip(), expr.strip()
    if not sep or not name.isidentifier() or not expr:
        raise IsolateUsageError(
            f"--over {spec!r}: write NAME=EXPR, e.g. --over seed=range(8) or "
            "--over lr=[0.1, 0.01] (EXPR runs to the next --option); nothing ran."
        )
    try:
        values = eval(expr, namespace)  # the notebook's own expression, in its namespace
    except Exception as exc:
        raise IsolateUsageError(
            f"--over {name}={expr}: evaluating {expr!r} in the notebook raised "
            f"{type(exc).__name__}: {exc}; nothing ran."
        ) from None
    if isinstance(values, (str, bytes)):
        raise IsolateUsageError(
            f"--over {name}={expr} is a string, which would sweep its characters; give a list "
            f"instead, e.g. --over {name}=[{expr}]; nothing ran."
        )
    try:
        items = list(itertools.islice(iter(values), MAX_VALUES + 1))
    except TypeError:
        raise IsolateUsageError(
            f"--over {name}={expr}: a {type(values).__name__} is not a collection of values; "
            "give a list, range or other iterable; nothing ran."
        ) from None
    if not items:
        raise IsolateUsageError(f"--over {name}={expr} has no values; nothing ran.")
    if len(items) > MAX_VALUES:
        raise IsolateUsageError(
            f"--over {name}={expr} has more than {MAX_VALUES} values (or never ends); sweep a "
            "smaller set, or loop inside the cell; nothing ran."
        )
    return name, items


class _PrefixSink:
    """Writes a run's output through the cell's sink, each line prefixed with ``[NAME=value]``."""

    def __init__(self, sink: Any, prefix: str) -> None:
        self.sink = sink
        self.prefix = prefix
        self._partial: dict[str, str] = {}

    def stream(self, name: str, text: str) -> None:
        text = self._partial.pop(name, "") + text
        lines = text.split("\n")
        tail = lines.pop()
        if lines:
            self.sink.stream(name, "".join(f"{self.prefix}{line}\n" for line in lines))
        if tail:
            self._partial[name] = tail

    def display(self, kind: str, data: dict[str, Any]) -> None:
        self.flush()
        self.sink.display(kind, data)

    def flush(self) -> None:
        for name, tail in list(self._partial.items()):
            self.sink.stream(name, f"{self.prefix}{tail}\n")
        self._partial.clear()


class _Soon:
    """A backend that starts each value's worker without waiting for it to exist.

    Given to every run of a sweep whose backend offers ``start_soon`` (the
    local one): ``CellRun.start`` returns as soon as the request is sent, so
    the sweep asks for its next value's worker while the last one is forked.
    Checking and concurrency stay the backend's own.
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.name = backend.name
        self.held = False  # set by the sweep before each start: fork now, run on release

    def check(self, launch: Any) -> None:
        self.backend.check(launch)

    def concurrency(self, runs: int) -> int:
        return int(self.backend.concurrency(runs))

    def start(self, launch: Any, deliver: Callable[[Event], None]) -> Any:
        return self.backend.start_soon(launch, deliver, held=self.held)


class _LeaderBackend:
    """The local backend as seen by a leader's launch: one worker for every value."""

    def __init__(self, backend: Any, slim: bool) -> None:
        self.backend = backend
        self.name = backend.name
        self.slim = slim

    def start(self, launch: Any, deliver: Callable[[Event], None]) -> Any:
        return self.backend.start_sweep(launch, deliver, slim=self.slim)


def _imports(source: str) -> set[str]:
    """The top-level packages a cell imports anywhere in it (``import a.b``, ``from c import d``)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.partition(".")[0])
    return found


class Sweep:
    """Runs the cell of ``template`` (a :class:`CellRun`, never run itself) once per value of ``NAME``.

    ``template`` carries the cell, the notebook namespace, the options and the
    listeners (the panel).  Each value gets a :class:`CellRun` whose options
    are the template's with the inputs and outputs of the sweep
    (``dataclasses.replace``), so every option holds for every value.  Driven
    by :mod:`nbisolate.wait` like a single run.
    """

    def __init__(self, template: CellRun, name: str, values: list[Any]) -> None:
        self.template = template
        self.name = name
        self.values = values
        self.labels = [f"{name}={_short(v)}" for v in values]
        self.runs: list[CellRun] = []
        self.locals: list[dict[str, Any]] = []
        self.sinks: list[_PrefixSink] = []
        self.results: list[Any] = [None] * len(values)
        self.ok = [False] * len(values)
        self.errors: dict[int, BaseException] = {}
        self.hosts: dict[int, str] = {}
        self.outputs: list[str] = []
        self.has_result = False
        self.interrupted = False
        self.concurrency = 1
        self._pending: list[int] = []
        self._running: set[int] = set()
        self._settled: set[int] = set()
        self._put: Callable[[tuple[int, Event]], None] | None = None
        self.packages: list[str] = []
        self._preloaded = False
        self._soon: _Soon | None = None  # the backend adapter that forks values ahead
        self._held: list[int] = []  # values whose worker is forked and waits for a slot
        self._started: set[int] = set()
        self._t0 = 0.0
        self.seconds = 0.0
        self.leader: Any = None  # the leader's handle, when one worker forks every value
        self._leader_error: Event | None = None
        self._leader_over = False
        self._progress_at = 0.0
        self._latest: tuple[int, str] | None = None

    @property
    def listeners(self) -> list[Callable[[Event], None]]:
        return self.template.listeners

    @property
    def options(self) -> RunOptions:
        return self.template.options

    # -- preparing ------------------------------------------------------------------------
    def prepare(self) -> None:
        """Plan once, ship once per value, check the backend once: every usage or shipping
        error is raised here, before any process exists."""
        t = self.template
        try:
            if t.backend is None:
                t.backend = backends.choose(t.options, t.note)
            available = set(t.available) | {self.name}
            inputs = None if t.options.inputs is None else (*dict.fromkeys([*t.options.inputs, self.name]),)
            t0 = time.perf_counter()
            plan = plan_cell(
                t.source,
                available,
                inputs=None if inputs is None else list(inputs),
                outputs=None if t.options.outputs is None else list(t.options.outputs),
                first_line=t.line_offset + 1,
            )
            if self.name not in plan.inputs:
                raise IsolateUsageError(
                    f"--over {self.name}=...: the cell never reads {self.name!r}, so every run "
                    f"would be the same; use {self.name} in the cell; nothing ran."
                )
            t.plan = plan
            t.phases["plan"] = time.perf_counter() - t0
            types = {n: type_name(t.namespace.get(n)) for n in plan.inputs}
            # The swept name has the type of its values (all of them: a sweep may mix types).
            types[self.name] = " | ".join(dict.fromkeys(type_name(v) for v in self.values))
            self._notify(
                Event(
                    "planned",
                    {
                        "label": t.label,
                        "inputs": list(plan.inputs),
                        "outputs": list(plan.outputs),
                        "types": types,
                        "options": t.options,
                        "over": {"name": self.name, "count": len(self.values)},
                    },
                )
            )
            self._notify(Event("phase", ("plan", t.phases["plan"])))
            self.outputs = [o for o in plan.outputs if o != self.name]
            self.has_result = plan.has_result
            options = replace(t.options, inputs=inputs, outputs=tuple(self.outputs))
            t1 = time.perf_counter()
            # Every input but the swept name is the same for every value: serialized once,
            # sent beside each value's own (small) shipment, its buffers shared.
            common = [n for n in plan.inputs if n != self.name]
            shared = (
                ship.dumps(
                    {n: t.namespace[n] for n in common}, main=t.main_namespace, uses=plan.names
                )
                if common
                else None
            )
            packages = user_packages(t.namespace)
            self.packages = packages
            # Each value's worker is asked for without waiting for it, where the backend can.
            self._soon = _Soon(t.backend) if hasattr(t.backend, "start_soon") else None
            backend = self._soon or t.backend
            for i, value in enumerate(self.values):
                local: dict[str, Any] = {self.name: value}
                sink = _PrefixSink(t.sink, f"[{self.labels[i]}] ")
                run = CellRun(
                    t.source,
                    ChainMap(local, t.namespace),
                    options,
                    available=available,
                    label=f"{t.label} [{self.labels[i]}]",
                    line_offset=t.line_offset,
                    display_source=t.display_source,
                    sink=sink,
                    filename=t.filename,
                    cell_label=t.cell_label,
                    backend=backend,
                    shared=shared,
                    settings_of=t.settings,  # read once, with the sweep's own run
                )
                run.plan = plan  # the same for every value: planned once, above
                run.micro = t.micro
                run.label_cells = t.label_cells
                run.watch = False  # values run side by side: no in-place changes come back
                run.carry_random = False  # nor one random state for all of them
                run.settings_back = False  # nor the settings one of them changed
                run.attributes_back = False  # nor what one of them set on a module
                run.packages = packages
                if i == 0:  # the others are serialized as they start (see _launch)
                    run.prepare(check=False)
                self.runs.append(run)
                self.locals.append(local)
                self.sinks.append(sink)
            first = self.runs[0]
            t.shipment = first.shipment
            t.phases["serialize"] = time.perf_counter() - t1
            self._notify(Event("phase", ("serialize", t.phases["serialize"])))
            if first.shipment is not None:
                self._notify(Event("shipped", _shipped(first.shipment, first.namespace, shared)))
            assert first.launch is not None
            t.backend.check(first.launch)  # a cluster that cannot run it fails now, once
            self.concurrency = t.backend.concurrency(len(self.runs))
        except BaseException as exc:
            self.done(exc)
            raise

    # -- events --------------------------------------------------------------------------
    def _notify(self, event: Event) -> None:
        self.template._notify(event)

    def done(self, error: BaseException | None) -> None:
        self.template.done(error)

    def _progress(self, index: int, state: str) -> None:
        self._notify(
            Event(
                "sweep",
                {
                    "total": len(self.values),
                    "done": len(self._settled),
                    "failed": len(self.errors),
                    "running": len(self._running),
                    "index": index,
                    "value": self.labels[index],
                    "state": state,
                    "host": self.hosts.get(index, ""),
                },
            )
        )

    def _launch(self) -> None:
        """Start values while fewer than ``concurrency`` run; with a backend that can hold a
        started worker (local), also fork as many more ahead, each held until a slot frees."""
        put = self._put
        assert put is not None
        ahead = self.concurrency if self._soon is not None else 0
        while self._held and len(self._running) < self.concurrency and not self.interrupted:
            i = self._held.pop(0)
            self._running.add(i)
            handle = self.runs[i].handle
            if handle is not None:
                handle.release()  # type: ignore[attr-defined]
            if i in self._started:
                self._progress(i, "started")
        while (
            self._pending
            and len(self._running) + len(self._held) < self.concurrency + ahead
            and not self.interrupted
        ):
            i = self._pending.pop(0)
            held = len(self._running) >= self.concurrency
            if held:
                self._held.append(i)
            else:
                self._running.add(i)
            run = self.runs[i]
            try:
                # Serialized only now, and let go of once sent: a sweep holds as many
                # shipments as runs at once, not one per value for its whole length.
                if run.launch is None:
                    # Only this value is new: every input was inspected with the first
                    # value's run (the values themselves were listed and shown already),
                    # so no inspecting thread per value.
                    run._finish_preparing(False, run._notify)
                if self._soon is not None:
                    self._soon.held = held
                run.start(self._deliver(i, put))
                if not self._preloaded:
                    # Once, after the first value asked for its worker (as one cell does):
                    # the template imports the notebook's packages for the values after it.
                    self._preloaded = True
                    if self._soon is not None:
                        self._soon.backend.preload(self.packages)
                if i:
                    run.shipment = None
                    run.launch = None
            except Exception as exc:
                self._forget(i)
                self._settled.add(i)
                self.errors[i] = exc
                self._progress(i, "failed")

    @staticmethod
    def _deliver(i: int, put: Callable[[tuple[int, Event]], None]) -> Callable[[Event], None]:
        """What value ``i``'s worker says, for the waiting thread, less what nobody reads there.

        A value's own phases are not shown (the sweep shows its runs as one
        phase), and once its result or error is in, its ``exit`` changes
        nothing: both are left out here, in the backend's thread, so each value
        wakes the kernel's loop for its ``started``, its output and its outcome
        only, not for every step of its worker.
        """
        over = [False]

        def deliver(event: Event) -> None:
            kind = event.kind
            if kind == "phase" or (kind == "exit" and over[0]):
                return
            if kind in ("result", "error"):
                over[0] = True
            put((i, event))

        return deliver

    def _forget(self, i: int) -> None:
        self._running.discard(i)
        if i in self._held:
            self._held.remove(i)

    # -- what nbisolate.wait drives ------------------------------------------------------
    def begin(self, put: Callable[[tuple[int, Event]], None]) -> None:
        if not self.runs:
            self.prepare()
        self._t0 = time.perf_counter()
        self._put = put
        if self._uses_leader():
            self._start_leader(put)
            return
        self._pending = list(range(len(self.runs)))
        self._launch()

    def _uses_leader(self) -> bool:
        """One leader worker for every value: local, no ``--mem`` (a value's cap must hold from
        its first byte, which a fork of a leader cannot promise), and enough values."""
        backend = self.template.backend
        return (
            hasattr(backend, "start_sweep")
            and self.options.mem is None
            and len(self.values) >= LEADER_FROM
        )

    def _start_leader(self, put: Callable[[tuple[int, Event]], None]) -> None:
        """Ship every value (small, one by one: a value that cannot travel fails alone) and
        start the one leader worker with them all."""
        t = self.template
        first = self.runs[0]
        assert first.launch is not None and t.plan is not None
        shared = first.shared
        buffers: list[Any] = list(shared.buffers) if shared is not None else []
        values: list[tuple[list[str], bytes, str, int]] = []
        order: list[int] = []
        for i, value in enumerate(self.values):
            try:
                shipped = (
                    first.shipment
                    if i == 0
                    else ship.dumps({self.name: value}, main=t.main_namespace, uses=t.plan.names)
                )
                assert shipped is not None
            except Exception as exc:  # this value cannot travel: it fails, the others run
                values.append(([], b"", "pickle", 0))
                self._settled.add(i)
                self.errors[i] = exc
                continue
            values.append((shipped.names, shipped.data, shipped.engine, len(shipped.buffers)))
            buffers.extend(shipped.buffers)
            order.append(i)
        for run in self.runs[1:]:
            run.shipment = run.launch = None
        # What the values will import, imported once by the leader before it forks: what the
        # template would preload (the notebook's packages), the standard library, and the
        # by-value engines the workers load anyway; a module of the notebook's own directory
        # is still imported by each value, as it would be in a worker of its own.
        needed = {m.partition(".")[0] for m in first.launch.modules} | _imports(t.source)
        needed -= {"nbisolate", "__main__", "builtins"}
        stdlib = getattr(sys, "stdlib_module_names", frozenset())
        allowed = stdlib | set(self.packages) | {"cloudpickle", "dill"}
        preload = sorted(m for m in needed if m in sys.modules and m in allowed)
        slim = len(order) >= SLIM_FROM and all(m in stdlib or m in ("cloudpickle", "dill") for m in needed)
        payload = dict(first.launch.payload)
        payload["sweep"] = {
            "values": values,
            "order": order,
            "concurrency": self.concurrency,
            "timeout": self.options.timeout,
            "max_output": self.options.max_output,
            "preload": preload,
        }
        launch = replace(first.launch, payload=payload, buffers=buffers, label=t.label)
        self._running = set(order)
        if not order:
            self._leader_over = True
            return
        self.leader = backends.start_tracked(
            _LeaderBackend(t.backend, slim), launch, lambda event: put((_LEADER, event))
        )

    def _feed_leader(self, event: Event) -> None:
        """What the leader says: its children's messages (demultiplexed), its own output, its end."""
        kind = event.kind
        if kind == "values":
            buffers = event.buffers
            at = 0
            for index, what, body, count in event.data:
                self._feed_value(index, Event(what, body, buffers[at : at + count], event.time))
                at += count
            event.buffers = []
            self._draw()
        elif kind == "stream":  # C-level output of a value's processes, to the leader's pipes
            self.template.sink.stream(*event.data)
        elif kind == "error":
            self._leader_error = event
        elif kind == "started":
            self._notify(event)
        elif kind == "exit":
            self._leader_over = True
            for i in sorted(self._running):
                # The leader ended before this value did: it fails as the leader did, or
                # (Stop, an interrupt) as its own run would have.
                if self._leader_error is not None and not self.interrupted:
                    last = Event("error", self._leader_error.data, list(self._leader_error.buffers))
                else:
                    last = Event("exit", dict(event.data, pid=event.data.get("pid")))
                self._feed_value(i, last)
            self._running.clear()
            self._draw(force=True)

    def _feed_value(self, i: int, event: Event) -> None:
        if i in self._settled:
            return
        run = self.runs[i]
        if event.kind == "started":
            self._latest = (i, "started")
            return
        run.feed(event)
        if run.busy:
            return
        self._running.discard(i)
        self._settle(i, run)
        self._latest = (i, "done" if self.ok[i] else "failed")

    def _draw(self, force: bool = False) -> None:
        """Progress, at most every PROGRESS_SECONDS (a thousand values would redraw a thousand times)."""
        now = time.perf_counter()
        if self._latest is None or (not force and now - self._progress_at < PROGRESS_SECONDS):
            return
        self._progress_at = now
        self._progress(*self._latest)

    def _settle(self, i: int, run: CellRun) -> None:
        self._settled.add(i)
        try:
            self.results[i] = run.outcome()
            self.ok[i] = True
        except BaseException as exc:  # this value's failure; the others go on
            self.errors[i] = exc
        finally:
            self.sinks[i].flush()

    def feed(self, item: tuple[int, Event]) -> None:
        i, event = item
        if i == _LEADER:
            self._feed_leader(event)
            return
        if i in self._settled:
            return
        run = self.runs[i]
        if event.kind == "started":
            self.hosts[i] = str(getattr(event.data, "host", "") or "")
            self._started.add(i)
            self._notify(event)
            if i in self._running:  # a worker forked ahead says so when it is released
                self._progress(i, "started")
        run.feed(event)
        if run.busy:
            return
        self._forget(i)
        self._settle(i, run)
        self._progress(i, "done" if self.ok[i] else "failed")
        self._launch()

    @property
    def busy(self) -> bool:
        if self.leader is not None or self._leader_over:
            return not self._leader_over
        return bool(self._running) or bool(self._held) or (bool(self._pending) and not self.interrupted)

    def tick(self) -> None:
        self._notify(Event("tick"))

    def interrupt(self) -> None:
        self.interrupted = True
        self._pending.clear()
        if self.leader is not None:  # its whole tree, every value's process with it
            self.leader.stop("interrupt")
        for i in [*self._running, *self._held]:
            self.runs[i].stop("interrupt")

    def stop(self, reason: str = "interrupt") -> None:
        """Stop every run (the panel's Stop button)."""
        self.interrupt()

    def run_sync(self) -> Any:
        """Run every value, blocking; Ctrl-C stops them all. See the module doc for results."""
        return wait_sync(self)

    async def run_async(self) -> Any:
        """Run every value while awaiting on the kernel's loop; SIGINT stops them all."""
        return await wait_async(self)

    # -- the outcome ---------------------------------------------------------------------
    def outcome(self) -> Any:
        self.seconds = time.perf_counter() - self._t0
        n = len(self.values)
        if self.interrupted:
            finished = sum(self.ok)
            interrupt = KeyboardInterrupt(
                f"the sweep over {self.name} was interrupted after {finished} of {n} runs had "
                "finished; the running ones and every process they started were stopped, the "
                "others never started. No notebook variable was changed."
            )
            interrupt._render_traceback_ = lambda: [f"KeyboardInterrupt: {interrupt}"]  # type: ignore[attr-defined]
            raise interrupt
        good = [i for i in range(n) if self.ok[i]]
        bound: list[str] = []
        results: list[Any] | None = None
        if good:
            for out in self.outputs:
                present = [self.locals[i][out] for i in good if out in self.locals[i]]
                if not present:
                    continue
                if all(isinstance(v, types.ModuleType) and v is present[0] for v in present):
                    self.template.namespace[out] = present[0]  # `import x` in the cell: x, not [x, x]
                else:
                    self.template.namespace[out] = [
                        self.locals[i].get(out) if self.ok[i] else None for i in range(n)
                    ]
                bound.append(out)
            if self.has_result:
                results = [self.results[i] if self.ok[i] else None for i in range(n)]
                if all(value is None for value in results):
                    # The cell ends in print(...) or another call without a value: no Out,
                    # as an ordinary cell shows none for None.
                    results = None
        self.template.returned = bound
        self._notify(Event("applied", {"returned": bound, "skipped": {}, "phases": self.template.phases}))
        if self.errors:
            raise SweepError(self.name, self.labels, dict(self.errors), bound, results)
        return results
