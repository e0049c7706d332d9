"""proctree against real process trees it starts: a group member and a double-forked daemon."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from nbisolate import proctree

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and prctl")

# A subreaper (as a worker is) that starts a sleeper in its group and a daemon that
# leaves the group (setsid) by a double fork, then prints both pids and waits.
TREE = textwrap.dedent(
    """
    import ctypes, os, subprocess, sys, time
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    same = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            os.write(w, str(os.getpid()).encode())
            time.sleep(120)
            os._exit(0)
        os._exit(0)
    os.waitpid(middle, 0)
    daemon = int(os.read(r, 64))
    print(same.pid, daemon, flush=True)
    THEN
    """
)


def _start_tree() -> tuple[subprocess.Popen[str], list[psutil.Process]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", TREE.replace("THEN", "time.sleep(120)")], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    pids = [int(p) for p in proc.stdout.readline().split()]
    members = [psutil.Process(pid) for pid in pids]
    daemon = members[1]
    assert os.getpgid(daemon.pid) != proc.pid  # it left the group: killpg alone misses it
    assert daemon.ppid() == proc.pid  # re-parented to the subreaper
    return proc, members


def _gone(procs: list[psutil.Process], within: float = 10.0) -> list[psutil.Process]:
    """The processes still alive (and not zombies) after ``within`` seconds."""
    until = time.monotonic() + within
    alive = list(procs)
    while alive and time.monotonic() < until:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    return alive


def _cleanup(proc: subprocess.Popen[str], members: list[psutil.Process]) -> None:
    for p in members:
        try:
            p.kill()  # psutil checks identity first
        except psutil.Error:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def test_kill_tree_kills_the_group_and_the_daemon_that_left_it():
    proc, members = _start_tree()
    try:
        proctree.kill_tree(proc.pid)  # not reaped yet: the pid is surely our child
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert _gone(members) == []
    finally:
        _cleanup(proc, members)


def test_tree_sweep_finds_descendants_it_never_remembered():
    proc, members = _start_tree()
    try:
        tree = proctree.Tree(proc.pid)
        assert tree.alive()
        tree.sweep()  # no remember() before: the stop rounds over /proc must find the daemon
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert not tree.alive()
        assert _gone(members) == []
    finally:
        _cleanup(proc, members)


def test_tree_remembers_descendants_to_kill_them_after_the_worker_died():
    proc, members = _start_tree()
    try:
        tree = proctree.Tree(proc.pid)
        tree.remember()
        proc.kill()  # the worker crashes: the daemon is orphaned away from it
        proc.wait()
        assert _gone([members[1]], within=0.2)  # still running, no longer our descendant
        tree.sweep()
        assert _gone(members) == []
    finally:
        _cleanup(proc, members)


def test_a_process_whose_identity_changed_is_not_signalled():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = proctree.descendants(os.getpid())
        mine = [p for p in start if p[0] == sleeper.pid]
        assert mine, "the sleeper is a descendant of this process"
        pid, started = mine[0]
        assert not proctree.send((pid, started + 1), signal.SIGKILL)  # a stranger with that pid
        assert sleeper.poll() is None
        assert proctree.send((pid, started), signal.SIGKILL)
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
        sleeper.wait()


def test_a_subreaper_kills_its_own_descendants_until_quiet():
    # In a child of its own: kill_own_descendants kills every descendant of the caller.
    then = "from nbisolate import proctree; proctree.kill_own_descendants_until_quiet(); print('done')"
    code = TREE.replace("THEN", then)
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    assert proc.stdout is not None
    members = [psutil.Process(int(p)) for p in proc.stdout.readline().split()]
    try:
        assert proc.stdout.readline().strip() == "done"
        assert proc.wait(timeout=10) == 0
        assert _gone(members) == []
    finally:
        _cleanup(proc, members)
