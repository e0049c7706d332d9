"""Large values across the process boundary: where the time of a 400 MB result or input goes.

Each case runs, round by round, the isolated cell (``%%isolate --quiet``, timed
from the client: request to reply), the same code as an ordinary cell (also
from the client) and, where the target is a baseline, that baseline inside the
kernel (a warm ``memcpy`` into an existing array, or pickle dumps+loads), and
an isolated cell that moves nothing: the isolated cell less that one is what
the value itself costs, the part a baseline of a few milliseconds can be
compared with (a whole cell cannot be faster than an ordinary empty one).
Interleaving makes a burst of load on a shared machine hit them alike, so read
the ratios of the medians rather than single numbers.

Every event of every isolated run is stamped as it reaches the run's
listeners, so each run also gives its breakdown (medians, ms):

* ``serialize``: planning and pickling the inputs in the kernel (to ``shipped``);
* ``to worker``: from ``shipped`` to the worker's ``load`` phase (handing the
  inputs over: the kernel's copy into the worker's memory, unpickling), of which
  ``launch to first word`` is the time from handing the cell to a worker to its
  first message (the worker making room, the kernel's copy into it) and
  ``worker load`` the worker unpickling them (its own clock);
* ``run``: the cell in the worker (for ``np.ones``: allocating and faulting its pages);
* ``worker return``: the worker serializing its results (from its own clock);
* ``to kernel``: from the worker's ``run`` phase to the ``result`` event (serializing,
  then moving the bytes: a copy into this process's memory);
* ``rebuild``: from ``result`` to ``applied`` (unpickling and binding);
* page faults: the kernel's minor faults during the run (``ru_minflt``) and
  those of the receiving copy, and the worker's during the cell and its return.

Run it alone (``python -m benchmarks.bench_bigdata``); ``benchmarks/run.py``
adds its numbers to ``make bench``'s report.
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

ROUNDS = 7

SETUP = textwrap.dedent(
    f"""
    import sys, time, json, statistics, pickle, resource, gc
    sys.path.insert(0, {str(ROOT)!r})
    import numpy as np, pandas as pd
    _base_times = []
    def _timed(f):
        gc.collect()
        t0 = time.perf_counter(); f(); _base_times.append(time.perf_counter() - t0)
    """
)

# Stamps every event of every isolated run, with the kernel's minor page faults.
STAMPS = textwrap.dedent(
    """
    import nbisolate.panel as _P
    _stamps = []
    _attach = _P.attach
    def _stamping_attach(run, **kw):
        marks = {}
        _stamps.append(marks)
        def listen(event, marks=marks):
            name = event.kind
            if name == "phase":
                name = "phase " + event.data[0]
                marks.setdefault("worker " + event.data[0], event.data[1])
            marks.setdefault(name, time.perf_counter())
            if name in ("planned", "done"):
                marks.setdefault("minflt " + name, resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
            if name == "result" and isinstance(event.data, dict):
                marks["dump_seconds"] = event.data.get("dump_seconds")
                marks["transfer"] = event.data.get("transfer")
        run.listeners.append(listen)
        return _attach(run, **kw)
    _P.attach = _stamping_attach
    """
)

CASES: list[dict[str, Any]] = [
    {
        "name": "400 MB array out",
        "setup": "n_out = 50_000_000",
        "cell": "back = np.ones(n_out)",
        "target": ("direct", 2.0),
        "teardown": "del back",
    },
    {
        "name": "400 MB array in",
        "setup": "arr = np.random.rand(50_000_000); dst = np.zeros_like(arr)",
        "cell": "s = float(arr[::4096].sum())",
        "baseline": "np.copyto(dst, arr)",
        "target": ("baseline", 2.0),
        "teardown": "del arr, dst",
    },
    {
        "name": "numeric DataFrame in (1M rows)",
        "setup": (
            "nframe = pd.DataFrame({'a': np.arange(10**6), 'b': np.random.rand(10**6)}); "
            "ndst = np.zeros((2, 10**6))"
        ),
        "cell": "k = len(nframe)",
        "baseline": "np.copyto(ndst, nframe.to_numpy().T)",
        "target": ("baseline", 2.0),
        "teardown": "del nframe, ndst",
    },
    {
        "name": "string DataFrame in (1M rows)",
        "setup": (
            "frame = pd.DataFrame({'a': np.arange(10**6), 'b': np.random.rand(10**6), "
            "'c': ['x%d' % (i % 100) for i in range(10**6)]})"
        ),
        "cell": "k = len(frame)",
        "baseline": "pickle.loads(pickle.dumps(frame, protocol=5))",
        "target": ("baseline", 1.2),
        "teardown": "del frame",
    },
]

EMPTY = "%%isolate --quiet\n_k = 1"
"""An isolated cell that moves nothing, timed in the same rounds: the fixed cost of any cell."""

INTERVALS = (
    ("serialize", "planned", "shipped"),
    ("to worker", "shipped", "phase load"),
    ("run", "phase load", "phase run"),
    ("to kernel", "phase run", "result"),
    ("rebuild", "result", "applied"),
)


def _ms(values: list[float]) -> dict[str, float]:
    """Median and quartiles of seconds, in milliseconds."""
    if len(values) > 1:
        q1, q2, q3 = statistics.quantiles(values, n=4)
    else:
        q1 = q2 = q3 = values[0]
    return {"median": round(q2 * 1000, 2), "q1": round(q1 * 1000, 2), "q3": round(q3 * 1000, 2)}


def _load() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError):
        return float("nan")


def _breakdown(marks: list[dict[str, Any]]) -> dict[str, float]:
    """Medians of each interval (ms) and of the page-fault counts across the runs."""
    rows: dict[str, list[float]] = {}
    for mark in marks:
        for name, a, b in INTERVALS:
            if a in mark and b in mark:
                rows.setdefault(name, []).append((mark[b] - mark[a]) * 1000)
        for phase, label in (("start", "launch to first word"), ("load", "worker load")):
            if isinstance(mark.get("worker " + phase), float):
                rows.setdefault(label, []).append(mark["worker " + phase] * 1000)
        if mark.get("dump_seconds") is not None:
            rows.setdefault("worker return", []).append(mark["dump_seconds"] * 1000)
        if "minflt planned" in mark and "minflt done" in mark:
            rows.setdefault("kernel minflt", []).append(mark["minflt done"] - mark["minflt planned"])
        for key, value in (mark.get("transfer") or {}).items():
            if isinstance(value, int | float):
                scale = 1000 if key.endswith("seconds") else 1
                rows.setdefault(key.replace("seconds", "ms"), []).append(value * scale)
    return {name: round(statistics.median(v), 2) for name, v in rows.items()}


def run(rounds: int = ROUNDS, cases: list[str] | None = None) -> dict[str, Any]:
    """Start a kernel and time every case ``rounds`` times, interleaved; returns the numbers."""
    k = Kernel(cwd=str(ROOT))
    out: dict[str, Any] = {"rounds": rounds, "load_before": _load(), "cases": {}}
    try:
        k.run(SETUP, timeout=120)
        k.run("%load_ext nbisolate")
        time.sleep(1.0)  # the template starts while a user reads
        k.run(STAMPS)
        for case in CASES:
            if cases and case["name"] not in cases:
                continue
            print(f"- {case['name']}", flush=True)
            k.run(case["setup"], timeout=300)
            cell = case["cell"]
            k.run("%%isolate --quiet\n" + cell, timeout=300)  # warm: imports, arenas, the template
            k.run(cell, timeout=300)
            k.run("_stamps.clear(); _base_times.clear()")
            codes = {"isolate": "%%isolate --quiet\n" + cell, "direct": cell}
            if case.get("baseline"):
                codes["baseline"] = f"_timed(lambda: {case['baseline']})"
            codes["empty"] = EMPTY
            times: dict[str, list[float]] = {name: [] for name in codes}
            for _ in range(rounds):
                for name, code in codes.items():
                    t0 = time.perf_counter()
                    res = k.run(code, timeout=300)
                    times[name].append(time.perf_counter() - t0)
                    if not res.ok:
                        raise RuntimeError(f"{case['name']}: {name} failed: {res.error_text[-500:]}")
                    if name == "empty":
                        k.run("_stamps.pop()")  # its phases are not the case's
            if "baseline" in times:
                times["baseline"] = json.loads(k.run("print(json.dumps(_base_times))").stdout)
            marks = json.loads(k.run("print(json.dumps(_stamps))").stdout)
            if case.get("teardown"):
                k.run(case["teardown"])
            row: dict[str, Any] = {name: _ms(v) for name, v in times.items()}
            row["breakdown_ms"] = _breakdown(marks)
            column, factor = case["target"]
            ratio = row["isolate"]["median"] / row[column]["median"]
            row["ratio"] = round(ratio, 2)
            row["target"] = f"isolate <= {factor:g} x {column}"
            row["met"] = ratio <= factor
            # What the value itself costs: the isolated cell less an empty one of the same rounds.
            own = row["isolate"]["median"] - row["empty"]["median"]
            row["own_ms"] = round(own, 2)
            row["own_ratio"] = round(own / row[column]["median"], 2)
            row["load"] = _load()
            out["cases"][case["name"]] = row
            print("  " + describe_case(case["name"], row), flush=True)
    finally:
        k.shutdown()
    return out


def describe_case(name: str, row: dict[str, Any]) -> str:
    parts = [f"{key} {row[key]['median']:.1f} ({row[key]['q1']:.1f}-{row[key]['q3']:.1f})"
             for key in ("isolate", "direct", "baseline") if key in row]
    verdict = "met" if row["met"] else "NOT met"
    text = f"{name}: " + ", ".join(parts) + f" ms; {row['ratio']:.2f}x ({row['target']}: {verdict})"
    if "own_ms" in row:
        text += (f"; the value's own cost (isolate - empty isolated cell {row['empty']['median']:.1f}): "
                 f"{row['own_ms']:.1f} ms, {row['own_ratio']:.2f}x")
    text += f"; load {row['load']:.1f}"
    text += "\n    breakdown (medians): " + ", ".join(f"{k} {v:g}" for k, v in row["breakdown_ms"].items())
    return text


def describe(result: dict[str, Any]) -> list[str]:
    """Lines for people: each case's medians, quartiles, ratio and breakdown."""
    lines = [f"large values, {result['rounds']} interleaved rounds, client request to reply (ms; "
             "the baseline timed inside the kernel):"]
    for name, row in result["cases"].items():
        lines.append("  " + describe_case(name, row))
    return lines


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--case", action="append", help="only this case (repeatable)")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    result = run(args.rounds, args.case)
    print("\n".join(describe(result)))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
