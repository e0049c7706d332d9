"""The ``local`` backend: a fresh worker process on this machine.

The worker is forked by the kernel's template process (or spawned when the
template cannot be had); :class:`~nbisolate.supervisor.Job` supervises it:
its pipes, its deadline, its whole process tree.  This module only adapts
that to the :class:`~nbisolate.backends.Backend` interface.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..errors import IsolateError
from ..options import RunOptions
from . import Deliver, Launch, RunHandle


class LocalBackend:
    """Runs each launch in a new process here; as many at once as there are cores."""

    name = "local"

    def __init__(self, options: RunOptions | None = None, note: Callable[[str], None] | None = None) -> None:
        self.options = options

    def check(self, launch: Launch) -> None:
        """Nothing to check: the worker runs on this Python, with this ``sys.path``."""

    def concurrency(self, runs: int) -> int:
        return max(1, min(os.cpu_count() or 1, runs))

    def start(self, launch: Launch, deliver: Deliver) -> RunHandle:
        from ..supervisor import Job

        options = launch.options
        job = Job(
            launch.payload,
            launch.buffers,
            on_event=deliver,
            timeout=options.timeout,
            label=launch.label,
            max_output=options.max_output,
            # A memory cap must hold from the first byte: a fork of the template
            # already carries its imports, so a capped cell gets a new interpreter
            # (exec'd by the template, which still kills it if the kernel dies).
            fresh=options.mem is not None,
        )
        try:
            job.start()
        except OSError as exc:
            raise IsolateError(
                f"could not start the isolated worker process ({type(exc).__name__}: {exc}); "
                "nothing ran. Check that the working directory still exists and the machine "
                "has free memory and process slots, then run the cell again."
            ) from exc
        # The next cells that use the notebook's packages should not pay their import.
        from ..supervisor import launcher

        launcher.preload(launch.packages)
        return job
