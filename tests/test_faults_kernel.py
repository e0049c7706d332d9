"""Fault injection through real kernels: isolated cells never take the kernel down,
never hang, never leak.

Everything is checked from outside the kernel, as an operator would: psutil over
the kernel's descendants and over the whole machine (every process a test cell
starts carries a unique marker in its command line), the kernel's descriptor,
thread and RSS counts, ``/dev/shm`` and a private ``TMPDIR``.  Tests that kill,
restart or interrupt a kernel get a kernel of their own.
"""

from __future__ import annotations

import os
import resource
import signal
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psutil
import pytest

from .conftest import shm_held, shm_names, wait_until
from .kernel import CellResult, Kernel

TEMPLATE_MARK = "nbisolate.template"
SPARE_NAME = "nbisolate-spare"  # nbisolate.template.SPARE_NAME


def cell(code: str) -> str:
    return textwrap.dedent(code).strip("\n")


def new_mark() -> str:
    return f"nbisolate-fault-{uuid.uuid4().hex[:12]}"


def marked(mark: str) -> list[psutil.Process]:
    """Live processes anywhere on the machine whose command line carries ``mark``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and mark in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def describe(proc: psutil.Process) -> str:
    """A survivor, with what it takes to tell who should have killed it."""
    try:
        return f"{proc.pid} ppid={proc.ppid()} {proc.status()} {' '.join(proc.cmdline())[-120:]!r}"
    except psutil.Error as exc:
        return f"{proc.pid} ({exc})"


def workers_of(k: Kernel) -> list[psutil.Process]:
    """The kernel's descendants except the template process: workers and what they started."""
    try:
        procs = psutil.Process(k.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for proc in procs:
        try:
            if TEMPLATE_MARK in " ".join(proc.cmdline()) and proc.ppid() == k.pid:
                continue
            if proc.name() == SPARE_NAME:  # the template's spare: no worker until handed a cell
                continue
            if proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            pass
    return out


def tree_cell(mark: str, options: str = "", then: str = "") -> str:
    """A cell that starts a child in its group and a daemon that left it (setsid + double fork).

    Both ignore SIGINT and SIGTERM, so only a real SIGKILL ends them; both
    write their pid (one ``write``, so lines never interleave) to the inherited
    stdout, so the test knows them, and then a byte to a pipe the cell waits
    on, so the cell goes on (``then``) only once both are in place.
    """
    ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGINT, signal.SIG_IGN)"
    ready = "ready = int(sys.argv[1]); os.write(ready, b'.'); os.close(ready)"
    child = (
        f"import os, signal, sys, time\n{ignore}\n"
        f"os.write(1, b'child %d\\n' % os.getpid())\n{ready}\ntime.sleep(300)  # {mark}"
    )
    daemon = (
        "import os, signal, sys, time\nos.setsid()\nif os.fork():\n    os._exit(0)\n"
        f"{ignore}\nos.write(1, b'escapee %d\\n' % os.getpid())\n{ready}\ntime.sleep(300)  # {mark}"
    )
    return (
        f"%%isolate {options}\n"
        "import os, subprocess, sys, time\n"
        "r, w = os.pipe()\n"
        f"subprocess.Popen([sys.executable, '-c', {child!r}, str(w)], pass_fds=(w,))\n"
        f"subprocess.Popen([sys.executable, '-c', {daemon!r}, str(w)], pass_fds=(w,)).wait()\n"
        "os.close(w)\n"
        "got = b''\n"
        "while len(got) < 2 and (more := os.read(r, 2)):  # EOF: a grandchild died early\n"
        "    got += more\n"
        "print('worker', os.getpid(), flush=True)\n"
        f"{then}\n"
    )


def pids_in(text: str) -> dict[str, int]:
    found = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("worker", "child", "escapee") and parts[1].isdigit():
            found[parts[0]] = int(parts[1])
    return found


def run_and_act(
    k: Kernel,
    code: str,
    trigger: str | Callable[[CellResult], bool],
    action: Callable[[CellResult], None],
    timeout: float = 60.0,
) -> tuple[CellResult, float]:
    """Execute ``code``; call ``action(result so far)`` once ``trigger`` shows in its stdout.

    ``trigger`` is a string to find in the cell's stdout, or a predicate of the result so far.

    Returns what IOPub said and the time (from the request) the action ran.
    """
    fired_at = [-1.0]

    def watch(result: CellResult) -> None:
        ready = trigger(result) if callable(trigger) else trigger in result.stdout
        if fired_at[0] < 0 and ready:
            fired_at[0] = result.times[-1]
            action(result)

    result = k.execute(code, timeout=timeout, watch=watch)
    return result, fired_at[0]


def start_cell(k: Kernel, code: str, mark: str, processes: int = 2) -> str:
    """Send a :func:`tree_cell` without waiting; return once its whole tree is in place.

    Marked processes alone are not enough: the daemon's intermediate process
    carries the mark too, so the count can be reached before the daemon exists.
    The cell prints ``worker PID`` only after both grandchildren reported in.
    """
    msg_id = k.kc.execute(code)
    deadline = time.monotonic() + 30
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "the cell's processes never started"
        msg = k.kc.get_iopub_msg(timeout=remaining)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "error":
            raise AssertionError(f"the cell failed before its tree was in place: {msg['content']}")
        if msg["msg_type"] == "stream" and "worker " in msg["content"]["text"]:
            break
    assert len(marked(mark)) >= processes, "the cell's processes never started"
    return msg_id


@dataclass
class Usage:
    """What the kernel and the machine hold that an isolated cell could leak."""

    fds: int
    threads: int
    workers: int
    shm: int
    tmp_files: int
    memfds: int
    strays: int

    def minus(self, other: Usage) -> dict[str, int]:
        return {name: getattr(self, name) - getattr(other, name) for name in self.__dataclass_fields__}


def shm_in_use_elsewhere(k: Kernel) -> set[str]:
    """/dev/shm entries mapped or open in processes outside this kernel's tree."""
    ours = {k.pid} | {p.pid for p in psutil.Process(k.pid).children(recursive=True)}
    return shm_held(lambda proc: proc.pid not in ours)


def shm_left(k: Kernel, shm_before: set[str]) -> int:
    """/dev/shm entries made since ``shm_before`` that nobody outside the kernel's tree holds.

    Counted only if still there and still unheld a moment later: a test session
    running side by side makes and unlinks entries of its own (a named
    semaphore is a file for the instant between its creation and its unlink),
    while a leaked one stays.
    """
    def unheld() -> set[str]:
        new = shm_names() - shm_before
        return new - shm_in_use_elsewhere(k) if new else new

    left = unheld()
    if left:
        time.sleep(0.3)
        left &= unheld()
    return len(left)


def usage(k: Kernel, tmpdir: str, shm_before: set[str]) -> Usage:
    proc = psutil.Process(k.pid)
    memfds = 0
    for fd in os.listdir(f"/proc/{k.pid}/fd"):
        try:
            memfds += os.readlink(f"/proc/{k.pid}/fd/{fd}").startswith("/memfd:")
        except OSError:
            pass
    return Usage(
        fds=proc.num_fds(),
        threads=proc.num_threads(),
        workers=len(workers_of(k)),
        shm=shm_left(k, shm_before),
        tmp_files=sum(len(files) + len(dirs) for _, dirs, files in os.walk(tmpdir)),
        memfds=memfds,
        strays=len(marked(LEAK_MARK)),
    )


# Every process the mixed cells start carries this, so strays show machine-wide.
LEAK_MARK = new_mark()

# A mix of the cells a notebook meets: each kind once per round.
MIXED_CELLS = [
    "%%isolate\nok_value = 41 + 1",
    "%%isolate\nraise ValueError('expected failure')",
    "%%isolate --timeout 0.5\nimport time\ntime.sleep(30)",
    "%%isolate\nimport os\nos._exit(4)",
    "%%isolate\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "%%isolate\nprint('line\\n' * 2000)",
    tree_cell(LEAK_MARK),  # a child and a daemon, left running when the cell ends
    "%%isolate\nbig_back = bytearray(4 << 20)",
    "%%isolate\nn_in = len(big_in)",
    "%%isolate --mem 200M\nhog = bytearray(400 << 20)",
]


def run_mixed(k: Kernel, rounds: int) -> dict[str, int]:
    """Run ``rounds`` rounds of MIXED_CELLS; count the outcomes by error name."""
    outcomes: dict[str, int] = {}
    for _ in range(rounds):
        for code in MIXED_CELLS:
            res = k.execute(code, timeout=60)
            name = res.error["ename"] if res.error else ("ok" if res.ok else "failed")
            outcomes[name] = outcomes.get(name, 0) + 1
    return outcomes


@pytest.fixture(scope="module")
def kernel_tmp(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("kernel-tmpdir"))


@pytest.fixture(scope="module")
def kernel(kernel_tmp) -> Iterator[Kernel]:
    """This module's shared kernel, with a TMPDIR of its own so stray temp files show."""
    k = Kernel(env={"TMPDIR": kernel_tmp})
    try:
        k.run("%load_ext nbisolate")
        k.run("import numpy as np\nguard = 'kept'\nbig_in = np.ones(1 << 18)")
        yield k
    finally:
        k.shutdown()


# -- process trees --------------------------------------------------------------------
@pytest.mark.parametrize("how", ["done", "timeout", "stop"])
def test_nothing_the_cell_started_survives(kernel, how):
    """Done, timed out or stopped (the panel's Stop): the worker, its child and a daemon die."""
    mark = new_mark()
    if how == "done":
        code = tree_cell(mark)
    elif how == "timeout":
        code = tree_cell(mark, "--timeout 2", "time.sleep(60)")
    else:
        kernel.run("import threading, nbisolate.backends as _b\nthreading.Timer(2.0, _b.running.stop_all).start()")
        code = tree_cell(mark, "", "time.sleep(60)")
    res = kernel.execute(code)
    pids = pids_in(res.stdout)
    assert set(pids) == {"worker", "child", "escapee"}, res.stdout + res.stderr
    if how == "done":
        assert res.ok, res.error_text
    elif how == "timeout":
        assert res.error["ename"] == "IsolateTimeout"
    else:
        assert res.error["ename"] == "KeyboardInterrupt"
    assert wait_until(lambda: all(gone(pid) for pid in pids.values()), 5), pids
    assert wait_until(lambda: not marked(mark), 5)
    assert kernel.value("guard") == "kept"


# -- interrupt ------------------------------------------------------------------------
def test_interrupt_runs_finally_then_a_stubborn_cell_is_killed_once(fresh_kernel):
    k = fresh_kernel
    k.run("guard = 'kept'")
    res, fired = run_and_act(
        k,
        cell(
            """
            %%isolate
            import os, time
            guard = 'lost'
            try:
                print('worker', os.getpid(), flush=True)
                time.sleep(60)
            finally:
                print('cleanup ran', flush=True)
            """
        ),
        "worker",
        lambda _: k.interrupt(),
    )
    assert res.error["ename"] == "KeyboardInterrupt", res.error_text
    assert "cleanup ran" in res.stdout  # SIGINT first: the cell's finally ran and its output arrived
    assert res.reply_time - fired < 10
    assert len(res.of("error")) == 1
    assert wait_until(lambda: gone(pids_in(res.stdout)["worker"]), 5)

    # A cell that swallows KeyboardInterrupt is killed after the grace period, and
    # two presses of Interrupt still reach it as exactly one SIGINT.
    def interrupt_twice(_: CellResult) -> None:
        k.interrupt()
        time.sleep(0.3)
        k.interrupt()

    res, fired = run_and_act(
        k,
        cell(
            """
            %%isolate
            import os, time
            first = True
            while True:
                try:
                    if first:
                        first = False
                        print('worker', os.getpid(), flush=True)
                    time.sleep(60)
                except KeyboardInterrupt:
                    print('caught SIGINT, carrying on', flush=True)
            """
        ),
        "worker",
        interrupt_twice,
    )
    assert res.error["ename"] == "KeyboardInterrupt", res.error_text
    assert res.stdout.count("caught SIGINT") == 1, res.stdout
    assert 1.0 < res.reply_time - fired < 15
    assert len(res.of("error")) == 1
    assert wait_until(lambda: gone(pids_in(res.stdout)["worker"]), 5)
    assert k.value("guard") == "kept"
    assert k.run("%%isolate\nafter = 'fine'\nafter").result == {"text/plain": "'fine'"}


# -- crashes --------------------------------------------------------------------------
CRASHES = {
    "segfault": ("import ctypes\nctypes.string_at(0)", ["signal SIGSEGV", "crash in C code"]),
    "abort": ("import os\nos.abort()", ["signal SIGABRT", "abort()"]),
    "os._exit": ("import os\nos._exit(5)", ["exit code 5", "called os._exit()"]),
    "SIGKILL": (
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
        ["signal SIGKILL (9)", "often the out-of-memory killer"],
    ),
}


@pytest.mark.parametrize("name", list(CRASHES))
def test_crashes_are_explained_and_the_kernel_survives(kernel, name):
    code, expected = CRASHES[name]
    res = kernel.execute(f"%%isolate\nguard = 'lost'\n{code}")
    assert res.error["ename"] == "WorkerCrashed", res.error_text
    for text in expected:
        assert text in res.error["evalue"], res.error["evalue"]
    assert "the kernel is fine" in res.error["evalue"]
    assert kernel.value("guard") == "kept"
    assert kernel.run("%%isolate\n6 * 7").result == {"text/plain": "42"}


@pytest.mark.parametrize("call", ["sys.exit()", "sys.exit(3)", "sys.exit('bye now')", "raise SystemExit(5)"])
def test_sys_exit_shows_as_in_an_ordinary_cell_and_binds_nothing(kernel, call):
    """IPython catches SystemExit from a cell and shows it without a traceback; an isolated
    cell's worker exits with that status, and the kernel shows the same error where it ran."""
    cell = f"import sys\nguard = 'lost'\n{call}"
    plain = kernel.execute(cell.replace("guard = 'lost'", "plain_guard = 'set'"))
    kernel.run("guard = 'kept'")
    res = kernel.execute(f"%%isolate\n{cell}")
    assert res.error["ename"] == plain.error["ename"] == "SystemExit", res.error_text
    assert res.error["evalue"] == plain.error["evalue"], (res.error, plain.error)
    assert res.error["traceback"] == plain.error["traceback"], (res.error, plain.error)
    assert "bye now" not in res.stderr  # its argument is the error's value, as in IPython
    assert kernel.value("guard") == "kept"
    assert kernel.run("%%isolate\n6 * 7").result == {"text/plain": "42"}


# -- memory cap -----------------------------------------------------------------------
def test_mem_caps_the_worker_and_overflow_is_a_clear_memory_error(kernel):
    limits: list[int] = []

    def read_limit(res: CellResult) -> None:  # the cap as the operating system sees it
        limits.append(psutil.Process(pids_in(res.stdout)["worker"]).rlimit(resource.RLIMIT_DATA)[0])

    res, _ = run_and_act(
        kernel,
        "%%isolate --mem 300M\nimport os, time\nprint('worker', os.getpid(), flush=True)\ntime.sleep(1)",
        "worker",
        read_limit,
    )
    assert res.ok and limits == [300 * 1024 * 1024]

    # Ordinary imports and work fit under a few hundred MB.
    ok = kernel.run(
        "%%isolate --mem 300M\nimport numpy as np, pandas as pd\ncapped = float(np.ones(10**6).sum())\ncapped"
    )
    assert ok.result == {"text/plain": "1000000.0"}

    for code, detail in [
        ("hog = bytearray(2 * 10**9)", None),
        ("import numpy as np\nhog = np.ones(10**9)", "Unable to allocate"),
    ]:
        res = kernel.execute(f"%%isolate --mem 300M\nguard = 'lost'\n{code}")
        assert res.error["ename"] == "MemoryError", res.error_text
        evalue = res.error["evalue"]
        assert "ran out of memory: it is capped at 300.0 MB by --mem; raise --mem" in evalue, evalue
        if detail:
            assert detail in evalue
        assert "hog = " in "\n".join(res.error["traceback"])  # the cell's line that allocated
        assert kernel.value("guard") == "kept"

    res = kernel.execute("%%isolate --mem 200M\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert res.error["ename"] == "WorkerCrashed"
    assert "SIGKILL" in res.error["evalue"] and "200.0 MB by --mem" in res.error["evalue"]
    assert kernel.run("%%isolate\n1 + 1").result == {"text/plain": "2"}


# -- the worker never outlives its kernel ----------------------------------------------
@pytest.mark.parametrize(
    "how, options, body",
    [
        ("kill", "", "time.sleep(120)"),
        ("kill", "--mem 1G", "time.sleep(120)"),
        ("kill", "--mem 1G", "sum(range(10**13))"),
        ("restart", "", "time.sleep(120)"),
    ],
    ids=[
        "SIGKILL kernel, forked worker",
        "SIGKILL kernel, fresh-interpreter worker",
        "SIGKILL kernel, fresh-interpreter worker stuck in C holding the GIL",
        "restart kernel",
    ],
)
def test_workers_exit_when_their_kernel_goes(fresh_kernel, how, options, body):
    """A busy cell with a child and a daemon: all of it goes when the kernel does.

    Without ``--mem`` the worker is a fork of the template; with it, the
    template execs a fresh interpreter. Either way the worker's watchdog, or
    the template when the worker's main thread holds the GIL in C code (so
    its watchdog thread cannot run), cleans up alone.
    """
    k = fresh_kernel
    mark = new_mark()
    start_cell(k, tree_cell(mark, options, body), mark)
    tree = [p for p in workers_of(k)]
    assert len(tree) >= 3, tree  # the worker, its child and the daemon (now the worker's child)
    t0 = time.perf_counter()
    if how == "kill":
        os.kill(k.pid, signal.SIGKILL)
    else:
        k.km.restart_kernel(now=False)
    assert wait_until(lambda: not marked(mark) and all(gone(p.pid) for p in tree), 10), [
        describe(p) for p in tree if not gone(p.pid)
    ]
    elapsed = time.perf_counter() - t0
    print(f"\n{how} ({options or 'forked'}): the whole tree was gone {elapsed:.2f} s after")
    if how == "restart":
        k.kc.wait_for_ready(timeout=60)
        k.run("%load_ext nbisolate")
        assert k.run("%%isolate\n'after restart'").result == {"text/plain": "'after restart'"}


# -- floods and giants ----------------------------------------------------------------
class PeakRSS:
    """Samples a process's RSS in a thread; ``growth`` is the peak minus the start."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.base


@pytest.mark.parametrize(
    "code",
    [
        "for i in range(2_000_000):\n    print('x' * 50)",
        "print('x' * 100_000_000)",
        "import os\nfor i in range(100):\n    os.write(1, b'y' * 1_000_000)",
    ],
    ids=["100 MB in lines", "100 MB in one string", "100 MB to fd 1"],
)
def test_an_output_flood_is_cut_without_bloating_or_hanging_the_kernel(kernel, code):
    with PeakRSS(kernel.pid) as rss:
        res = kernel.execute(f"%%isolate\n{code}\nflood_done = True", timeout=120)
    assert res.ok, res.error_text
    assert len(res.stdout) == 10 * 1024 * 1024  # DEFAULT_MAX_OUTPUT, then nothing
    assert "MB of output was dropped: the limit is 10.0 MB per cell" in res.stderr
    dropped = float(res.stderr.split("nbisolate: ")[1].split(" MB")[0])
    assert 80 < dropped < 90, res.stderr
    assert kernel.value("flood_done") is True
    print(f"\nflood: {res.reply_time:.2f} s, kernel RSS peak +{rss.growth / 2**20:.0f} MB")
    assert res.reply_time < 60  # a hang guard, not a speed claim
    assert rss.growth < 200 * 2**20


def test_a_result_over_max_result_is_left_out_and_named(kernel):
    res = kernel.run(
        cell(
            """
            import nbisolate
            ns = {}
            nbisolate.run_isolated("huge = bytearray(8 << 20)\\nsmall = 'arrived'", ns, max_result="1M")
            print(sorted(ns))
            """
        )
    )
    assert res.stdout.strip() == "['small']"
    assert "result 'huge' was not copied back: its 8.0 MB" in res.stderr
    assert "over the result limit of 1.0 MB (max_result)" in res.stderr


def test_a_result_the_kernel_cannot_allocate_is_reported_not_fatal(fresh_kernel):
    """The kernel's data limit is lowered from outside while the cell runs; the worker,
    started before, builds a 400 MB result the kernel then cannot take in."""
    k = fresh_kernel
    k.run("guard = 'kept'")
    kproc = psutil.Process(k.pid)
    soft, hard = kproc.rlimit(resource.RLIMIT_DATA)

    def squeeze(_: CellResult) -> None:
        with open(f"/proc/{k.pid}/status") as f:
            data_kb = next(int(line.split()[1]) for line in f if line.startswith("VmData:"))
        kproc.rlimit(resource.RLIMIT_DATA, (data_kb * 1024 + (150 << 20), hard))

    try:
        res, _ = run_and_act(
            k,
            "%%isolate\nimport time\nprint('worker ready', flush=True)\ntime.sleep(1)\nguard = b'x' * (400 << 20)",
            "worker ready",
            squeeze,
        )
    finally:
        kproc.rlimit(resource.RLIMIT_DATA, (soft, hard))
    assert res.error["ename"] == "MemoryError", res.error_text
    assert "the kernel ran out of memory receiving its results" in res.error["evalue"]
    assert res.error["traceback"] == [f"MemoryError: {res.error['evalue']}"]  # one paragraph
    print(f"\n{res.error['traceback'][0]}")
    assert k.value("guard") == "kept"
    assert k.run("%%isolate\n'still fine'").result == {"text/plain": "'still fine'"}
    assert wait_until(lambda: not workers_of(k), 5)


# -- no leaks -------------------------------------------------------------------------
def test_forty_mixed_cells_leave_nothing_behind(kernel, kernel_tmp):
    """Normal, failing, timing-out, crashing, flooding and child-starting cells, with big
    inputs and results through shared memory: the kernel's fds, threads and children,
    /dev/shm and TMPDIR are where they were."""
    shm_before = shm_names()
    run_mixed(kernel, 1)  # warm caches: the template, shared-memory arenas, IOPub
    time.sleep(0.5)
    base = usage(kernel, kernel_tmp, shm_before)
    outcomes = run_mixed(kernel, 4)
    assert outcomes == {
        "ok": 20, "ValueError": 4, "IsolateTimeout": 4, "WorkerCrashed": 8, "MemoryError": 4,
    }, outcomes
    assert wait_until(lambda: not usage(kernel, kernel_tmp, shm_before).minus(base).get("workers"), 5)
    # Warm shared-memory arenas are kept a while for speed; a cell must not add to them.
    assert wait_until(lambda: all(v <= 0 for v in usage(kernel, kernel_tmp, shm_before).minus(base).values()), 10), (
        usage(kernel, kernel_tmp, shm_before).minus(base)
    )
    end = usage(kernel, kernel_tmp, shm_before)
    assert (end.shm, end.tmp_files) == (0, 0), end


# -- security -------------------------------------------------------------------------
def test_the_channel_is_a_private_local_socketpair(kernel, kernel_tmp):
    def listening(pid: int) -> set[object]:
        conns = psutil.Process(pid).net_connections("inet")
        return {c.laddr for c in conns if c.status in (psutil.CONN_LISTEN, psutil.CONN_NONE)}

    kernel_ports = listening(kernel.pid)  # ZMQ's, from before the cell
    seen: dict[str, object] = {}

    def inspect(res: CellResult) -> None:
        pids = pids_in(res.stdout)
        worker, child = psutil.Process(pids["worker"]), psutil.Process(pids["child"])
        seen["worker_inet"] = worker.net_connections("inet")
        seen["worker_unix"] = worker.net_connections("unix")
        seen["child_unix"] = child.net_connections("unix")
        seen["kernel_ports"] = listening(kernel.pid)
        seen["worker_files"] = [f.path for f in worker.open_files()]

    code = cell(
        """
        %%isolate
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, '-c', 'import os, time; os.write(1, b"child %d" % os.getpid() + bytes([10])); time.sleep(30)'])
        time.sleep(0.3)
        print('worker', os.getpid(), flush=True)
        time.sleep(1)
        child.kill()
        """
    )
    res, _ = run_and_act(kernel, code, lambda r: {"worker", "child"} <= set(pids_in(r.stdout)), inspect)
    assert res.ok, res.error_text
    assert seen, res.stdout + res.stderr
    assert seen["worker_inet"] == []  # no TCP or UDP port, listening or not
    assert seen["kernel_ports"] == kernel_ports  # and the kernel opened none for it
    # Its one socket is half of an unnamed socketpair: no path anyone could connect to.
    assert seen["worker_unix"] and all(not c.laddr and not c.raddr for c in seen["worker_unix"])
    assert seen["child_unix"] == []  # the cell's own processes do not inherit the channel
    assert not [p for p in seen["worker_files"] if p.startswith(kernel_tmp)]
    assert not os.listdir(kernel_tmp)


# -- bad input ------------------------------------------------------------------------
BAD_INPUT = {
    "unknown option": ("%%isolate --bogus\nx = 1", ["--bogus", "Usage: %%isolate"]),
    "zero timeout": ("%%isolate --timeout 0\nx = 1", ["--timeout", "above zero"]),
    "negative timeout": ("%%isolate --timeout -5\nx = 1", ["--timeout", "above zero"]),
    "nan timeout": ("%%isolate --timeout nan\nx = 1", ["--timeout", "above zero"]),
    "timeout not a number": ("%%isolate --timeout soon\nx = 1", ["soon"]),
    "unreadable size": ("%%isolate --mem abc\nx = 1", ["cannot read size 'abc'", "like 500M or 2G"]),
    "negative size": ("%%isolate --mem=-1G\nx = 1", ["'-1G' must be more than zero"]),
    "negative size as option": ("%%isolate --mem -1G\nx = 1", ["--mem", "Usage: %%isolate"]),
    "zero size": ("%%isolate --mem 0\nx = 1", ["must be more than zero"]),
    "size too small": ("%%isolate --mem 1K\nx = 1", ["--mem 1K is too small", "32M"]),
    "--out without names": ("%%isolate --out\nx = 1", ["--out", "Usage: %%isolate"]),
    "no such variable": ("%%isolate no_such_var\nx = 1", ["no_such_var", "nothing ran"]),
}


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_bad_input_is_a_one_line_usage_error_and_nothing_runs(kernel, name):
    code, expected = BAD_INPUT[name]
    assert wait_until(lambda: not workers_of(kernel), 5)
    started: set[int] = set()
    watching = threading.Event()
    watching.set()

    def watch() -> None:  # every process the kernel starts while the cell runs
        while watching.is_set():
            started.update(p.pid for p in workers_of(kernel))
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        res = kernel.execute(code)
    finally:
        watching.clear()
        watcher.join()
    assert not res.ok
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("UsageError: %%isolate"), res.stderr + res.error_text
    for text in expected:
        assert text in lines[0], lines[0]
    assert not started, f"a worker started: {started}"
    assert kernel.value("'x' in globals()") is False


def test_max_result_flag_of_the_magic(kernel):
    kernel.run("mr_small = 'before'")
    res = kernel.run("%%isolate --max-result 1M\nmr_huge = bytearray(4 << 20)\nmr_small = 'after'")
    assert "result 'mr_huge' was not copied back" in res.stderr and "(max_result)" in res.stderr
    assert kernel.value("(mr_small, 'mr_huge' in globals())") == ("after", False)
    bad = kernel.execute("%%isolate --max-result lots\nx = 1")
    assert not bad.ok and "cannot read size 'lots'" in bad.stderr
