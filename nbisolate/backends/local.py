"""The ``local`` backend: a fresh worker process on this machine.

The worker is forked by the kernel's template process (or spawned when the
template cannot be had); :class:`~nbisolate.supervisor.Job` supervises it:
its pipes, its deadline, its whole process tree.  This module only adapts
that to the :class:`~nbisolate.backends.Backend` interface.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import IsolateError
from ..options import RunOptions
from . import Deliver, Launch, RunHandle

if TYPE_CHECKING:
    from ..supervisor import Job


class LocalBackend:
    """Runs each launch in a new process here; as many at once as there are cores."""

    name = "local"
    here = True

    def __init__(self, options: RunOptions | None = None, note: Callable[[str], None] | None = None) -> None:
        self.options = options

    def check(self, launch: Launch) -> None:
        """Nothing to check: the worker runs on this Python, with this ``sys.path``."""

    def concurrency(self, runs: int) -> int:
        return max(1, min(os.cpu_count() or 1, runs))

    def start(self, launch: Launch, deliver: Deliver) -> RunHandle:
        job = self._job(launch, deliver)
        try:
            job.start()
        except OSError as exc:
            raise IsolateError(
                f"could not start the isolated worker process ({type(exc).__name__}: {exc}); "
                "nothing ran. Check that the working directory still exists and the machine "
                "has free memory and process slots, then run the cell again."
            ) from exc
        return job

    def start_soon(self, launch: Launch, deliver: Deliver, held: bool = False) -> RunHandle:
        """Like :meth:`start`, without waiting for the worker to exist: the batch entry of a sweep.

        The fork request is sent and its reply awaited in the job's own thread
        (:meth:`nbisolate.supervisor.Job.start_soon`), so a sweep asks for its
        next value's worker while the template forks this one; a failure to
        start arrives as the job's ``error`` and ``exit`` events.  The sweep
        asks the template to preload the notebook's packages once, before its
        first value (:meth:`preload`), not once per value.  With ``held`` the
        worker is forked but gets its cell only when the handle's ``release()``
        is called (see :meth:`nbisolate.supervisor.Job.start_soon`).
        """
        job = self._job(launch, deliver)
        job.start_soon(held=held)
        return job

    def start_sweep(self, launch: Launch, deliver: Deliver, slim: bool = False) -> RunHandle:
        """Start the one leader worker of a sweep (:mod:`nbisolate.sweep_leader`).

        The leader forks a child per value and enforces each value's
        ``--timeout`` itself, so its own job has no deadline; Stop and an
        interrupt end its whole tree, every value's process with it.  With
        ``slim`` the leader is a fresh interpreter (the kernel's ``sys.path``,
        working directory and environment, as any spawned worker), not a fork
        of the template and its preloaded packages: each value's fork then
        copies a small process's mappings instead of a large one's.  Forked
        from the template, it is forked directly (as a sweep's values are),
        leaving the spare for the next cell; a failure to start arrives as
        the job's ``error`` and ``exit`` events, which every value then shares.
        """
        job = self._job(launch, deliver, deadline=False)
        job.use_template = not slim
        job.start_soon()
        return job

    def preload(self, packages: list[str]) -> None:
        """Have the template import ``packages`` before the next forks."""
        from ..supervisor import launcher

        launcher.preload(packages)

    def _job(self, launch: Launch, deliver: Deliver, deadline: bool = True) -> Job:
        from ..supervisor import Job

        options = launch.options
        return Job(
            launch.payload,
            launch.buffers,
            on_event=deliver,
            timeout=options.timeout if deadline else None,
            label=launch.label,
            max_output=options.max_output,
            # A memory cap must hold from the first byte: a fork of the template
            # already carries its imports, so a capped cell gets a new interpreter
            # (exec'd by the template, which still kills it if the kernel dies).
            fresh=options.mem is not None,
            # Large inputs are copied straight into the worker (Job._lend) for a cell the
            # kernel waits on, and not under --mem, whose cap counts shared inputs apart.
            lend=not options.background and options.mem is None,
        )
