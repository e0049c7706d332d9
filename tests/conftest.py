"""Shared fixtures: real kernels, and a check that no worker outlives the tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from .kernel import Kernel

# Dask clusters the tests start (in kernels and subprocesses, which inherit this process's
# environment) keep their scratch folder here, not in the machine's shared
# /tmp/dask-scratch-space, which they would leave behind; it is removed when the session ends.
_DASK_SCRATCH = tempfile.mkdtemp(prefix="nbisolate-tests-dask-")
os.environ.setdefault("DASK_TEMPORARY_DIRECTORY", _DASK_SCRATCH)

WORKER_MARK = "from nbisolate."  # both the template and spawned workers
# Kernels inherit the test session's environment, and so do their templates and
# workers: this marker tells this session's processes from any other on the machine.
SESSION_MARK = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
os.environ["NBISOLATE_TEST_SESSION"] = SESSION_MARK


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


def mp_folders() -> set[Path]:
    """multiprocessing's temporary folders (``pymp-*``; a forkserver's socket is in one)."""
    return set(Path(tempfile.gettempdir()).glob("pymp-*"))


@pytest.fixture(scope="session", autouse=True)
def dask_scratch_removed() -> Iterator[None]:
    yield
    shutil.rmtree(_DASK_SCRATCH, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def no_stray_workers() -> Iterator[None]:
    before = {p.pid for p in worker_processes()}
    yield
    assert wait_until(lambda: not [p for p in worker_processes() if p.pid not in before], 10), (
        "worker processes outlived the tests: "
        + ", ".join(str(p.pid) for p in worker_processes() if p.pid not in before)
    )
