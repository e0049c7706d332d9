"""The options of an isolated run, declared and validated in one place.

``%%isolate --timeout 5 --mem 2G ...``, ``run_isolated(..., timeout=5)`` and
each value of an ``--over`` sweep all run with a :class:`RunOptions`.  It is
frozen and checks itself when built, so an invalid value fails before any
process exists, with a message naming the option, and a derived run
(``dataclasses.replace(options, inputs=...)``) can neither drop an option nor
skip the checks: a sweep once lost ``--max-result`` because its runs copied
the options one by one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import IsolateUsageError
from .units import parse_size

DEFAULT_MAX_OUTPUT = 10 * 1024 * 1024
"""Output (stdout and stderr together) kept per run; the rest is dropped, and said so."""

MIN_MEM = 32 * 1024 * 1024
"""A worker needs about 30 MB just to run Python and load nbisolate; a ``--mem`` below this
could only end in a confusing crash."""


def _names(value: Iterable[str] | str | None, option: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = (value,) if isinstance(value, str) else tuple(value)
    bad = [n for n in names if not isinstance(n, str) or not n.isidentifier()]
    if bad:
        raise IsolateUsageError(
            f"{option} {' '.join(map(str, bad))}: not a variable name; give Python "
            f"identifiers, e.g. {option} df model. Nothing ran."
        )
    return names


@dataclass(frozen=True)
class RunOptions:
    """How one isolated run behaves; see ``%%isolate?`` for each option.

    Sizes may be given as text (``"2G"``) and are kept in bytes; names as any
    iterable and are kept as tuples, so two equal option sets compare equal.
    """

    inputs: tuple[str, ...] | None = None
    """Notebook variables to ship (None: the ones the cell reads)."""
    outputs: tuple[str, ...] | None = None
    """Names to copy back (None: every name the cell binds at top level)."""
    timeout: float | None = None
    """Seconds after which the worker and its whole tree are killed; the serialization counts."""
    mem: int | None = None
    """A memory cap for the worker, in bytes (it then runs in a fresh interpreter)."""
    max_result: int | None = None
    """Results larger than this many bytes are left out and named; the others arrive."""
    max_output: int = DEFAULT_MAX_OUTPUT
    """Bytes of output kept per run."""
    quiet: bool = False
    """No live panel: the cell's own output and one summary line."""
    backend: str | None = None
    """Where the worker runs: a name from :mod:`nbisolate.backends` (None: the configured default)."""
    scheduler: str | None = None
    """A scheduler address for cluster backends (implies ``backend="dask"``)."""
    background: bool = False
    """``--bg``: the cell returns a :class:`~nbisolate.background.Job` at once and runs on."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Backend-specific settings a backend may read (none today); kept out of equality."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalize once, here
        set_(self, "inputs", _names(self.inputs, "NAMES"))
        set_(self, "outputs", _names(self.outputs, "--out"))
        if self.timeout is not None:
            try:
                seconds = float(self.timeout)
            except (TypeError, ValueError):
                seconds = math.nan
            if not seconds > 0 or math.isinf(seconds):
                raise IsolateUsageError(
                    f"--timeout must be a number of seconds above zero, not {self.timeout!r}; "
                    "nothing ran."
                )
            set_(self, "timeout", seconds)
        if self.mem is not None:
            mem = parse_size(self.mem)
            if mem < MIN_MEM:
                raise IsolateUsageError(
                    f"--mem {self.mem} is too small: a worker needs about 30 MB just to run "
                    "Python; use 32M or more. Nothing ran."
                )
            set_(self, "mem", mem)
        if self.max_result is not None:
            set_(self, "max_result", parse_size(self.max_result))
        set_(self, "max_output", parse_size(self.max_output))
        if self.backend is not None:
            set_(self, "backend", str(self.backend).strip().lower())
        if self.scheduler is not None:
            set_(self, "scheduler", str(self.scheduler).strip() or None)

    def describe(self) -> str:
        """The options that differ from the defaults, as ``%%isolate`` would spell them."""
        from .units import format_bytes

        parts = []
        if self.inputs:
            parts.append(" ".join(self.inputs))
        if self.timeout is not None:
            parts.append(f"--timeout {self.timeout:g}")
        if self.outputs is not None:
            parts.append("--out " + " ".join(self.outputs))
        if self.mem is not None:
            parts.append(f"--mem {format_bytes(self.mem)}")
        if self.max_result is not None:
            parts.append(f"--max-result {format_bytes(self.max_result)}")
        if self.quiet:
            parts.append("--quiet")
        if self.backend is not None:
            parts.append(f"--backend {self.backend}")
        if self.scheduler is not None:
            parts.append(f"--scheduler {self.scheduler}")
        if self.background:
            parts.append("--bg")
        return " ".join(parts)
