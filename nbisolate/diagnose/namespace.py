"""``check_namespace``: ``%pickle_check`` over a notebook's variables.

Picks the user's variables (not IPython's own), shares one spawn context and
one time budget across them, lists modules apart (``%%isolate`` re-imports
them by name) and orders the reports so variables with problems come first.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable, Sequence
from typing import Any

from .categories import _SOFT_CATEGORIES, _is, _type_name
from .check import DEFAULT_MAX_SECONDS, pickle_check
from .report import NamespaceReport, Report, SerializerResult, UnknownNameError
from .serializers import _SERIALIZERS, available_serializers
from .spawn import _Context, _VerifySpawn

_IPYTHON_NAMES = frozenset(
    {"In", "Out", "_", "__", "___", "_oh", "_ih", "_dh", "exit", "quit", "get_ipython"}
)


_PLAIN_TYPES = frozenset(
    {int, float, complex, bool, str, bytes, list, tuple, dict, set, frozenset, type(None)}
)


NAMESPACE_SEARCH_SECONDS = 0.5
"""How long ``%pickle_check`` with no names looks for one variable's culprits (its verdicts
always come from complete dumps and loads, which keep their own bound): a function whose
globals reach a cluster client took a second, half the whole notebook's. ``%pickle_check NAME``
looks for up to :data:`~nbisolate.diagnose.check.DEFAULT_MAX_SECONDS`."""


def _is_user_variable(name: str) -> bool:
    return name not in _IPYTHON_NAMES and not name.startswith("_")


def _report_rank(report: Report) -> int:
    """Order for a namespace: breaks %%isolate, fails somewhere, spawn-only/advice, clean."""
    if report.errors or report.isolate_ok is False:
        return 0
    if any(p.category not in _SOFT_CATEGORIES for p in report.problems):
        return 1
    if report.problems or not report.ok:
        return 2
    return 3


class _BudgetRunner:
    """Runs checks one after another in one helper thread, each given up after its budget.

    Why a thread at all: the budget must hold even when serializing blocks in C
    or on the network (a proxy whose server is gone), where the checks' own
    deadlines are never reached. Why one thread for all: starting and joining a
    thread per variable cost more than checking most variables (~0.6 ms each,
    0.6 s for a thousand). A check given up keeps its thread, blocked; the
    next check gets a new one.
    """

    def __init__(self) -> None:
        import queue

        self._queue_type = queue.SimpleQueue
        self._jobs: Any = None

    def _start(self) -> None:
        import threading

        jobs = self._jobs = self._queue_type()

        def serve() -> None:
            while True:
                job = jobs.get()
                if job is None:
                    return
                check, box, done = job
                try:
                    box.append(check())
                except BaseException as exc:
                    box.append(exc)
                done.set()

        threading.Thread(target=serve, daemon=True, name="pickle-check").start()

    def run(self, check: Callable[[], Report], seconds: float) -> Report | None:
        """``check()``'s report, or None when it did not return within ``seconds``."""
        import threading

        if self._jobs is None:
            self._start()
        box: list[Any] = []
        done = threading.Event()
        self._jobs.put((check, box, done))
        if not done.wait(seconds):
            self._jobs = None  # that thread stays blocked in the check; the next gets a new one
            return None
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def close(self) -> None:
        if self._jobs is not None:
            self._jobs.put(None)
            self._jobs = None


def _given_up(name: str, value: Any, serializers: Sequence[str] | None, seconds: float) -> Report:
    """The report of a variable whose check did not return within its budget."""
    note = (
        f"stopped: serializing {name!r} did not return within {seconds:.0f} s (it blocks, e.g. a "
        "proxy whose server is gone); %%isolate could not send it either"
    )
    names = list(serializers) if serializers is not None else available_serializers()
    results = {
        n: SerializerResult(
            n, _SERIALIZERS[n].label, _SERIALIZERS[n].used_by, ok=None, dumps_ok=None, note=note
        )
        for n in names
        if n in _SERIALIZERS
    }
    return Report(
        name=name, type_name=_type_name(type(value)), results=results, problems=[],
        truncated=True, notes=[note], seconds=seconds,
    )


def check_namespace(
    user_ns: dict[str, Any],
    names: Sequence[str] | None = None,
    *,
    serializers: Sequence[str] | None = None,
    max_seconds: float = 30.0,
    verify_spawn: _VerifySpawn | None = None,
) -> NamespaceReport:
    """Check notebook variables; with no ``names``, every user variable.

    Skips IPython's own names (``In``, ``Out``, ``_``, ``_i3``, ``exit``,
    ...) and anything starting with ``_``. Variables that hold modules are
    listed as fine: ``%%isolate`` re-imports them by name instead of
    pickling them. Names asked for explicitly are always checked (a module
    asked for by name gets a full report) and raise :class:`UnknownNameError`
    when missing. ``max_seconds`` is the budget for the whole namespace; each
    variable gets at most :data:`DEFAULT_MAX_SECONDS` of it for the search for
    culprits when named, :data:`NAMESPACE_SEARCH_SECONDS` when the whole
    namespace is checked. Variables with problems come first in the result.
    """
    started = time.perf_counter()
    deadline = started + max_seconds
    explicit = names is not None and len(names) > 0
    if explicit:
        missing = [n for n in names if n not in user_ns]  # type: ignore[union-attr]
        if missing:
            raise UnknownNameError(missing)
        chosen = list(dict.fromkeys(names))  # type: ignore[arg-type]
    else:
        chosen = [n for n in list(user_ns) if _is_user_variable(n)]
    ctx = _Context(verify_spawn)
    runner = _BudgetRunner()
    reports: dict[str, Report] = {}
    modules: list[str] = []
    notes: list[str] = []
    position = {var: i for i, var in enumerate(chosen)}  # the reports keep the notebook's order
    if not explicit:
        # The notebook's plain data first (it loads back here): meanwhile the loader process
        # starts and imports the packages the others need.
        chosen.sort(key=lambda var: type(user_ns[var]) not in _PLAIN_TYPES)
    try:
        ctx.prepare(user_ns[var] for var in chosen)
        for i, var in enumerate(chosen):
            value = user_ns[var]
            if not explicit and _is(value, types.ModuleType):
                modules.append(var)
                continue
            left = deadline - time.perf_counter()
            if left <= 0:
                notes.append(
                    f"stopped after {max_seconds:g} s (max_seconds): {len(chosen) - i} variables "
                    f"not checked: {', '.join(chosen[i:i + 10])}"
                    f"{' ...' if len(chosen) - i > 10 else ''}"
                )
                break
            limit = min(DEFAULT_MAX_SECONDS, left)
            search = None if explicit else min(NAMESPACE_SEARCH_SECONDS, limit)
            budget = min(2 * limit, left) + 1.0
            report = runner.run(
                lambda value=value, var=var, limit=limit, search=search: pickle_check(
                    value, name=var, serializers=serializers, max_seconds=limit, _ctx=ctx,
                    _search_seconds=search,
                ),
                budget,
            )
            if report is not None and not explicit and any("stopped looking" in n for n in report.notes):
                report.notes.append(
                    f"%pickle_check {var} alone looks for up to {DEFAULT_MAX_SECONDS:g} s"
                )
            reports[var] = report or _given_up(var, value, serializers, budget)
    finally:  # the loader process (if the check started one) ends with the call
        runner.close()
        ctx.close()
    ordered = dict(sorted(reports.items(), key=lambda kv: (_report_rank(kv[1]), position[kv[0]])))
    return NamespaceReport(
        reports=ordered, modules=modules, seconds=time.perf_counter() - started, notes=notes
    )
