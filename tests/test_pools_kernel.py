"""The user's own process pools, through a real kernel: in isolated cells, and with ``mp=on``.

Each pool kind (multiprocessing ``Pool``, ``concurrent.futures.ProcessPoolExecutor``,
``multiprocess``, joblib's loky backend) on each start method this platform
has, with a notebook function, a lambda, a closure and a class whose
instances come back as the notebook's own class. A child that cannot load its
task fails the cell in seconds with a message naming it; nothing the cell's
multiprocessing made (processes, named semaphores, shared memory) outlives it.
"""

from __future__ import annotations

import multiprocessing
import shutil
import time
import uuid

import psutil
import pytest

from .conftest import loaded_kernel, mp_folders, new_shm, shm_names, wait_until
from .kernel import Kernel

METHODS = multiprocessing.get_all_start_methods()

DEFINITIONS = """
k = 3
def sq(v):
    return v * v
def make(n):
    def add(v):
        return v + n
    return add
add = make(10)
class Box:
    def __init__(self, v):
        self.v = v
def box(v):
    return Box(v)
import functools
@functools.lru_cache
def memo(v):
    return -v
"""

# One cell per pool kind: function, lambda, closure, class; `ctx` is the start method's context.
POOL_CELLS = {
    "multiprocessing": """
import multiprocessing
ctx = multiprocessing.get_context({method!r}) if {method!r} else multiprocessing
with ctx.Pool(2) as pool:
    r = (pool.map(sq, range(4)), pool.map(lambda v: v * k, range(3)), pool.map(add, range(2)),
         pool.map(box, range(2)), pool.map(memo, range(2)))
""",
    "concurrent.futures": """
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
ctx = multiprocessing.get_context({method!r}) if {method!r} else None
with ProcessPoolExecutor(2, mp_context=ctx) as ex:
    r = (list(ex.map(sq, range(4))), list(ex.map(lambda v: v * k, range(3))),
         list(ex.map(add, range(2))), list(ex.map(box, range(2))), list(ex.map(memo, range(2))))
""",
    "multiprocess": """
import multiprocess
ctx = multiprocess.get_context({method!r}) if {method!r} else multiprocess
with ctx.Pool(2) as pool:
    r = (pool.map(sq, range(4)), pool.map(lambda v: v * k, range(3)), pool.map(add, range(2)),
         pool.map(box, range(2)), pool.map(memo, range(2)))
""",
    "joblib": """
from joblib import Parallel, delayed
run = Parallel(n_jobs=2, backend="loky")
r = (run(delayed(sq)(v) for v in range(4)), run(delayed(lambda v: v * k)(v) for v in range(3)),
     run(delayed(add)(v) for v in range(2)), run(delayed(box)(v) for v in range(2)),
     # not memo: loky sends tasks with cloudpickle, which names an lru_cache'd notebook
     # function instead of copying it, and fails on it in any notebook
     [memo(v) for v in range(2)])
""",
}
RESULT = "result = (r[0], r[1], r[2], [b.v for b in r[3]], all(type(b) is Box for b in r[3]), list(r[4]))"
EXPECTED = ([0, 1, 4, 9], [0, 3, 6], [10, 11], [0, 1], True, [0, -1])


def _cases() -> list[tuple[str, str | None]]:
    cases: list[tuple[str, str | None]] = []
    for kind in ("multiprocessing", "concurrent.futures", "multiprocess"):
        cases.append((kind, None))  # the default start method of this Python
        cases.extend((kind, method) for method in METHODS)
    cases.append(("joblib", None))
    return cases


# What multiprocessing and loky keep running in a kernel by design, between pools: the
# forkserver, resource trackers, loky's reusable workers. Only an ordinary cell (mp=on) has them.
KERNEL_HELPERS = ("forkserver import main", "resource_tracker import main", "loky")


def _leftovers(k: Kernel, kernel_helpers: bool = False) -> list[str]:
    """Processes under the kernel other than the template (and the kernel's own helpers)."""
    out = []
    for proc in psutil.Process(k.pid).children(recursive=True):
        try:  # a process may end between any two of these reads
            cmd = " ".join(proc.cmdline())
            if "nbisolate.template" in cmd:
                continue
            if kernel_helpers and any(h in cmd for h in KERNEL_HELPERS):
                continue
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        out.append(f"{proc.pid} {cmd[:120]}")
    return out


def _workers_gone(k: Kernel, kernel_helpers: bool = False) -> bool:
    return wait_until(lambda: not _leftovers(k, kernel_helpers), 10)


@pytest.mark.parametrize(("kind", "method"), _cases())
def test_pools_work_inside_an_isolated_cell(kernel, kind, method):
    before = mp_folders()
    cell = "%%isolate --timeout 90 --quiet\n" + DEFINITIONS + POOL_CELLS[kind].format(method=method) + RESULT
    res = kernel.execute(cell, timeout=120)
    assert res.ok, res.error_text
    assert kernel.value("result") == EXPECTED
    assert _workers_gone(kernel), _leftovers(kernel)
    # The worker removes the folders its pools made as it ends, just after the cell's reply.
    assert wait_until(lambda: not mp_folders() - before, 10), mp_folders() - before


@pytest.fixture(scope="module")
def mp_kernel():
    """A kernel of their own for ordinary cells: the forkserver and loky's workers stay in it."""
    pytest.importorskip("joblib")
    before = mp_folders()
    with loaded_kernel() as k:
        yield k
    # The kernel's own forkserver folders: ipykernel's shutdown ends the kernel before
    # multiprocessing's exit handler removes them (an ordinary notebook's leave them too).
    for folder in mp_folders() - before:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize(("kind", "method"), _cases())
def test_pools_work_in_ordinary_cells_with_mp_on(mp_kernel, kind, method):
    on = mp_kernel.run("%isolate_config mp=on")
    assert "by value" in on.stdout and "mp=off" in on.stdout
    try:
        mp_kernel.run(DEFINITIONS)
        res = mp_kernel.execute(POOL_CELLS[kind].format(method=method) + RESULT, timeout=120)
        assert res.ok, res.error_text
        assert mp_kernel.value("result") == EXPECTED
    finally:
        mp_kernel.run("%isolate_config mp=off")
    assert _workers_gone(mp_kernel, kernel_helpers=True), _leftovers(mp_kernel, True)


def test_mp_is_off_by_default_and_turns_off_cleanly(mp_kernel):
    kernel = mp_kernel
    assert "mp=off" in kernel.run("%isolate_config").stdout.split()
    kernel.run("%isolate_config mp=on")
    assert "mp=on" in kernel.run("%isolate_config").stdout.split()
    off = kernel.run("%isolate_config mp=off")
    assert "back to its own pickling" in off.stdout
    assert "mp=off" in kernel.run("%isolate_config").stdout.split()
    # Off means multiprocessing's own behaviour again: the notebook function fails under spawn.
    kernel.run("import multiprocessing, pickle\ndef nb_fn(v):\n    return v")
    res = kernel.execute(
        "from multiprocessing.reduction import ForkingPickler\n"
        "assert 'reducer_override' not in vars(ForkingPickler)\n"
        "import multiprocessing.spawn as s\n"
        "assert not getattr(s.get_preparation_data, '_nbisolate', False)\n"
    )
    assert res.ok, res.error_text
    bad = kernel.execute("%isolate_config mp=maybe")
    assert "mp=on or mp=off" in bad.stderr


def test_enable_multiprocessing_is_there_for_scripts(mp_kernel):
    kernel = mp_kernel
    res = kernel.run(
        "import nbisolate\nsaid = nbisolate.enable_multiprocessing()\n"
        "back = nbisolate.disable_multiprocessing()\nprint(said)\nprint(back)"
    )
    assert "ForkingPickler" in res.stdout and "back to its own pickling" in res.stdout


@pytest.mark.parametrize("method", [m for m in ("spawn", "forkserver") if m in METHODS])
@pytest.mark.parametrize("kind", ["Pool", "ProcessPoolExecutor"])
def test_a_child_that_cannot_load_its_task_fails_the_cell_in_seconds(kernel, kind, method):
    # A module made at run time is pickled by name; a fresh interpreter cannot import it.
    start = "with multiprocessing.get_context({m!r}).Pool(2) as pool:\n    out = pool.map(ghost.f, range(3))"
    if kind == "ProcessPoolExecutor":
        start = (
            "from concurrent.futures import ProcessPoolExecutor\n"
            "with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context({m!r})) as ex:\n"
            "    out = list(ex.map(ghost.f, range(3)))"
        )
    cell = (
        "%%isolate --timeout 60 --quiet\n"
        "import multiprocessing, sys, types\n"
        "ghost = types.ModuleType('ghost')\nsys.modules['ghost'] = ghost\n"
        "exec('def f(v):\\n    return v', ghost.__dict__)\n" + start.format(m=method)
    )
    t0 = time.monotonic()
    res = kernel.execute(cell, timeout=90)
    took = time.monotonic() - t0
    assert not res.ok
    assert took < 15, f"took {took:.1f} s"
    text = res.error_text
    # The child's report stops the cell, or (when the executor noticed the death first) is
    # added to its BrokenProcessPool: either way the message says which child and why.
    assert "PoolChildError" in text or "BrokenProcessPool" in text, text
    assert "could not load its task" in text and "'ghost'" in text
    assert "Fix:" in text and "make it importable" in text
    assert "Worker" in text or "Process" in text  # the child's name
    assert _workers_gone(kernel), _leftovers(kernel)


def test_a_pool_that_keeps_respawning_broken_workers_fails_the_cell(kernel):
    cell = (
        "%%isolate --timeout 60 --quiet\n"
        "import multiprocessing\n"
        "def init():\n    raise RuntimeError('no database here')\n"
        "with multiprocessing.get_context('spawn').Pool(2, initializer=init) as pool:\n"
        "    out = pool.map(abs, range(3))\n"
    )
    t0 = time.monotonic()
    res = kernel.execute(cell, timeout=90)
    assert not res.ok and time.monotonic() - t0 < 15
    assert "PoolChildError" in res.error_text and "no database here" in res.error_text
    assert "SpawnPoolWorker" in res.error_text and "initializer" in res.error_text
    assert _workers_gone(kernel), _leftovers(kernel)


def test_a_process_whose_target_cannot_load_fails_the_cell(kernel):
    cell = (
        "%%isolate --timeout 60 --quiet\n"
        "import multiprocessing, sys, types\n"
        "ghost = types.ModuleType('ghost')\nsys.modules['ghost'] = ghost\n"
        "exec('def f():\\n    pass', ghost.__dict__)\n"
        "p = multiprocessing.get_context('spawn').Process(target=ghost.f)\n"
        "p.start()\np.join()\nimport time\ntime.sleep(30)\n"
    )
    t0 = time.monotonic()
    res = kernel.execute(cell, timeout=90)
    assert not res.ok and time.monotonic() - t0 < 15
    assert "could not load the process it should run" in res.error_text
    assert _workers_gone(kernel), _leftovers(kernel)


OPEN_FILE_HOLDER = """
class Genome:
    def __init__(self, path):
        self.fh = open(path, "rb")
class Embedding:
    def __init__(self, path):
        self.genome = Genome(path)
        self.dim = 4
def embed(i, e):
    return i * e.dim
"""


@pytest.mark.parametrize("where", ["isolated", "ordinary"])
def test_a_task_holding_an_open_file_names_the_member_and_the_fix(kernel, mp_kernel, where, tmp_path):
    """The DataLoader story: the pool cannot pickle a task, and the error says which member of
    which object holds the file, not only the file's type."""
    data = tmp_path / "genome.bin"
    data.write_bytes(b"ACGT")
    k = kernel if where == "isolated" else mp_kernel
    k.run(OPEN_FILE_HOLDER + f"emb = Embedding({str(data)!r})")
    body = (
        "from multiprocessing import get_context\n"
        "with get_context('spawn').Pool(1) as pool:\n"
        "    out = pool.starmap(embed, [(1, emb)])\n"
    )
    if where == "isolated":
        body = "%%isolate --timeout 60\n" + body
    else:
        k.run("%isolate_config mp=on")
    try:
        res = k.execute(body, timeout=90)
    finally:
        if where == "ordinary":
            k.run("%isolate_config mp=off")
    assert not res.ok
    text = res.error_text + res.stderr
    assert "cannot pickle" in text and "BufferedReader" in text  # Python's own words vary
    assert "Embedding.genome.fh is a _io.BufferedReader" in text and "Fix:" in text
    k.run("emb.genome.fh.close()")


SEMAPHORE_CELL = """%%isolate {opts} --quiet --out x
import multiprocessing, time
from multiprocessing import shared_memory
ctx = multiprocessing.get_context('spawn')
q = ctx.Queue()
lock = ctx.Lock()
seg = shared_memory.SharedMemory(name={segment!r}, create=True, size=4096)
with ctx.Pool(1) as pool:
    pool.map(abs, range(2))
{tail}
"""


def _segment() -> str:
    """A name for the cell's shared memory that no other test run side by side makes."""
    return f"psm_nbi_{uuid.uuid4().hex[:12]}"


@pytest.mark.parametrize(
    ("opts", "tail", "ok"),
    [
        ("", "x = 1", True),
        ("", "raise ValueError('the cell failed')", False),
        ("--timeout 3", "time.sleep(60)", False),
        # The worker lives through SIGTERM, so the grace ends in a kill of the whole tree:
        # the resource tracker must still get to unlink the segment.
        ("--timeout 3", "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)", False),
    ],
    ids=["success", "failure", "timeout", "timeout-ignoring-sigterm"],
)
def test_semaphores_and_shared_memory_do_not_outlive_the_cell(kernel, opts, tail, ok):
    before_sem, segment = shm_names("sem.mp-"), _segment()
    res = kernel.execute(SEMAPHORE_CELL.format(opts=opts, tail=tail, segment=segment), timeout=60)
    assert res.ok is ok, res.error_text
    assert wait_until(lambda: not new_shm(before_sem, "sem.mp-") and not shm_names(segment), 20), (
        new_shm(before_sem, "sem.mp-"), shm_names(segment)
    )
    assert _workers_gone(kernel), _leftovers(kernel)


def test_stop_cleans_up_semaphores_too(fresh_kernel):
    before_sem, segment = shm_names("sem.mp-"), _segment()
    fresh_kernel.kc.execute(
        SEMAPHORE_CELL.format(opts="", tail="print('ready', flush=True)\ntime.sleep(60)", segment=segment)
    )
    deadline = time.monotonic() + 30
    seen = ""
    while "ready" not in seen and time.monotonic() < deadline:
        msg = fresh_kernel.kc.get_iopub_msg(timeout=30)
        if msg["msg_type"] == "stream":
            seen += msg["content"]["text"]
    assert "ready" in seen
    fresh_kernel.interrupt()
    assert wait_until(lambda: not new_shm(before_sem, "sem.mp-") and not shm_names(segment), 20), (
        new_shm(before_sem, "sem.mp-"), shm_names(segment)
    )
    assert _workers_gone(fresh_kernel), _leftovers(fresh_kernel)


def test_pytorch_dataloader_workers_under_spawn(kernel):
    pytest.importorskip("torch", reason="torch is not installed here (pip install torch for this test)")
    cell = (
        "%%isolate --timeout 120 --quiet\n"
        "import torch\nfrom torch.utils.data import DataLoader, Dataset\n"
        "class Squares(Dataset):\n    def __len__(self):\n        return 8\n"
        "    def __getitem__(self, i):\n        return torch.tensor(i * i)\n"
        "loader = DataLoader(Squares(), batch_size=4, num_workers=2, multiprocessing_context='spawn')\n"
        "batches = [b.tolist() for b in loader]\n"
    )
    res = kernel.execute(cell, timeout=180)
    assert res.ok, res.error_text
    assert kernel.value("batches") == [[0, 1, 4, 9], [16, 25, 36, 49]]
    assert _workers_gone(kernel), _leftovers(kernel)


def _shown(res) -> str:
    """The text of what a cell showed: its result, else its last display."""
    data = res.result if res.result is not None else res.displays[-1]["data"]
    return data["text/plain"]


def test_pickle_check_flags_the_main_trap_with_the_fix_that_applies(mp_kernel):
    mp_kernel.run("%isolate_config mp=off")
    mp_kernel.run("def to_pool(v):\n    return v\nclass Rows:\n    pass\nrows = Rows()")
    report = _shown(mp_kernel.run("%pickle_check to_pool rows"))
    assert "FAILS under spawn" in report and "Can't get attribute" in report
    assert "%isolate_config mp=on" in report and "%%isolate" in report
    assert "rows" in report and "Rows" in report  # an instance: flagged through its class
    mp_kernel.run("%isolate_config mp=on")
    try:
        report = _shown(mp_kernel.run("%pickle_check to_pool"))
        assert "mp=on` is in effect in this kernel" in report
    finally:
        mp_kernel.run("%isolate_config mp=off")
