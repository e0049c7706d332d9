"""``make bench``: nbisolate side by side with what a user would otherwise pick.

Everything runs in one real IPython kernel (started with ``jupyter_client``),
in one session, so the ratios compare like with like on a shared, noisy
machine.  For each case the table gives the median wall time of each
approach and the ratio of ``%%isolate`` to the naive per-cell spawn pool.

Approaches: ``%%isolate --quiet`` and ``%%isolate`` with the default panel
(timed from the client: request to reply, so they include the kernel's own
messaging and the panel's messages), interleaved round by round with the
same code run directly in the kernel, each with its quartiles; the same code run directly in the
kernel (also timed from the client), a stdlib ``multiprocessing`` spawn
``Process`` per cell, a ``multiprocess`` spawn ``Pool`` per cell (the naive
way), ``concurrent.futures.ProcessPoolExecutor`` with spawn per cell, loky's
reusable executor (warm: not a fresh process), and Dask ``LocalCluster``
submit (warm workers).

``bench_trivial`` then times the trivial cell as users run it (ordinary,
panel, ``--quiet``, the naive spawn pool, interleaved) and breaks an isolated
cell into its phases.

Writes ``build/bench/results.json`` and ``build/bench/bench.png``, and copies
both to ``benchmarks/results/`` for the README.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.kernel import Kernel  # noqa: E402

REPEATS = int(os.environ.get("NBISOLATE_BENCH_REPEATS", "7"))
QUICK = os.environ.get("NBISOLATE_BENCH_QUICK") == "1"
# --smoke: two cases, three approaches, one repeat; for the test that checks the harness works.
SMOKE_CASES = ("trivial cell", "100 MB array in")
SMOKE_APPROACHES = ("isolate", "direct", "mp_pool")

# The kernel-side harness: each alternative runs the same workload function.
SETUP = textwrap.dedent(
    f"""
    import sys, time, statistics, gc, json, pickle
    sys.path.insert(0, {str(ROOT)!r})
    import numpy as np, pandas as pd
    from benchmarks import workloads as W
    import multiprocessing, concurrent.futures
    import multiprocess
    ctx = multiprocessing.get_context("spawn")
    mctx = multiprocess.get_context("spawn")

    def _median(f, n):
        times = []
        for _ in range(n):
            gc.collect()
            t0 = time.perf_counter(); f(); times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def mp_process(fn, *args, **kwargs):
        # Never wait on a pipe for a child that died: that is the hang users know too well.
        mine, theirs = ctx.Pipe(duplex=False)
        p = ctx.Process(target=W.run_target, args=(theirs, fn, args, kwargs))
        p.start(); theirs.close()
        while not mine.poll(0.1):
            if not p.is_alive():
                raise RuntimeError(f"the child died with exit code {{p.exitcode}}")
        r = mine.recv(); p.join(); return r

    def mp_pool(fn, *args, **kwargs):
        with mctx.Pool(1) as pool:
            return pool.apply(fn, args, kwargs)

    def cf_pool(fn, *args, **kwargs):
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
            return ex.submit(fn, *args, **kwargs).result()

    try:
        from loky import get_reusable_executor
        def loky_warm(fn, *args, **kwargs):
            return get_reusable_executor(max_workers=1).submit(fn, *args, **kwargs).result()
        loky_warm(W.trivial)
    except ImportError:
        loky_warm = None

    try:
        if SMOKE_FLAG:
            raise ImportError("not in a smoke run")
        from distributed import Client, LocalCluster
        _cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)
        _client = Client(_cluster)
        def dask_submit(fn, *args, **kwargs):
            return _client.submit(fn, *args, pure=False, **kwargs).result()
        dask_submit(W.trivial)
    except Exception:
        dask_submit = None
    """
)

APPROACHES = ["isolate", "isolate_panel", "direct", "mp_process", "mp_pool", "cf_pool", "loky_warm", "dask_submit"]


def _cases(quick: bool) -> list[dict]:
    big = 400 if not quick else 100
    return [
        {
            "name": "trivial cell",
            "setup": "",
            "cell": "x = 1",
            "call": "W.trivial()",
            "n": REPEATS,
            "target": ("mp_pool", 0.15),
        },
        {
            "name": "pandas cell",
            "setup": "import pandas as pd",
            "cell": "frame = pd.DataFrame({'a': range(100), 'b': range(100)})\nr = int(frame.a.sum())",
            "call": "W.pandas_cell()",
            "n": REPEATS,
            "target": ("mp_pool", 0.10),
        },
        {
            "name": "100 MB array in",
            "setup": "arr = np.random.rand(100 * 2**20 // 8)",
            "cell": "s = float(arr[::4096].sum())",
            "call": "W.array_in(arr)",
            "n": 5,
        },
        {
            "name": f"{big} MB array in",
            "setup": f"arr = np.random.rand({big} * 2**20 // 8); dst = np.zeros_like(arr)",
            "cell": "s = float(arr[::4096].sum())",
            "call": "W.array_in(arr)",
            "n": 3,
            "baseline": "np.copyto(dst, arr)",
            "target": ("baseline", 2.0),
        },
        {
            "name": f"{big} MB array out",
            "setup": f"n_out = {big} * 2**20 // 8",
            "cell": "out = np.ones(n_out)",
            "call": "W.array_out(n_out)",
            "n": 5,
            "target": ("direct", 2.0),
            "breakdown": True,
        },
        {
            "name": "DataFrame in (1M rows)",
            "setup": "frame = pd.DataFrame({'a': np.arange(10**6), 'b': np.random.rand(10**6), 'c': ['x%d' % (i % 100) for i in range(10**6)]})",
            "cell": "k = len(frame)",
            "call": "W.frame_in(frame)",
            "n": 3,
            "baseline": "pickle.loads(pickle.dumps(frame, protocol=5))",
            "target": ("baseline", 1.2),
        },
        {
            "name": "numeric DataFrame in (1M rows)",
            "setup": "nframe = pd.DataFrame({'a': np.arange(10**6), 'b': np.random.rand(10**6)}); ndst = np.zeros((2, 10**6))",
            "cell": "k = len(nframe)",
            "call": "W.frame_in(nframe)",
            "n": 3,
            "baseline": "np.copyto(ndst, nframe.to_numpy().T)",
            "target": ("baseline", 2.0),
        },
        {
            "name": "200,000 small dicts in",
            "setup": "rows = [{'id': i, 'v': i * 0.5, 'k': 'r%d' % i} for i in range(200_000)]",
            "cell": "k = len(rows)",
            "call": "W.dicts_in(rows)",
            "n": 3,
            "baseline": "pickle.loads(pickle.dumps(rows))",
            "target": ("baseline", 3.0),
        },
        {
            "name": "1,000 small variables in",
            "setup": "_vals = {f'v{i}': [i, str(i), {'k': i}] for i in range(1000)}\nglobals().update(_vals)",
            "cell": "k = sum(map(len, [" + ", ".join(f"v{i}" for i in range(1000)) + "]))",
            "call": "W.many_in(**_vals)",
            "n": 3,
        },
    ]


def _time_interleaved(kernel: Kernel, codes: dict[str, str], n: int) -> dict[str, list[float]]:
    """Client times (request to reply) of each code, ``n`` rounds, one of each per round.

    Interleaving makes a burst of load on a shared machine hit every approach
    alike, so the ratio of the medians holds even when the absolute times move.
    """
    times: dict[str, list[float]] = {name: [] for name in codes}
    for _ in range(n):
        for name, code in codes.items():
            t0 = time.perf_counter()
            kernel.run(code, timeout=300)
            times[name].append(time.perf_counter() - t0)
    return times


def _quartiles(values: list[float]) -> list[float]:
    """[q1, q3] of ``values`` (both the value itself when there is one)."""
    if len(values) < 2:
        return [values[0], values[0]]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return [q1, q3]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a quick run that only checks the harness")
    parser.add_argument("--out", default=str(ROOT / "build" / "bench"), help="where results go")
    args = parser.parse_args(argv)
    quick = QUICK or args.smoke
    global REPEATS
    if args.smoke:
        REPEATS = 1
    # The Dask cluster's lock files in a folder of the run's own, not the machine's /tmp/dask-scratch-space.
    scratch = tempfile.mkdtemp(prefix="nbisolate-bench-dask-")
    os.environ.setdefault("DASK_TEMPORARY_DIRECTORY", scratch)
    try:
        return _run(args, quick)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(args: Any, quick: bool) -> int:
    kernel = Kernel(cwd=str(ROOT))
    rows = []
    try:
        kernel.run(SETUP.replace("SMOKE_FLAG", repr(args.smoke)), timeout=300)
        kernel.run("%load_ext nbisolate")
        time.sleep(1.0)  # let the template start, as it does while a user reads
        for case in _cases(quick):
            if args.smoke:
                if case["name"] not in SMOKE_CASES:
                    continue
                case["n"] = 1
            print(f"- {case['name']}", flush=True)
            if case["setup"]:
                kernel.run(case["setup"], timeout=300)
            n = case["n"]
            row = {"case": case["name"]}
            cell = case["cell"]
            kernel.run("%%isolate\n" + cell, timeout=300)  # warm: the template learns the imports
            time.sleep(0.5)
            timed = _time_interleaved(
                kernel,
                {"isolate": "%%isolate --quiet\n" + cell, "isolate_panel": "%%isolate\n" + cell, "direct": cell},
                n,
            )
            row["spread"] = {}
            for name, values in timed.items():
                row[name] = statistics.median(values)
                row["spread"][name] = _quartiles(values)
            if case.get("breakdown") and not args.smoke:
                # Where the time of one isolated run goes: the worker's phases (run:
                # allocating the array; return: serializing it, the kernel copying it out of
                # the worker, rebuilding it here), each the median of n runs.
                code = textwrap.dedent(
                    f"""
                    from nbisolate.runner import CellRun as _CR
                    _ph = []
                    for _i in range({n}):
                        _r = _CR({cell!r}, globals(), quiet=True)
                        _at = {{}}
                        _r.listeners.append(lambda e, _at=_at: _at.setdefault(
                            e.kind + (" " + e.data[0] if e.kind == "phase" else ""), time.perf_counter()))
                        _r.prepare(); _r.run_sync()
                        _ph.append({{
                            "launch to the first word (with the run: small phases ride with the result)": _r.phases["start"],
                            "allocate in the worker (run)": _r.phases["run"],
                            "serialize, then the kernel copies it out": _at["result"] - _at["phase run"],
                            "rebuild and bind in the kernel": _at["applied"] - _at["result"],
                            "whole run": _at["done"] - _at["planned"],
                        }})
                    print(json.dumps({{k: statistics.median(p[k] for p in _ph) for k in _ph[0]}}))
                    """
                )
                res = kernel.run(code, timeout=600)
                row["phases"] = json.loads(res.stdout.strip().splitlines()[-1])
                print("  phases (s): " + ", ".join(f"{k} {v:.3f}" for k, v in row["phases"].items()), flush=True)
            if case.get("baseline"):
                res = kernel.run(f"print(repr(_median(lambda: {case['baseline']}, {n})))", timeout=600)
                row["baseline"] = float(res.stdout.strip())
            for name in APPROACHES[3:]:
                if (quick and name in ("mp_process", "cf_pool")) or (args.smoke and name not in SMOKE_APPROACHES):
                    continue
                fn, _, call_args = case["call"].partition("(")
                call_args = call_args[:-1]
                call = f"{name}({fn}" + (f", {call_args})" if call_args else ")")
                code = f"print(repr(_median(lambda: {call}, {n})) if {name} is not None else 'None')"
                res = kernel.execute(code, timeout=600)
                try:
                    row[name] = float(res.stdout.strip()) if res.ok else None
                except ValueError:
                    row[name] = None
                if not res.ok:
                    print(f"  {name} failed: {res.error_text[-300:]}", flush=True)
            if case.get("target"):
                column, factor = case["target"]
                row["target"] = f"isolate <= {factor:g} x {column}"
                ref = row.get(column)
                row["met"] = bool(ref) and row["isolate"] <= factor * ref
            rows.append(row)
            print("  " + ", ".join(f"{k}={v * 1000:.1f} ms" for k, v in row.items() if isinstance(v, float)), flush=True)
        memory = None if quick else _peak_memory(kernel)
        receiving = None if quick else _peak_receiving(kernel)
        sweep = None if args.smoke else _sweep(kernel, 200 if quick else 1000, 3)
        kernel.run("%pickle_check", timeout=300)  # warm
        checks = []
        for _ in range(5):  # one run on a shared machine is one draw: the median of five
            t0 = time.perf_counter()
            kernel.run("%pickle_check", timeout=300)
            checks.append(time.perf_counter() - t0)
        check_seconds = statistics.median(checks)
        # Where the time goes: the variables that took longest, in one more check.
        slowest = kernel.run(
            "_pcr = get_ipython().run_line_magic('pickle_check', '')\n"
            "print(json.dumps([round(_pcr.seconds, 3), len(_pcr.reports), sorted(((round(r.seconds, 3), n, "
            "r.type_name) for n, r in _pcr.reports.items()), reverse=True)[:5]]))\ndel _pcr",
            timeout=300,
        )
        check_detail = json.loads(slowest.stdout.strip().splitlines()[-1])
    finally:
        kernel.execute("try:\n    _client.close(); _cluster.close()\nexcept Exception:\n    pass", timeout=60)
        kernel.shutdown()
    extras: dict = {}
    if not args.smoke:
        from benchmarks import bench_bigdata, bench_panel, bench_pickle_check, bench_trivial

        print("- the trivial cell: ordinary, %%isolate (panel, --quiet), the spawn pool", flush=True)
        extras["trivial"] = bench_trivial.run()
        print("\n".join(bench_trivial.describe(extras["trivial"])), flush=True)

        print("- large values: 400 MB out and in, DataFrames in, with their breakdown", flush=True)
        extras["bigdata"] = bench_bigdata.run(5)
        print("\n".join(bench_bigdata.describe(extras["bigdata"])), flush=True)

        print("- %pickle_check engine (1,000 ordinary variables, a 1 GB array)", flush=True)
        extras["pickle_check"] = bench_pickle_check.run()
        print("- the live panel's cost per cell", flush=True)
        extras["panel"] = bench_panel.run()
    return _report(
        rows, check_seconds, quick, Path(args.out), keep=not args.smoke, memory=memory, extras=extras,
        check_detail=check_detail,
        receiving=receiving, sweep=sweep,
    )


def _cell(row: dict, approach: str) -> str:
    """The median in ms, with the quartiles where the approach was timed from the client."""
    value = row.get(approach)
    if not isinstance(value, float):
        return "-"
    q = (row.get("spread") or {}).get(approach)
    return f"{value * 1000:.1f}" + (f" ({q[0] * 1000:.1f}-{q[1] * 1000:.1f})" if q else "")


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}"


def _peak_rss_while(kernel: Kernel, code: str) -> int:
    """The kernel's peak resident memory (bytes) above its memory before, while ``code`` runs."""
    import threading

    import psutil

    proc = psutil.Process(kernel.pid)
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        kernel.run(code, timeout=300)
    finally:
        stop.set()
        thread.join()
    return peak[0] - base


def _peak_memory(kernel: Kernel) -> float:
    """GB by which the kernel's resident memory peaks above a 1 GB array while shipping it."""
    kernel.run("big = np.random.rand(2**30 // 8)", timeout=300)
    grown = _peak_rss_while(kernel, "%%isolate --quiet\ns = float(big[::4096].sum())") / 2**30
    kernel.run("del big", timeout=60)
    print(f"- shipping a 1 GB array: the kernel's memory peaked {grown:.2f} GB above it", flush=True)
    return grown


def _peak_receiving(kernel: Kernel) -> dict[str, float]:
    """GB by which the kernel's resident memory peaks above a 1 GB result while receiving it."""
    kernel.run("n_big = 2**30 // 8", timeout=60)
    grown = _peak_rss_while(kernel, "%%isolate --quiet\nbig_out = np.ones(n_big)") / 2**30 - 1.0
    kernel.run("del big_out", timeout=60)
    print(f"- receiving a 1 GB result: the kernel's memory peaked {grown:.2f} GB above it", flush=True)
    return {"gb_above_result": round(grown, 3)}


def _sweep(kernel: Kernel, n: int, rounds: int) -> dict[str, float]:
    """``--over`` across ``n`` trivial values against a spawn ProcessPoolExecutor mapping the
    same ``n`` calls, its start included, and the floor of a fresh process per value (see
    :mod:`benchmarks.bench_sweep`); medians of ``rounds`` interleaved rounds (seconds)."""
    from benchmarks import bench_sweep

    kernel.run("%%isolate --over v=range(4)\nr = v + 1", timeout=120)  # warm
    codes = bench_sweep.codes(n)
    floors = [f"floor_{kind}" for kind in bench_sweep.FLOORS]
    times: dict[str, list[float]] = {name: [] for name in [*codes, *floors]}
    for _ in range(rounds):
        for kind in bench_sweep.FLOORS:
            times[f"floor_{kind}"].append(bench_sweep.fork_floor(n, kind))
        for name, code in codes.items():
            t0 = time.perf_counter()
            kernel.run(code, timeout=1200)
            times[name].append(time.perf_counter() - t0)
    out = {name: round(statistics.median(v), 3) for name, v in times.items()}
    out["values"] = n
    out["ratio"] = round(out["isolate_over"] / out["cf_pool_map"], 2)
    for name in floors:
        out[f"{name}_ratio"] = round(out[name] / out["cf_pool_map"], 2)
    print(f"- --over {n} values: {out}", flush=True)
    return out


def _report(
    rows: list[dict],
    check_seconds: float,
    quick: bool,
    out: Path,
    keep: bool,
    memory: float | None = None,
    extras: dict | None = None,
    receiving: dict | None = None,
    sweep: dict | None = None,
    check_detail: list | None = None,
) -> int:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()} {platform.release()}",
        "repeats": REPEATS,
        "quick": quick,
        "pickle_check_namespace_seconds": check_seconds,
        "pickle_check_slowest": check_detail,
        "peak_kernel_gb_above_1gb_array": memory,
        "peak_kernel_gb_above_1gb_result": (receiving or {}).get("gb_above_result"),
        "sweep": sweep,
        **(extras or {}),
    }
    header = ["case"] + APPROACHES + ["baseline", "isolate/mp_pool", "isolate/direct", "target", "met"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in rows:
        cells = [row["case"]] + [_cell(row, a) for a in APPROACHES]
        cells += [
            f"{row['baseline'] * 1000:.1f}" if isinstance(row.get("baseline"), float) else "-",
            _ratio(row.get("isolate"), row.get("mp_pool")),
            _ratio(row.get("isolate"), row.get("direct")),
            row.get("target", "-"),
            {True: "yes", False: "NO"}.get(row.get("met"), "-"),
        ]
        lines.append(" | ".join(cells))
    table = "\n".join(lines)
    for row in rows:
        if row.get("phases"):
            table += f"\n\n{row['case']}, one isolated run's phases (medians, s): " + ", ".join(
                f"{k} {v:.3f}" for k, v in row["phases"].items()
            )
    print(f"\nmedian milliseconds (quartiles for the client-timed columns), {meta['date']}, {meta['machine']}\n")
    print(table)
    line = (
        f"%pickle_check over the whole benchmark namespace: {check_seconds:.2f} s (median of 5) "
        f"(target <= 2 s: {'yes' if check_seconds <= 2 else 'NO'})"
    )
    if check_detail:
        total, count, slow = check_detail
        line += (
            f"; one more check of its {count:,} variables took {total:.2f} s, the slowest "
            + ", ".join(f"{name} ({kind}) {seconds:.2f} s" for seconds, name, kind in slow)
        )
    print("\n" + line)
    table += "\n\n" + line
    if sweep is not None:
        line = (
            f"--over {sweep['values']:,} trivial values: {sweep['isolate_over']:.2f} s "
            f"({sweep['values'] / sweep['isolate_over']:.0f} values/s) vs a spawn ProcessPoolExecutor "
            f"mapping them, its start included, {sweep['cf_pool_map']:.2f} s: {sweep['ratio']:.2f}x "
            f"(target <= 2x: {'yes' if sweep['ratio'] <= 2 else 'NO'}); medians of 3 interleaved rounds. "
            f"The floors of a fresh process per value, an interpreter forking {sweep['values']:,} "
            f"children that exit at once (nothing sent, run or returned): a bare one {sweep['floor_bare']:.2f} s, "
            f"{sweep['floor_bare_ratio']:.2f}x the pool; one the size of the sweep's leader (nbisolate's "
            f"worker modules imported) {sweep['floor_leader']:.2f} s, {sweep['floor_leader_ratio']:.2f}x. "
            f"The least a fresh process per value does, a bare interpreter whose child runs the body with its "
            f"value and pipes the pickled result back (no channel, output, errors or kernel): "
            f"{sweep['floor_minimal']:.2f} s, {sweep['floor_minimal_ratio']:.2f}x"
        )
        print(line)
        table += "\n\n" + line
    if receiving is not None:
        above = receiving["gb_above_result"]
        line = (
            f"peak kernel memory receiving a 1 GB result: {above:.2f} GB above the result "
            f"(target <= 1.1: {'yes' if above <= 1.1 else 'NO'})"
        )
        print(line)
        table += "\n\n" + line
    if memory is not None:
        verdict = "yes" if memory <= 1.2 else "NO"
        line = f"peak kernel memory shipping a 1 GB array: {memory:.2f} GB above the array (target <= 1.2: {verdict})"
        print(line)
        table += "\n\n" + line
    for name, values in (extras or {}).items():
        if name == "trivial":
            from benchmarks import bench_trivial

            line = "\n".join(bench_trivial.describe(values))
            print(line)
            table += "\n\n```\n" + line + "\n```"
            continue
        if name == "bigdata":
            from benchmarks import bench_bigdata

            line = "\n".join(bench_bigdata.describe(values))
            print(line)
            table += "\n\n```\n" + line + "\n```"
            continue
        line = f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items())
        print(line)
        table += "\n\n" + line
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / "table.md").write_text(table + "\n")
    _chart(rows, meta, out / "bench.png")
    if keep:
        kept = ROOT / "benchmarks" / "results"
        kept.mkdir(exist_ok=True)
        for name in ("results.json", "table.md", "bench.png"):
            shutil.copy(out / name, kept / name)
    return 0


def _chart(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(APPROACHES)
    for i, approach in enumerate(APPROACHES):
        values = [(row.get(approach) or 0) * 1000 for row in rows]
        ax.bar([j + i * width for j in range(len(rows))], values, width, label=approach)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([row["case"] for row in rows], rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median ms (log)")
    ax.set_title(f"nbisolate vs alternatives — {meta['date']} — {meta['machine']}", fontsize=9)
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
