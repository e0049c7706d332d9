"""Big data through a real kernel: shared memory both ways, nothing left behind."""

from __future__ import annotations

import os

import psutil

from .conftest import wait_until


def shm_names() -> set[str]:
    return set(os.listdir("/dev/shm"))


def new_shm(before: set[str]) -> set[str]:
    """Segments that appeared since ``before``: moving arrays must create none (they travel
    through anonymous memfds). multiprocessing's named semaphores (``sem.mp-*``) are left out:
    they come and go with its resource tracker, and tests/test_pools_kernel.py checks that
    none outlives a cell."""
    return {n for n in shm_names() - before if not n.startswith("sem.mp-")}


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
    assert not new_shm(before)


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
    assert not new_shm(shm_before)


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
