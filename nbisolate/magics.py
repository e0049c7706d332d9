"""The IPython side: ``%%isolate`` and ``%pickle_check``.

In a Jupyter kernel, a cell that starts with ``%%isolate`` is rewritten (by
an input transformer) into an awaited call, so the kernel waits for the
worker on its event loop: front-end messages such as a click on the panel's
Stop button are handled while the cell runs, and "Run all" still waits for
the cell.  Everywhere else (terminal IPython, ``run_cell_magic`` called by
hand) the same magic runs and waits synchronously.
"""

from __future__ import annotations

import argparse
import ast
import functools
import re
import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from . import backends, magicline
from .cellsyntax import cell_number, transform
from .errors import IsolateUsageError
from .kernel_comms import let_comms_through
from .options import RunOptions
from .runner import CellRun

_TRANSFORM_MARK = "%%isolate"


def _visible_names(shell: Any, history: bool = False) -> set[str]:
    """User variables: the namespace minus what IPython put there itself.

    With ``history``, IPython's history too, which an ordinary cell reads as it reads any
    variable (``_ * 2``, ``Out[3]``): what a cell may read (only what it reads travels).
    ``%pickle_check`` with no names checks the user's variables alone.
    """
    hidden = shell.user_ns_hidden
    ns = shell.user_ns
    history_name = _HISTORY.fullmatch if history else (lambda n: False)
    return {n for n in ns if n not in hidden or hidden[n] is not ns[n] or history_name(n)}


_HISTORY = re.compile(r"(?:_{1,3}|_\d+|_i{1,3}|_i\d+|_ih|_oh|_dh|In|Out)")
"""IPython's history in the namespace: the last results (``_``, ``__``, ``___``, ``_7``),
the inputs (``_i``, ``_i7``, ``In``) and outputs (``Out``) by number, the directories."""


@magics_class
class IsolateMagics(Magics):
    """``%%isolate`` runs a cell in a fresh worker process; ``%pickle_check`` diagnoses."""

    @magic_arguments()
    @argument(
        "names",
        nargs="*",
        help="Notebook variables to ship to the worker (default: the ones the cell reads).",
    )
    @argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="Kill the worker and everything it started after this many seconds.",
    )
    @argument(
        "--out",
        nargs="+",
        default=None,
        metavar="NAME",
        help="Copy back only these names (default: every name the cell binds at top level).",
    )
    @argument(
        "--mem",
        default=None,
        metavar="SIZE",
        help="Cap the worker's memory, e.g. 500M or 2G.",
    )
    @argument(
        "--max-result",
        default=None,
        metavar="SIZE",
        help="Leave out (and name) results larger than this, e.g. 1G; the others still arrive.",
    )
    @argument(
        "--quiet",
        action="store_true",
        help="No live status panel: only the cell's own output and one summary line at the end.",
    )
    @argument(
        "--backend",
        default=None,
        metavar="NAME",
        help="Where the worker runs: " + ", ".join(f"{n} ({h})" for n, h in backends.described())
        + "; default: local, or `%%isolate_config backend=NAME`.",
    )
    @argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="The Dask scheduler to use (implies --backend dask), e.g. tcp://10.0.0.5:8786.",
    )
    @argument(
        "--bg",
        action="store_true",
        help="Run in the background: the cell returns a Job at once, its output keeps arriving "
        "here, its results are bound when it ends (%%isolate_jobs, %%isolate_wait, %%isolate_stop).",
    )
    @argument(
        "--over",
        default=None,
        metavar="NAME=EXPR",
        help="Run the cell once per value of EXPR (up to the next --option), in parallel, with NAME "
        "bound to the value; "
        "each bound name comes back as a list.",
    )
    @cell_magic
    def isolate(self, line: str, cell: str) -> Any:
        """Run the cell in a freshly spawned worker process.

        Usage::

            %%isolate [NAME ...] [--timeout SECONDS] [--out NAME ...] [--mem SIZE] [--quiet]
                      [--backend local|dask] [--scheduler ADDRESS] [--bg] [--over NAME=EXPR]

        The worker sees only the shipped variables; modules are re-imported
        there, notebook functions and classes travel by value.  On
        success the names the cell binds come back; if it fails, times out or
        crashes, nothing in the notebook changes.

        ``--bg`` returns a :class:`~nbisolate.background.Job` at once (a Jupyter
        kernel only): see :mod:`nbisolate.background` for what it binds when it ends.
        """
        run = self._make_run(line, cell)
        if run.options.background:
            return _submit(self.shell, run, cell)
        return run.run_sync()

    def _make_run(self, line: str, cell: str, interactive: bool = False) -> CellRun:
        """Parse the line into :class:`RunOptions` (validated there, once), attach the panel,
        and prepare the run (or the sweep): every usage or shipping error is raised here,
        before any process exists."""
        from .sweep import split_over

        # --over takes the rest of its option unsplit, so `--over x=[1, 2]` needs no quotes.
        options_line, over_spec = split_over(line)
        try:
            args = argparse.Namespace(**dict(_parse_line(options_line)))
        except UsageError as exc:
            raise UsageError(f"%%isolate: {exc}. Usage: {_usage()}") from None
        shell = self.shell
        assert shell is not None
        try:
            options = RunOptions(
                inputs=args.names or None,
                outputs=args.out,
                timeout=args.timeout,
                mem=args.mem,
                max_result=args.max_result,
                quiet=args.quiet,
                backend=args.backend,
                scheduler=args.scheduler,
                background=args.bg,
            )
            if options.background:
                _check_background(shell)
            backends.chosen_name(options)  # an unknown --backend fails before anything else
            over = None
            if over_spec is not None:  # nbisolate.sweep: one run per value
                from .sweep import parse_over

                over = parse_over(over_spec, shell.user_ns)
            shown = f"%%isolate {line}".rstrip() + "\n" + cell
            number = cell_number(shell)
            run = CellRun(
                # IPython lines (!ls, %time) become Python here, as IPython does it; a
                # magic that needs the kernel is refused, by name, before anything runs.
                transform(shell, cell),
                shell.user_ns,
                options,
                available=_visible_names(shell, history=True),
                line_offset=1,
                display_source=shown,
                # The name IPython gives the cell's code, so a syntax error, a warning or a
                # traceback names it as it names an ordinary cell: Cell In[n], line k.
                filename=_cell_filename(shell, shown, number),
                cell_label=f"Cell In[{number}]",
            )
            if "get_ipython" in run.source:  # IPython lines: %time prints as the kernel's does
                run.micro = _micro_sign()
            run.label_cells = functools.partial(_cell_label, shell)
            if options.background:
                # The job reads its inputs from the namespace as this cell saw it (a queued
                # job starts later) and binds into a copy; nbisolate.background applies it.
                from .background import scratch_namespace

                run.namespace, start = scratch_namespace(shell.user_ns)
                run.bg_start = start  # type: ignore[attr-defined]
            # Shown before prepare(), so a slow or failing serialization is visible;
            # the panel only listens to the run's events (see nbisolate.panel).
            from .panel import attach

            attach(run, quiet=options.quiet, interactive=interactive)
            if over is not None:
                from .sweep import Sweep

                sweep = Sweep(run, *over)
                sweep.prepare()
                if options.background:
                    sweep.bg_start = start  # type: ignore[attr-defined]
                    for each in sweep.runs:  # functions coming back: the notebook's globals
                        each.main_namespace = shell.user_ns
                return sweep  # type: ignore[return-value]  # runs like a CellRun
            # Plan now (usage errors before anything else); the inputs are inspected and
            # serialized as the run begins, so --timeout and an interrupt cover them.
            run.prepare(ship=False)
        except IsolateUsageError as exc:
            raise UsageError(f"%%isolate: {exc}") from None
        return run

    @line_magic
    def pickle_check(self, line: str) -> Any:
        """Tell whether notebook variables can cross a process boundary, and why not.

        Usage: ``%pickle_check [NAME ...]`` (no names: every user variable).
        """
        from .diagnose import check_namespace

        names = shlex.split(line)
        shell = self.shell
        assert shell is not None
        unknown = [n for n in names if n not in shell.user_ns]
        if unknown:
            raise UsageError(
                f"%pickle_check: no notebook variable named {', '.join(map(repr, unknown))}. "
                "Usage: %pickle_check [NAME ...]"
            )
        from .probe import spawn_loads

        if not names:
            visible = _visible_names(shell)
            ns = {n: v for n, v in shell.user_ns.items() if n in visible}
            return check_namespace(ns, None, verify_spawn=spawn_loads)
        return check_namespace(shell.user_ns, names, verify_spawn=spawn_loads)

    @line_magic
    def isolate_jobs(self, line: str) -> Any:
        """List the background jobs (``%%isolate --bg``): id, first line, state, started,
        elapsed, host, pid."""
        from .background import JobTable, jobs

        return JobTable(jobs())

    @line_magic
    def isolate_wait(self, line: str) -> None:
        """``%isolate_wait [ID ...]``: block until these background jobs end (default: all).

        An interrupt ends the wait, not the jobs.
        """
        from . import background

        try:
            found = background.find(line.split())
        except ValueError as exc:
            raise UsageError(f"%isolate_wait: {exc}. Usage: %isolate_wait [ID ...]") from None
        background.wait(found)

    @line_magic
    def isolate_stop(self, line: str) -> None:
        """``%isolate_stop ID|all``: stop background jobs and every process they started."""
        from . import background

        ids = line.split()
        if not ids:
            raise UsageError("%isolate_stop: name a job (see %isolate_jobs) or all. "
                             "Usage: %isolate_stop ID|all")
        try:
            found = background.find(ids)
        except ValueError as exc:
            raise UsageError(f"%isolate_stop: {exc}. Usage: %isolate_stop ID|all") from None
        for job in found:
            job.stop()

    @line_magic
    def isolate_config(self, line: str) -> None:
        """Show or change settings: ``%isolate_config [panel=...] [backend=...] [mp=on|off] [scheduler=...]``.

        ``panel=auto|widget|text|off``: ``auto`` (the default, or $NBISOLATE_PANEL)
        shows the live widget panel in a Jupyter kernel and plain text lines
        elsewhere; ``text`` forces the lines (for front ends without the widget
        manager); ``off`` shows nothing.

        ``backend=NAME``: the default of ``--backend`` (see ``%%isolate?``).
        Dask settings (nbisolate.backends.dask): ``scheduler=ADDRESS`` (the
        default Dask scheduler; ``scheduler=`` clears it),
        ``connect_timeout=SECONDS``.

        ``mp=on|off``: in ordinary cells, the notebook's own process pools
        (``multiprocessing``, ``concurrent.futures``, ``multiprocess``) send
        functions and classes defined in the notebook by value, so they work
        under spawn and forkserver (:func:`nbisolate.enable_multiprocessing`).
        Off by default; isolated cells always have it.

        ``bg_limit=N``: at most N background jobs (``--bg``) run at once, the
        others wait as ``queued`` (default: the number of cores).
        """
        from .backends import dask as dask_settings
        from .panel import configure

        asked = line.split()
        rest = []
        try:
            for item in asked:
                key, sep, value = item.partition("=")
                if sep and key.strip().lower() == "backend":
                    backends.set_default(value)
                elif sep and key.strip().lower() == "mp":
                    print(_set_mp(value))
                elif sep and key.strip().lower() == "bg_limit":
                    _set_bg_limit(value)
                else:
                    rest.append(item)
            line, _ = dask_settings.split_config(" ".join(rest))
            current = configure(line)
        except ValueError as exc:
            raise UsageError(f"%isolate_config: {exc}") from None
        if not asked:  # no settings given: show them all
            from . import pools

            print(
                f"{current} backend={backends.settings['backend']} "
                f"mp={'on' if pools.enabled() else 'off'} "
                f"bg_limit={_bg_settings()['bg_limit']} {dask_settings.describe_config()}"
            )


def _bg_settings() -> dict[str, Any]:
    from .background import settings

    return settings


def _set_bg_limit(value: str) -> None:
    """``bg_limit=N``: how many background jobs run at once."""
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ValueError(f"bg_limit={value!r}: give a whole number of jobs, 1 or more (bg_limit=2)")
    _bg_settings()["bg_limit"] = limit


def _set_mp(value: str) -> str:
    """``mp=on|off``: the notebook's own pools send notebook functions by value (nbisolate.pools)."""
    from . import pools

    wanted = value.strip().lower()
    if wanted in ("on", "true", "1", "yes"):
        return pools.enable_multiprocessing()
    if wanted in ("off", "false", "0", "no"):
        return pools.disable_multiprocessing()
    raise ValueError(f"mp={value!r}: use mp=on or mp=off")


def _cell_filename(shell: Any, shown: str, number: int) -> str:
    """A file name for the cell's text that IPython shows as ``Cell In[n]``.

    Registered as IPython registers a cell it compiles (its compiler's map of
    names to execution counts, and ``linecache`` for the text), without
    writing a file as IPython's cache would: a syntax error, a warning or a
    traceback then names the cell as it names an ordinary one.
    """
    import linecache

    name = f"<isolated cell {number}>"
    linecache.cache[name] = (len(shown), None, shown.splitlines(True), name)
    names = getattr(getattr(shell, "compile", None), "_filename_map", None)
    if isinstance(names, dict):
        names[name] = number
    return name


def _cell_label(shell: Any, filename: str) -> str | None:
    """How IPython names the cell a code object's file name stands for (``Cell In[2]``), or None."""
    names = getattr(getattr(shell, "compile", None), "_filename_map", None)
    number = names.get(filename) if isinstance(names, dict) else None
    return None if number is None else f"Cell In[{number}]"


def _usage() -> str:
    return (
        "%%isolate [NAME ...] [--timeout SECONDS] [--out NAME ...] [--mem SIZE] [--quiet] "
        "[--backend local|dask] [--scheduler ADDRESS] [--bg] [--over NAME=EXPR]"
    )


def _check_background(shell: Any) -> None:
    """``--bg`` needs a kernel's event loop to keep the job going between cells."""
    from .background import kernel_loop

    if getattr(shell, "kernel", None) is None or kernel_loop() is None:
        raise IsolateUsageError(
            "--bg runs the cell in the background on a Jupyter kernel's event loop, and there is "
            "none here (terminal IPython or a script); nothing ran. Run the cell without --bg."
        )
    if not callable(getattr(shell, "set_thread_parent", None)):
        import ipykernel

        raise IsolateUsageError(
            f"--bg needs a kernel that can send output to a cell that is no longer running, and "
            f"this ipykernel ({ipykernel.__version__}) cannot; nothing ran. Upgrade it "
            "(pip install -U ipykernel, 7 or newer) and restart the kernel, or run the cell "
            "without --bg."
        )


@functools.lru_cache(maxsize=32)
def _parse_line(options_line: str) -> tuple[tuple[str, Any], ...]:
    """The options of a ``%%isolate`` line, parsed once per line: argparse took a tenth of a
    millisecond of every cell, which is usually run again with the same line.  Raises
    :class:`UsageError` (never cached) as ``parse_argstring`` does."""
    args = parse_argstring(IsolateMagics.isolate, options_line)
    return tuple((key, tuple(value) if isinstance(value, list) else value) for key, value in vars(args).items())


def _submit(shell: Any, run: Any, cell: str) -> Any:
    """Hand a prepared ``--bg`` run to nbisolate.background; returns its Job."""
    from . import background

    return background.submit(run, shell, run.namespace if not hasattr(run, "template")
                             else run.template.namespace, run.bg_start, cell)


async def isolate_async(line: str, cell: str) -> Any:
    """What a transformed ``%%isolate`` cell awaits in a kernel."""
    import signal
    import threading

    from IPython import get_ipython

    shell = get_ipython()
    magics = shell.magics_manager.registry["IsolateMagics"]
    previous = None
    if threading.current_thread() is threading.main_thread():
        # ipykernel's handler only schedules a cancel for the loop's next turn, which
        # planning (synchronous) would not give it: raise at once instead.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        # `%%isolate --timeout $t`: expanded as IPython expands every magic's line.
        run = magics._make_run(_expand(shell, line), cell, interactive=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if run.options.background:
        return _submit(shell, run, cell)
    # The panel's Stop and the status item's stop are comm messages: kernels older than
    # ipykernel 7.4 would queue them behind this very cell (nbisolate.kernel_comms).
    release_comms = let_comms_through()
    try:
        return await run.run_async()
    except magicline.UsageError as exc:  # a magic's line in the cell (%timeit -z): as IPython shows it
        raise UsageError(str(exc)) from None
    finally:
        release_comms()


@functools.lru_cache(maxsize=1)
def _micro_sign() -> str:
    """How this kernel's IPython writes microseconds (``µs`` up to IPython 8, ``μs`` from 9):
    ``%time`` and ``%timeit`` in an isolated cell print what they print in the notebook, though
    the worker never imports IPython for them."""
    try:
        from IPython.core.magics.execution import _format_time

        return str(_format_time(2e-6)).split()[-1]
    except Exception:  # another IPython: the worker's own sign
        return "µs"


def _expand(shell: Any, line: str) -> str:
    """``$name`` and ``{expr}`` in a magic's line, from the notebook's variables, as
    ``InteractiveShell.var_expand`` does for magics it runs itself (unchanged if it cannot)."""
    from IPython.utils.text import DollarFormatter

    try:
        return DollarFormatter().vformat(line, args=[], kwargs=dict(shell.user_ns))
    except Exception:
        return line


def _inside_a_magic() -> bool:
    """True when the cell being transformed is the body of another cell magic.

    ``%%time`` compiles its body itself and ``%%capture`` runs it with the
    synchronous ``run_cell``: neither can run an awaited call, so under them
    ``%%isolate`` stays a magic and waits synchronously.
    """
    import sys

    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name in ("run_cell_magic", "run_line_magic"):
            return True
        frame = frame.f_back
    return False


def _transform(lines: list[str]) -> list[str]:
    """Rewrite an ``%%isolate`` cell into an awaited call (kernels only, see module doc)."""
    if not lines or not lines[0].startswith(_TRANSFORM_MARK):
        return lines
    if _inside_a_magic():
        return lines
    first = lines[0][len(_TRANSFORM_MARK) :]
    if first and not first[0].isspace():
        return lines  # %%isolated or similar: not ours
    line = first.strip()
    cell = "".join(lines[1:])
    return [
        "await __import__('nbisolate.magics', fromlist=['isolate_async'])"
        f".isolate_async({line!r}, {cell!r})\n"
    ]


_SETS_ATTRIBUTE = re.compile(
    r"\.\s*[A-Za-z_]\w*\s*(?://|\*\*|<<|>>|[-+*/%@&|^])?=(?!=)|\bdel\b|\b(?:set|del)attr\b|\w\s*\.\s*\w+\s*\.\s*\w+\s*\(|\w\s*\.\s*\w+\s*\[[^\]]*\]\s*\S?="
)
"""A cell that may set, delete or change in place an attribute (``x.a = 1``, ``x.a.append(2)``,
``x.a[k] = 3``): only such a cell is parsed after it ran."""


def _note_attributes(result: Any) -> None:
    """``post_run_cell``: remember what an ordinary cell set on a module, or on a class or a
    function of a module (``config.LR = 0.5``), so that isolated cells find it set too
    (:data:`nbisolate.attributes.registry`).  An isolated cell's come back by its results."""
    raw = getattr(getattr(result, "info", None), "raw_cell", None)
    if not raw or not _SETS_ATTRIBUTE.search(raw) or raw.lstrip().startswith("%%isolate"):
        return
    from IPython import get_ipython

    from . import attributes

    shell = get_ipython()
    if shell is None:
        return
    stored, touched = _attribute_uses_of(shell, raw)
    if stored or touched:
        attributes.registry.note(shell.user_ns, stored, touched)


@functools.lru_cache(maxsize=64)
def _attribute_uses_of(shell: Any, raw: str) -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]]:
    """:func:`nbisolate.plan.attribute_uses` of an ordinary cell's text, once per text (a cell is
    run again and again); nothing for a cell that is not Python after all (its error was shown)."""
    from .plan import attribute_uses

    try:
        return attribute_uses(ast.parse(shell.transform_cell(raw)))
    except Exception:
        return (), ()


def load(shell: Any) -> None:
    """Register the magics, and in a kernel the async transformer and the status comm."""
    import threading

    from . import settings
    from .supervisor import launcher

    shell.register_magics(IsolateMagics)
    if settings.before_cell not in shell.events.callbacks["pre_run_cell"]:
        shell.events.register("pre_run_cell", settings.before_cell)
    if _note_attributes not in shell.events.callbacks["post_run_cell"]:
        shell.events.register("post_run_cell", _note_attributes)
    # Start the template now, in the background, so the first cell finds it warm.
    threading.Thread(target=launcher.start, daemon=True, name="nbisolate-prestart").start()
    if getattr(shell, "kernel", None) is not None:
        if _transform not in shell.input_transformers_cleanup:
            shell.input_transformers_cleanup.append(_transform)
        from . import labcomm

        labcomm.register(shell)


def unload(shell: Any) -> None:
    import sys as _sys

    from . import labcomm

    background = _sys.modules.get("nbisolate.background")  # loaded only if a job ran
    if background is not None:
        background.stop_all()
    from .supervisor import launcher

    launcher.close()
    labcomm.unregister(shell)
    from . import settings

    if settings.before_cell in shell.events.callbacks["pre_run_cell"]:
        shell.events.unregister("pre_run_cell", settings.before_cell)
    if _note_attributes in shell.events.callbacks["post_run_cell"]:
        shell.events.unregister("post_run_cell", _note_attributes)
    import sys

    panel = sys.modules.get("nbisolate.panel")  # loaded only if a cell ran
    if panel is not None:
        panel.release_widgets()
    if _transform in shell.input_transformers_cleanup:
        shell.input_transformers_cleanup.remove(_transform)
