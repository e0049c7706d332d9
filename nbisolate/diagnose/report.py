"""What a check answers: the result types users hold and print.

Kept apart from the machinery that fills them so that a user (or the panel,
or :class:`nbisolate.errors.ShipError`, which carries a report) can read a
:class:`Report` without importing the tracing picklers; printing them is
:mod:`.render`'s job, reached lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SerializerResult:
    """How one serializer fared with the whole object.

    ``ok`` is the verdict a user cares about: the object can be dumped here,
    loaded back, and (as far as we can tell) loaded in a freshly spawned
    process. ``dumps_ok`` and ``loads_ok`` are the two halves of the in-process
    round trip; ``spawn_ok`` is False when a reference to ``__main__`` or to
    an unimportable module makes a spawned child fail, None when unknown.
    ``size`` counts every byte that would be shipped, in-band pickle plus
    out-of-band buffers (``oob_bytes``).
    """

    name: str
    label: str
    used_by: str
    ok: bool | None
    dumps_ok: bool | None
    loads_ok: bool | None = None
    spawn_ok: bool | None = None
    size: int | None = None
    oob_bytes: int = 0
    seconds: float = 0.0
    error: str | None = None
    note: str | None = None

    @property
    def verdict(self) -> str:
        """One word for tables: ``ok``, ``fails``, ``spawn`` or ``unknown``."""
        if self.ok:
            return "ok"
        if self.ok is None:
            return "unknown"
        if self.dumps_ok and self.loads_ok and self.spawn_ok is False:
            return "spawn"
        return "fails"


@dataclass
class Problem:
    """One distinct culprit: where it is, what it is, why it fails, how to fix it.

    ``path`` is an access path from the checked name (``e.store.db``,
    ``cfg['feeds'][1]``, ``worker.<closure fh>``); ``type_name`` the culprit's
    qualified type (``sqlite3.Connection``); ``what`` a short description of
    the culprit itself. ``fails_with`` lists the serializers it breaks;
    ``severity`` is ``"error"`` when it breaks ``%%isolate`` (dill) too, and
    ``"warning"`` when only other serializers are affected, or for
    advisories such as very large objects. ``also_at`` holds other paths to
    the same object (a shared object is reported once).
    """

    path: str
    type_name: str
    category: str
    title: str
    reason: str
    fix: str
    fails_with: tuple[str, ...] = ()
    severity: str = "error"
    what: str = ""
    also_at: tuple[str, ...] = ()
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class Report:
    """The answer of :func:`pickle_check` for one object.

    ``ok`` is True when every checked serializer succeeded (including the
    spawn check); ``isolate_ok`` is the verdict for ``%%isolate`` alone (the
    dill column). ``truncated`` is True when the walk stopped early (time or
    depth bound); ``notes`` says what was skipped. ``str(report)`` is meant
    for a terminal, ``_repr_html_`` for a notebook.
    """

    name: str
    type_name: str
    results: dict[str, SerializerResult]
    problems: list[Problem]
    truncated: bool = False
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    omitted: int = 0

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results.values())

    @property
    def isolate_ok(self) -> bool | None:
        r = self.results.get("dill")
        return None if r is None else r.ok

    @property
    def errors(self) -> list[Problem]:
        """Problems that break ``%%isolate`` (severity ``"error"``)."""
        return [p for p in self.problems if p.severity == "error"]

    @property
    def size(self) -> int | None:
        """Bytes ``%%isolate`` would ship (dill), else the first known size."""
        r = self.results.get("dill")
        if r is not None and r.size is not None:
            return r.size
        for r in self.results.values():
            if r.size is not None:
                return r.size
        return None

    def __str__(self) -> str:
        from .render import _report_text

        return _report_text(self)

    __repr__ = __str__

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        from .render import _report_html

        return _report_html(self)


@dataclass
class NamespaceReport:
    """The answer of :func:`check_namespace`: one :class:`Report` per variable.

    ``reports`` is ordered with variables that have problems first.
    ``modules`` lists variables that hold modules: they are not pickled at
    all by ``%%isolate`` but re-imported by name in the worker.
    """

    reports: dict[str, Report]
    modules: list[str] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.reports.values())

    @property
    def truncated(self) -> bool:
        return any(r.truncated for r in self.reports.values())

    @property
    def problems(self) -> list[Problem]:
        return [p for r in self.reports.values() for p in r.problems]

    def __str__(self) -> str:
        from .render import _namespace_text

        return _namespace_text(self)

    __repr__ = __str__

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        from .render import _namespace_html

        return _namespace_html(self)


class UnknownNameError(KeyError):
    """``check_namespace`` was asked about names the namespace does not have."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        listed = ", ".join(self.names)
        plural = "s" if len(self.names) > 1 else ""
        super().__init__(
            f"no notebook variable{plural} named {listed}: check the spelling, or run the "
            "cell that defines it first"
        )

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])
