"""A local sweep of many values runs under one leader worker that forks a child per value.

What must hold however the values are run: each value in a brand-new process
that ran no cell code before; output per value, prefixed; results bound in the
order of the values; a value's failure, timeout or unpicklable result is that
value's alone; Stop ends every process of the sweep and binds nothing.
"""

from __future__ import annotations

import textwrap
import threading

import psutil
import pytest

from nbisolate.sweep import LEADER_FROM, SLIM_FROM

from .conftest import wait_until
from .kernel import Kernel

N = max(LEADER_FROM, 12)


def cell(text: str) -> str:
    return textwrap.dedent(text).strip()


def sweep(k: Kernel, body: str):
    """Run ``body`` once per value of ``v`` (N of them) in one ``%%isolate --over`` cell."""
    return k.execute(f"%%isolate --over v=range({N})\n" + cell(body), timeout=120)


def test_every_value_runs_in_a_process_of_its_own_results_in_order(kernel: Kernel):
    res = kernel.run(
        cell(
            f"""
            %%isolate --over v=range({N})
            import os
            who = os.getpid()
            parent = os.getppid()
            r = v * 10
            """
        ),
        timeout=120,
    )
    assert res.ok, res.error_text
    r, who, parent = kernel.value("(r, who, parent)")
    assert r == [v * 10 for v in range(N)]
    assert len(set(who)) == N and kernel.pid not in who
    leader = set(parent)
    assert len(leader) == 1 and not leader & set(who)  # one leader forked them all
    assert kernel.value("'v' in globals()") is False  # the swept name is never bound


def test_a_child_starts_from_the_inputs_having_run_no_cell_code(kernel: Kernel):
    kernel.run("base = [1, 2]")
    res = kernel.run(
        cell(
            f"""
            %%isolate --over v=range({N})
            base.append(v)  # a previous value's change must not be seen by the next
            seen = list(base)
            """
        ),
        timeout=120,
    )
    assert res.ok, res.error_text
    assert kernel.value("seen") == [[1, 2, v] for v in range(N)]
    assert kernel.value("base") == [1, 2]


def test_output_per_value_is_prefixed_with_its_value(kernel: Kernel):
    res = kernel.run(
        cell(
            f"""
            %%isolate --quiet --over v=range({N})
            print("value", v)
            r = v
            """
        ),
        timeout=120,
    )
    assert res.ok, res.error_text
    lines = set(res.stdout.splitlines())
    assert {f"[v={v}] value {v}" for v in range(N)} <= lines, res.stdout


def test_output_below_python_is_prefixed_with_its_value_too(kernel: Kernel):
    """What a value's C code or subprocess writes straight to its file descriptors is that
    value's output, prefixed like its prints, and arrives before the sweep ends."""
    res = kernel.run(
        cell(
            f"""
            %%isolate --quiet --over v=range({N})
            import os, subprocess
            os.write(1, b"fd-out %d\\n" % v)
            os.write(2, b"fd-err %d\\n" % v)
            subprocess.run(["echo", "child", str(v)], check=True)
            r = v
            """
        ),
        timeout=120,
    )
    assert res.ok, res.error_text
    out, err = set(res.stdout.splitlines()), set(res.stderr.splitlines())
    assert {f"[v={v}] fd-out {v}" for v in range(N)} <= out, res.stdout
    assert {f"[v={v}] child {v}" for v in range(N)} <= out, res.stdout
    assert {f"[v={v}] fd-err {v}" for v in range(N)} <= err, res.stderr


def test_one_failure_is_that_values_alone(kernel: Kernel):
    res = kernel.execute(
        cell(
            f"""
            %%isolate --quiet --over v=range({N})
            r = 1 / (v - 3)
            """
        ),
        timeout=120,
        allow_error=True,
    )
    assert res.error["ename"] == "SweepError", res.error_text
    assert "v=3: ZeroDivisionError: division by zero" in res.error_text
    r = kernel.value("r")
    assert r[3] is None and r[:3] == [1 / (v - 3) for v in range(3)] and len(r) == N


def test_a_failing_values_traceback_points_at_the_cells_line(kernel: Kernel):
    # The leader compiles the cell once for every value: its lines must still be the cell's.
    res = kernel.execute(
        cell(
            f"""
            %%isolate --quiet --over v=range({N})
            x = v
            r = 1 / (v - 3)
            r
            """
        ),
        timeout=120,
        allow_error=True,
    )
    assert res.error["ename"] == "SweepError", res.error_text
    text = res.error_text.split("--- v=3 ---", 1)[1]
    assert "line 3" in text and "---> 3" in text and "r = 1 / (v - 3)" in text, text
    assert kernel.value("x") == [None if v == 3 else v for v in range(N)]  # a failed run binds None


def test_a_timeout_ends_that_value_and_its_processes_only(kernel: Kernel):
    res = kernel.execute(
        cell(
            f"""
            %%isolate --quiet --timeout 2 --over v=range({N})
            import os, subprocess, sys, time
            if v == 5:
                kid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
                print("kid", kid.pid, flush=True)
                time.sleep(600)
            r = v
            """
        ),
        timeout=120,
        allow_error=True,
    )
    assert res.error["ename"] == "SweepError", res.error_text
    assert "v=5: IsolateTimeout" in res.error_text, res.error_text
    assert kernel.value("r") == [None if v == 5 else v for v in range(N)]
    kid = int(res.stdout.split("kid")[1].split()[0])
    assert wait_until(lambda: not psutil.pid_exists(kid) or psutil.Process(kid).status() == "zombie", 10)


def test_a_result_that_cannot_be_pickled_is_skipped_for_that_value(kernel: Kernel):
    res = kernel.run(
        cell(
            f"""
            %%isolate --quiet --over v=range({N})
            r = (i for i in range(3)) if v == 2 else v
            """
        ),
        timeout=120,
    )
    assert res.ok, res.error_text
    assert "'r' was not copied back" in res.stderr, res.stderr
    r = kernel.value("r")
    assert r[2] is None and [x for i, x in enumerate(r) if i != 2] == [v for v in range(N) if v != 2]


def test_random_state_differs_per_value(kernel: Kernel):
    kernel.run("import random; random.seed(0)")
    res = kernel.run(f"%%isolate --quiet --over v=range({N})\nimport random\nx = (v, random.random())", timeout=120)
    assert res.ok, res.error_text
    assert len({x for _, x in kernel.value("x")}) == N


def test_stop_mid_sweep_leaves_no_process_and_binds_nothing(fresh_kernel: Kernel):
    k = fresh_kernel
    threading.Timer(3.0, k.interrupt).start()
    res = k.execute(
        cell(
            f"""
            %%isolate --over n=range({N})
            import os, subprocess, sys, time
            kid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            print(os.getpid(), os.getppid(), kid.pid, flush=True)
            time.sleep(600)
            swept = n
            """
        ),
        timeout=60,
    )
    assert res.error["ename"] == "KeyboardInterrupt", res.error_text
    pids = {int(p) for line in res.stdout.splitlines() if line.strip() for p in line.split()[-3:]}
    assert len(pids) >= 3, res.stdout
    assert wait_until(lambda: not any(psutil.pid_exists(p) for p in pids), 10), [
        psutil.Process(p).status() for p in pids if psutil.pid_exists(p)
    ]
    assert k.value("'swept' in globals()") is False
    assert k.run(f"%%isolate --over n=range({N})\nafter = n * 2").ok
    assert k.value("after") == [n * 2 for n in range(N)]


LEADER_PARENT = "int(open('/proc/%d/stat' % os.getppid()).read().rsplit(')', 1)[1].split()[1])"


def test_the_leader_is_slim_unless_the_values_need_a_package_the_template_preloads(kernel: Kernel):
    pytest.importorskip("numpy")
    template = kernel.value("__import__('nbisolate.supervisor').supervisor.launcher.pid")
    kernel.run("import numpy")
    # Nothing third-party: a fresh interpreter (the kernel's child) leads, whose forks are cheap.
    res = kernel.run(f"%%isolate --quiet --over v=range({SLIM_FROM})\nimport os\np = (v, {LEADER_PARENT})")
    assert res.ok, res.error_text
    assert {p for _, p in kernel.value("p")} == {kernel.pid}
    # The cell imports NumPy: the leader is forked from the template, which has it already.
    res = kernel.run(
        f"%%isolate --quiet --over v=range({SLIM_FROM})\nimport os, numpy\np = (v, {LEADER_PARENT})"
    )
    assert res.ok, res.error_text
    assert {p for _, p in kernel.value("p")} == {template}


READ_BYTES = "int(dict(line.split(': ') for line in open('/proc/self/io').read().splitlines())['rchar'])"
"""Bytes the process read from files so far (its own count starts at its fork)."""


@pytest.mark.parametrize("values", [N, SLIM_FROM], ids=["forked leader", "slim leader"])
def test_a_value_reads_no_module_file_its_leader_imported_what_it_runs(kernel: Kernel, values: int):
    """Each import a value's process made would be a file read (and, where no bytecode is
    cached, a compile of milliseconds) paid once per value: the leader makes them once."""
    res = kernel.run(f"%%isolate --quiet --over v=range({values})\nread = (v, {READ_BYTES})", timeout=120)
    assert res.ok, res.error_text
    read = kernel.value("read")
    assert len(read) == values
    # The smallest module of nbisolate is more than 600 bytes; the cell itself reads none.
    assert max(n for _, n in read) < 600, read[:3]


def test_large_inputs_and_results_travel_through_the_leader(kernel: Kernel):
    kernel.run("big = bytes(range(256)) * (16 * 1024)")  # 4 MB, shared by every value
    res = kernel.run(
        f"%%isolate --quiet --over v=range({N})\nout = big[v:v + 3] + bytes(2 * 1024 * 1024)\nsize = len(big)",
        timeout=120,
    )
    assert res.ok, res.error_text
    assert kernel.value("size") == [4 * 1024 * 1024] * N
    assert kernel.value("[o[:3] for o in out]") == [bytes([v, v + 1, v + 2]) for v in range(N)]
    assert kernel.value("{len(o) for o in out}") == {3 + 2 * 1024 * 1024}


def test_every_value_obeys_the_notebooks_settings(fresh_kernel: Kernel):
    # Taken once by the leader; each value's logging handlers write to its own output.
    k = fresh_kernel
    k.run(
        "import sys, logging\nsys.setrecursionlimit(20000)\n"
        'logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(message)s")'
    )
    res = sweep(
        k,
        """
        import logging
        def depth(n):
            return 0 if n == 0 else 1 + depth(n - 1)
        d = depth(3000 + v)
        logging.getLogger("job").info("value %d", v)
        """,
    )
    assert res.ok, res.error_text
    assert k.value("d") == [3000 + v for v in range(N)]
    for v in range(N):
        assert f"INFO:value {v}" in res.stderr + res.stdout, res.stderr


def test_every_value_obeys_the_notebooks_warning_filters(fresh_kernel: Kernel):
    # As in an ordinary cell: "error" turns the cell's warning into that value's failure,
    # "ignore" silences it; the sweep's own steps are not the cell's and never fail by them.
    k = fresh_kernel
    k.run(
        "import sys, warnings\n"
        'warnings.filterwarnings("error", message="odd")\n'
        'warnings.filterwarnings("ignore", message="hush")'
    )
    res = sweep(
        k,
        """
        import warnings
        warnings.warn("hush")
        if v % 2:
            warnings.warn(f"odd {v}")
        r = v
        """,
    )
    assert not res.ok
    assert f"{N // 2} of {N} runs of --over v failed" in res.error_text, res.error_text
    for v in range(1, N, 2):
        assert f"v={v}: UserWarning: odd {v}" in res.error_text, res.error_text
    assert "hush" not in res.stderr + res.stdout, res.stderr
    assert k.value("sorted(sys.last_value.errors)") == list(range(1, N, 2))  # the even values ran
    assert k.value("[r[v] for v in range(0, len(r), 2)]") == list(range(0, N, 2))
