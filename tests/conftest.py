"""Shared fixtures: real kernels, and a check that no worker outlives the tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from .kernel import Kernel

WORKER_MARK = "from nbisolate."  # both the template and spawned workers
# Kernels inherit the test session's environment, and so do their templates and
# workers: this marker tells this session's processes from any other on the machine.
SESSION_MARK = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
os.environ["NBISOLATE_TEST_SESSION"] = SESSION_MARK


# Dask clusters the tests start (in kernels and subprocesses, which inherit this process's
# environment, and in this process, whose Dask reads it at import) keep their scratch
# folder here, not in the machine's shared /tmp/dask-scratch-space, which they would leave
# behind. Dask makes it when a cluster starts; it is removed when the session ends.
_DASK_SCRATCH = Path(tempfile.gettempdir()) / f"nbisolate-tests-dask-{SESSION_MARK}"
os.environ.setdefault("DASK_TEMPORARY_DIRECTORY", str(_DASK_SCRATCH))


def _ours(proc: psutil.Process) -> bool:
    try:
        return proc.environ().get("NBISOLATE_TEST_SESSION") == SESSION_MARK
    except (psutil.Error, OSError):
        return False


def worker_processes() -> list[psutil.Process]:
    """Templates and workers started from this test session's kernels."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if WORKER_MARK in cmd and proc.pid != os.getpid() and _ours(proc):
            found.append(proc)
    return found


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@contextlib.contextmanager
def loaded_kernel() -> Iterator[Kernel]:
    """A new kernel with the extension loaded, shut down (with its workers) afterwards."""
    k = Kernel()
    try:
        k.run("%load_ext nbisolate")
        yield k
    finally:
        k.shutdown()


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    """A kernel with the extension loaded, shared by the tests of one module."""
    with loaded_kernel() as k:
        yield k


@pytest.fixture
def fresh_kernel() -> Iterator[Kernel]:
    """A kernel of its own, for tests that interrupt, restart or kill it."""
    with loaded_kernel() as k:
        yield k


def shm_names(prefix: str = "") -> set[str]:
    """The entries of ``/dev/shm`` whose names start with ``prefix``."""
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}
    except OSError:
        return set()


def shm_held(by: Callable[[psutil.Process], bool]) -> set[str]:
    """``/dev/shm`` entries mapped or open in the processes for which ``by`` is true.

    Other programs on the machine make segments of their own, and so does another
    test session running side by side (another Python's suite): theirs are held by
    their processes. A segment the tests leaked is one nobody holds.
    """
    held: set[str] = set()
    for proc in psutil.process_iter():
        try:
            if not by(proc):
                continue
            with open(f"/proc/{proc.pid}/maps") as f:
                held.update(line.rsplit("/dev/shm/", 1)[1].split()[0] for line in f if "/dev/shm/" in line)
            for fd in os.listdir(f"/proc/{proc.pid}/fd"):
                target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
                if target.startswith("/dev/shm/"):
                    held.add(target[len("/dev/shm/") :].split()[0])
        except (OSError, IndexError, psutil.Error):
            pass
    return held


def _not_this_session(proc: psutil.Process) -> bool:
    return proc.pid != os.getpid() and not _ours(proc)


def new_shm(before: set[str], prefix: str = "") -> set[str]:
    """Entries of ``/dev/shm`` (starting with ``prefix``) made since ``before`` by this session."""
    new = shm_names(prefix) - before
    return new - shm_held(_not_this_session) if new else new


def mp_folders() -> set[Path]:
    """multiprocessing's temporary folders (``pymp-*``; a forkserver's socket is in one)."""
    return set(Path(tempfile.gettempdir()).glob("pymp-*"))


@pytest.fixture(scope="session", autouse=True)
def dask_scratch_removed() -> Iterator[None]:
    yield
    shutil.rmtree(_DASK_SCRATCH, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def session_tmpdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A TMPDIR of this session's own, for the kernels, templates and workers it starts.

    What they leave there is this session's, even while another test run (another
    Python's suite, side by side) makes temporary files of its own; left anything,
    the session fails. pytest keeps the folder with its other temporary paths.
    """
    tmp = tmp_path_factory.mktemp("tmpdir")
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    yield tmp

    def left() -> list[str]:
        return sorted(p.name for p in tmp.iterdir())

    try:
        assert wait_until(lambda: not left(), 10), f"the tests left files in their TMPDIR {tmp}: {left()}"
    finally:
        if old is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old
        tempfile.tempdir = None


@pytest.fixture(scope="session", autouse=True)
def no_stray_workers() -> Iterator[None]:
    before = {p.pid for p in worker_processes()}
    yield
    assert wait_until(lambda: not [p for p in worker_processes() if p.pid not in before], 10), (
        "worker processes outlived the tests: "
        + ", ".join(str(p.pid) for p in worker_processes() if p.pid not in before)
    )
