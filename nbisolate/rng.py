"""The notebook's global random state travels with the cell, and comes back.

After ``random.seed(0)`` and ``np.random.seed(0)`` in a notebook, the next
cells draw the same numbers on every run: that is how results are made
reproducible. A worker is a fresh process with a random state of its own, so an
isolated cell would draw other numbers than the same cell run in the kernel,
and the cells after it would not continue the sequence.

So the kernel sends its global states with the cell (:func:`capture`: the
``random`` module's, and NumPy's legacy global ``RandomState`` when the
notebook imported NumPy); the worker sets them before the cell runs
(:func:`restore`) and sends its own back with the results, which the kernel
then takes. A sequence of isolated cells draws exactly what the same cells draw
as ordinary cells. A failed cell leaves the kernel's state as it was (as for
variables); the values of an ``--over`` sweep each keep a fresh state (one
shared state would give every value the same numbers), and a ``--bg`` job
starts from the notebook's state but does not set it when it ends (the
notebook went on meanwhile).

``numpy.random.Generator`` objects (``rng = np.random.default_rng(0)``) are
notebook variables like any other and come back through
:mod:`nbisolate.inplace`.

Standard library only; NumPy is used only when it is imported anyway. NumPy 2
imports ``numpy.random`` only when it is first used, and that import costs
about 10 ms: so looking at the state never imports it, and a worker sets
NumPy's state the moment its cell first imports ``numpy.random``
(``restore(..., lazily=True)``). A cell that never draws from NumPy does not
pay for it.
"""

from __future__ import annotations

import random
import sys
from typing import Any

State = dict[str, Any]


def capture() -> State:
    """This process's global random states, as plain Python values."""
    state: State = {"random": random.getstate()}
    # Not ``numpy.random`` by attribute: with NumPy 2 that would import it.
    legacy = getattr(sys.modules.get("numpy.random"), "get_state", None)
    if legacy is not None:
        try:
            name, keys, pos, has_gauss, cached = legacy(legacy=True)
            state["numpy"] = (name, keys.tobytes(), keys.dtype.str, pos, has_gauss, cached)
        except Exception:  # an unusual NumPy: its state stays this process's own
            pass
    return state


def restore(state: State | None, lazily: bool = False) -> None:
    """Set the global random states captured by :func:`capture` in another process.

    NumPy's is set now if this process has imported NumPy; with ``lazily`` (a
    worker, before its cell), only once ``numpy.random`` is imported, by the
    cell or already.
    """
    if not state:
        return
    if "random" in state:
        random.setstate(state["random"])
    if "numpy" in state:
        trigger = "numpy.random" if lazily else "numpy"
        if trigger in sys.modules:
            _set_numpy(state["numpy"])
        else:  # importing NumPy costs ~50 ms, numpy.random ~10: only if the cell does, and then at once
            from .pools import _when_imported

            _when_imported(trigger, lambda: _set_numpy(state["numpy"]))


def _set_numpy(packed: tuple[Any, ...]) -> None:
    try:
        import numpy as np

        name, raw, dtype, pos, has_gauss, cached = packed
        keys = np.frombuffer(raw, dtype=dtype).copy()
        # From sys.modules when it is there: the hook runs while numpy.random is being imported.
        generator = sys.modules.get("numpy.random") or np.random
        generator.set_state((name, keys, pos, has_gauss, cached))
    except Exception:  # another NumPy version here: this side's own state
        pass


def changed_since(state: State | None) -> State | None:
    """This process's states if they moved on from ``state`` (the cell drew numbers); else
    None, and the kernel has nothing to set."""
    if not state:
        return None
    now = capture()  # only what this process has: NumPy's state if the cell imported it
    return None if all(state.get(key) == value for key, value in now.items()) else now
