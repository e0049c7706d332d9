"""``--over`` across N trivial values against a spawn ``ProcessPoolExecutor`` mapping the same calls.

Usage: ``python -m benchmarks.bench_sweep [N] [ROUNDS]`` (default 1000 values, 5 rounds).

The sweep gives every value a brand-new process that ran nothing before; the
pool starts once (its start is timed) and reuses its workers, which gives
isolation up.  The target is a sweep at most 2 x the pool.  Both run in one
real kernel, timed from the client (request to reply), interleaved round by
round, so a burst of load on a shared machine hits both alike: read the
ratio of the medians, not single numbers.  ``--panel`` adds the same sweep
with the default live panel (drawn as a user sees it).

Then, from inside the kernel, where one value's time goes: the sweep's own
phases (plan, serialize, then the runs), and the values per second.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.kernel import Kernel  # noqa: E402

SETUP = textwrap.dedent(
    f"""
    import sys, time, json, concurrent.futures, multiprocessing
    sys.path.insert(0, {str(ROOT)!r})
    from benchmarks import workloads as W
    ctx = multiprocessing.get_context("spawn")
    import numpy as np, pandas as pd  # as in `make bench`'s kernel: the template preloads them
    """
)


def codes(n: int, panel: bool = False) -> dict[str, str]:
    """The cells timed: the quiet sweep, the pool's map (its start included), and the panel sweep."""
    out = {
        "isolate_over": f"%%isolate --quiet --over v=range({n})\nr = v + 1",
        "cf_pool_map": (
            "with concurrent.futures.ProcessPoolExecutor(mp_context=ctx) as _ex:\n"
            f"    _rr = list(_ex.map(W.sweep_value, range({n})))"
        ),
    }
    if panel:
        out["isolate_over_panel"] = f"%%isolate --over v=range({n})\nr = v + 1"
    return out


# The floors of one fresh process per value on this machine: an interpreter forks ``n``
# children that exit at once, as many at a time as there are cores.  No value is sent, run or
# returned.  "bare": nothing imported, so any sweep that gives each value a process of its own
# costs at least this.  "leader": first it imports what a sweep's leader holds when it forks
# (nbisolate's worker modules, with the standard library's threading, logging and random,
# whose fork hooks run in every child), so it is the fork and exit of a process the size of
# the leader; what the sweep takes above it is its own work per value. "minimal": a bare
# interpreter whose child runs the body with its value, pickles the result and writes it to a
# pipe the parent reads before it exits: the least any sweep that gives each value a fresh
# process does, with no channel, output, error handling or kernel in it.
FLOOR = textwrap.dedent(
    """
    import os, sys, time
    n, width = int(sys.argv[1]), os.cpu_count() or 1
    kind = sys.argv[2]
    if kind == "leader":
        from nbisolate import display_worker, inplace, pools, rng, settings, ship, sweep_leader, worker
        worker.prepare()
    if kind == "minimal":
        import pickle
        body = compile("r = v + 1", "<cell>", "exec")
        read, write = os.pipe()
        results = os.fdopen(read, "rb", buffering=0)
    t0 = time.perf_counter()
    live = 0
    for i in range(n):
        if live >= width:
            if kind == "minimal":
                pickle.loads(results.read(int.from_bytes(results.read(4), "little")))
            os.wait()
            live -= 1
        if os.fork() == 0:
            if kind == "minimal":
                ns = {"v": i}
                exec(body, ns)
                data = pickle.dumps(ns["r"])
                os.write(write, len(data).to_bytes(4, "little") + data)
            os._exit(0)
        live += 1
    while live:
        if kind == "minimal":
            pickle.loads(results.read(int.from_bytes(results.read(4), "little")))
        os.wait()
        live -= 1
    print(time.perf_counter() - t0)
    """
)
FLOORS = ("bare", "minimal", "leader")


def fork_floor(n: int, kind: str = "bare") -> float:
    """Seconds for an interpreter to fork ``n`` children that exit at once (see ``FLOOR``)."""
    flags = ["-I", "-S"] if kind in ("bare", "minimal") else []
    done = subprocess.run(
        [sys.executable, *flags, "-c", FLOOR, str(n), kind], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return float(done.stdout.strip().splitlines()[-1])


# Where one value's cost goes, from inside the kernel: the CPU time of the kernel process, of
# the template, and of the workers (the template's reaped children, and the kernel's: a sweep's
# leader started as a fresh interpreter, with every child it reaped), per value; a sweep of
# trivial values is bound by these on a machine with few cores.
BREAKDOWN = textwrap.dedent(
    """
    import os, resource, time, json
    from nbisolate.supervisor import launcher as _L
    def _tcpu():
        st = open(f"/proc/{_L.pid}/stat").read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(st[11]) / tick + int(st[12]) / tick, int(st[13]) / tick + int(st[14]) / tick
    _kc = lambda: (lambda r: r.ru_utime + r.ru_stime)(resource.getrusage(resource.RUSAGE_CHILDREN))
    _r0 = resource.getrusage(resource.RUSAGE_SELF); _t0, _c0 = _tcpu(); _k0 = _kc(); _w0 = time.perf_counter()
    get_ipython().run_cell_magic("isolate", "--quiet --over v=range(__N__)", "r = v + 1")
    _w = time.perf_counter() - _w0
    time.sleep(0.5)  # the last workers are reaped
    _r = resource.getrusage(resource.RUSAGE_SELF); _t, _c = _tcpu(); _k1 = _kc()
    _k = _r.ru_utime + _r.ru_stime - _r0.ru_utime - _r0.ru_stime
    print(json.dumps({"wall": _w / __N__ * 1000, "kernel": _k / __N__ * 1000, "template": (_t - _t0) / __N__ * 1000,
                      "workers": (_c - _c0 + _k1 - _k0) / __N__ * 1000}))
    """
)


def breakdown(k: Kernel, n: int) -> dict[str, float]:
    """Milliseconds per value: wall, and the CPU of the kernel, the template and the workers."""
    res = k.run(BREAKDOWN.replace("__N__", str(n)), timeout=600)
    return {key: round(value, 3) for key, value in json.loads(res.stdout.strip().splitlines()[-1]).items()}


def spread(values: list[float]) -> dict[str, float]:
    """Median and quartiles, in seconds."""
    if len(values) < 2:
        return {"median": values[0], "q1": values[0], "q3": values[0]}
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return {"median": round(q2, 4), "q1": round(q1, 4), "q3": round(q3, 4)}


def run(n: int = 1000, rounds: int = 5, panel: bool = False) -> dict[str, Any]:
    """Start a kernel, time the sweep and the pool ``rounds`` times interleaved."""
    k = Kernel(cwd=str(ROOT))
    try:
        k.run(SETUP, timeout=120)
        k.run("%load_ext nbisolate")
        time.sleep(1.0)  # the template starts while a user reads
        k.run("%%isolate --quiet --over v=range(4)\nr = v + 1", timeout=120)  # warm
        cells = codes(n, panel)
        times: dict[str, list[float]] = {name: [] for name in [*cells, *(f"floor_{k}" for k in FLOORS)]}
        load = []
        for _ in range(rounds):
            load.append(os.getloadavg()[0])
            for kind in FLOORS:
                times[f"floor_{kind}"].append(fork_floor(n, kind))
            for name, code in cells.items():
                t0 = time.perf_counter()
                res = k.run(code, timeout=1200)
                times[name].append(time.perf_counter() - t0)
                if name.startswith("isolate"):
                    check = k.run(f"print(r == list(range(1, {n} + 1)))")
                    assert check.stdout.strip() == "True", (res.stdout, res.stderr, check.stdout)
        out: dict[str, Any] = {name: spread(v) for name, v in times.items()}
        out["values"] = n
        out["rounds"] = rounds
        out["ratio"] = round(out["isolate_over"]["median"] / out["cf_pool_map"]["median"], 2)
        for kind in FLOORS:
            out[f"floor_{kind}_ratio"] = round(out[f"floor_{kind}"]["median"] / out["cf_pool_map"]["median"], 2)
        out["values_per_second"] = round(n / out["isolate_over"]["median"], 1)
        out["load_average"] = round(statistics.median(load), 2)
        out["per_value_ms"] = breakdown(k, n)
        return out
    finally:
        k.shutdown()


def describe(result: dict[str, Any]) -> list[str]:
    n = result["values"]
    lines = [f"--over across {n:,} trivial values, {result['rounds']} interleaved rounds (s):"]
    for name in ("isolate_over", "isolate_over_panel", "cf_pool_map", *(f"floor_{k}" for k in FLOORS)):
        if name in result:
            s = result[name]
            lines.append(f"  {name:<20} median {s['median']:.3f}  quartiles {s['q1']:.3f}-{s['q3']:.3f}")
    lines.append(
        f"  sweep / pool: {result['ratio']:.2f} (target <= 2), {result['values_per_second']:.0f} values a "
        f"second, load average {result['load_average']:.2f} on {os.cpu_count()} cores"
    )
    lines.append(
        f"  floors, a fork and exit per value, nothing run: a bare interpreter {result['floor_bare_ratio']:.2f} x "
        f"the pool, one the size of the sweep's leader {result['floor_leader_ratio']:.2f} x; a bare "
        f"interpreter whose child runs the body and pipes its pickled result back {result['floor_minimal_ratio']:.2f} x"
    )
    per = result.get("per_value_ms")
    if per:
        cpu = per["kernel"] + per["template"] + per["workers"]
        lines.append(
            f"  per value (ms): wall {per['wall']:.2f}; CPU {cpu:.2f} = kernel {per['kernel']:.2f} + "
            f"template {per['template']:.2f} + worker {per['workers']:.2f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = [a for a in argv if not a.startswith("--")]
    n = int(args[0]) if args else 1000
    rounds = int(args[1]) if len(args) > 1 else 5
    result = run(n, rounds, panel="--panel" in argv)
    print("\n".join(describe(result)))
    if "--json" in argv:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
