"""The notebook's interpreter settings travel with the cell: what its code obeys without naming it.

A notebook sets some things once, near its top, and every later cell obeys
them: ``warnings.filterwarnings("ignore")`` silences warnings,
``sys.setrecursionlimit(10_000)`` lets a deep recursion finish,
``np.seterr(all="raise")`` turns a division by zero into an error and
``np.set_printoptions(precision=3)`` prints arrays shorter. A worker is a fresh
process with the defaults, so the same cell, isolated, would warn, fail or
print otherwise. The kernel sends these settings with each cell
(:func:`capture`) and the worker takes them after loading the inputs, just
before the cell runs (:func:`restore`).

They do not come back: a cell that changes them changes its own worker's, as a
function that sets them and resets them before it returns would. (The random
state, which cells change all the time by drawing, does come back: see
:mod:`nbisolate.rng`.)

Standard library only: a worker imports this module. NumPy's settings are read
only when the notebook has imported NumPy, and set in the worker only once
NumPy is imported there (preloaded by the template, or by the cell), so a cell
that never uses NumPy never pays for importing it.
"""

from __future__ import annotations

import re
import sys
import warnings
from typing import Any

Settings = dict[str, Any]

_PLAIN_PRINT = (bool, int, float, str, type(None))
"""NumPy print options that travel: a ``formatter`` of functions does not (it stays the worker's)."""


def capture() -> Settings:
    """This process's settings, as plain values any pickler takes (a few microseconds)."""
    out: Settings = {"recursion": sys.getrecursionlimit(), "warnings": _pack_filters()}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        try:
            printing = {k: v for k, v in numpy.get_printoptions().items() if isinstance(v, _PLAIN_PRINT)}
            out["numpy"] = {"err": dict(numpy.geterr()), "print": printing}
        except Exception:  # a NumPy being imported, or an unusual one: the worker keeps its own
            pass
    return out


def restore(settings: Settings | None) -> None:
    """Take the settings :func:`capture` read in the kernel; what cannot be set stays as it is."""
    if not settings:
        return
    limit = settings.get("recursion")
    if limit and limit != sys.getrecursionlimit():
        try:
            sys.setrecursionlimit(limit)
        except (RecursionError, ValueError):  # the worker's stack is deeper than the limit: keep its own
            pass
    if "warnings" in settings:
        _unpack_filters(settings["warnings"])
    if "numpy" in settings:
        if "numpy" in sys.modules:
            _set_numpy(settings["numpy"])
        else:  # importing NumPy costs ~50 ms: only if the cell does, and then at once
            from .pools import _when_imported

            _when_imported("numpy", lambda: _set_numpy(settings["numpy"]))


def _pack_filters() -> list[tuple[Any, ...]]:
    """``warnings.filters``, with each pattern as its text and flags and each category by its name."""
    packed = []
    for action, message, category, module, lineno in warnings.filters:
        name = (getattr(category, "__module__", None), getattr(category, "__qualname__", None))
        packed.append((action, _pack_pattern(message), *name, _pack_pattern(module), lineno))
    return packed


def _pack_pattern(pattern: Any) -> Any:
    """A filter's message or module: None, a plain string (the interpreter's own filters) or a regex."""
    if pattern is None or isinstance(pattern, str):
        return pattern
    return (pattern.pattern, pattern.flags)


def _unpack_pattern(packed: Any) -> Any:
    return re.compile(*packed) if isinstance(packed, tuple) else packed


def _unpack_filters(packed: list[tuple[Any, ...]]) -> None:
    """Make ``warnings.filters`` the kernel's: a filter whose category this process cannot
    name without importing anything (a class defined in the notebook, a package not imported
    here) is left out."""
    filters = []
    for action, message, module_name, qualname, module, lineno in packed:
        category: Any = sys.modules.get(module_name or "")
        for part in (qualname or "").split("."):
            category = getattr(category, part, None)
        if not (isinstance(category, type) and issubclass(category, Warning)):
            continue
        try:
            filters.append(
                (action, _unpack_pattern(message), category, _unpack_pattern(module), lineno)
            )
        except re.error:
            continue
    if filters != warnings.filters:
        warnings.filters[:] = filters
        warnings._filters_mutated()  # type: ignore[attr-defined]  # what filterwarnings() calls


def _set_numpy(packed: Settings) -> None:
    try:
        import numpy as np

        np.seterr(**packed["err"])
        np.set_printoptions(**packed["print"])
    except Exception:  # another NumPy version here: its own settings
        pass
