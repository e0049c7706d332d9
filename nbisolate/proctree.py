"""Ending a whole process tree: the worker's, the template's and the probe's one way to kill.

A cell may start processes that leave its process group (``setsid``, a
daemon's double fork), so signalling the group is not enough; and a pid alone
names a process only until it is reaped, after which the number may belong to
a stranger.  Hence three rules, followed by every function here:

* **Stop before listing.**  A stopped process cannot fork, so SIGSTOP is sent
  round after round to every descendant found (read from ``/proc``) until a
  round finds nothing new: then the list is complete.  The worker is a child
  subreaper, so orphans of a double fork are re-parented to it and stay in
  its tree to be found.
* **Identity before signal.**  Every process is remembered as ``(pid, start
  time)`` and signalled only while ``/proc`` still shows that start time for
  that pid; the supervisor keeps ``psutil.Process`` handles, which check the
  same way.  A process group is signalled by its leader's pid only while the
  leader is not reaped (its zombie keeps the number) or, after that, while a
  member keeps the group's id alive.
* **Kill until quiet.**  Where the tree cannot be frozen (the worker's own
  watchdog, while the cell's thread may still be starting processes),
  kill rounds repeat until one finds no process.

This module runs in the worker, so it imports only the standard library;
``psutil`` is imported by :class:`Tree`, the supervisor's view, on first use.
Descendant listing needs ``/proc`` (Linux); elsewhere only the process group
and the psutil handles are signalled.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

Proc = tuple[int, int]
"""A process as ``(pid, start time in clock ticks since boot)``: its identity."""


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False when there is no such group (or no right)."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the name (the state first), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2 :].split()
    except (OSError, ValueError):
        return None


def _stat(pid: int | str) -> tuple[bytes, int, int] | None:
    """``(state, ppid, start time)`` of a process from ``/proc``, or None when it is gone."""
    fields = _stat_fields(pid)
    try:
        return (fields[0], int(fields[1]), int(fields[19])) if fields is not None else None
    except (ValueError, IndexError):
        return None


def zombie_returncode(pid: int, start: int) -> int | None:
    """The return code of ``pid`` while it is a zombie nobody has reaped yet, as ``Popen`` gives it
    (``-N`` for signal N); None when it is not that zombie or the code cannot be told.

    ``/proc/PID/stat`` shows a dead process's wait status (its field 52) until its
    parent reaps it, and until then the pid cannot name another process; ``start``
    (the start time read while it surely named ours) rules out one started since.
    A process this one may not inspect shows 0 there, so 0 tells nothing: None.
    """
    fields = _stat_fields(pid)
    try:
        if fields is None or fields[0] != b"Z" or int(fields[19]) != start:
            return None
        status = int(fields[49])
    except (ValueError, IndexError):
        return None
    if status == 0:
        return None
    return -(status & 0x7F) if status & 0x7F else (status >> 8) & 0xFF


def descendants(root: int) -> list[Proc]:
    """Live (non-zombie) descendants of ``root``, read from ``/proc``; [] where there is none."""
    children: dict[int, list[Proc]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        stat = _stat(entry)
        if stat is None or stat[0] in (b"Z", b"X"):
            continue
        children.setdefault(stat[1], []).append((int(entry), stat[2]))
    found: list[Proc] = []
    todo = [root]
    while todo:
        for proc in children.get(todo.pop(), ()):
            found.append(proc)
            todo.append(proc[0])
    return found


def send(proc: Proc, sig: int) -> bool:
    """Send ``sig`` to ``proc`` if its pid still names the same process (pid reuse)."""
    pid, start = proc
    stat = _stat(pid)
    if stat is None or stat[2] != start:
        return False
    try:
        os.kill(pid, sig)
        return True
    except OSError:
        return False


def stop_descendants(root: int) -> list[Proc]:
    """SIGSTOP every descendant of ``root``, repeating until no new one appears; those stopped.

    A stopped process cannot fork, so once a round finds nothing new the list
    is complete, and it stays valid (stopped processes do not exit by
    themselves) for the SIGKILL that follows.
    """
    stopped: list[Proc] = []
    seen: set[int] = set()
    for _ in range(50):
        new = [proc for proc in descendants(root) if proc[0] not in seen]
        if not new:
            break
        for proc in new:
            seen.add(proc[0])
            if send(proc, signal.SIGSTOP):
                stopped.append(proc)
    return stopped


def kill_tree(pid: int) -> None:
    """SIGKILL process ``pid``, its process group and every descendant, even those that left it.

    For the parent of ``pid``, before it reaps it (so ``pid`` surely is that
    process): it is stopped first, so it stays the subreaper holding its tree
    together while the tree is listed.  The template ends its workers this
    way when the kernel is gone, the probe its child on a timeout.
    """
    try:
        os.kill(pid, signal.SIGSTOP)
    except OSError:
        pass
    victims = stop_descendants(pid)
    signal_group(pid, signal.SIGKILL)
    for victim in victims:
        send(victim, signal.SIGKILL)
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def kill_own_descendants() -> int:
    """SIGKILL every process this process started, including ones that left its group; how many.

    For the worker, a child subreaper: a descendant whose parent died is
    re-parented to it and still found here.  Cheap when the cell started
    nothing: one ``waitpid`` says there is no child.
    """
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass  # reap exited children; what is left is alive
    except ChildProcessError:
        return 0  # no child at all, hence no descendant (orphans would be our children)
    except OSError:
        pass
    victims = stop_descendants(os.getpid())
    for victim in victims:
        send(victim, signal.SIGKILL)
    return len(victims)


def is_resource_tracker(proc: Proc) -> bool:
    """True for a multiprocessing (or multiprocess, loky) resource tracker, read from its command line.

    A tracker unlinks what its pipe's writers registered (named semaphores,
    shared memory) once the last writer is gone; killing it leaks them in
    ``/dev/shm``.
    """
    try:
        with open(f"/proc/{proc[0]}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"resource_tracker import main" in cmdline


def kill_own_descendants_sparing(spare: Any) -> list[Proc]:
    """Like :func:`kill_own_descendants`, but leave the processes ``spare(proc)`` picks running.

    All descendants are stopped first (so the list is complete), the others
    killed, the spared ones continued; returns the spared ones.
    """
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        return []
    except OSError:
        pass
    spared: list[Proc] = []
    for victim in stop_descendants(os.getpid()):
        if spare(victim):
            spared.append(victim)
        else:
            send(victim, signal.SIGKILL)
    for proc in spared:
        send(proc, signal.SIGCONT)
    return spared


def wait_for_exit(procs: list[Proc], timeout: float, reap: bool = True) -> bool:
    """Wait until every process of ``procs`` has exited; False on timeout.

    With ``reap`` (the worker, which owns every child it has) exited children
    are reaped on the way; the supervisor, in a kernel whose other children are
    not its own, passes False and counts a zombie as exited.
    """
    deadline = time.monotonic() + timeout
    pause = 0.002
    while True:
        try:
            while reap and os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except OSError:
            pass
        alive = [p for p in procs if (stat := _stat(p[0])) is not None and stat[2] == p[1]
                 and stat[0] not in (b"Z", b"X")]
        if not alive:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def group_members(pgid: int) -> list[Proc]:
    """Live processes of process group ``pgid``, read from ``/proc``.

    Safe only while the group's id cannot be reused: its leader not reaped.
    """
    members: list[Proc] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for entry in entries:
        fields = _stat_fields(entry) if entry.isdigit() else None
        try:
            if fields is not None and fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid:
                members.append((int(entry), int(fields[19])))
        except (ValueError, IndexError):
            pass
    return members


def kill_own_descendants_until_quiet(rounds: int = 20, pause: float = 0.01) -> None:
    """Kill rounds of :func:`kill_own_descendants` until one finds no process (at most ``rounds``).

    For the worker's watchdog: the cell's thread keeps running while it
    kills, and may start a process after a round listed the tree.
    """
    for _ in range(rounds):
        if not kill_own_descendants():
            return
        time.sleep(pause)


class Tree:
    """The process tree of one worker, seen from the process that started it (the supervisor).

    The worker is held as a ``psutil.Process`` taken right after it started,
    while its pid surely named it; descendants are remembered the same way
    (:meth:`remember`, called periodically while the worker runs), so that
    processes that left the group are still known after the worker died and
    its orphans were re-parented away from it.  :meth:`sweep` ends it all.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._ps: Any = _process(pid)
        self._known: list[Any] = []

    def alive(self) -> bool:
        """True while the worker runs: not exited, its pid not reused (psutil checks identity)."""
        ps = self._ps
        try:
            return ps is not None and ps.is_running() and ps.status() != "zombie"
        except Exception:
            return False

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the worker's process group (the worker leads its own session)."""
        signal_group(self.pid, sig)

    def remember(self) -> None:
        """Add the worker's current descendants to the known ones; never by pid alone.

        Only while the worker is alive: once it is reaped its pid may belong to
        a stranger, whose children are none of ours.
        """
        if not self.alive():
            return
        seen = {p.pid for p in self._known}
        try:
            found = self._ps.children(recursive=True)
        except Exception:
            found = []
        self._known.extend(p for p in found if p.pid not in seen)

    def sweep(self) -> None:
        """SIGKILL whatever is left of the tree, leaving nothing the cell started alive.

        While the worker lives it is stopped first (SIGSTOP to its group and
        to every known descendant), then stop rounds over ``/proc`` catch the
        descendants that left the group since the last :meth:`remember`, until
        none is new.  Then SIGKILL to the group, to each stopped descendant
        and to each known one, each identity-checked.  Call it before the
        worker is reaped, so its zombie keeps the group's id from reuse.
        """
        stopped: list[Proc] = []
        if self.alive():
            self.signal(signal.SIGSTOP)
            for proc in list(self._known):
                try:
                    proc.suspend()
                except Exception:
                    pass
            stopped = stop_descendants(self.pid)
            self.remember()
        trackers = [p for p in stopped + self._known_procs() if is_resource_tracker(p)]
        if trackers:
            self._let_trackers_clean_up(trackers, stopped)
        self.signal(signal.SIGKILL)
        for victim in stopped:
            send(victim, signal.SIGKILL)
        for proc in self._known:
            try:
                if proc.is_running():
                    proc.kill()
            except Exception:
                pass
        self._known = []

    #: How long the resource trackers get to unlink what the cell left registered.
    TRACKER_SECONDS = 3.0

    def _known_procs(self) -> list[Proc]:
        """The remembered descendants still running, as identities for :func:`send`."""
        procs: list[Proc] = []
        for proc in self._known:
            try:
                stat = _stat(proc.pid)
                if stat is not None and proc.is_running():
                    procs.append((proc.pid, stat[2]))
            except Exception:
                pass
        return procs

    def _let_trackers_clean_up(self, trackers: list[Proc], stopped: list[Proc]) -> None:
        """Kill all but the resource trackers, then let those unlink what the cell left and exit.

        A tracker (which ignores SIGTERM and SIGINT) unlinks the shared memory
        and semaphores still registered once the last writer of its pipe is
        gone; killed with the rest, it leaves them in ``/dev/shm`` for good.
        So every other process of the tree goes first (the worker, its group,
        each descendant), which closes the pipe; the trackers are continued and
        get :data:`TRACKER_SECONDS`; the caller kills whatever is left.
        """
        spare = {pid for pid, _ in trackers}
        try:
            if self._ps is not None and self._ps.is_running():
                self._ps.kill()
        except Exception:
            pass
        for victim in stopped + self._known_procs() + group_members(self.pid):
            if victim[0] not in spare:
                send(victim, signal.SIGKILL)
        for proc in trackers:
            send(proc, signal.SIGCONT)
        wait_for_exit(trackers, self.TRACKER_SECONDS, reap=False)
        for proc in trackers:
            send(proc, signal.SIGKILL)


def _process(pid: int) -> Any:
    """A psutil handle on ``pid`` taken while it surely is our worker, or None."""
    try:
        import psutil

        return psutil.Process(pid)
    except Exception:
        return None
