"""Scale-out through a real kernel: ``--backend dask`` against a real LocalCluster, and ``--over``.

The cluster runs in a process of its own (as a shared cluster would), with
two worker processes of one thread each; the kernel reaches it only by its
address.  Every process the cluster and the cells start is checked gone at
the end.
"""

from __future__ import annotations

import pickle
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from .conftest import loaded_kernel, wait_until
from .kernel import Kernel

pytest.importorskip("distributed")

CLUSTER_SCRIPT = """
import sys
from distributed import LocalCluster

if __name__ == "__main__":
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    print(cluster.scheduler_address, flush=True)
    sys.stdin.read()  # until the test closes our stdin
    cluster.close(timeout=20)
"""


def cell(code: str) -> str:
    return textwrap.dedent(code).strip("\n")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Cluster:
    """A LocalCluster in a subprocess: its scheduler address and its process tree."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLUSTER_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()
        assert self.address.startswith("tcp://"), "the LocalCluster did not start"
        self.seen: set[int] = {self.proc.pid}

    def tree(self) -> list[psutil.Process]:
        procs = psutil.Process(self.proc.pid).children(recursive=True)
        self.seen.update(p.pid for p in procs)
        return procs

    def worker_pids(self) -> set[int]:
        """The Dask worker processes (spawned by the in-process nannies)."""
        return {p.pid for p in self.tree() if "spawn_main" in " ".join(p.cmdline())}

    def isolated_workers(self) -> list[psutil.Process]:
        """nbisolate worker subprocesses running under the cluster now (an exited one its parent
        has not reaped yet is not running)."""
        found = []
        for p in self.tree():
            try:  # a process may end, or be a zombie, between any two of these reads
                if p.status() != psutil.STATUS_ZOMBIE and "nbisolate.worker" in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.Error:
                continue
        return found

    def close(self) -> None:
        self.tree()
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(40)
        except subprocess.TimeoutExpired:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                p.kill()
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        c.close()
        assert wait_until(lambda: all(gone(pid) for pid in c.seen), 20), (
            "cluster processes outlived the tests: "
            + ", ".join(str(pid) for pid in c.seen if not gone(pid))
        )


@pytest.fixture(scope="module")
def dask_kernel(kernel: Kernel, cluster: Cluster) -> Kernel:
    """The module's kernel, with the test cluster as its configured scheduler."""
    kernel.run(f"%isolate_config scheduler={cluster.address}")
    return kernel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- through the kernel -------------------------------------------------------------------


def test_cell_runs_on_a_dask_worker_with_results_and_live_output(dask_kernel, cluster):
    k = dask_kernel
    k.run("import numpy as np\ndata = list(range(10))\narr = np.arange(200_000)  # scattered")
    res = k.run(
        cell(
            """
            %%isolate --backend dask
            import os, time
            for i in range(4):
                print('step', i, flush=True)
                time.sleep(0.4)
            total = sum(data) + int(arr.sum())
            where = (os.getpid(), os.getppid())
            doubled = arr * 2
            total * 2
            """
        ),
        timeout=60,
    )
    assert res.stdout.split() == ["step", "0", "step", "1", "step", "2", "step", "3"]
    streams = [t for m, t in zip(res.messages, res.times, strict=True) if m["msg_type"] == "stream"]
    assert streams[0] < res.reply_time - 1.0  # streamed while the cell ran, not at the end
    expected = 45 + sum(range(200_000))
    assert res.result == {"text/plain": str(2 * expected)}
    total, (pid, parent) = k.value("(total, where)")
    assert total == expected
    assert parent in cluster.worker_pids()  # a subprocess of a Dask worker process
    assert pid not in (k.pid, parent)
    # Arrays that came back are ordinary, writable arrays.
    assert k.run("doubled[0] = -1\nprint(int(doubled[0]), int(doubled[-1]))").stdout.split() == [
        "-1",
        str(2 * 199_999),
    ]
    # The panel's end line (it replaces the panel's display) says where it ran.
    shown = " ".join(
        str(m["content"]["data"].get("text/plain", ""))
        for m in res.of("display_data") + res.of("update_display_data")
    )
    assert "Dask worker tcp://" in shown


def test_each_cell_gets_a_fresh_process_on_the_cluster(dask_kernel):
    k = dask_kernel
    k.run("%%isolate --backend dask\nimport builtins, os\nbuiltins.leak = 1\nfirst = os.getpid()")
    k.run("%%isolate --backend dask\nimport builtins, os\nsecond = (os.getpid(), hasattr(builtins, 'leak'))")
    first, (second, leaked) = k.value("(first, second)")
    assert first != second and leaked is False


def test_exception_is_reraised_with_the_remote_traceback(dask_kernel):
    k = dask_kernel
    k.run("kept = 'before'")
    res = k.execute(
        cell(
            """
            %%isolate --backend dask
            kept = 'after'
            def inner(v):
                return 1 / v
            inner(0)
            """
        ),
        timeout=60,
    )
    assert res.error["ename"] == "ZeroDivisionError"
    tb = "\n".join(res.error["traceback"])
    assert "line 5" in tb and "inner(0)" in tb and "return 1 / v" in tb
    assert k.value("kept") == "before"


def test_timeout_kills_the_remote_subprocess_and_its_children(dask_kernel, cluster):
    res = dask_kernel.execute(
        cell(
            """
            %%isolate --backend dask --timeout 3
            import os, subprocess, sys, time
            child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
            print(os.getpid(), os.getppid(), child.pid, flush=True)
            time.sleep(600)
            """
        ),
        timeout=60,
    )
    assert res.error["ename"] == "IsolateTimeout"
    assert "--timeout 3 s" in res.error["evalue"] and "Dask worker tcp://" in res.error["evalue"]
    assert res.reply_time < 15
    pid, parent, child = map(int, res.stdout.split())
    assert parent in cluster.worker_pids()
    assert wait_until(lambda: gone(pid) and gone(child), 10)
    assert wait_until(lambda: not cluster.isolated_workers(), 10)


def interrupt_when_running(k: Kernel, cluster: Cluster, count: int) -> tuple[threading.Thread, list[int]]:
    """Interrupt the kernel once ``count`` isolated workers run under the cluster; their pids."""
    pids: list[int] = []

    def watch() -> None:
        if wait_until(lambda: len(cluster.isolated_workers()) >= count, 30, 0.1):
            pids.extend(p.pid for p in cluster.isolated_workers())
            time.sleep(0.5)  # let them print, and show that only `count` ever start
        k.interrupt()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, pids


def test_interrupt_stops_the_remote_subprocesses_of_a_cell_and_of_a_sweep(fresh_kernel, cluster):
    k = fresh_kernel
    watcher, pids = interrupt_when_running(k, cluster, 1)
    res = k.execute(
        cell(
            f"""
            %%isolate --scheduler {cluster.address}
            import os, time
            print(os.getpid(), flush=True)
            time.sleep(600)
            """
        ),
        timeout=60,
    )
    watcher.join()
    assert res.error["ename"] == "KeyboardInterrupt", res.error_text
    assert len(pids) == 1 and res.stdout.split() == [str(pids[0])]
    assert wait_until(lambda: gone(pids[0]), 10)
    assert k.run(f"%%isolate --scheduler {cluster.address}\nafter = 'fine'").ok

    # A sweep: every running value is stopped, the queued ones never start, nothing is bound.
    watcher, pids = interrupt_when_running(k, cluster, 2)
    res = k.execute(
        cell(
            f"""
            %%isolate --scheduler {cluster.address} --over n=range(5)
            import os, time
            print(os.getpid(), flush=True)
            time.sleep(600)
            swept = n
            """
        ),
        timeout=60,
    )
    watcher.join()
    assert res.error["ename"] == "KeyboardInterrupt", res.error_text
    assert "0 of 5 runs had finished" in res.error["evalue"]
    assert len(pids) == 2  # two worker threads: two runs started, three never did
    assert wait_until(lambda: all(gone(p) for p in pids), 10)
    assert wait_until(lambda: not cluster.isolated_workers(), 10)
    assert k.value("'swept' in globals()") is False


def test_module_only_the_kernel_has_is_named_with_the_worker_before_running(dask_kernel, cluster):
    k = dask_kernel
    # A module importable in the kernel only: generated code registered in sys.modules.
    k.run(
        cell(
            """
            import sys, types
            kernel_only = types.ModuleType('kernel_only_helpers')
            exec('def scale(x):\\n    return 3 * x', kernel_only.__dict__)
            sys.modules['kernel_only_helpers'] = kernel_only
            """
        )
    )
    res = k.execute("%%isolate --backend dask\nprint('ran')\ny = kernel_only.scale(2)", timeout=60)
    assert res.error["ename"] == "DaskBackendError"
    text = res.error["evalue"]
    assert "'kernel_only_helpers'" in text and "nothing ran" in text
    assert "Dask worker tcp://127.0.0.1:" in text
    assert "ran" not in res.stdout
    assert not cluster.isolated_workers()


def test_unreachable_scheduler_fails_fast_naming_the_address(dask_kernel):
    k = dask_kernel
    address = f"tcp://127.0.0.1:{free_port()}"
    k.run("%isolate_config connect_timeout=2")
    try:
        res = k.execute(f"%%isolate --scheduler {address}\nx = 1", timeout=30)
    finally:
        k.run("%isolate_config connect_timeout=10")
    assert res.error["ename"] == "DaskBackendError"
    assert address in res.error["evalue"] and "2 s" in res.error["evalue"]
    assert res.reply_time < 10


def test_sweep_on_the_cluster_runs_in_parallel_in_order_and_reports_a_failure(dask_kernel):
    k = dask_kernel
    k.run("offset = 100")
    res = k.execute(
        cell(
            """
            %%isolate --backend dask --over seed=range(8)
            import os, time
            time.sleep(1.5)
            if seed == 5:
                raise ValueError(f'bad seed {seed}')
            score = seed * seed + offset
            pid = os.getpid()
            print('done', seed)
            score
            """
        ),
        timeout=90,
    )
    # 8 runs of 1.5 s on 2 worker threads take about 6 s; one after the other, no less than
    # 12 s of sleep alone. Checked loosely: the machine is shared.
    assert res.reply_time < 8 * 1.5, res.reply_time
    assert res.error["ename"] == "SweepError"
    assert "1 of 8 runs" in res.error["evalue"]
    assert "seed=5: ValueError: bad seed 5" in res.error["evalue"]
    tb = "\n".join(res.error["traceback"])
    assert "raise ValueError" in tb  # the first failure's remote traceback
    scores, pids = k.value("(score, pid)")
    assert scores == [100, 101, 104, 109, 116, None, 136, 149]
    assert pids[5] is None and len(set(pids) - {None}) == 7  # a fresh process per value
    assert sorted(line for line in res.stdout.splitlines() if line) == sorted(
        f"[seed={s}] done {s}" for s in range(8) if s != 5
    )
    assert k.value("'seed' in globals()") is False


def test_the_notebooks_own_client_is_used(dask_kernel, cluster):
    k = dask_kernel
    k.run("%isolate_config scheduler=")
    try:
        k.run(f"from distributed import Client\n_client = Client({cluster.address!r})")
        res = k.run("%%isolate --backend dask\nimport os\nvia = os.getppid()", timeout=60)
        assert "local Dask cluster" not in res.stderr
        assert k.value("via") in cluster.worker_pids()
        k.run("_client.close()")
    finally:
        k.run(f"%isolate_config scheduler={cluster.address}")


# -- --over without Dask --------------------------------------------------------------------


def test_local_sweep_gives_ordered_lists_and_fresh_processes(kernel):
    res = kernel.run(
        cell(
            """
            %%isolate --over x=[3, 1, 2, 5]
            import os, time
            time.sleep(0.5)
            doubled = 2 * x
            who = os.getpid()
            print('x is', x)
            doubled + 1
            """
        ),
        timeout=60,
    )
    assert res.result == {"text/plain": "[7, 3, 5, 11]"}
    doubled, who = kernel.value("(doubled, who)")
    assert doubled == [6, 2, 4, 10]
    assert len(set(who)) == 4 and kernel.pid not in who
    assert kernel.value("type(os).__name__") == "module"  # an import stays a module
    assert "[x=5] x is 5" in res.stdout
    assert kernel.value("'x' in globals()") is False


def test_local_sweep_usage_errors_change_nothing(kernel):
    res = kernel.execute("%%isolate --over seed=range(3)\ny = 1")
    assert not res.ok and "never reads 'seed'" in res.stderr
    res = kernel.execute("%%isolate --over seed=nope_missing\ny = seed")
    assert not res.ok and "NameError" in res.stderr and "nothing ran" in res.stderr
    res = kernel.execute("%%isolate --over seed\ny = seed")
    assert not res.ok and "NAME=EXPR" in res.stderr


def test_all_failing_sweep_binds_nothing(kernel):
    kernel.run("untouched_sweep = 'kept'")
    res = kernel.execute("%%isolate --over v=[0, 0]\nuntouched_sweep = 1 / v", timeout=60)
    assert res.error["ename"] == "SweepError" and "2 of 2 runs" in res.error["evalue"]
    assert kernel.value("untouched_sweep") == "kept"


def test_local_cluster_is_started_once_said_on_stderr_and_stopped_with_the_kernel():
    with loaded_kernel() as k:
        res = k.run("%%isolate --backend dask\nimport os\nwhere = os.getppid()", timeout=90)
        assert "a local Dask cluster was started: 2 worker processes x 1 thread" in res.stderr
        again = k.run("%%isolate --backend dask\nwhere2 = 1", timeout=60)
        assert "local Dask cluster" not in again.stderr
        tree = [p.pid for p in psutil.Process(k.pid).children(recursive=True)]
        assert k.value("where") in tree
    assert wait_until(lambda: all(gone(pid) for pid in tree), 20)


# -- units beside -------------------------------------------------------------------------------


def test_shipment_names_the_modules_it_imports():
    import collections
    import json

    from nbisolate import ship

    def uses_json(v):
        return json.dumps(v)

    s = ship.dumps({"od": collections.OrderedDict(), "f": uses_json, "m": json})
    assert {"collections", "json"} <= s.modules
    stream = pickle.dumps([collections.OrderedDict()], protocol=2)
    assert ship.modules_in_pickle(stream) == {"collections"}
    assert ship.modules_in_pickle(b"not a pickle") == set()


def test_version_and_module_problems_are_explained():
    from nbisolate.backends.dask import _kernel_versions, _problems

    mine = _kernel_versions()
    ok = {"python": mine["python"], "dill": mine["dill"], "nbisolate": mine["nbisolate"], "missing": []}
    assert _problems(ok, mine) == []
    other = dict(ok, python=[3, 9, 1], dill="0.3.1", nbisolate=None, missing=["vendor_sdk"])
    found = " | ".join(_problems(other, mine))
    assert "Python 3.9.1" in found and "dill 0.3.1" in found
    assert "nbisolate is not installed" in found and "'vendor_sdk'" in found


def test_over_values_are_parsed_in_the_notebook_namespace():
    from nbisolate.errors import IsolateUsageError
    from nbisolate.sweep import parse_over

    assert parse_over("lr=[x / 10 for x in range(3)]", {}) == ("lr", [0.0, 0.1, 0.2])
    assert parse_over("n = base + [2]", {"base": [1]}) == ("n", [1, 2])
    for bad in ("lr", "1x=[1]", "s='abc'", "e=[]", "z=5"):
        with pytest.raises(IsolateUsageError):
            parse_over(bad, {})


def test_scheduler_precedence_and_unreachable_environment_scheduler(monkeypatch):
    from nbisolate.backends import dask as db

    bad_env = f"tcp://127.0.0.1:{free_port()}"
    bad_flag = f"tcp://127.0.0.1:{free_port()}"
    monkeypatch.setenv(db.ENV_SCHEDULER, bad_env)
    monkeypatch.setitem(db.config, "connect_timeout", 1.0)
    monkeypatch.setitem(db.config, "scheduler", None)
    with pytest.raises(db.DaskBackendError, match=r"\$NBISOLATE_SCHEDULER") as info:
        db.get_client()
    assert bad_env in str(info.value)
    with pytest.raises(db.DaskBackendError, match="--scheduler") as info:
        db.get_client(bad_flag)  # --scheduler wins over the environment
    assert bad_flag in str(info.value)
    from nbisolate import backends
    from nbisolate.options import RunOptions

    assert backends.chosen_name(RunOptions(backend="local")) == "local"
    with pytest.raises(db.IsolateUsageError, match="--scheduler needs --backend dask"):
        backends.chosen_name(RunOptions(backend="local", scheduler=bad_flag))


def test_remote_pid_reads_as_a_pid_and_names_the_host():
    from nbisolate.backends.dask import RemotePid

    pid = RemotePid(4711, "node7", "tcp://10.0.0.7:4242")
    assert pid == 4711 and int(pid) == 4711 and f"{pid:d}" == "4711"
    assert f"pid {pid}" == "pid 4711 on node7 (Dask worker tcp://10.0.0.7:4242)"
    assert pickle.loads(pickle.dumps(pid)).host == "node7"


def test_cluster_is_not_needed_to_import_the_backend():
    code = "import sys; sys.modules['distributed'] = None; import nbisolate.backends.dask as d\n"
    code += "try:\n    d.get_client()\nexcept d.DaskBackendError as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'nbisolate[dask]'" in out.stdout and "nothing ran" in out.stdout
