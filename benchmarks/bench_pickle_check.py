"""How fast is ``%pickle_check``? Medians of a few repeats, printed as JSON.

Measures what the feature promises:

* ``namespace_1000_s``: :func:`check_namespace` over 1,000 ordinary notebook
  variables (numbers, strings, lists, dicts, small arrays and data frames,
  functions and instances of classes defined in the notebook) -- promised
  under 2 s;
* ``size_1gb_array_s`` and ``size_1gb_extra_rss_mb``: sizing a 1 GB numpy
  array, and how much the process's peak memory grew while doing so (it must
  not copy the array, so this stays near 0);
* ``deep_failure_s``: locating one sqlite3 connection at the bottom of a
  5,000-member object graph (the slow, tracing path);
* ``zoo_s``: every object of dill's own object zoo (``dill._objects``).

Run with ``python benchmarks/bench_pickle_check.py``; no timing is asserted
anywhere, the numbers are for people.
"""

from __future__ import annotations

import json
import resource
import sqlite3
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from nbisolate.diagnose import check_namespace, pickle_check

_NOTEBOOK_CODE = """
def score(row, weight=2.0):
    return row * weight

class Holder:
    def __init__(self, value):
        self.value = value
        self.tags = ["a", "b"]
"""


def _notebook_namespace(n: int = 1000) -> dict[str, Any]:
    """A namespace shaped like a working notebook's, with ``n`` variables.

    Functions and classes are defined in ``__main__`` from code without a
    file, as a notebook's are, so the spawn check has work to do.
    """
    main = sys.modules["__main__"]
    exec(compile(_NOTEBOOK_CODE, "<notebook cell>", "exec"), main.__dict__)
    score, holder = main.__dict__["score"], main.__dict__["Holder"]
    rng = np.random.default_rng(0)
    makers: list[Callable[[int], Any]] = [
        lambda i: i,
        lambda i: i * 0.5,
        lambda i: f"value {i}",
        lambda i: [float(j) for j in range(100)],
        lambda i: {f"k{j}": j for j in range(20)},
        lambda i: rng.random(1000),
        lambda i: pd.DataFrame(rng.random((100, 5)), columns=list("abcde")),
        lambda i: score,
        lambda i: holder(i),
        lambda i: (i, "x", None, 3.5),
    ]
    ns: dict[str, Any] = {"In": [], "Out": {}, "_": None, "np": np, "pd": pd}
    for i in range(n):
        ns[f"v{i}"] = makers[i % len(makers)](i)
    return ns


def _median(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run(repeat: int = 3) -> dict[str, float]:
    """Run every measurement ``repeat`` times; return the medians."""
    warnings.simplefilter("ignore")
    out: dict[str, float] = {}

    ns = _notebook_namespace(1000)
    out["namespace_1000_s"] = _median(lambda: check_namespace(ns), repeat)

    big = [np.ones(125_000_000, dtype=np.float64)]  # 1 GB, touched so it is resident
    before = _peak_rss_mb()
    out["size_1gb_array_s"] = _median(lambda: pickle_check(big[0], "big"), repeat)
    out["size_1gb_extra_rss_mb"] = round(_peak_rss_mb() - before, 1)
    big.clear()

    leaves: list[Any] = [{"id": i, "vals": list(range(5))} for i in range(5000)]
    leaves[-1]["conn"] = sqlite3.connect(":memory:")
    graph = {"config": {"name": "run"}, "items": leaves}
    out["deep_failure_s"] = _median(lambda: pickle_check(graph, "graph"), repeat)

    import dill._objects as zoo

    objects = list(zoo.a.values()) + list(zoo.x.values())
    out["zoo_s"] = _median(lambda: [pickle_check(o) for o in objects], repeat)
    out["zoo_objects"] = float(len(objects))
    return {k: round(v, 4) for k, v in out.items()}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
