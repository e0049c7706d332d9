"""What happens to a run, as a stream of :class:`Event` objects: the one vocabulary.

A run (one cell, or one value of a sweep) is watched by *listeners*: the live
panel, the JupyterLab status comm, the text summary, a test.  They learn
everything from events and read nothing else of the run, so a new backend or
a new front end only has to speak this vocabulary.

Events are produced in three places, each for what only it knows:

* the run itself (:mod:`nbisolate.runner`, :mod:`nbisolate.sweep`): planning,
  shipping, ticks, the outcome;
* a backend's run handle (:mod:`nbisolate.backends`): the worker's life;
* the worker, whose messages the backend forwards unchanged.

:data:`KINDS` lists every kind with what its ``data`` holds; a test checks it
against the code and against ``docs/architecture.md``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .protocol import CHANNEL_ONLY
from .protocol import KINDS as WORKER_KINDS

KINDS: dict[str, str] = {
    # -- from the run, in the kernel -------------------------------------------------
    "planned": "RunInfo-like dict: label, inputs, outputs, options (RunOptions), available "
    "before any process exists",
    "phase": "(name, seconds): a phase ended (plan, serialize, start, load, run, return)",
    "shipped": "list of dicts (name, type, size, engine) for the inputs, once serialized",
    "tick": "None: time passes (every TICK_SECONDS while waiting)",
    "note": "text for the user from nbisolate itself (a backend starting a cluster, a "
    "dropped-output note); listeners decide whether to show it",
    "applied": "dict: returned (names bound), skipped (name -> why), phases",
    "sweep": "dict: progress of an --over sweep (total, done, failed, running, index, value, "
    "state, host)",
    "done": "the exception that ended the run, or None: always the last event",
    # -- from the backend's run handle --------------------------------------------------
    "started": "pid (an int, or a RemotePid naming the host): the worker exists",
    "dropped": "dict (dropped, max_output): output over the limit was cut",
    "exit": "dict (returncode, reason, error, elapsed, dropped, max_output, pid): the worker "
    "is gone; the last event of a handle",
    "error": "dict with buffers: the cell (or the worker's setup, or the return) raised; also "
    "from a handle that failed itself (stage receive, a remote task that failed outside the cell)",
}
# -- from the worker, forwarded unchanged: the wire protocol's kinds (but the set-up ones) -----
KINDS.update({k: what for k, what in WORKER_KINDS.items() if k not in KINDS and k not in CHANNEL_ONLY})


@dataclass
class Event:
    """One thing that happened to a run, in the order it happened (see :data:`KINDS`)."""

    kind: str
    data: Any = None
    buffers: list[Any] = field(default_factory=list)
    time: float = field(default_factory=time.perf_counter)
