"""Soak: 500 isolated cells in one kernel leave nothing behind (``make soak``).

A mix of normal, failing, timing-out, crashing, memory-capped, flooding and
child-starting cells, with inputs and results large enough to travel through
shared memory.  Measured from outside the kernel after a warm-up round (the
template process, warm shared-memory arenas and IOPub's own buffers are made
once and kept): the kernel's descriptors, memfds, threads and children; stray
processes anywhere on the machine; ``/dev/shm`` segments nobody holds; files in
the kernel's own TMPDIR; and the named semaphores (``sem.mp-*``) and shared memory
(``psm_*``) of cells that use multiprocessing themselves and succeed, fail or time out.
Prints a table of what it found; all must be zero.
"""

from __future__ import annotations

import time

import psutil
import pytest

from .conftest import new_shm, shm_names, wait_until
from .kernel import Kernel
from .test_faults_kernel import MIXED_CELLS, run_mixed, usage

CELLS = 500

# A cell's own multiprocessing: named semaphores (a Queue, a Lock) and shared memory that the
# cell does not release, a spawn pool, and an ending that succeeds, fails or times out.
POOL_CELL = """%%isolate {opts} --quiet --out x
import multiprocessing, time
from multiprocessing import shared_memory
ctx = multiprocessing.get_context('spawn')
q, lock = ctx.Queue(), ctx.Lock()
seg = shared_memory.SharedMemory(create=True, size=4096)
with ctx.Pool(1) as pool:
    x = pool.map(abs, range(2))
{tail}
"""
POOL_CELLS = [
    POOL_CELL.format(opts="", tail="x = 1"),
    POOL_CELL.format(opts="", tail="raise ValueError('failed on purpose')"),
    POOL_CELL.format(opts="--timeout 2", tail="time.sleep(30)"),
]
POOL_ROUNDS = 5


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_500_mixed_cells_leak_nothing(tmp_path):
    k = Kernel(env={"TMPDIR": str(tmp_path)})
    try:
        k.run("%load_ext nbisolate")
        k.run("import numpy as np\nguard = 'kept'\nbig_in = np.ones(1 << 18)")
        shm_before = shm_names()
        sem_before, psm_before = shm_names("sem.mp-"), shm_names("psm_")
        run_mixed(k, 1)  # warm-up, not counted
        time.sleep(0.5)
        base = usage(k, str(tmp_path), shm_before)
        rss_base = psutil.Process(k.pid).memory_info().rss
        rounds = CELLS // len(MIXED_CELLS)
        t0 = time.perf_counter()
        outcomes = run_mixed(k, rounds)
        for _ in range(POOL_ROUNDS):
            for code in POOL_CELLS:
                res = k.execute(code, timeout=60)
                name = "ok" if res.ok else (res.error or {}).get("ename", "?")
                outcomes[f"pool:{name}"] = outcomes.get(f"pool:{name}", 0) + 1
        elapsed = time.perf_counter() - t0
        # Workers of the last cells may still be exiting; the arenas' idle timer may be pending.
        wait_until(lambda: all(v <= 0 for v in usage(k, str(tmp_path), shm_before).minus(base).values()), 40)
        end = usage(k, str(tmp_path), shm_before)
        wait_until(lambda: not new_shm(sem_before, "sem.mp-") and not new_shm(psm_before, "psm_"), 10)
        sems, psms = new_shm(sem_before, "sem.mp-"), new_shm(psm_before, "psm_")
        growth = end.minus(base)
        rss_growth = psutil.Process(k.pid).memory_info().rss - rss_base
        assert k.value("guard") == "kept"
    finally:
        k.shutdown()

    print(f"\n{rounds * len(MIXED_CELLS)} isolated cells in {elapsed:.0f} s: {outcomes}")
    print(f"{'what':<36}{'before':>8}{'after':>8}{'leaked':>8}")
    labels = {
        "fds": "kernel file descriptors",
        "memfds": "kernel memfds (shared-memory arenas)",
        "threads": "kernel threads",
        "workers": "kernel's worker processes",
        "strays": "cell processes left on the machine",
        "shm": "/dev/shm segments nobody holds",
        "tmp_files": "files in the kernel's TMPDIR",
    }
    for name, label in labels.items():
        print(f"{label:<36}{getattr(base, name):>8}{getattr(end, name):>8}{max(growth[name], 0):>8}")
    print(f"{'named semaphores (sem.mp-*)':<36}{len(sem_before):>8}{len(sem_before | sems):>8}{len(sems):>8}")
    print(f"{'shared memory (psm_*)':<36}{len(psm_before):>8}{len(psm_before | psms):>8}{len(psms):>8}")
    print(f"{'kernel RSS growth (MB, for info)':<36}{'':>8}{'':>8}{rss_growth / 2**20:>8.1f}")
    leaks = {name: n for name, n in growth.items() if n > 0}
    leaks.update({k: len(v) for k, v in (("sem.mp-*", sems), ("psm_*", psms)) if v})
    assert not leaks, f"leaks after {CELLS} cells: {leaks}"
