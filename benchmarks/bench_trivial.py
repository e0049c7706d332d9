"""The trivial cell as users run it: an ordinary cell, ``%%isolate`` with the default panel,
``%%isolate --quiet`` and the naive spawn pool, interleaved in one kernel.

Each round runs every approach once, in the same order, so a burst of load
on a shared machine hits all of them alike; the report gives the median and
the quartiles of each, and the ratios of the medians.  Timed from the
client (request to reply), so the kernel's own messaging and the panel's
IOPub messages count, as they do for a user.  Then the same again in a
second kernel, in a notebook that imported NumPy and pandas (most do: the
template then preloads them, and NumPy's random state goes with each cell).

Then the phases of an isolated trivial cell, from inside the kernel: every
event a run emits is stamped as it reaches the run's listeners, so each
millisecond between the magic being called and the reply is accounted for:

* ``plan``: the magic parses its line, plans the cell, attaches the panel
  (from the magic's start to ``planned``);
* ``serialize``: from ``planned`` to ``shipped`` (inspecting and pickling the
  inputs, in the preparing thread, and the hop to it);
* ``fork``: from ``shipped`` to ``started`` (the template forks the worker;
  about nothing when a spare takes the cell: the kernel writes the run
  message to a spare it prepared, in the magic's own thread, so the start's
  time shows in ``serialize``, whose events reach the listeners after it);
* ``first message``: from ``started`` to the worker's ``start`` phase (the
  worker's own start, the run message; a quick cell's start phase travels
  with its result);
* ``run``: from the ``start`` phase to the worker's ``run`` phase (loading the
  inputs, running the cell);
* ``result``: from the ``run`` phase to ``result`` (serializing the results,
  the output marks);
* ``apply``: from ``result`` to ``applied`` (rebuilding and binding);
* ``panel``: from ``applied`` to ``done`` (the panel's summary);
* ``request``: from the client sending the request to the magic's start (the
  kernel receiving it, IPython's transform and compiling the awaited call);
* ``reply``: from ``done`` to the client having the reply (the rest of the
  cell in IPython, the reply and every IOPub message).

The client's and the kernel's stamps are both ``time.perf_counter``, one
monotonic clock for every process on Linux, so ``request`` and ``reply`` are
measured, not inferred; the phases add up to the client's time.  An ordinary
cell spends all of its time in the equivalent of these two.
"""

from __future__ import annotations

import json
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.kernel import Kernel  # noqa: E402

ROUNDS = 25

SETUP = textwrap.dedent(
    f"""
    import sys, time, json, statistics
    sys.path.insert(0, {str(ROOT)!r})
    from benchmarks import workloads as W
    import multiprocess
    _mctx = multiprocess.get_context("spawn")
    def mp_pool(fn, *args):
        with _mctx.Pool(1) as pool:
            return pool.apply(fn, args)
    a = 1
    """
)

# Stamps every event of every run the magic makes, and the magic's own start.
STAMPS = textwrap.dedent(
    """
    import nbisolate.magics as _M, nbisolate.panel as _P
    _stamps = []
    _attach = _P.attach
    def _stamping_attach(run, **kw):
        marks = {"magic": _magic_began[0]}
        _stamps.append(marks)
        def listen(event, marks=marks):
            name = event.kind
            if name == "phase":
                name = "phase " + event.data[0]
            marks.setdefault(name, time.perf_counter())
        run.listeners.append(listen)
        return _attach(run, **kw)
    _P.attach = _stamping_attach
    _magic_began = [0.0]
    _make_run = _M.IsolateMagics._make_run
    def _timed_make_run(self, *args, **kw):
        _magic_began[0] = time.perf_counter()
        return _make_run(self, *args, **kw)
    _M.IsolateMagics._make_run = _timed_make_run
    """
)

INTERVALS = (
    ("plan", "magic", "planned"),
    ("serialize", "planned", "shipped"),
    ("fork", "shipped", "started"),
    ("first message", "started", "phase start"),
    ("run", "phase start", "phase run"),
    ("result", "phase run", "result"),
    ("apply", "result", "applied"),
    ("panel", "applied", "done"),
)

APPROACHES = {
    "ordinary": "zz = a",
    "quiet": "%%isolate --quiet\nzz = a",
    "panel": "%%isolate\nzz = a",
    "spawn pool": "zz = mp_pool(W.trivial)",
}


def spread(values: list[float]) -> dict[str, float]:
    """Median and quartiles, in milliseconds."""
    q1, q2, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return {"median": round(q2 * 1000, 2), "q1": round(q1 * 1000, 2), "q3": round(q3 * 1000, 2)}


NUMPY_NOTEBOOK = "import numpy as np\nimport pandas as pd\nframe = pd.DataFrame({'x': np.arange(10)})"
"""The same cells again in a notebook that imported NumPy and pandas, as most do: the
template preloads them, and the notebook's random state includes NumPy's."""


def _measure(rounds: int, notebook: str) -> tuple[dict[str, list[float]], dict[str, list[int]], list, list, list]:
    """One kernel: every approach ``rounds`` times interleaved, and the isolated runs' stamps."""
    k = Kernel(cwd=str(ROOT))
    try:
        k.run(SETUP + notebook, timeout=120)
        k.run("%load_ext nbisolate")
        time.sleep(1.0)  # the template starts while a user reads
        k.run(STAMPS)
        for code in APPROACHES.values():  # warm: imports, the first panel's widgets
            k.run(code, timeout=120)
        time.sleep(1.0)  # the template preloads the notebook's packages
        times: dict[str, list[float]] = {name: [] for name in APPROACHES}
        messages: dict[str, list[int]] = {name: [] for name in APPROACHES}
        client: dict[str, list[tuple[float, float]]] = {"quiet": [], "panel": []}
        k.run("_stamps.clear()")
        order: list[str] = []
        for _ in range(rounds):
            for name, code in APPROACHES.items():
                t0 = time.perf_counter()
                res = k.run(code, timeout=120)
                spent = time.perf_counter() - t0
                times[name].append(spent)
                messages[name].append(len(res.messages))
                if name in client:
                    client[name].append((t0, t0 + spent))
                    order.append(name)
        stamps = json.loads(k.run("print(json.dumps(_stamps))").stdout)
    finally:
        k.shutdown()
    return times, messages, client, order, stamps


def _summary(times: dict[str, list[float]], suffix: str = "") -> dict[str, Any]:
    medians = {name: statistics.median(v) for name, v in times.items()}
    out: dict[str, Any] = {
        "times_ms": {name: spread(v) for name, v in times.items()},
        "panel_minus_ordinary_ms": round((medians["panel"] - medians["ordinary"]) * 1000, 2),
        "quiet_minus_ordinary_ms": round((medians["quiet"] - medians["ordinary"]) * 1000, 2),
        "panel_over_spawn_pool": round(medians["panel"] / medians["spawn pool"], 3),
        "quiet_over_spawn_pool": round(medians["quiet"] / medians["spawn pool"], 3),
    }
    out["targets"] = {
        "panel <= ordinary + 5 ms" + suffix: out["panel_minus_ordinary_ms"] <= 5,
        "quiet <= ordinary + 3 ms" + suffix: out["quiet_minus_ordinary_ms"] <= 3,
        "panel <= 0.1 x spawn pool" + suffix: out["panel_over_spawn_pool"] <= 0.1,
    }
    return out


def run(rounds: int = ROUNDS) -> dict[str, Any]:
    """Start a kernel, time every approach ``rounds`` times interleaved, and the phases; then
    the same in a notebook that imported NumPy and pandas (:data:`NUMPY_NOTEBOOK`)."""
    times, messages, client, order, stamps = _measure(rounds, "")
    result: dict[str, Any] = {
        "rounds": rounds,
        "iopub_messages": {name: statistics.median(v) for name, v in messages.items()},
        **_summary(times),
    }
    result["phases_ms"] = _phases(client, order, stamps)
    with_numpy, _, client, order, stamps = _measure(rounds, "\n" + NUMPY_NOTEBOOK)
    result["numpy_pandas_notebook"] = _summary(with_numpy, " (NumPy and pandas notebook)")
    result["numpy_pandas_notebook"]["phases_ms"] = _phases(client, order, stamps)
    result["targets"].update(result["numpy_pandas_notebook"]["targets"])
    return result


def _phases(client: dict[str, list[tuple[float, float]]], order: list[str], stamps: list) -> dict[str, Any]:
    """The medians of each phase of the isolated runs, from their stamps and the client's times."""
    phases: dict[str, dict[str, dict[str, float]]] = {}
    for mode in ("quiet", "panel"):
        marks = [m for m, name in zip(stamps, order, strict=False) if name == mode]
        spent = [c for c, name in zip(client[mode], [n for n in order if n == mode], strict=False)]
        rows: dict[str, list[float]] = {name: [] for name, _, _ in INTERVALS}
        rows["request"] = []
        rows["reply"] = []
        for mark, (sent, replied) in zip(marks, spent, strict=False):
            if not all(key in mark for _, a, b in INTERVALS for key in (a, b)):
                continue
            for name, a, b in INTERVALS:
                rows[name].append(mark[b] - mark[a])
            rows["request"].append(mark["magic"] - sent)
            rows["reply"].append(replied - mark["done"])
        phases[mode] = {name: spread(v) for name, v in rows.items() if v}
    return phases


def describe(result: dict[str, Any]) -> list[str]:
    """Lines for people: the spread of each approach and where an isolated cell's time goes."""
    lines = [f"trivial cell, {result['rounds']} interleaved rounds, client request to reply (ms):"]
    for name, s in result["times_ms"].items():
        lines.append(
            f"  {name:11s} median {s['median']:7.1f}  quartiles {s['q1']:.1f}-{s['q3']:.1f}  "
            f"IOPub messages {result['iopub_messages'][name]:g}"
        )
    lines.append(
        f"  panel - ordinary {result['panel_minus_ordinary_ms']:.1f} ms, quiet - ordinary "
        f"{result['quiet_minus_ordinary_ms']:.1f} ms, panel / spawn pool "
        f"{result['panel_over_spawn_pool']:.3f}"
    )
    other = result.get("numpy_pandas_notebook")
    if other:
        t = other["times_ms"]
        lines.append(
            "  in a notebook that imported NumPy and pandas (another kernel, the same rounds): "
            + ", ".join(f"{name} {t[name]['median']:.1f}" for name in t)
        )
        lines.append(
            f"    panel - ordinary {other['panel_minus_ordinary_ms']:.1f} ms, quiet - ordinary "
            f"{other['quiet_minus_ordinary_ms']:.1f} ms, panel / spawn pool {other['panel_over_spawn_pool']:.3f}"
        )
    for target, met in result["targets"].items():
        lines.append(f"  target {target}: {'met' if met else 'NOT met'}")
    for notebook, phases in (("", result["phases_ms"]), (", NumPy and pandas notebook", (other or {}).get("phases_ms", {}))):
        for mode, rows in phases.items():
            parts = ", ".join(f"{name} {s['median']:.2f}" for name, s in rows.items())
            lines.append(f"  phases of an isolated cell ({mode}{notebook}), medians: {parts}")
    return lines


if __name__ == "__main__":
    out = run()
    print("\n".join(describe(out)))
