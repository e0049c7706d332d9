"""Workloads the benchmark runs through every approach.

They live in a module, not in the notebook, because the alternatives
(``multiprocessing`` with spawn, ``concurrent.futures``, loky, Dask) can only
send functions that a fresh interpreter can import by name.  ``%%isolate``
runs the same bodies as cell source.
"""

from __future__ import annotations

import numpy as np


def trivial() -> int:
    x = 1
    return x


def pandas_cell() -> int:
    import pandas as pd

    frame = pd.DataFrame({"a": range(100), "b": range(100)})
    return int(frame.a.sum())


def array_in(arr: np.ndarray) -> float:
    return float(arr[::4096].sum())


def array_out(n: int) -> np.ndarray:
    return np.ones(n)


def frame_in(frame) -> int:
    return len(frame)


def dicts_in(rows: list) -> int:
    return len(rows)


def many_in(**values) -> int:
    return len(values)


def sweep_value(v: int) -> int:
    """One value of the ``--over`` sweep, mapped by a spawn pool for comparison."""
    r = v + 1
    return r




def run_target(conn, fn, args, kwargs) -> None:
    """The target of the one-``Process``-per-cell approach: it must be importable under spawn."""
    conn.send(fn(*args, **kwargs))
    conn.close()
