"""The live status panel of an ``%%isolate`` cell.

A cell that runs in another process is a black box: is it still pickling a
2 GB frame, starting the interpreter, loading its inputs, running, or hung?
A team once lost days to a 900 s timeout whose cause (a module object being
pickled) nobody could see.  So every isolated cell shows, at the top of its
output and from its first second:

* the phases with their durations as they complete (plan, serialize, start,
  load, run, return: ``CellRun.phases``);
* one row per shipped variable: name, type, size, how it travels
  (``Shipment.how``), time to serialize, and for an input that cannot be
  shipped the member path, the culprit's type and the fix (from
  :func:`nbisolate.diagnose.pickle_check`);
* the elapsed time, ticking, and with ``--timeout`` a bar filling toward the
  limit; a Stop button that stops the worker as an interrupt does;
* at the end, one summary line (``ran 3.2 s in pid 4711; 2 in (1.3 MB), 3
  out``), to which the panel collapses.

How it is shown depends on where the cell runs (``choose_mode``):

``widget``
    In a Jupyter kernel, a panel of standard ipywidgets (no front-end code of
    our own).  At the end the widget output is *replaced*, through its display
    id, by a static HTML/text summary (a ``<details>`` element that expands to
    the phases and variables): a saved or reopened notebook shows a readable
    summary instead of a dead widget.  The cell's Stop button is then closed
    (a late click can never reach another cell); the other widgets, no longer
    shown anywhere, wait for the next cell's panel, which sends only what
    changed, so the kernel holds one idle set of them, not one per cell.  A
    front end without the widget manager (nbclient, nbconvert, some editors)
    shows the display's ``text/plain``: a start line, then the summary line.
``text``
    Terminal IPython, ``run_cell_magic`` without a kernel, or
    ``%isolate_config panel=text``: a start line when the inputs are known,
    then the summary line, and an unshippable input's problems in full.  In a
    kernel these are ``text/plain`` displays; without one they go to stderr,
    so a cell's stdout stays the cell's own.
``quiet`` (``--quiet``)
    Only the summary line, at the end.
``off`` (``%isolate_config panel=off``)
    Nothing at all.

The panel only listens to :class:`~nbisolate.runner.CellRun` events; the
supervisor knows nothing of it, and the worker never imports it.  Updates
come from the runner's ``tick`` (every 0.25 s from the loop the cell awaits
on, so they carry the cell's parent header and never race the kernel),
plus a heartbeat thread that takes over only while that loop is blocked in
pickling or unpickling, so the clock keeps moving while a large input is
serialized.  Widget updates are sent only when their text changes.

The settings live in :data:`settings`; ``%isolate_config panel=...`` or the
environment variable ``NBISOLATE_PANEL`` set them.
"""

from __future__ import annotations

import html
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .units import format_bytes

log = logging.getLogger(__name__)

MODES = ("auto", "widget", "text", "off")
"""``panel=`` values: ``auto`` picks ``widget`` in a kernel with ipywidgets, else ``text``."""


def _mode_from_env() -> str:
    value = os.environ.get("NBISOLATE_PANEL", "auto").strip().lower() or "auto"
    return value if value in MODES else "auto"


settings: dict[str, str] = {"panel": _mode_from_env()}

PHASES: tuple[tuple[str, str], ...] = (
    ("plan", "find the inputs and outputs"),
    ("serialize", "serialize the inputs"),
    ("start", "start (or take) the worker"),
    ("load", "load the inputs in the worker"),
    ("run", "run the cell"),
    ("return", "send the results back"),
)
"""``CellRun.phases`` keys in the order a cell goes through them; the key is the label, the
text its tooltip."""

CLOCK_SECONDS = 0.25
"""The clock is sent this often (the runner's tick has the same period)."""

HEARTBEAT_POLL = 0.05
"""How often the heartbeat thread wakes to see whether it must send the clock itself."""

STALL_SECONDS = 0.6
"""Outside the known blocking stages, the heartbeat sends only if the loop stalled this long."""

COALESCE_SECONDS = 0.1
"""Status and table changes closer together than this are sent as one."""

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
NO_WIDGETS_NOTE = "(live panel: needs the Jupyter widgets front end)"


# -- formatting ------------------------------------------------------------------


def fmt_seconds(seconds: float) -> str:
    """``0.4 ms``, ``85 ms``, ``3.2 s``, ``15 min 02 s``: short, and stable in width while it ticks."""
    if seconds < 0.001:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_clock(seconds: float) -> str:
    """The ticking elapsed time: tenths of a second, then minutes."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    return fmt_seconds(seconds)




def _names(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … (+{len(names) - limit})" if len(names) > limit else "")


# -- what is known about one run -------------------------------------------------


@dataclass
class Problem:
    """Why one input cannot be shipped: where, what, why, and what to do."""

    path: str
    type_name: str
    reason: str
    fix: str


@dataclass
class Row:
    """One shipped variable, as the panel lists it."""

    name: str
    type_name: str
    size: int | None = None
    how: str | None = None
    seconds: float | None = None
    problems: tuple[Problem, ...] = ()


_PENDING: Any = object()


class Watch:
    """Everything the panel knows about one run, gathered from the run's events only.

    Kept apart from any way of showing it, so the widget panel, the text
    lines and the benchmark share one source of truth for rows, status and
    summary.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.t0 = clock()
        self.t_end: float | None = None
        self.planned = False
        self.inputs_: list[str] = []
        self.outputs_: list[str] = []
        self.types: dict[str, str] = {}
        self.timeout: float | None = None
        self.phases: dict[str, float] = {}
        self.shipped: dict[str, dict[str, Any]] = {}
        self.nbytes: int | None = None
        self.returned: list[str] = []
        self.skipped: dict[str, str] = {}
        self.pid: int | None = None
        self.job_t0: float | None = None
        self.error_type: str | None = None
        self.exit_reason: str | None = None
        self.returncode: int | None = None
        self.outcome: Any = _PENDING
        self.problems: tuple[Problem, ...] = ()
        self.failed_input: str | None = None
        self.stopping = False
        self.sweep: dict[str, Any] | None = None  # progress of a --over sweep (nbisolate.sweep)
        self.over: dict[str, Any] | None = None  # {"name", "count"} when the cell is a sweep
        self.background = False  # a --bg cell: its summary says when it ended

    # -- events ------------------------------------------------------------------
    def observe(self, event: Any) -> None:
        kind = event.kind
        data = event.data
        if kind == "planned":
            self.planned = True
            self.inputs_ = list(data.get("inputs") or [])
            self.outputs_ = list(data.get("outputs") or [])
            self.types = dict(data.get("types") or {})
            self.timeout = getattr(data.get("options"), "timeout", None)
            self.over = data.get("over")
            self.background = bool(getattr(data.get("options"), "background", False))
        elif kind == "phase":
            name, seconds = data
            self.phases[name] = seconds
        elif kind == "shipped":
            self.nbytes = data.get("nbytes")
            self.shipped = {row["name"]: row for row in data.get("rows") or []}
        elif kind == "applied":
            self.returned = list(data.get("returned") or [])
            self.skipped = dict(data.get("skipped") or {})
            self.phases.update(data.get("phases") or {})  # "return" ends with the apply
        elif kind == "started":
            self.pid = data
            self.job_t0 = event.time
        elif kind == "sweep":
            self.sweep = dict(data or {})
        elif kind == "error":
            raw = str((data or {}).get("type", "Exception"))
            self.error_type = raw.removeprefix("builtins.")
        elif kind == "exit":
            data = data or {}
            self.exit_reason = data.get("reason")
            self.returncode = data.get("returncode")
            self.pid = data.get("pid", self.pid)
        elif kind == "done":
            self.outcome = data
            self.t_end = event.time
            from .errors import ShipError

            if isinstance(data, ShipError):
                self.failed_input = data.name
                self.problems = tuple(diagnose_input(data, self.types))

    # -- derived ------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.outcome is not _PENDING

    def elapsed(self) -> float:
        end = self.t_end if self.t_end is not None else self.clock()
        return max(0.0, end - self.t0)

    def job_elapsed(self) -> float:
        """Seconds on the worker's clock, the one ``--timeout`` counts."""
        if self.job_t0 is None:
            return 0.0
        end = self.t_end if self.t_end is not None else self.clock()
        return max(0.0, end - self.job_t0)

    def phase_keys(self) -> tuple[tuple[str, str], ...]:
        """The phases this run goes through: a sweep plans and serializes once, then runs
        its values, each through its own start, load, run and return."""
        if self.over is None:
            return PHASES
        return (*PHASES[:2], ("run", "run every value, each in a worker of its own"))

    def current_phase(self) -> str | None:
        if self.done:
            return None
        phases = self.phases
        for key, _label in self.phase_keys():
            if key not in phases:
                return key
        return None

    def phase_seconds(self, key: str) -> float | None:
        """How long a finished phase took; a sweep's runs last from its serializing to its end."""
        if self.over is not None and key == "run":
            if not self.done:
                return None
            return max(0.0, self.elapsed() - sum(self.phases.get(k, 0.0) for k in ("plan", "serialize")))
        return self.phases.get(key)

    def inputs(self) -> list[str]:
        return list(self.inputs_)

    def outputs(self) -> list[str]:
        return list(self.outputs_)

    def rows(self) -> list[Row]:
        rows = []
        for name in self.inputs():
            row = Row(name, self.types.get(name, "?"))
            shipped = self.shipped.get(name)
            if shipped is not None:
                row.size = shipped.get("size")
                row.how = shipped.get("how")
                row.seconds = shipped.get("seconds")
            if name == self.failed_input:
                row.problems = self.problems
            rows.append(row)
        return rows

    def status(self) -> str:
        """What is happening now, in a few words."""
        pid = f" pid {self.pid}" if self.pid is not None else ""
        if self.stopping:
            return f"stopping{pid}…"
        if self.sweep is not None:
            return self._sweep_text()
        if self.error_type is not None:
            return f"the cell raised {self.error_type}"
        phase = self.current_phase()
        if phase == "plan":
            return "planning…"
        if phase == "serialize":
            names = self.inputs()
            if not names:
                return "preparing…"
            return f"serializing {len(names)} input{'s' if len(names) != 1 else ''}: {_names(names, 4)}…"
        if phase == "start":
            return f"starting worker{pid}…"
        if phase == "load":
            return f"loading inputs in{pid}…"
        if phase == "run":
            return f"running in{pid}"
        if phase == "return":
            return f"returning results from{pid}…"
        return "finishing…"

    def _sweep_text(self) -> str:
        sweep = self.sweep or {}
        text = f"sweep: {sweep.get('done', 0)} of {sweep.get('total', '?')} runs done"
        if sweep.get("failed"):
            text += f", {sweep['failed']} failed"
        if sweep.get("running"):
            text += f", {sweep['running']} running"
        if sweep.get("host"):
            text += f" (latest on {sweep['host']})"
        return text

    def start_line(self) -> str:
        """One line for text mode, once the inputs are known."""
        ins, outs = self.inputs(), self.outputs()
        line = (
            f"isolated cell starting: {len(ins)} in"
            + (f" ({_names(ins)})" if ins else "")
            + f", {len(outs)} out"
            + (f" ({_names(outs)})" if outs else "")
        )
        if self.timeout:
            line += f"; --timeout {self.timeout:g} s"
        return line

    def summary(self, clock: Callable[[str], str] = str) -> str:
        """The one-line outcome; ``clock`` may wrap the elapsed time (HTML markup)."""
        from .errors import IsolateTimeout, ShipError, WorkerCrashed, describe_exit

        exc = self.outcome
        took = clock(fmt_seconds(self.elapsed()))
        pid = f" in pid {self.pid}" if self.pid is not None else ""
        if self.sweep is not None and not isinstance(exc, ShipError):
            ending = "" if exc is None else "; " + ("stopped" if self.stopping else type(exc).__name__)
            return f"{self._sweep_text()} in {took}{ending}"
        if exc is None:
            names = self.inputs()
            ins = f"{len(names)} in" + (
                f" ({format_bytes(self.nbytes)})" if names and self.nbytes is not None else ""
            )
            line = f"ran {took}{pid}; {ins}, {len(self.returned)} out"
            skipped = self.skipped
            if skipped:
                what = ", ".join(f"{n} ({why.split(':', 1)[0]})" for n, why in skipped.items())
                line += f"; {len(skipped)} result{'s' if len(skipped) != 1 else ''} skipped: {what}"
            return line
        if isinstance(exc, ShipError):
            first = self.problems[0] if self.problems else None
            where = f" ({first.path}: {first.type_name})" if first else ""
            return f"nothing ran: input {exc.name!r} cannot be sent to the worker{where}"
        if self.pid is None:
            return f"nothing ran: {type(exc).__name__} (see the error below)"
        if isinstance(exc, IsolateTimeout) or self.exit_reason == "timeout":
            limit = self.timeout or 0.0
            return f"timed out after {took}{pid} (--timeout {limit:g} s); nothing changed"
        if self.exit_reason in ("interrupt", "stop"):
            how = " (Stop button)" if self.stopping else ""
            return f"stopped{how} after {took}{pid}; nothing changed"
        if isinstance(exc, WorkerCrashed):
            return (
                f"worker{pid.replace(' in', '')} died with {describe_exit(self.returncode)} "
                f"after {took}; nothing changed"
            )
        if self.error_type is not None:
            return f"raised {self.error_type} after {took}{pid}; nothing changed"
        return f"failed after {took}{pid}: {type(exc).__name__}; nothing changed"

    def problem_lines(self) -> list[str]:
        lines = []
        for p in self.problems:
            lines.append(f"  ✗ {p.path}: {p.type_name}: {p.reason}")
            if p.fix:
                lines.append(f"    fix: {p.fix}")
        return lines


def diagnose_input(exc: Any, types: dict[str, str]) -> list[Problem]:
    """Every problem that keeps the input named by a ``ShipError`` from being shipped.

    ``ship.dumps`` attaches the ``%pickle_check`` engine's report to the
    error (checked the way ``%%isolate`` ships); the panel lists every error
    in it.  Without a report (the engine failed), the error's own path and
    message are the one problem shown.
    """
    name = getattr(exc, "name", None) or "?"
    report = getattr(exc, "report", None)
    problems: list[Problem] = []
    if report is not None:
        found = [p for p in report.problems if getattr(p, "severity", "error") == "error"]
        problems = [Problem(p.path, p.type_name, p.reason, p.fix) for p in found]
    if not problems:
        problems = [Problem(getattr(exc, "path", None) or name, types.get(name, "?"), str(exc), "")]
    return problems


# -- HTML pieces (shared by the live widgets and the final summary) ----------------

_MUTED = "color: var(--jp-ui-font-color2, #616161)"
_FONT = "font-family: var(--jp-code-font-family, monospace); font-size: var(--jp-code-font-size, 13px)"
_CELL = "padding: 1px 10px 1px 0; text-align: left; vertical-align: top"
_BAD = "color: var(--jp-error-color1, #d32f2f)"
_ROW = "var(--jp-widgets-inline-height, 28px)"  # the height of the Stop button's row


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def phases_html(watch: Watch) -> str:
    """``plan 0.4 ms · serialize 2 ms · start 15 ms · run …``: done, current, still to come."""
    current = watch.current_phase()
    parts = []
    for key, what in watch.phase_keys():
        tip = f"title='{_e(what)}'"
        seconds = watch.phase_seconds(key)
        if seconds is not None:
            parts.append(f"<span {tip}>{key}&nbsp;<b>{_e(fmt_seconds(seconds))}</b></span>")
        elif key == current and watch.sweep is not None:
            sweep = watch.sweep
            progress = f"{sweep.get('done', 0)} of {sweep.get('total', '?')}"
            parts.append(f"<span {tip}><b>{key}&nbsp;…</b>&nbsp;({_e(progress)})</span>")
        elif key == current:
            parts.append(f"<span {tip}><b>{key}&nbsp;…</b></span>")
        elif not watch.done:
            parts.append(f"<span {tip} style='opacity: 0.5'>{key}</span>")
    return f"<div class='nbisolate-phases' style='{_MUTED}'>{' · '.join(parts)}</div>"


def rows_html(watch: Watch) -> str:
    """The variables table: one ``tr.nbisolate-var`` per shipped variable, problems beneath."""
    rows = watch.rows()
    if not rows:
        return ""
    head = "".join(
        f"<th style='{_CELL}; font-weight: normal; {_MUTED}'>{h}</th>"
        for h in ("variable", "type", "size", "travels as", "serialize")
    )
    body = []
    for row in rows:
        mark = f" <span style='{_BAD}'>✗</span>" if row.problems else ""
        cells = (
            f"<b>{_e(row.name)}</b>{mark}",
            _e(row.type_name),
            _e(format_bytes(row.size)) if row.size is not None else "—",
            _e(row.how) if row.how else ("cannot be sent" if row.problems else "…"),
            _e(fmt_seconds(row.seconds)) if row.seconds is not None else "—",
        )
        body.append(
            f"<tr class='nbisolate-var' data-name='{_e(row.name)}'>"
            + "".join(f"<td style='{_CELL}'>{c}</td>" for c in cells)
            + "</tr>"
        )
        for p in row.problems:
            fix = f"<br>fix: {_e(p.fix)}" if p.fix else ""
            body.append(
                f"<tr class='nbisolate-problem' data-name='{_e(row.name)}' data-path='{_e(p.path)}'>"
                f"<td colspan='5' style='{_CELL}; padding-left: 1.5em; {_BAD}'>✗ <b>{_e(p.path)}</b>: "
                f"{_e(p.type_name)}: <span style='{_MUTED}'>{_e(p.reason)}{fix}</span></td></tr>"
            )
    return (
        f"<table class='nbisolate-vars' style='border-collapse: collapse; margin: 2px 0; {_FONT}'>"
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def body_html(watch: Watch) -> str:
    return phases_html(watch) + rows_html(watch)


def _state_color(watch: Watch) -> str:
    if not watch.done:
        return "var(--jp-brand-color1, #1976d2)"
    if watch.outcome is None:
        return "var(--jp-success-color1, #388e3c)"
    return "var(--jp-error-color1, #d32f2f)"


def final_bundle(watch: Watch) -> dict[str, str]:
    """What the panel collapses to: a ``<details>`` summary, and the same as text."""
    ok = watch.outcome is None
    sign = "✓" if ok else "✗"
    # The summary is plain text; mark the clock, escape the text, then turn the marks into markup.
    marked = watch.summary(clock=lambda t: f"\x00{t}\x01")
    ended = ""
    if watch.background:  # it ended long after its cell did: say when
        ended = f" · ended at {time.strftime('%H:%M:%S')}"
        marked += ended
    summary_html = (
        _e(marked).replace("\x00", "<span class='nbisolate-elapsed'>").replace("\x01", "</span>")
    )
    # An input that cannot be shipped is explained in full by the error under the panel;
    # the panel stays folded to its summary line, and lists every problem when opened.
    opened = ""
    page = (
        f"<details class='nbisolate-panel nbisolate-done'{opened} "
        f"style='border-left: 3px solid {_state_color(watch)}; padding: 1px 8px; {_FONT}'>"
        f"<summary style='cursor: pointer; {_MUTED}'>{sign} <b>isolated</b>: {summary_html}</summary>"
        f"{body_html(watch)}</details>"
    )
    where = [f"  ✗ {p.path}: {p.type_name}" for p in watch.problems]
    text = "\n".join([f"nbisolate: {watch.summary()}{ended}", *where])
    return {"text/plain": text, "text/html": page}


# -- the three ways of showing it ---------------------------------------------------


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _display(
    bundle: dict[str, Any],
    display_id: str | None = None,
    update: bool = False,
    metadata: dict[str, Any] | None = None,
    *,
    summary: bool = False,
) -> None:
    """Display ``bundle``; a ``summary`` line skips the stream flush when no text is pending.

    ipykernel flushes ``sys.stdout`` and ``sys.stderr`` before every display,
    each a round trip to its IO thread and back, so that text printed before
    a display shows before it.  A fast cell's summary line usually follows no
    pending text at all; then those two round trips (a good part of what the
    line costs) are left out, and the display goes out as it would anyway.
    """
    from IPython.display import display

    publisher = _idle_publisher() if summary else None
    if publisher is None:
        display(bundle, raw=True, display_id=display_id, update=update, metadata=metadata)
        return
    publisher._flush_streams = _no_flush  # this one display; the class's method stays
    try:
        display(bundle, raw=True, display_id=display_id, update=update, metadata=metadata)
    finally:
        publisher.__dict__.pop("_flush_streams", None)


def _no_flush() -> None:
    return None


def _idle_publisher() -> Any:
    """The kernel's display publisher when both kernel streams hold no text, else None.

    Only an ipykernel ``OutStream`` whose buffers are empty counts as holding
    none (it keeps them per parent message and empties them when it sends);
    anything else, or a publisher that is not ipykernel's, keeps the flush.
    """
    try:
        from IPython import get_ipython

        shell = get_ipython()
        publisher = getattr(shell, "display_pub", None)
        if publisher is None or "_flush_streams" not in type(publisher).__dict__:
            return None
        for stream in (sys.stdout, sys.stderr):
            buffers = getattr(stream, "_buffers", None)
            if not isinstance(buffers, dict) or buffers:
                return None
        return publisher
    except Exception:
        return None


# -- what a front end that lost sight of a panel may ask (nbisolate.labcomm) ------------

_live: dict[str, WidgetPanel] = {}
"""Widget panels of cells still running, by the display id their output carries."""
_outcomes: dict[str, dict[str, str]] = {}
"""The final bundle of panels that ended, by display id (the newest MAX_OUTCOMES)."""
MAX_OUTCOMES = 256
_registry_lock = threading.Lock()


def lookup(display_ids: Sequence[str]) -> dict[str, Any]:
    """For a front end that shows panels it did not see end (a notebook reopened, a page
    reloaded): which are still live, and the final bundle of those that ended here."""
    with _registry_lock:
        return {
            "live": [d for d in display_ids if d in _live],
            "outcomes": {d: _outcomes[d] for d in display_ids if d in _outcomes},
        }


def mirror(request_id: str) -> bool:
    """Show the live panel of the cell whose request is ``request_id`` once more, as HTML
    kept up to date (a reloaded page cannot rebuild the widgets until the cell ends)."""
    with _registry_lock:
        panels = [p for p in _live.values() if p.request_id == request_id]
    for panel in panels:
        panel.want_mirror = True
    return bool(panels)


class Panel:
    """A run listener showing a :class:`Watch`; never lets a failure of its own reach the cell."""

    def __init__(self, stop: Callable[[str], None] | None = None) -> None:
        self.watch = Watch()
        self.stop_run = stop  # what the Stop button calls; the panel never touches the run
        self.broken = False

    def __call__(self, event: Any) -> None:
        if self.broken:
            return
        try:
            self.watch.observe(event)
            self.on_event(event)
        except Exception:
            self.broken = True
            log.warning("nbisolate: the status panel failed and is switched off", exc_info=True)
            try:
                self.on_broken()
            except Exception:
                pass

    def on_event(self, event: Any) -> None:
        raise NotImplementedError

    def on_broken(self) -> None:
        """Release what the panel holds (widgets, threads)."""


class TextPanel(Panel):
    """Plain lines: a start line when the inputs are known (unless quiet), the summary at the end."""

    def __init__(
        self,
        stop: Callable[[str], None] | None = None,
        quiet: bool = False,
        in_kernel: bool | None = None,
    ) -> None:
        super().__init__(stop)
        self.quiet = quiet
        self.in_kernel = _in_kernel() if in_kernel is None else in_kernel
        self.lines: list[str] = []

    def emit(self, text: str) -> None:
        self.lines.append(text)
        if self.in_kernel:
            _display({"text/plain": text}, summary=True)
        else:
            sys.stdout.flush()
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def on_event(self, event: Any) -> None:
        kind = event.kind
        if kind == "planned" and not self.quiet:
            self.emit(f"nbisolate: {self.watch.start_line()}")
        elif kind == "note" and not self.quiet:
            self.emit(str(event.data).rstrip("\n"))
        elif kind == "done" and self.watch.planned:  # else a usage error says it all
            lines = [f"nbisolate: {self.watch.summary()}"]
            if not self.quiet:
                lines += self.watch.problem_lines()
            self.emit("\n".join(lines))


class _Parts:
    """The reusable widgets of a panel: everything but the Stop button.

    Every widget model is a comm that costs a message to open and another to
    close, so these are kept from cell to cell (see :func:`_take_parts`): a
    finished panel's display is replaced by static HTML, so nothing shows
    them any more, and the next panel only sends what changed.  ``root`` (an
    HBox with class ``nbisolate-panel``) holds ``main`` (HTML: status line,
    phases, variables), ``elapsed`` (HTML, ``nbisolate-elapsed``), the
    optional timeout bar, and the cell's own Stop button.
    """

    def __init__(self, with_progress: bool) -> None:
        import ipywidgets as w

        self.with_progress = with_progress
        self.values: dict[tuple[int, str], Any] = {}
        # The main part takes the room; the clock, bar and button keep their size.
        self.wide = w.Layout(width="auto", flex="1 1 auto")
        self.shared = w.Layout(width="auto", flex="0 0 auto", align_items="flex-start")
        self.models: list[Any] = [self.wide, self.shared]
        extra: dict[str, Any] = {}
        try:
            from ipywidgets.widgets.widget_string import HTMLStyle

            extra["style"] = HTMLStyle()
            self.models.append(extra["style"])
        except ImportError:  # pragma: no cover - other ipywidgets layouts
            pass
        self.main = w.HTML(layout=self.wide, _dom_classes=("nbisolate-main",), **extra)
        self.elapsed = w.HTML(layout=self.shared, _dom_classes=("nbisolate-elapsed",), **extra)
        self.models += [self.main, self.elapsed]
        self.base: tuple[Any, ...] = (self.main, self.elapsed)
        self.progress = None
        if with_progress:
            progress_layout = w.Layout(width="140px")
            self.progress = w.FloatProgress(
                value=0.0,
                min=0.0,
                max=1.0,
                bar_style="info",
                layout=progress_layout,
                _dom_classes=("nbisolate-timeout",),
            )
            self.models += [progress_layout, self.progress.style, self.progress]
            self.base += (self.progress,)
        self.root = w.HBox(self.base, layout=self.shared, _dom_classes=("nbisolate-panel",))
        self.models.append(self.root)

    def set(self, widget: Any, trait: str, value: Any) -> bool:
        """Set a trait only when it changed: every change is a message to the front end."""
        key = (id(widget), trait)
        if key in self.values and self.values[key] == value:
            return False
        self.values[key] = value
        setattr(widget, trait, value)
        return True

    def close(self) -> None:
        for model in reversed(self.models):
            try:
                model.close()
            except Exception:
                log.debug("nbisolate: closing a panel widget failed", exc_info=True)
        self.models = []


_pool: list[_Parts] = []
_pool_lock = threading.Lock()
POOL_SIZE = 2
"""Idle panel widget sets kept per kernel (one suffices for cells run one after another)."""


def _take_parts(with_progress: bool) -> _Parts:
    with _pool_lock:
        for i, parts in enumerate(_pool):
            if parts.with_progress == with_progress:
                return _pool.pop(i)
    return _Parts(with_progress)


def _give_back(parts: _Parts) -> None:
    with _pool_lock:
        _pool.append(parts)
        extra = _pool[:-POOL_SIZE]
        del _pool[:-POOL_SIZE]
    for old in extra:
        old.close()


def release_widgets() -> None:
    """Close the idle panel widgets this kernel keeps for the next cells."""
    with _pool_lock:
        idle = list(_pool)
        _pool.clear()
    for parts in idle:
        parts.close()


class WidgetPanel(Panel):
    """The live panel: a few standard ipywidgets, replaced by a static summary at the end.

    ``interactive`` shows the Stop button; it is only useful when the cell
    awaits on the kernel's loop (a transformed ``%%isolate`` cell), because a
    click is a message the kernel must be free to handle.  The button is the
    cell's own (made for it, closed with it), so a click that arrives late
    can never stop the next cell's worker.
    """

    def __init__(self, stop: Callable[[str], None] | None = None, interactive: bool = True) -> None:
        super().__init__(stop)
        self.interactive = interactive
        self.display_id = uuid.uuid4().hex
        self.parts: _Parts | None = None
        self.stop: Any = None
        self.updates = 0
        self._lock = threading.RLock()
        self._closed = False
        self._shown_panel = False
        self._dirty = False
        self._blocked = False
        self._flush_next = False
        self._last_push = 0.0
        self._last_full = 0.0
        self._beat_stop = threading.Event()
        self._fallback: TextPanel | None = None
        self.request_id = _current_request_id()
        self.want_mirror = False
        self._mirror_id: str | None = None

    # -- construction --------------------------------------------------------------
    def _build(self) -> None:
        timeout = self.watch.timeout
        self.parts = parts = _take_parts(bool(timeout))
        children = parts.base
        if self.interactive:
            import ipywidgets as w

            self.stop = w.Button(
                description="Stop",
                icon="stop",
                tooltip="Stop the worker, as an interrupt does: the cell raises "
                "KeyboardInterrupt and no notebook variable changes.",
                layout=parts.shared,
                _dom_classes=("nbisolate-panel-stop",),
            )
            self.stop.on_click(self._on_stop)
            children += (self.stop,)
        if parts.progress is not None:
            parts.set(parts.progress, "value", 0.0)
            parts.set(parts.progress, "max", float(timeout))
            parts.set(parts.progress, "bar_style", "info")
        parts.set(parts.root, "children", children)
        self._push_all()

    def _show(self) -> None:
        """Build and display the panel once planning is over (a usage error shows none).

        Everything after this is an update of the widgets, and at the end one
        update of this display.
        """
        self._shown_panel = True
        with _registry_lock:
            _live[self.display_id] = self
        self._build()
        assert self.parts is not None
        self._display_panel()
        self._last_push = self._last_full = time.perf_counter()
        threading.Thread(target=self._heartbeat, name="nbisolate-panel", daemon=True).start()

    def _display_panel(self) -> None:
        assert self.parts is not None
        text = f"nbisolate: {self.watch.start_line()} {NO_WIDGETS_NOTE}"
        model = {"version_major": 2, "version_minor": 0, "model_id": self.parts.root.model_id}
        # The display id is in the metadata too, which a saved notebook keeps: a front end
        # that reopens it can ask the kernel how this panel's run ended (see lookup()).
        _display(
            {"text/plain": text, WIDGET_VIEW: model},
            display_id=self.display_id,
            metadata={"nbisolate": {"display_id": self.display_id, "live": True}},
        )

    # -- updates ---------------------------------------------------------------------
    def _main_html(self) -> str:
        return (
            f"<div style='border-left: 3px solid {_state_color(self.watch)}; padding-left: 8px; "
            f"line-height: normal; white-space: normal'>"
            f"<div class='nbisolate-status' style='{_FONT}; line-height: {_ROW}'>"
            f"<span style='color: {_state_color(self.watch)}'>●</span>&nbsp;<b>isolated</b>"
            f"<span style='{_MUTED}'>&nbsp;·&nbsp;{_e(self.watch.status())}</span></div>"
            f"{body_html(self.watch)}</div>"
        )

    def _elapsed_html(self) -> str:
        text = fmt_clock(self.watch.elapsed())
        timeout = self.watch.timeout
        if timeout:
            text += f" of {timeout:g} s"
        return (
            f"<span style='{_FONT}; {_MUTED}; padding: 0 8px; white-space: nowrap; "
            f"line-height: {_ROW}'>{_e(text)}</span>"
        )

    def _push_clock(self) -> None:
        parts = self.parts
        assert parts is not None
        self.updates += parts.set(parts.elapsed, "value", self._elapsed_html())
        if parts.progress is not None:
            spent = min(self.watch.job_elapsed(), parts.progress.max)
            self.updates += parts.set(parts.progress, "value", round(spent, 1))
            if spent >= 0.8 * parts.progress.max:
                self.updates += parts.set(parts.progress, "bar_style", "warning")
        self._last_push = time.perf_counter()

    def _mirror_bundle(self) -> dict[str, str]:
        text = f"nbisolate: {self.watch.status()} · {fmt_clock(self.watch.elapsed())}"
        html_ = (
            f"<div class='nbisolate-panel nbisolate-mirror' style='display: flex'>"
            f"{self._main_html()}{self._elapsed_html()}</div>"
        )
        return {"text/plain": text, "text/html": html_}

    def _show_mirror(self) -> None:
        """The panel as HTML, for a page that reloaded while the cell ran (see mirror())."""
        self.want_mirror = False
        first = self._mirror_id is None
        if first:
            self._mirror_id = uuid.uuid4().hex
        _display(
            self._mirror_bundle(),
            display_id=self._mirror_id,
            update=not first,
            metadata={"nbisolate": {"display_id": self.display_id, "mirror": True}},
        )

    def _push_all(self) -> None:
        parts = self.parts
        assert parts is not None
        changed = parts.set(parts.main, "value", self._main_html())
        self.updates += changed
        if changed and self._mirror_id is not None:
            self._show_mirror()
        self._dirty = False
        self._last_full = time.perf_counter()
        self._push_clock()

    def on_event(self, event: Any) -> None:
        kind = event.kind
        with self._lock:
            if self._fallback is not None:
                self._fallback.on_event(event)
                return
            if self._closed:
                return
            if kind == "note":  # from nbisolate itself (a backend): on the cell's stderr
                sys.stderr.write(str(event.data))
                return
            if kind == "phase" and event.data[0] == "plan":
                self._blocked = True  # prepare() now pickles the inputs on this thread
            elif kind in ("phase", "started"):
                self._blocked = False
            elif kind == "result":
                self._blocked = True  # outcome() now unpickles the results on this thread
            if not self._shown_panel:
                if kind == "done":
                    self._closed = True
                    if self.watch.planned:  # else planning failed: the error says it all
                        self._summary_only()
                    return
                # A cell that ends within a moment gets its summary line alone: the live
                # widgets (a dozen comm messages) appear only once it has run for a tick,
                # or as it shows its first output (see draw()), so they still come first.
                if kind not in ("tick", "clear_output") or not self._draw(event):
                    return
            if self.want_mirror and kind != "done":
                self._show_mirror()
            if kind == "done":
                self._finish()
            elif kind == "clear_output":
                # The cell cleared its output (an epoch loop's clear_output(wait=True)),
                # and a cell has one output area: the panel went with it.  Show it again
                # at once, under the same display id, so it stays first, keeps its Stop
                # button and timeout bar, and the summary still replaces it at the end.
                # With wait=True this display is the output that triggers the clear.
                self._display_panel()
                # The cell's next text follows at once rather than at the kernel's next
                # stream flush, so the cleared output is not left empty for a moment.
                self._flush_next = True
            elif kind == "stream" and self._flush_next:
                self._flush_next = False
                for stream in (sys.stdout, sys.stderr):
                    stream.flush()
            elif kind in ("phase", "started", "result", "error", "exit"):
                # Phases of a fast cell end within milliseconds of each other: send
                # at most one change of status every COALESCE_SECONDS, the rest at
                # the next tick (or, if the cell is over by then, in the summary).
                if time.perf_counter() - self._last_full >= COALESCE_SECONDS:
                    self._push_all()
                else:
                    self._dirty = True
            elif kind == "tick" and self._dirty:
                self._push_all()
            elif kind == "tick" or time.perf_counter() - self._last_push >= CLOCK_SECONDS:
                self._push_clock()  # a stream of output must not stop the clock

    def _draw(self, event: Any = None) -> bool:
        """Show the live widgets now; False if they failed and text lines took over."""
        try:
            self._show()
        except Exception:
            log.warning("nbisolate: the widget panel failed; text instead", exc_info=True)
            self._discard()
            self._fallback = TextPanel(self.stop_run, in_kernel=True)
            self._fallback.watch = self.watch
            if event is not None:
                self._fallback.on_event(event)
            return False
        return True

    def draw(self) -> None:
        """Show the live widgets before the cell's first output, if they are not shown yet."""
        with self._lock:
            if not self._shown_panel and not self._closed and self._fallback is None and self.watch.planned:
                self._draw()

    def _summary_only(self) -> None:
        """The panel of a cell that was over before it was drawn: its summary, one display."""
        self._beat_stop.set()
        bundle = final_bundle(self.watch)
        _display(
            bundle,
            display_id=self.display_id,
            metadata={"nbisolate": {"display_id": self.display_id, "live": False}},
            summary=True,
        )
        with _registry_lock:
            _outcomes[self.display_id] = bundle
            while len(_outcomes) > MAX_OUTCOMES:
                del _outcomes[next(iter(_outcomes))]

    def _heartbeat(self) -> None:
        """Keep the clock moving while the kernel's loop cannot: pickling, unpickling.

        The runner's ticks come from the loop the cell awaits on, so they carry
        the cell's parent header and never race a click; this thread only
        speaks while prepare() or outcome() holds that loop (or if it stalled),
        when a kernel-side thread is the only way to show time passing.
        """
        while not self._beat_stop.wait(HEARTBEAT_POLL):
            quiet_for = time.perf_counter() - self._last_push
            due = CLOCK_SECONDS - HEARTBEAT_POLL / 2 if self._blocked else STALL_SECONDS
            if quiet_for < due:
                continue
            with self._lock:
                if self._closed:
                    return
                try:
                    self._push_all()
                except Exception:
                    log.debug("nbisolate: panel heartbeat update failed", exc_info=True)
                    return

    def _on_stop(self, _button: Any) -> None:
        with self._lock:
            if self._closed:
                return
            self.watch.stopping = True
            if self.stop_run is not None:
                self.stop_run("interrupt")
            if self.stop is not None:
                self.stop.disabled = True
                self.stop.description = "Stopping…"
            self._push_all()

    # -- the end -------------------------------------------------------------------------
    def _finish(self) -> None:
        self._closed = True
        self._beat_stop.set()
        bundle = final_bundle(self.watch)
        _display(bundle, display_id=self.display_id, update=True)
        if self._mirror_id is not None:
            _display(bundle, display_id=self._mirror_id, update=True)
        with _registry_lock:
            _live.pop(self.display_id, None)
            _outcomes[self.display_id] = bundle
            while len(_outcomes) > MAX_OUTCOMES:
                del _outcomes[next(iter(_outcomes))]
        if self.parts is not None:
            # An idle root must not refer to a closed model: a front end that reloads
            # restores every open widget, and would fail to find the button.
            self.parts.set(self.parts.root, "children", self.parts.base)
        self._close_button()
        if self.parts is not None:
            _give_back(self.parts)
            self.parts = None

    def _close_button(self) -> None:
        if self.stop is not None:
            for model in (self.stop, self.stop.style):
                try:
                    model.close()
                except Exception:
                    log.debug("nbisolate: closing the Stop button failed", exc_info=True)
            self.stop = None

    def _discard(self) -> None:
        """After a failure of our own: close everything, return nothing to the pool."""
        self._closed = True
        with _registry_lock:
            _live.pop(self.display_id, None)
        self._beat_stop.set()
        self._close_button()
        if self.parts is not None:
            self.parts.close()
            self.parts = None

    def on_broken(self) -> None:
        with self._lock:
            self._discard()


def _current_request_id() -> str:
    """The id of the request the kernel is handling (the cell's ``execute_request``)."""
    try:
        from IPython import get_ipython

        kernel = getattr(get_ipython(), "kernel", None)
        parent = kernel.get_parent() if kernel is not None else {}
        return str((parent or {}).get("header", {}).get("msg_id", ""))
    except Exception:
        return ""


def choose_mode(quiet: bool = False, in_kernel: bool | None = None) -> str:
    """``widget``, ``text``, ``quiet`` or ``off``, from the settings and where we run."""
    setting = settings.get("panel", "auto")
    if setting == "off":
        return "off"
    if quiet:
        return "quiet"
    if setting == "text":
        return "text"
    if in_kernel is None:
        in_kernel = _in_kernel()
    if not in_kernel:
        return "text"
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return "text"
    return "widget"


def attach(
    run: Any, *, quiet: bool = False, interactive: bool = False, mode: str | None = None
) -> Panel | None:
    """Show a panel for ``run`` and register it as the run's listener; call before ``prepare()``.

    ``mode`` overrides :func:`choose_mode`.  Returns the panel, or None for
    ``off``.  Nothing shows before planning succeeds (a usage error needs no
    panel); a widget panel that cannot be built falls back to text lines
    rather than failing the cell.
    """
    mode = mode or choose_mode(quiet)
    if mode == "off":
        return None
    panel: Panel
    stop = getattr(run, "stop", None)
    if mode == "widget":
        panel = WidgetPanel(stop, interactive=interactive)
        if getattr(run, "sink", None) is not None:
            run.sink = _DrawFirst(run.sink, panel)
    else:
        panel = TextPanel(stop, quiet=mode == "quiet")
    run.listeners.append(panel)
    return panel


class _DrawFirst:
    """The run's sink, drawing the widget panel before the cell's first output.

    The widgets are drawn late (a fast cell gets its summary line alone), but
    never under output: what the cell prints follows the panel, as it always did.
    """

    def __init__(self, sink: Any, panel: WidgetPanel) -> None:
        self.sink = sink
        self.panel = panel

    def stream(self, name: str, text: str) -> None:
        self.panel.draw()
        self.sink.stream(name, text)

    def display(self, kind: str, data: Any) -> None:
        self.panel.draw()
        self.sink.display(kind, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sink, name)


def configure(line: str = "") -> str:
    """Apply ``key=value`` settings (``panel=auto|widget|text|off``); returns the settings as text.

    Raises ``ValueError`` naming the bad key or value and the accepted ones.
    """
    for item in line.split():
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip().lower()
        if not sep or key != "panel":
            raise ValueError(
                f"cannot read {item!r}: the setting is panel=auto|widget|text|off "
                "(for example `%isolate_config panel=text`)"
            )
        if value not in MODES:
            raise ValueError(f"panel={value!r} is not one of {', '.join(MODES)}")
        settings["panel"] = value
    return " ".join(f"{k}={v}" for k, v in settings.items())
