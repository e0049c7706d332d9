"""The path of a cell from the magic to a running worker, and back, kept short without
giving up isolation: a spare worker that prepared itself but ran no cell, the run
message queued before the worker exists, the phases that travel with the next
message, the reader threads kept for the next cell, and a clear error when no
worker can be started at all.

Speed itself is measured in ``benchmarks/bench_trivial.py``; these tests pin
that each shortcut keeps the behaviour it replaced.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import psutil
import pytest

from nbisolate.events import Event
from nbisolate.runner import CellRun, run_isolated
from nbisolate.supervisor import QUEUE_BYTES, _Threads

from .conftest import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPARE_NAME = "nbisolate-spare"  # nbisolate.template.SPARE_NAME
SPARES = 2  # nbisolate.template.SPARES


@pytest.fixture(scope="module", autouse=True)
def _template_closed():
    """Runs below start this process's template; it must not outlive the module."""
    yield
    from nbisolate.supervisor import launcher

    launcher.close()


def _spares_idle(template_pid: int, quiet: float = 0.3) -> bool:
    """True once every spare spent no CPU for ``quiet`` seconds: it is done warming up and waits."""
    def spent() -> list[float] | None:
        try:
            return [sum(p.cpu_times()[:2]) for p in _spares_of(template_pid)]
        except psutil.Error:
            return None

    before = spent()
    time.sleep(quiet)
    return before is not None and before == spent()


def _spares_of(template_pid: int) -> list[psutil.Process]:
    try:
        children = psutil.Process(template_pid).children()
    except psutil.Error:
        return []
    spares = []
    for child in children:
        try:
            if child.name() == SPARE_NAME:
                spares.append(child)
        except psutil.Error:
            pass
    return spares


def test_a_spare_prepares_itself_but_its_cell_finds_a_fresh_main():
    """The spare starts its watchdog thread and rehearses a cell on a value of its own
    before any cell arrives; the cell it is handed still sees nothing but its inputs."""
    from nbisolate.supervisor import launcher

    ns: dict[str, object] = {"given": 5}
    run_isolated("first = given", ns)  # the template is up and has forked a spare
    assert wait_until(lambda: len(_spares_of(launcher.pid)) == SPARES, 10)
    spares = _spares_of(launcher.pid)
    # Waiting for its cell, each already runs its watchdog thread: no thread start on the cell's path.
    for spare in spares:
        assert wait_until(lambda spare=spare: spare.num_threads() == 2, 10), spare.num_threads()
    run_isolated(
        "seen = sorted(k for k in globals() if not k.startswith('__'))\n"
        "used = given\n"
        "import builtins, sys\n"
        "me = __import__('os').getpid()\n"
        "underscore = hasattr(builtins, '_')\n"
        "main_is_ours = sys.modules['__main__'].__dict__ is globals()\n",
        ns,
    )
    assert ns["me"] in {spare.pid for spare in spares}  # this cell was handed to a spare
    assert ns["seen"] == ["given"]  # its inputs alone: the rehearsal left nothing
    assert ns["underscore"] is False and ns["main_is_ours"] is True


@pytest.mark.parametrize(
    "value",
    [
        7,  # quick: prepared in the waiting thread, the run message queued before the fork
        "x" * (QUEUE_BYTES * 3),  # too big to queue: the reader thread sends it
        bytes(3 << 20),  # in the pickle, 3 MB: the reader thread sends it
        np.arange(3 << 17, dtype=np.int64),  # large buffers: the kernel copies them into the worker
    ],
    ids=["queued", "in-band", "in-band-large", "large-buffers"],
)
def test_every_size_of_run_message_reaches_the_worker(value):
    ns: dict[str, object] = {"value": value}
    run_isolated("back = value\nsize = len(value) if not isinstance(value, int) else value", ns)
    assert np.array_equal(ns["back"], value) if isinstance(value, np.ndarray) else ns["back"] == value
    assert ns["size"] == (value if isinstance(value, int) else len(value))


@pytest.mark.parametrize(
    "source",
    ["small = 1", "big = list(range(100_000))", "print('out')\nsmall = 2"],
    ids=["quick result", "slow result", "output"],
)
def test_phases_arrive_in_order_before_the_result(source):
    """Phases held back to travel with the next message still come in order, after
    ``started`` and before the result, whatever the cell returns or prints."""
    heard: list[Event] = []
    run = CellRun(source, {})
    run.listeners.append(heard.append)
    run.prepare()
    run.run_sync()
    kinds = [e.kind if e.kind != "phase" else f"phase {e.data[0]}" for e in heard]
    worker = [k for k in kinds if k in ("started", "phase start", "phase load", "phase run", "result")]
    assert worker == ["started", "phase start", "phase load", "phase run", "result"], kinds
    assert all(seconds >= 0 for seconds in run.phases.values()), run.phases


def test_what_one_read_brings_is_passed_on_together(monkeypatch):
    """The run phase travels in the same write as the result: both reach the waiting thread
    in one batch, after both were read, rather than one wake-up each while the reader parses."""
    from nbisolate import wire

    reads = [0]
    recv = wire.Channel.recv

    def counting(self: wire.Channel):
        reads[0] += 1
        return recv(self)

    monkeypatch.setattr(wire.Channel, "recv", counting)
    passed: list[tuple[str, int]] = []
    items: queue.SimpleQueue = queue.SimpleQueue()

    def put(item: object) -> None:  # in the reader thread, as each event is passed on
        if isinstance(item, Event):
            passed.append((item.kind if item.kind != "phase" else f"phase {item.data[0]}", reads[0]))
        items.put(item)

    run = CellRun("small = 1", {})
    run.prepare()
    run.begin(put)
    while run.busy:
        run.feed(items.get(timeout=60))
    run.outcome()
    run.done(None)
    at = dict(passed)
    assert at["phase run"] == at["result"], passed


def test_the_reader_threads_are_kept_for_the_next_job_and_then_end():
    threads = _Threads()
    threads.IDLE_SECONDS = 0.5
    ran: list[tuple[str, int]] = []
    done = threading.Event()

    def task(label: str) -> None:
        ran.append((label, threading.get_ident()))
        if label == "second":
            done.set()

    threads.run("nbisolate-test-a", task, "first")
    assert wait_until(lambda: len(ran) == 1 and threads._idle == 1, 5)
    threads.run("nbisolate-test-b", task, "second")
    assert done.wait(5)
    assert ran[0][1] == ran[1][1]  # the same thread ran both: no new thread for the second

    # Jobs that overlap get threads of their own; only IDLE_THREADS wait afterwards.
    release = threading.Event()
    started = threading.Semaphore(0)

    def blocking(_: str) -> None:
        started.release()
        release.wait(5)

    for i in range(4):
        threads.run(f"nbisolate-test-{i}", blocking, str(i))
    for _ in range(4):
        assert started.acquire(timeout=5)
    names = {t.name for t in threading.enumerate()}
    assert {f"nbisolate-test-{i}" for i in range(4)} <= names  # named after their job
    release.set()
    assert wait_until(lambda: threads._idle == threads.IDLE_THREADS, 5)
    # Idle for IDLE_SECONDS, they end: nothing stays in the kernel for ever.
    assert wait_until(lambda: threads._idle == 0, 5)
    assert wait_until(lambda: not any(t.name == "nbisolate-idle" for t in threading.enumerate()), 5)


NO_WORKER = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {root!r})
    from nbisolate.errors import IsolateError
    from nbisolate.runner import run_isolated
    from nbisolate.supervisor import launcher

    ns = {{}}
    run_isolated("before = 1", ns)  # the template is up
    template = launcher.pid
    os.kill(template, signal.SIGSTOP)  # it can no longer answer: the cell falls back to a spawn
    for _ in range(200):  # stopped for sure before the cell (a signal is delivered, not done, by kill)
        try:
            with open(f"/proc/{{template}}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("T", "Z"):
                    break
        except FileNotFoundError:  # found stopped by the kernel side already, and killed
            break
        time.sleep(0.005)
    sys.executable = "/nonexistent/python"  # which fails too
    t0 = time.monotonic()
    try:
        run_isolated("after = 2", ns)
    except IsolateError as exc:
        print("raised", type(exc).__name__, exc)
    print("bound", sorted(ns))
    print("seconds", round(time.monotonic() - t0, 1))
    for _ in range(100):  # killed (a zombie until its reader reaps it) or reaped
        try:
            with open(f"/proc/{{template}}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "X"
        if state in ("Z", "X"):
            break
        time.sleep(0.05)
    print("template", "gone" if state in ("Z", "X") else "alive")
    launcher.close()
    """
)


def test_when_no_worker_can_be_started_the_cell_says_so_and_binds_nothing(tmp_path):
    """The template stopped and no interpreter to spawn: the fork is waited for in the
    reader thread, and its failure still reaches the cell as a clear error."""
    out = subprocess.run(
        [sys.executable, "-c", NO_WORKER.format(root=ROOT)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    raised = next(line for line in lines if line.startswith("raised"))
    assert raised.startswith("raised IsolateError could not start the isolated worker process")
    assert "nothing ran" in raised and "run the cell again" in raised
    assert "bound ['before']" in lines
    assert float(next(line for line in lines if line.startswith("seconds")).split()[1]) < 10
    assert "template gone" in lines  # found stopped, it was killed (and said so)



def test_a_cell_runs_once_when_the_template_answers_late(tmp_path):
    """The cell was queued in its channel for a worker the template handed it only after
    the kernel stopped waiting: the kernel took it back, so only the spawned worker ran it."""
    from nbisolate.supervisor import FORK_SECONDS, launcher

    (tmp_path / "slow_import_pkg.py").write_text("import time\ntime.sleep(7)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        ns: dict[str, object] = {"log": str(tmp_path / "ran.txt")}
        run_isolated("ready = 1", ns)  # the template is up
        launcher.preload(["slow_import_pkg"])  # it imports for 7 s; the next fork waits behind it
        t0 = time.monotonic()
        run_isolated("import os\nwith open(log, 'a') as f:\n    f.write(f'{os.getpid()}\\n')", ns)
        assert time.monotonic() - t0 >= FORK_SECONDS - 0.5  # it gave up waiting, then spawned
        time.sleep(max(0.0, 9 - (time.monotonic() - t0)))  # the late reply and hand-over are done
        with open(ns["log"]) as f:  # type: ignore[call-overload]
            ran = f.read().split()
        assert len(ran) == 1, ran
        run_isolated("after = 2", ns)  # the template serves the next cell as usual
        assert ns["after"] == 2
    finally:
        sys.path.remove(str(tmp_path))


def test_a_queued_cell_is_taken_back_unless_a_worker_read_it():
    """What the kernel decides on when the template does not answer: if no worker read the
    queued cell, reading it back leaves the channel empty (a late worker finds nothing to
    run); if one read it, the kernel must wait for that worker instead of spawning another."""
    import socket

    from nbisolate.supervisor import Job
    from nbisolate.wire import recv_frame

    payload = {"source": "x = 1", "inputs": [], "data": b"", "engine": "pickle"}
    for read_first in (False, True):
        job = Job(dict(payload), on_event=lambda event: None)
        mine, theirs = socket.socketpair()
        try:
            job._queue_run(mine)
            assert job._queued is not None and job._queued[0] is mine
            job._peer = theirs.dup()
            if read_first:  # the worker's side reads its cell, as a handed-over worker does
                kind, body, _, _ = recv_frame(theirs)
                assert kind == "run" and body["source"] == "x = 1" and body["sync"] == job.sync
            assert job._run_taken() is read_first
            with pytest.raises(BlockingIOError):  # either way nothing is left to run
                theirs.recv(1, socket.MSG_DONTWAIT)
        finally:
            job._drop_peer()
            mine.close()
            theirs.close()
            Job._close_fds(job._wake_r, job._wake_w)


def test_a_long_cell_reports_its_start_and_load_while_it_runs():
    """A fast cell's start and load travel with its result; a cell that runs on has them
    sent by its watchdog within moments, so the panel says it is running, not loading."""
    heard: dict[str, float] = {}
    run = CellRun("import time\ntime.sleep(1.5)\ndone = 1", {})
    run.listeners.append(
        lambda e: heard.setdefault(e.kind if e.kind != "phase" else f"phase {e.data[0]}", time.perf_counter())
    )
    run.prepare()
    run.run_sync()
    assert heard["phase start"] <= heard["phase load"] <= heard["phase run"] <= heard["result"]
    assert heard["phase load"] - heard["started"] < 0.75, heard
    assert heard["result"] - heard["phase load"] > 0.75, heard


def test_the_cell_goes_to_a_spare_that_holds_its_channel_and_is_named_a_worker_then():
    """A spare is handed its channel before any cell and keeps its spare's name until its
    cell arrives; the worker the cell ran in is the one the kernel announced as started."""
    from nbisolate.supervisor import launcher

    ns: dict[str, object] = {}
    run_isolated("ready = 1", ns)  # the template is up
    assert wait_until(lambda: len(_spares_of(launcher.pid)) == SPARES, 10)
    spares = {p.pid for p in _spares_of(launcher.pid)}
    t = launcher._current
    assert wait_until(lambda: {s.pid for s in t.spares} == spares, 10)  # each holds its channel
    started: list[Event] = []
    run = CellRun("import os\nme = os.getpid()\nname = open('/proc/self/comm').read().strip()", ns)
    run.listeners.append(lambda event: started.append(event) if event.kind == "started" else None)
    run.run_sync()
    assert ns["me"] in spares and [e.data for e in started] == [ns["me"]]
    assert ns["name"] != SPARE_NAME  # a worker from the moment its cell arrived


def test_a_spare_killed_before_its_cell_takes_nothing_and_the_cell_runs_once(tmp_path):
    """Spares that are gone when a cell comes (killed from outside): the write of the cell
    fails, nothing ran, and the cell runs once, in a worker forked for it."""
    from nbisolate.supervisor import launcher

    ns: dict[str, object] = {"log": str(tmp_path / "ran.txt")}
    run_isolated("ready = 1", ns)
    assert wait_until(lambda: len(_spares_of(launcher.pid)) == SPARES, 10)
    t = launcher._current
    assert wait_until(lambda: len(t.spares) == SPARES, 10)
    killed = {p.pid for p in _spares_of(launcher.pid)}
    for pid in killed:
        os.kill(pid, 9)
    assert wait_until(lambda: not (killed & {p.pid for p in _spares_of(launcher.pid)}), 10)
    run_isolated("import os\nwith open(log, 'a') as f:\n    f.write(f'{os.getpid()}\\n')\nafter = 2", ns)
    with open(str(ns["log"])) as f:
        ran = f.read().split()
    assert len(ran) == 1 and int(ran[0]) not in killed, (ran, killed)
    assert ns["after"] == 2
    run_isolated("again = 3", ns)  # and the next cells are served as usual
    assert ns["again"] == 3


def test_the_kernels_environment_of_the_moment_reaches_a_spare_prepared_before_it():
    """The spare was forked, and handed its channel, before the variable changed: the cell
    still sees the kernel's environment as it is when the cell runs."""
    from nbisolate.supervisor import launcher

    ns: dict[str, object] = {}
    run_isolated("ready = 1", ns)
    t = launcher._current
    assert wait_until(lambda: len(t.spares) == SPARES, 10)
    os.environ["NBISOLATE_START_PATH_VAR"] = "set after the spares"
    try:
        run_isolated("import os\nseen = os.environ.get('NBISOLATE_START_PATH_VAR')", ns)
    finally:
        del os.environ["NBISOLATE_START_PATH_VAR"]
    assert ns["seen"] == "set after the spares"
    run_isolated("import os\nseen = os.environ.get('NBISOLATE_START_PATH_VAR')", ns)
    assert ns["seen"] is None


def test_spares_forked_before_a_preload_are_dropped_for_ones_that_have_it(tmp_path):
    """A preload makes the kernel drop the spares it holds (they lack the new import); the
    cells after it run in workers that have it, as the ones forked after a preload did."""
    from nbisolate.supervisor import launcher

    (tmp_path / "start_path_preloaded.py").write_text("VALUE = 7\n")
    sys.path.insert(0, str(tmp_path))
    try:
        ns: dict[str, object] = {}
        run_isolated("ready = 1", ns)
        t = launcher._current
        assert wait_until(lambda: len(t.spares) == SPARES, 10)
        before = {s.pid for s in t.spares}
        launcher.preload(["start_path_preloaded"])
        assert wait_until(lambda: not t.preloading and len(t.spares) == SPARES, 10)
        assert not before & {s.pid for s in t.spares}
        run_isolated("import sys\nhad = 'start_path_preloaded' in sys.modules", ns)
        assert ns["had"] is True
    finally:
        sys.path.remove(str(tmp_path))


def test_a_spare_takes_the_page_faults_of_a_pandas_cell_before_its_cell_comes():
    """A fresh fork pays a page fault for each page of the template's it first writes: making
    a small DataFrame costs it about 600 (3 ms on this kind of machine).  With pandas
    preloaded, the spare makes one of its own while it waits, so its cell's takes few."""
    import pandas as pd

    from nbisolate.supervisor import launcher

    ns: dict[str, object] = {"pd": pd}
    run_isolated("x = 1", ns)  # the template preloads pandas, found through `pd`
    t = launcher._current
    assert wait_until(lambda: "pandas" in t.preloaded and not t.preloading and len(t.spares) == SPARES, 30)
    assert wait_until(lambda: all(s.num_threads() == 2 for s in _spares_of(launcher.pid)), 10)
    # The spares rehearse after their watchdog starts; on a busy machine that takes a while.
    assert wait_until(lambda: _spares_idle(launcher.pid), 20)
    code = (
        "import resource\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "frame = pd.DataFrame({'a': range(100), 'b': [0.5] * 100})\n"
        "total = int(frame.a.sum())\n"
        "faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
    )
    run_isolated(code, ns)
    assert ns["total"] == 4950 and ns["frame"].equals(pd.DataFrame({"a": range(100), "b": [0.5] * 100}))
    assert ns["faults"] < 200, ns["faults"]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _worker_pids(run: CellRun) -> list[int]:
    pids: list[int] = []
    run.listeners.append(lambda event: pids.append(event.data) if event.kind == "started" else None)
    return pids


def test_a_worker_exits_once_the_kernel_lets_it_go_and_not_while_a_cell_runs(monkeypatch):
    """A cell's worker exits after its outcome only when the kernel lets it go: once no
    other cell runs (its exit would slow that cell). Here a worker would wait a minute on
    its own, so only the kernel's word can end it."""
    from nbisolate import supervisor

    monkeypatch.setattr(supervisor, "LINGER_SECONDS", 60.0)
    ns: dict[str, object] = {}
    run_isolated("ready = 1", ns)
    slow = CellRun("import time\ntime.sleep(4)\nslow = 1", ns)
    slow_pids = _worker_pids(slow)
    slow.prepare()
    running = threading.Thread(target=slow.run_sync)
    running.start()
    try:
        assert wait_until(lambda: slow_pids, 10)
        quick = CellRun("quick = 1", ns)
        quick_pids = _worker_pids(quick)
        quick.prepare()
        quick.run_sync()
        assert ns["quick"] == 1 and quick_pids
        time.sleep(1.0)  # long past the moment its cell was over: the slow cell still runs
        assert "slow" not in ns and _alive(quick_pids[0])
    finally:
        running.join(60)
    assert ns["slow"] == 1
    # The slow cell over, both go (each would wait a minute otherwise).
    assert wait_until(lambda: not _alive(quick_pids[0]) and not _alive(slow_pids[0]), 10)


@pytest.mark.parametrize("let_go", [True, False], ids=["let go", "never let go"])
def test_a_worker_waits_for_the_word_after_its_outcome_at_most_as_long_as_it_was_told(let_go):
    """The worker's side, over its channel: after the result it waits for ``LET_GO`` (which
    may come in one read with another answer), and without it leaves once ``linger`` is
    over; either way it exits with 0, having sent its result."""
    import socket

    from nbisolate.protocol import LET_GO, MSG_RESULT, MSG_RUN
    from nbisolate.template import bootstrap
    from nbisolate.wire import recv_frame, send_frame

    run = CellRun("answer = 6 * 7", {})
    run.prepare()
    assert run.launch is not None
    payload = dict(run.launch.payload, sync="0" * 16, linger=60.0 if let_go else 0.5)
    mine, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-c", bootstrap("worker", theirs.fileno())],
        pass_fds=(theirs.fileno(),),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    theirs.close()
    try:
        send_frame(mine, MSG_RUN, payload)
        kind = None
        while kind != MSG_RESULT:
            kind, body, _, _ = recv_frame(mine)
        assert body["names"] == ["answer"]
        if let_go:
            time.sleep(0.5)
            assert proc.poll() is None  # its cell is over, and it waits
            mine.sendall(b"x" + LET_GO)  # an answer it does not wait for, and the word, in one read
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        mine.close()
