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

Standard library only; NumPy is used only when it is imported anyway (in a
worker that has not imported it, its state is set the moment the cell does).
"""

from __future__ import annotations

import random
import sys
from typing import Any

State = dict[str, Any]


def capture() -> State:
    """This process's global random states, as plain Python values."""
    state: State = {"random": random.getstate()}
    np = sys.modules.get("numpy")
    legacy = getattr(getattr(np, "random", None), "get_state", None)
    if legacy is not None:
        try:
            name, keys, pos, has_gauss, cached = legacy(legacy=True)
            state["numpy"] = (name, keys.tobytes(), keys.dtype.str, pos, has_gauss, cached)
        except Exception:  # an unusual NumPy: its state stays this process's own
            pass
    return state


def restore(state: State | None) -> None:
    """Set the global random states captured by :func:`capture` in another process."""
    if not state:
        return
    if "random" in state:
        random.setstate(state["random"])
    if "numpy" in state:
        if "numpy" in sys.modules:
            _set_numpy(state["numpy"])
        else:  # importing NumPy costs ~50 ms: only if the cell does, and then at once
            from .pools import _when_imported

            _when_imported("numpy", lambda: _set_numpy(state["numpy"]))


def _set_numpy(packed: tuple[Any, ...]) -> None:
    try:
        import numpy as np

        name, raw, dtype, pos, has_gauss, cached = packed
        np.random.set_state((name, np.frombuffer(raw, dtype=dtype).copy(), pos, has_gauss, cached))
    except Exception:  # another NumPy version here: this side's own state
        pass


def changed_since(state: State | None) -> State | None:
    """This process's states if they moved on from ``state`` (the cell drew numbers); else
    None, and the kernel has nothing to set."""
    if not state:
        return None
    now = capture()  # only what this process has: NumPy's state if the cell imported it
    return None if all(state.get(key) == value for key, value in now.items()) else now
