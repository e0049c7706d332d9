"""A local sweep forks its next values ahead and holds them until a slot frees.

What must hold whatever the speed: a held worker has run nothing and gets
its cell only when released; ``--timeout`` counts from then; an interrupt or
a stop ends the running and the held workers alike, and a held worker never
receives its cell; every value still runs in a process of its own.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psutil
import pytest

from nbisolate.events import Event
from nbisolate.supervisor import Job, launcher
from nbisolate.template import SPARES

from .conftest import wait_until
from .kernel import Kernel
from .test_faults_kernel import gone


def cell(text: str) -> str:
    return "\n".join(line.strip() for line in text.strip().splitlines())


def _payload(source: str, tmp: str) -> dict:
    import sys

    from nbisolate import ship

    shipped = ship.dumps({})
    return {
        "source": source,
        "filename": "<held>",
        "inputs": shipped.names,
        "data": shipped.data,
        "engine": shipped.engine,
        "outputs": [],
        "has_result": False,
        "sys_path": list(sys.path),
        "cwd": tmp,
        "kernel_pid": os.getpid(),
    }


def _collect(job_events: list[Event], done: threading.Event):
    def on_event(event: Event) -> None:
        job_events.append(event)
        if event.kind == "exit":
            done.set()

    return on_event


# Forked by the template, or (no template to be had) spawned: held either way.
TEMPLATE = pytest.mark.parametrize("use_template", [True, False], ids=["forked", "spawned"])


def _marking_job(tmp_path, use_template: bool) -> tuple[Job, list[Event], threading.Event, Any]:
    """A job whose cell creates a marker file (to tell whether it ran), its events, its end."""
    marker = tmp_path / "ran"
    events: list[Event] = []
    done = threading.Event()
    job = Job(
        _payload(f"open({str(marker)!r}, 'w').write('x')", str(tmp_path)),
        on_event=_collect(events, done),
        timeout=30,
        use_template=use_template,
    )
    return job, events, done, marker


@TEMPLATE
def test_a_held_worker_runs_its_cell_only_once_released(tmp_path, use_template):
    job, events, done, marker = _marking_job(tmp_path, use_template)
    try:
        job.start_soon(held=True)
        if use_template:  # forked ahead: the process exists and waits
            assert wait_until(lambda: any(e.kind == "started" for e in events), 10)
            assert psutil.pid_exists(job.pid)
        time.sleep(0.3)
        assert not marker.exists()  # it ran nothing
        job.release()
        assert done.wait(30)
        assert marker.exists()
        assert [e.data["reason"] for e in events if e.kind == "exit"] == ["done"]
        assert any(e.kind == "result" for e in events)
    finally:
        job.stop("stop")


@TEMPLATE
def test_a_held_worker_stopped_before_release_never_gets_its_cell(tmp_path, use_template):
    job, events, done, marker = _marking_job(tmp_path, use_template)
    job.start_soon(held=True)
    if use_template:
        assert wait_until(lambda: any(e.kind == "started" for e in events), 10)
    else:
        time.sleep(0.3)
    pid = job.pid
    job.stop("interrupt")
    assert done.wait(30)
    assert not marker.exists()
    (exit_event,) = [e for e in events if e.kind == "exit"]
    assert exit_event.data["reason"] == "stop"
    assert not [e for e in events if e.kind in ("result", "error", "stream")], events
    if use_template:
        assert wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", 10)
    else:
        assert pid is None  # never spawned at all


def test_timeout_counts_from_when_a_value_runs_not_from_when_it_was_forked(kernel: Kernel):
    # Each value sleeps 0.7 s under a 1.2 s timeout; the values forked ahead wait a whole
    # round (0.7 s or more) for a slot, which must not count against their timeout.
    res = kernel.run(
        cell(
            """
            %%isolate --timeout 1.2 --over v=range(6)
            import os, time
            time.sleep(0.7)
            r = v
            who = os.getpid()
            """
        ),
        timeout=120,
    )
    assert res.ok, res.error_text
    r, who = kernel.value("(r, who)")
    assert r == list(range(6))
    assert len(set(who)) == 6 and kernel.pid not in who  # a process of its own per value


def test_interrupt_ends_running_and_held_workers_and_binds_nothing(fresh_kernel: Kernel):
    k = fresh_kernel
    cores = k.value("__import__('os').cpu_count()")
    template = k.value("__import__('nbisolate.supervisor').supervisor.launcher.pid")
    threading.Timer(3.0, k.interrupt).start()
    res = k.execute(
        cell(
            """
            %%isolate --over n=range(12)
            import os, time
            print(os.getpid(), flush=True)
            time.sleep(600)
            swept = n
            """
        ),
        timeout=60,
    )
    assert res.error["ename"] == "KeyboardInterrupt", res.error_text
    pids = [int(line.split()[-1]) for line in res.stdout.splitlines() if line.strip()]
    assert len(pids) == min(cores, 12), res.stdout  # the held ones never ran their cell
    assert wait_until(lambda: not any(psutil.pid_exists(p) for p in pids), 10)

    def only_the_spare_left() -> bool:
        try:
            children = psutil.Process(template).children()
        except psutil.NoSuchProcess:
            return True
        return len([c for c in children if not gone(c.pid)]) <= SPARES

    def left() -> list[tuple[int, str, str]]:  # what a failure says it found
        try:
            return [(c.pid, c.name(), c.status()) for c in psutil.Process(template).children() if not gone(c.pid)]
        except psutil.Error:
            return []

    assert wait_until(only_the_spare_left, 10), (f"the template's children {left()}", f"the values' {pids}")
    assert k.value("'swept' in globals()") is False
    assert k.run("%%isolate --over n=range(3)\nafter = n * 2").ok
    assert k.value("after") == [0, 2, 4]


def teardown_module() -> None:
    launcher.close()  # the template the in-process tests above started
