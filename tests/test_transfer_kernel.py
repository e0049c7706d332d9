"""Big data through a real kernel: copied straight both ways (shared memory where refused), nothing left behind."""

from __future__ import annotations

import threading
import time

import psutil

from .conftest import new_shm, shm_names, wait_until


def new_segments(before: set[str]) -> set[str]:
    """Segments this session made since ``before``: moving arrays must make none (they travel
    through anonymous memfds). multiprocessing's named semaphores (``sem.mp-*``) are left out:
    they come and go with its resource tracker, and tests/test_pools_kernel.py checks that
    none outlives a cell."""
    return {n for n in new_shm(before) if not n.startswith("sem.mp-")}


def test_big_arrays_round_trip_through_shared_memory(kernel):
    before = shm_names()
    kernel.run("import numpy as np\nbig = np.random.rand(6_000_000)\nchecksum = float(big.sum())")
    res = kernel.run(
        "%%isolate\ninside = float(big.sum())\nback = big * 2\nfresh = np.arange(3_000_000, dtype=np.int64)"
    )
    assert res.ok
    assert kernel.value("inside == checksum") is True
    assert kernel.value("bool((back == big * 2).all()) and int(fresh[-1])") == 2_999_999
    assert kernel.value("back.flags.writeable") is True
    assert not new_segments(before)


def test_worker_crash_with_big_input_leaks_nothing(kernel):
    kernel.run("import numpy as np\npayload = np.ones(4_000_000)")
    kproc = psutil.Process(kernel.pid)
    kernel.run("%%isolate\nwarm = float(payload[0])")  # warm the arena and the template
    fds_before = kproc.num_fds()
    shm_before = shm_names()
    for _ in range(3):
        res = kernel.execute("%%isolate\nimport os\nx = float(payload.sum())\nos._exit(9)")
        assert res.error["ename"] == "WorkerCrashed" and "exit code 9" in res.error["evalue"]
    assert wait_until(lambda: kproc.num_fds() <= fds_before + 2)
    assert not new_segments(shm_before)


def test_workers_are_forked_from_a_template_not_from_the_kernel(kernel):
    res = kernel.run("%%isolate\nimport os\nparent = os.getppid()\nme = os.getpid()")
    assert res.ok
    parent, me = kernel.value("(parent, me)")
    template = psutil.Process(parent)
    assert parent != kernel.pid
    assert template.ppid() == kernel.pid  # the template is the kernel's own child
    assert "nbisolate.template" in " ".join(template.cmdline())
    # The result arrives before the worker has finished exiting: it goes right after.
    assert wait_until(lambda: _gone(me))


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_template_learns_the_notebooks_imports(kernel):
    """After the notebook imports a package, later isolated cells find it already imported."""
    kernel.run("import json, decimal\nimport numpy as np")
    kernel.run("%%isolate\nimport sys\nfirst = 'numpy' in sys.modules\nnp.zeros(1)")
    res = kernel.run("%%isolate\nimport sys\nwarm = 'numpy' in sys.modules")
    assert res.ok and kernel.value("warm") is True
    # ...but never a package the notebook did not import.
    res = kernel.run("%%isolate\nimport sys\nforeign = 'sqlite3' in sys.modules or 'pandas' in sys.modules")
    assert kernel.value("foreign") is False


def _mapping_of(kernel, expr: str) -> str:
    """The line of the kernel's /proc/PID/maps that holds the data of array ``expr``."""
    address = kernel.value(f"{expr}.ctypes.data")
    with open(f"/proc/{kernel.pid}/maps") as f:
        for line in f:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if start <= address < end:
                return line
    raise AssertionError(f"no mapping holds {expr}")


def test_a_large_result_is_the_kernels_own_memory_and_outlives_its_worker(kernel):
    """A result read out of the worker lands in private memory of the kernel: no shared
    segment is mapped for it, and it stays valid and writable once the worker is gone."""
    kernel.run("import numpy as np")
    shm_before = shm_names()
    res = kernel.run(
        "%%isolate\nimport os\nbig_back = np.arange(20_000_000, dtype=np.float64)\n"
        "ro = np.full(300_000, 7, dtype=np.int32); ro.flags.writeable = False\n"
        "empty = np.zeros(0)\nwho = os.getpid()"
    )
    assert res.ok, res.error_text
    who = kernel.value("who")
    assert wait_until(lambda: _gone(who))
    assert kernel.value("(float(big_back[-1]), big_back.flags.writeable)") == (19_999_999.0, True)
    assert kernel.value("(int(ro.sum()), empty.shape)") == (2_100_000, (0,))
    kernel.run("big_back[0] = -1.0")  # the kernel's own pages: writing touches nobody else's
    assert kernel.value("float(big_back[0])") == -1.0
    assert "memfd" not in _mapping_of(kernel, "big_back")
    assert _mapping_of(kernel, "big_back").split()[1].endswith("p")  # private, not shared
    assert not new_segments(shm_before)


def test_many_small_arrays_and_large_ones_come_back_together(kernel):
    """More buffers than one read can take (1,024), small ones sharing one allocation,
    large ones their own, shared objects still shared."""
    kernel.run("import numpy as np")
    res = kernel.run(
        "%%isolate\nsmall = [np.full(100, i, dtype=np.int64) for i in range(3000)]\n"
        "large = [np.full(300_000, i, dtype=np.float64) for i in range(3)]\n"
        "both = {'s': small[5], 'l': large[1]}"
    )
    assert res.ok, res.error_text
    assert kernel.value("[int(a[0]) for a in small] == list(range(3000))") is True
    assert kernel.value("[float(a[-1]) for a in large]") == [0.0, 1.0, 2.0]
    assert kernel.value("both['s'] is small[5] and both['l'] is large[1]") is True


def test_a_kernel_that_may_not_read_its_worker_gets_results_through_shared_memory(kernel):
    """Where a ptrace policy or a seccomp profile forbids reading another process (this
    kernel runs as a user who may, so the refusal is made to happen here), the worker is
    asked to send its buffers with the message, and the result arrives all the same."""
    kernel.run(
        "import errno, numpy as np\nimport nbisolate.ship as _ship\n_real_pull = _ship.pull\n"
        "def _refused(pid, spans, ready=None):\n"
        "    raise PermissionError(errno.EPERM, 'Operation not permitted')\n"
        "_ship.pull = _refused"
    )
    shm_before = shm_names()
    try:
        res = kernel.run("%%isolate\nvia_shm = np.arange(2_000_000)")
        assert res.ok, res.error_text
        assert kernel.value("int(via_shm[-1])") == 1_999_999
        assert "memfd:nbisolate" in _mapping_of(kernel, "via_shm")  # mapped, as it came
    finally:
        kernel.run("_ship.pull = _real_pull\ndel via_shm")
    assert not new_segments(shm_before)



_WHERE_IN_WORKER = (
    "def _where(a):\n"
    "    address = a.__array_interface__['data'][0]\n"
    "    for line in open('/proc/self/maps'):\n"
    "        start, end = (int(x, 16) for x in line.split()[0].split('-'))\n"
    "        if start <= address < end:\n"
    "            return line.strip()\n"
)


def test_large_inputs_are_copied_into_the_workers_own_memory(kernel):
    """Large inputs of a cell the kernel waits on are written straight into private memory
    of the worker (no shared segment): exact bytes, writable, several buffers large and
    small (one over the size that two threads copy), identity kept, nothing left behind."""
    kernel.run(
        "import numpy as np\nhuge = np.random.rand(9_000_000)\nmid = np.arange(300_000)\n"
        "tiny = np.arange(10)\npair = (mid, mid)\nsums = (float(huge.sum()), int(mid.sum()))\n"
        "huge_alias = huge"
    )
    shm_before = shm_names()
    res = kernel.run(
        "%%isolate\n" + _WHERE_IN_WORKER + "seen = (float(huge.sum()), int(mid.sum()))\n"
        "where = _where(huge)\nsame = pair[0] is pair[1] and pair[0] is mid\n"
        "huge[0] = -1.0\nwritable = bool(huge[0] == -1.0)\ntail = int(tiny[-1])"
    )
    assert res.ok, res.error_text
    assert kernel.value("seen == sums") is True
    where = kernel.value("where")
    assert "memfd" not in where and "/dev/shm" not in where, where
    assert kernel.value("(writable, tail, same)") == (True, 9, True)
    # The worker wrote into its own copy; the write comes back into the notebook's own array
    # (the cell's text writes into it), as after an ordinary cell.
    assert kernel.value("(float(huge_alias[0]), huge_alias is huge)") == (-1.0, True)
    assert not new_segments(shm_before)


def _alive(look):
    """``look()``, or None for a process that ended while it was looked at (a worker exiting)."""
    try:
        return look()
    except psutil.NoSuchProcess:
        return None


def _spares(kernel) -> list[psutil.Process]:
    template = [
        c for c in psutil.Process(kernel.pid).children()
        if "nbisolate.template" in " ".join(_alive(c.cmdline) or ())
    ]
    if not template:
        return []
    return [p for p in _alive(template[0].children) or () if _alive(p.name) == "nbisolate-spare"]


def _roomy(spare: psutil.Process) -> bool:
    """A spare that made room for 100 MB of inputs (its memory shows it)."""
    info = _alive(spare.memory_info)
    return info is not None and info.rss > 100e6


def test_after_a_cell_with_large_inputs_a_spare_makes_room_for_the_next_one_ahead(fresh_kernel):
    """Once a cell sent large inputs, the next spare makes room for as much and faults it in
    while it waits; the next such cell takes that spare (a small cell takes another), and
    its inputs arrive whole."""
    k = fresh_kernel
    k.run("import numpy as np\nsrc = np.random.rand(100_000_000 // 8)\nwant = float(src.sum())")
    k.run("%%isolate\nfirst = float(src.sum())")
    assert wait_until(lambda: any(_roomy(p) for p in _spares(k)), 20)
    ready = [p.pid for p in _spares(k) if _roomy(p)]
    assert len(ready) == 1  # one spare at a time holds the room
    k.run("%%isolate\nimport os\nsmall_pid = os.getpid()")
    assert k.value("small_pid") != ready[0]  # a cell without large inputs leaves it be
    k.run("%%isolate\nimport os\nsecond = float(src.sum())\nbig_pid = os.getpid()")
    assert k.value("big_pid") == ready[0]
    assert k.value("first == second == want") is True


# Keeps what each isolated run's result says of its transfer (the kernel's side of the copy).
TRANSFERS = """
import nbisolate.panel as _P
_transfers = []
_attach = _P.attach
def _noting_attach(run, **kw):
    def listen(event):
        if event.kind == "result" and isinstance(event.data, dict):
            _transfers.append(event.data.get("transfer"))
    run.listeners.append(listen)
    return _attach(run, **kw)
_P.attach = _noting_attach
"""


def test_a_cell_that_returned_a_large_result_gets_room_made_for_it_while_it_runs_again(fresh_kernel):
    """A cell that returned 80 MB makes the kernel fault in as much while that cell runs again:
    its next result is copied into that room, whole and right.  Another cell makes no room; the
    same cell returning little leaves the room unused, freed when it ends, no helper thread left."""
    k = fresh_kernel
    k.run("import numpy as np, threading\nn = 10_000_000\n" + TRANSFERS)
    again = "%%isolate --quiet\nimport time\ntime.sleep(0.3)\nback = np.arange(n, dtype=np.float64)"
    k.run(again)
    first = k.value("_transfers[-1]")
    assert first["pull_bytes"] == 80_000_000 and first["pull_room"] == 0  # nothing to go by yet
    k.run(again)
    second = k.value("_transfers[-1]")
    assert second["pull_room"] >= 80_000_000, second  # all of it faulted in while the cell slept
    assert k.value("(float(back[-1]), float(back[:1000].sum()), back.flags.writeable)") == (9_999_999.0, 499500.0, True)
    k.run("%%isolate --quiet\nimport time\ntime.sleep(0.3)\nother = np.ones(n)")
    assert k.value("_transfers[-1]")["pull_room"] == 0  # another cell: no room made for it

    kproc = psutil.Process(k.pid)
    k.run("n = 10\nimport gc; gc.collect()")
    rss = kproc.memory_info().rss
    peak = [0]
    running = threading.Thread(target=k.run, args=(again,))  # room for 80 MB while it sleeps
    running.start()
    while running.is_alive():
        peak[0] = max(peak[0], kproc.memory_info().rss)
        time.sleep(0.01)
    assert peak[0] > rss + (60 << 20), (rss, peak)  # the room was made...
    assert k.value("back.tolist()") == [float(i) for i in range(10)]  # ...and not needed
    assert k.value("_transfers[-1]") is None
    rooms = "[t.name for t in threading.enumerate() if t.name == 'nbisolate-room']"
    assert wait_until(lambda: k.value(rooms) == [])
    assert wait_until(lambda: kproc.memory_info().rss < rss + (30 << 20)), (rss, kproc.memory_info().rss)


def test_inputs_travel_through_shared_memory_where_the_kernel_may_not_write_into_its_worker(kernel):
    """Where the copy into the worker is refused (a ptrace policy, a seccomp profile; this
    kernel's user may, so the refusal is made to happen here), the buffers go with the
    answer through shared memory, and the cell sees the same inputs."""
    kernel.run(
        "import errno, numpy as np\nimport nbisolate.ship as _ship\n_real_place = _ship.place\n"
        "def _refused(pid, spans, buffers):\n"
        "    raise PermissionError(errno.EPERM, 'Operation not permitted')\n"
        "_ship.place = _refused\nrefused_in = np.arange(2_000_000)"
    )
    shm_before = shm_names()
    try:
        res = kernel.run(
            "%%isolate\n" + _WHERE_IN_WORKER + "last = int(refused_in[-1])\nwhere = _where(refused_in)"
        )
        assert res.ok, res.error_text
        assert kernel.value("last") == 1_999_999
        assert "memfd:nbisolate" in kernel.value("where")
    finally:
        kernel.run("_ship.place = _real_place\ndel refused_in")
    assert not new_segments(shm_before)


def test_a_rebound_result_frees_its_memory_at_once(kernel):
    """Rebinding a large result frees the old one's pages right away: nothing of the run
    that brought it (kept until the cyclic GC finds it) holds them, so the kernel never
    holds a result twice over."""
    kernel.run("import gc, weakref, numpy as np")
    kernel.run("gc.disable()")
    try:
        kernel.run("%%isolate\nrebound = np.ones(1_000_000)")
        kernel.run(
            "_view = rebound.base\nwhile not isinstance(_view, memoryview):\n    _view = _view.base\n"
            "_pages = weakref.ref(_view.obj)\ndel _view"
        )
        assert kernel.value("_pages() is not None") is True
        kernel.run("%%isolate\nrebound = np.zeros(1_000_000)")
        assert kernel.value("_pages() is None") is True
        assert kernel.value("float(rebound.sum())") == 0.0
    finally:
        kernel.run("gc.enable()")


def test_a_large_result_the_kernel_has_no_room_for_is_an_error_not_a_crash(fresh_kernel):
    """The kernel's data limit leaves no room for a 400 MB result read out of the worker
    (the template, started before, and so the worker keep theirs): the cell gets a
    MemoryError saying what to do, nothing is bound, the worker ends."""
    k = fresh_kernel
    k.run("import resource\nguard = 'kept'\n_limits = resource.getrlimit(resource.RLIMIT_DATA)")
    k.run("%%isolate\nwarm = 1")  # the template runs before the limit is lowered
    res = k.execute(
        "with open('/proc/self/status') as _f:\n"
        "    _kb = next(int(l.split()[1]) for l in _f if l.startswith('VmData:'))\n"
        "resource.setrlimit(resource.RLIMIT_DATA, (_kb * 1024 + (150 << 20), _limits[1]))\n"
        "try:\n"
        "    get_ipython().run_cell_magic('isolate', '', 'guard = bytearray(400 << 20)')\n"
        "finally:\n"
        "    resource.setrlimit(resource.RLIMIT_DATA, _limits)"
    )
    assert res.error is not None and res.error["ename"] == "MemoryError", res.error_text
    assert "the kernel ran out of memory receiving its results" in res.error["evalue"]
    assert k.value("guard") == "kept"
