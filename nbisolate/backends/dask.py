"""Running isolated cells on a Dask cluster: ``%%isolate --backend dask``.

When one machine is not enough, the cell should not change: the same payload
(the run's :class:`~nbisolate.backends.Launch`: source, inputs shipped by
pickle/dill, modules re-imported by name) runs the same way, only on a node of a Dask cluster the
user already has.  nbisolate does not bring its own cluster.

How one cell runs (kernel on the left, a Dask worker on the right)::

    CellRun.prepare()           plan + ship, unchanged; backend_for() connects
    DaskBackend.check()         check the workers  ->  probe(): versions, modules, paths
    DaskBackend.start()
                                scatter the shipment, submit _remote_run
                                                    _remote_run(): supervisor.Job spawns
                                                    a fresh nbisolate worker subprocess
                                                    (own session, timeout, tree kill)
    events -> CellRun.feed()    <- Worker.log_event  live started/phase/stream/display
    result/error + exit         <- the task's return value (with every event again)
    CellRun.outcome()           apply results or raise the remote exception, unchanged

Choices, and why:

* **Live events travel by ``Worker.log_event`` -> ``Client.subscribe_topic``.**
  They ride the batched streams the worker and the client already keep open
  to the scheduler, so they are pushed (no polling), ordered, and need no
  extra client inside the task.  ``Pub``/``Sub`` no longer exist in
  distributed 2026.8; a ``Queue`` would need a client in every task and one
  scheduler round trip per item on the kernel side.  One topic per kernel
  client (``nbisolate-<client id>``), messages tagged with the run id: the
  scheduler keeps at most ``distributed.admin.low-level-log-length`` events
  per topic, so a long session cannot grow the scheduler's memory.
* **The task's return value is the record.**  It carries the final
  ``result``/``error`` event with its buffers (zero-copy frames), the ``exit``
  event, and every live event again with its sequence number: the kernel
  delivers whatever the live path did not, in order, so no output is lost
  even if a live message is late or dropped.
* **Stopping** (``--timeout`` is enforced on the node by ``Job`` itself;
  interrupt, the panel's Stop, ``backends.running.stop``): ``Client.run`` calls
  :func:`_stop_job` in the worker process, which stops the ``Job`` as an
  interrupt does (SIGINT to its group, grace, SIGKILL, sweep); a run not
  started yet is cancelled.  As a backstop the task also stops its subprocess
  when Dask cancels the task (the kernel went away, or the future was
  cancelled).
* **Checked before running**, with the worker address in every message: the
  Python (major.minor) and ``dill`` versions match the kernel's, nbisolate is
  importable on the worker, and every module the shipment imports by name
  (:attr:`nbisolate.ship.Shipment.modules`) can be found there.  Workers
  that fail the check are left out when others pass; if none passes, the
  cell fails before anything runs.
* **Paths**: the subprocess uses the Dask worker's environment (its
  ``sys.path``) plus the kernel's project directories (entries outside the
  kernel's installation prefixes) that exist on the node, first, as in the
  kernel; the working directory is the kernel's when it exists there (shared
  file systems), else the Dask worker's.

Where the scheduler comes from, first match wins: ``--scheduler``,
``%isolate_config scheduler=ADDRESS``, ``$NBISOLATE_SCHEDULER``, a
``distributed.Client`` already created in the notebook
(``distributed.default_client()``), else a ``LocalCluster`` (2 worker
processes x 1 thread) started once per kernel, which is said in a ``note``
event (the cell's stderr, unless ``--quiet``).
"""

from __future__ import annotations

import atexit
import itertools
import os
import queue
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import IsolateError, IsolateUsageError
from ..events import Event
from ..options import RunOptions
from ..supervisor import GRACE_SECONDS
from . import HandleInfo, Launch

INSTALL_HINT = "pip install 'nbisolate[dask]'"
ENV_SCHEDULER = "NBISOLATE_SCHEDULER"
SCATTER_BYTES = 64 * 1024
"""Shipment parts at least this big are scattered (sent once, zero-copy); smaller ones ride
in the task itself."""

config: dict[str, Any] = {"scheduler": None, "connect_timeout": 10.0}
"""``%isolate_config`` settings of this module: the default backend, the default scheduler
address, and how long to wait for a scheduler or its workers to answer (seconds)."""


class DaskBackendError(IsolateError):
    """The cluster cannot run the cell (no ``distributed``, unreachable scheduler, a worker
    that lacks a module or has other versions). Raised before anything ran."""


class RemotePid(int):
    """The pid of a worker process on a Dask node: an ``int`` everywhere a pid is expected.

    Printed, it also says where (``4711 on node7 (Dask worker tcp://10.0.0.7:4242)``), so
    messages and the panel name the host without knowing about Dask; ``host`` and
    ``worker`` are attributes for code that wants them.
    """

    host: str
    worker: str

    def __new__(cls, pid: int, host: str = "", worker: str = "") -> RemotePid:
        obj = super().__new__(cls, pid)
        obj.host = host
        obj.worker = worker
        return obj

    def __reduce__(self) -> Any:
        return RemotePid, (int(self), self.host, self.worker)

    def __str__(self) -> str:
        return f"{int(self)} on {self.host} (Dask worker {self.worker})"

    def __format__(self, spec: str) -> str:
        return str(self) if not spec else format(int(self), spec)


# -- configuration ----------------------------------------------------------------------


def configure(settings: dict[str, str]) -> None:
    """Apply ``%isolate_config`` settings that belong here (``scheduler``,
    ``connect_timeout``); raises :class:`IsolateUsageError` naming a bad value."""
    for key, value in settings.items():
        if key == "scheduler":
            config["scheduler"] = value or None
        elif key == "connect_timeout":
            try:
                seconds = float(value)
            except ValueError:
                seconds = -1.0
            if not seconds > 0:
                raise IsolateUsageError(
                    f"connect_timeout={value!r} must be a number of seconds above zero"
                )
            config["connect_timeout"] = seconds
        else:
            raise IsolateUsageError(f"{key!r} is not a setting of the Dask backend")


def split_config(line: str) -> tuple[str, dict[str, str]]:
    """Apply the ``key=value`` items of an ``%isolate_config`` line that are ours.

    Returns the rest of the line (for the other settings' owners) and what was
    applied; a bad value raises :class:`IsolateUsageError` (a ``ValueError``).
    """
    mine: dict[str, str] = {}
    rest = []
    for item in line.split():
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if sep and key in ("scheduler", "connect_timeout"):
            mine[key] = value.strip()
        else:
            rest.append(item)
    configure(mine)
    return " ".join(rest), mine


def describe_config() -> str:
    """The settings as ``key=value`` text, with where the scheduler would come from."""
    scheduler = config["scheduler"] or ""
    parts = [
        f"scheduler={scheduler}",
        f"connect_timeout={config['connect_timeout']:g}",
    ]
    env = os.environ.get(ENV_SCHEDULER)
    if not scheduler and env:
        parts.append(f"(${ENV_SCHEDULER}={env})")
    return " ".join(parts)


def backend_for(options: RunOptions, note: Callable[[str], None]) -> DaskBackend:
    """The ``dask`` backend for one cell (the registry's factory, see :mod:`nbisolate.backends`).

    Connects now, so an unreachable cluster fails before anything runs
    (:class:`DaskBackendError`); ``note`` tells the user of a cluster started here.
    """
    client, source = get_client(options.scheduler, note)
    return DaskBackend(client, source, note)


# -- clients and clusters -----------------------------------------------------------------

_lock = threading.RLock()
_clients: dict[str, Any] = {}
_local: dict[str, Any] = {}  # "cluster", "client": the LocalCluster started here, if any


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise DaskBackendError(
            f"--backend dask needs the 'distributed' package, which this kernel's Python "
            f"({sys.executable}) cannot import ({exc}). Install it with `{INSTALL_HINT}` (the "
            "Dask workers need nbisolate too), restart the kernel and run the cell again; "
            "nothing ran."
        ) from None
    return distributed


def _alive(client: Any) -> bool:
    return getattr(client, "status", None) in ("running", "newly-created", "connecting")


def get_client(
    scheduler: str | None = None, note: Callable[[str], None] | None = None
) -> tuple[Any, str]:
    """A connected client and a few words on where its scheduler came from (see module doc)."""
    distributed = _distributed()
    for address, source in (
        (scheduler, "--scheduler"),
        (config["scheduler"], "%isolate_config scheduler="),
        (os.environ.get(ENV_SCHEDULER), f"${ENV_SCHEDULER}"),
    ):
        if address:
            return _connect(distributed, address.strip(), source), source
    try:
        client = distributed.default_client()
    except ValueError:
        client = None
    if client is not None and _alive(client):
        return client, "the notebook's distributed.Client"
    return _local_client(distributed, note), "a local cluster started by nbisolate"


def _connect(distributed: Any, address: str, source: str) -> Any:
    timeout = float(config["connect_timeout"])
    with _lock:
        client = _clients.get(address)
        if client is not None and _alive(client):
            return client
        try:
            client = distributed.Client(address, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise DaskBackendError(
                f"cannot reach the Dask scheduler at {address} (from {source}) within "
                f"{timeout:g} s: {exc}. Check that the scheduler runs and that this machine "
                "can reach that address and port (tcp:// or tls://, firewall); choose another "
                "with --scheduler ADDRESS or `%isolate_config scheduler=ADDRESS`, or allow more "
                "time with `%isolate_config connect_timeout=SECONDS`. Nothing ran."
            ) from None
        _clients[address] = client
        return client


def _local_client(distributed: Any, note: Callable[[str], None] | None = None) -> Any:
    with _lock:
        client = _local.get("client")
        if client is not None and _alive(client):
            return client
        t0 = time.perf_counter()
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        )
        client = distributed.Client(cluster, set_as_default=False)
        _local.update(cluster=cluster, client=client)
        link = getattr(cluster, "dashboard_link", "") or ""
        (note or _stderr)(
            "nbisolate: no Dask scheduler was given (--scheduler, `%isolate_config scheduler=`, "
            f"${ENV_SCHEDULER} or a distributed.Client in the notebook), so a local Dask cluster "
            f"was started: 2 worker processes x 1 thread, scheduler {cluster.scheduler_address}"
            + (f", dashboard {link}" if link else "")
            + f" ({time.perf_counter() - t0:.1f} s). Later --backend dask cells use it; it "
            "stops with the kernel.\n"
        )
        return client


def _stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def close() -> None:
    """Close the clients nbisolate opened and the local cluster it started, if any."""
    with _lock:
        clients = list(_clients.values()) + [_local.get("client")]
        cluster = _local.get("cluster")
        _clients.clear()
        _local.clear()
        _topics.clear()
    for client in clients:
        if client is not None:
            try:
                client.close()
            except Exception:
                pass
    if cluster is not None:
        try:
            cluster.close()
        except Exception:
            pass


atexit.register(close)


# -- what runs on the workers -------------------------------------------------------------

# The probe travels by value (cloudpickle pickles functions of a module it cannot
# import by value), so it answers even from a worker that lacks nbisolate.
_PROBE_SOURCE = '''
def remote_paths(project_paths, kernel_cwd):
    """sys.path and working directory for a worker subprocess on this node."""
    import os
    import sys

    cwd = kernel_cwd if kernel_cwd and os.path.isdir(kernel_cwd) else os.getcwd()
    paths = [p for p in project_paths if p == "" or os.path.exists(p)]
    paths += [p for p in sys.path if p not in paths]
    return paths, cwd


def probe(modules, project_paths, kernel_cwd):
    """Versions and, of ``modules`` (top-level names), those a worker subprocess cannot find."""
    import importlib.machinery
    import socket
    import sys

    paths, cwd = remote_paths(project_paths, kernel_cwd)
    search = [cwd if p == "" else p for p in paths]

    def importable(name):
        if name in sys.builtin_module_names or name in sys.modules:
            return True
        for finder in sys.meta_path:
            if finder is importlib.machinery.PathFinder:
                continue
            try:
                if finder.find_spec(name, None) is not None:
                    return True
            except Exception:
                pass
        try:
            return importlib.machinery.PathFinder.find_spec(name, search) is not None
        except Exception:
            return False

    def version(name):
        try:
            return getattr(__import__(name), "__version__", "?")
        except Exception:
            return None

    return {
        "python": list(sys.version_info[:3]),
        "executable": sys.executable,
        "host": socket.gethostname(),
        "dill": version("dill"),
        "nbisolate": version("nbisolate"),
        "cwd": cwd,
        "missing": [m for m in modules if not importable(m)],
    }
'''
_PROBE: dict[str, Any] = {"__name__": "nbisolate_dask_probe"}
exec(compile(_PROBE_SOURCE, "<nbisolate dask probe>", "exec"), _PROBE)

# Jobs running in this process when it is a Dask worker, by run id, for _stop_job.
_active: dict[str, Any] = {}
_stop_early: dict[str, str] = {}  # stop requests that arrived before their task started
_active_lock = threading.Lock()


def _stop_job(run_id: str, reason: str) -> bool:
    """Runs in a Dask worker process (``Client.run``): stop one cell's subprocess."""
    with _active_lock:
        job = _active.get(run_id)
        if job is None:
            _stop_early[run_id] = reason
            while len(_stop_early) > 1000:
                _stop_early.pop(next(iter(_stop_early)))
            return False
    job.stop(reason)
    return True


def _task_cancelled(worker: Any, key: Any) -> bool:
    if key is None:
        return False
    try:
        ts = worker.state.tasks.get(key)
    except Exception:
        return False
    return ts is None or ts.state in ("cancelled", "released", "forgotten")


def _remote_run(
    run_id: str,
    topic: str,
    payload: dict[str, Any],
    parts: Sequence[Any],
    project_paths: Sequence[str],
    timeout: float | None,
    label: str,
    max_output: int,
) -> dict[str, Any]:
    """The Dask task: run one cell in a fresh nbisolate worker subprocess on this node.

    Live events go out with ``log_event``; everything (again) comes back as the
    return value, see the module doc.
    """
    import inspect

    from distributed import get_worker
    from distributed.worker import thread_state

    from ..supervisor import Job

    worker = get_worker()
    key = getattr(thread_state, "key", None)
    host = socket.gethostname()
    paths, cwd = _PROBE["remote_paths"](project_paths, payload.get("cwd"))
    data, *buffers = parts
    payload = dict(payload, data=bytes(data) if not isinstance(data, bytes) else data)
    # The subprocess's watchdog follows the process that supervises it: this Dask worker.
    payload.update(sys_path=paths, cwd=cwd, kernel_pid=os.getpid())
    events: queue.SimpleQueue[Event] = queue.SimpleQueue()
    options: dict[str, Any] = {}
    if "use_template" in inspect.signature(Job).parameters:
        options["use_template"] = False  # a plain spawn: nothing of a long-lived Dask worker leaks
    job = Job(
        payload,
        [memoryview(b) for b in buffers],
        on_event=events.put,
        timeout=timeout,
        label=label,
        max_output=max_output,
        **options,
    )
    record: list[tuple[int, str, Any]] = []
    final: tuple[str, Any, list[Any]] | None = None
    exit_data: dict[str, Any] | None = None

    def publish(kind: str, data: Any) -> None:
        seq = len(record)
        record.append((seq, kind, data))
        try:
            worker.log_event(topic, {"run": run_id, "seq": seq, "kind": kind, "data": data})
        except Exception:
            pass  # not msgpack-able, or the worker is closing: the return value has it

    with _active_lock:
        _active[run_id] = job
        early = _stop_early.pop(run_id, None)
    try:
        job.start()
        if early is not None:
            job.stop(early)
        while exit_data is None:
            try:
                event = events.get(timeout=0.5)
            except queue.Empty:
                if _task_cancelled(worker, key):
                    job.stop("interrupt")
                continue
            if event.kind == "started":
                publish("started", {"pid": event.data, "host": host, "worker": worker.address})
            elif event.kind in ("result", "error"):
                final = (event.kind, event.data, [memoryview(b) for b in event.buffers])
            elif event.kind == "exit":
                exit_data = event.data
            else:
                publish(event.kind, event.data)
    finally:
        with _active_lock:
            _active.pop(run_id, None)
        if exit_data is None:  # we are leaving abnormally: the subprocess must not outlive us
            job.stop("interrupt")
    return {
        "events": record,
        "final": final,
        "exit": exit_data,
        "host": host,
        "worker": worker.address,
    }


# -- the kernel side -------------------------------------------------------------------------


class _Topic:
    """One event topic per client: routes live messages to the job whose run id they carry."""

    def __init__(self, client: Any) -> None:
        self.name = f"nbisolate-{client.id}"
        self.jobs: dict[str, DaskJob] = {}
        client.subscribe_topic(self.name, self._on_event)

    def _on_event(self, event: Any) -> None:
        try:
            _, msg = event
            job = self.jobs.get(msg.get("run"))
        except Exception:
            return
        if job is not None:
            job._live(msg)


_topics: dict[str, _Topic] = {}


def _topic_for(client: Any) -> _Topic:
    with _lock:
        topic = _topics.get(client.id)
        if topic is None:
            topic = _topics[client.id] = _Topic(client)
        return topic


def project_paths(path: Sequence[str]) -> list[str]:
    """The entries of the kernel's ``sys.path`` that are the user's, not the installation's.

    A remote subprocess uses its node's own environment; only these (the
    notebook's directory, ``sys.path.insert``-ed project folders) follow it,
    where they exist on the node.
    """
    roots = {
        os.path.realpath(p)
        for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
        if p
    }
    found = []
    for entry in path:
        if entry == "":
            found.append(entry)
            continue
        real = os.path.realpath(entry)
        parts = real.split(os.sep)
        if "site-packages" in parts or "dist-packages" in parts:
            continue
        if any(real == root or real.startswith(root + os.sep) for root in roots):
            continue
        found.append(entry)
    return found


def _kernel_versions() -> dict[str, Any]:
    try:
        import dill

        dill_version = dill.__version__
    except ImportError:  # pragma: no cover - dill is a dependency
        dill_version = None
    from .. import __version__

    return {"python": list(sys.version_info[:3]), "dill": dill_version, "nbisolate": __version__}


def _within(seconds: float, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` in a helper thread, or a clear error after ``seconds``: never a hang."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=call, daemon=True, name="nbisolate-dask-call")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise DaskBackendError(
            f"{what} did not answer within {seconds:g} s; nothing ran. Check the cluster's "
            "dashboard or logs, or allow more time with `%isolate_config connect_timeout=SECONDS`."
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


def _error_event(exc: BaseException) -> Event:
    """An ``error`` event that makes ``CellRun.outcome()`` raise ``exc`` itself."""
    from .. import ship
    from ..protocol import error_body

    shipped = ship.dumps({"exc": exc}, skip_failures=True)
    body = error_body(
        exc,
        traceback=f"{type(exc).__name__}: {exc}\n",
        names=shipped.names,
        data=shipped.data,
        engine=shipped.engine,
    )
    return Event("error", body, list(shipped.buffers))


class DaskBackend:
    """Runs the launches of one cell on a Dask cluster (a :class:`~nbisolate.backends.Backend`).

    One per cell (a sweep shares it): it remembers which workers passed the
    check and which large input buffers it already scattered, so a sweep
    checks once and sends a big array once, not once per value.
    """

    name = "dask"
    here = False

    def __init__(self, client: Any, source: str = "", note: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.source = source
        self.note = note or _stderr
        self.address = getattr(getattr(client, "scheduler", None), "address", None) or "?"
        self._checked: dict[Any, list[str] | None] = {}
        self._scattered: dict[tuple[int, int], tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    # -- before running -----------------------------------------------------------------
    def concurrency(self, runs: int) -> int:
        """Every run of a sweep is submitted at once: the scheduler queues what does not fit."""
        return max(1, runs)

    def check(self, launch: Launch) -> None:
        """Raise :class:`DaskBackendError` (nothing ran) if no worker can run ``launch``."""
        self.workers_for(launch)

    def workers_for(self, launch: Launch) -> list[str] | None:
        """Check the workers for ``launch``; the workers to use (None: any), or raise.

        See the module doc for what is checked. Workers failing the check are
        named in a note and left out, as long as one passes.
        """
        modules = sorted(
            {m.partition(".")[0] for m in launch.modules} - {"builtins", "__main__", ""}
        )
        paths = project_paths(sys.path)
        cwd = os.getcwd()
        key = (tuple(modules), tuple(paths), cwd)
        with self._lock:
            if key in self._checked:
                return self._checked[key]
        timeout = float(config["connect_timeout"])
        where = f"the Dask workers of the scheduler at {self.address}"
        answers = _within(
            timeout,
            where,
            lambda: self.client.run(_PROBE["probe"], modules, paths, cwd, on_error="return"),
        )
        if not answers:
            try:
                _within(timeout + 1, where, lambda: self.client.wait_for_workers(1, timeout=timeout))
            except Exception:
                raise DaskBackendError(
                    f"the Dask scheduler at {self.address} has no workers (waited {timeout:g} s); "
                    "nothing ran. Start some (`dask worker {self.address}`), or scale the cluster."
                ) from None
            answers = _within(
                timeout,
                where,
                lambda: self.client.run(_PROBE["probe"], modules, paths, cwd, on_error="return"),
            )
        mine = _kernel_versions()
        problems = {addr: _problems(info, mine) for addr, info in answers.items()}
        good = sorted(addr for addr, found in problems.items() if not found)
        bad = {addr: found for addr, found in problems.items() if found}
        if not good:
            raise DaskBackendError(
                f"no Dask worker of the scheduler at {self.address} can run this cell; nothing "
                "ran.\n" + _describe(bad) + "\n" + _fixes(bad)
            )
        chosen: list[str] | None = None
        if bad:
            chosen = good
            self.note(
                f"nbisolate: running only on {len(good)} of {len(answers)} Dask workers; the "
                "others cannot run this cell:\n" + _describe(bad) + "\n"
            )
        with self._lock:
            self._checked[key] = chosen
        return chosen

    # -- running ---------------------------------------------------------------------------
    def start(self, launch: Launch, deliver: Callable[[Event], None]) -> DaskJob:
        """Send and submit ``launch`` (to the workers that passed the check); returns its handle."""
        workers = self.workers_for(launch)  # checked already: answered from the cache
        job = DaskJob(self, launch, deliver)
        job.start(workers)
        return job

    def _parts(self, data: bytes, buffers: Sequence[Any], workers: list[str] | None) -> list[Any]:
        """The shipment's pieces as task arguments: big ones scattered once, small ones inline."""
        parts: list[Any] = [data, *buffers]
        out: list[Any] = [None] * len(parts)
        todo: list[tuple[int, Any, tuple[int, int]]] = []
        with self._lock:
            for i, part in enumerate(parts):
                view = memoryview(part).cast("B")
                if view.nbytes < SCATTER_BYTES:
                    out[i] = view.tobytes()
                    continue
                ident = (id(view.obj), view.nbytes)
                known = self._scattered.get(ident)
                if known is not None:
                    out[i] = known[1]
                else:
                    todo.append((i, view, ident))
        if todo:
            futures = _within(
                max(60.0, float(config["connect_timeout"])),
                f"sending the inputs to the Dask cluster at {self.address}",
                lambda: self.client.scatter([v for _, v, _ in todo], hash=False, workers=workers),
            )
            with self._lock:
                for (i, view, ident), future in zip(todo, futures, strict=True):
                    out[i] = future
                    self._scattered[ident] = (view.obj, future)  # keeps id() from being reused
        return out


def _problems(info: Any, mine: dict[str, Any]) -> list[str]:
    if isinstance(info, BaseException):
        return [f"the check itself failed there: {type(info).__name__}: {info}"]
    found = []
    theirs = info.get("python") or [0, 0, 0]
    if list(theirs[:2]) != list(mine["python"][:2]):
        found.append(
            f"Python {'.'.join(map(str, theirs))} ({info.get('executable')}) where the kernel has "
            f"{'.'.join(map(str, mine['python']))}: code and dill streams differ between versions"
        )
    if info.get("dill") != mine["dill"]:
        found.append(
            f"dill {info.get('dill') or 'not installed'} where the kernel has dill {mine['dill']}"
        )
    if info.get("nbisolate") is None:
        found.append("nbisolate is not installed")
    elif info.get("nbisolate") != mine["nbisolate"]:
        found.append(f"nbisolate {info['nbisolate']} where the kernel has {mine['nbisolate']}")
    for name in info.get("missing", ()):
        found.append(
            f"module {name!r}, which the cell's inputs need, cannot be imported there "
            f"(searched its sys.path and the kernel's project folders that exist on it; "
            f"working directory {info.get('cwd')})"
        )
    return found


def _describe(bad: dict[str, list[str]], limit: int = 6) -> str:
    lines = []
    for addr in sorted(bad)[:limit]:
        for problem in bad[addr]:
            lines.append(f"  Dask worker {addr}: {problem}")
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more workers")
    return "\n".join(lines)


def _fixes(bad: dict[str, list[str]]) -> str:
    text = " ".join(p for found in bad.values() for p in found)
    fixes = []
    if "module " in text:
        fixes.append(
            "install the missing modules on the workers (pip, or `client.upload_file(path)` for a "
            "single-file module of yours), or create what needs them inside the cell"
        )
    if "Python " in text or "dill " in text or "nbisolate " in text:
        fixes.append(
            f"run the workers with the kernel's versions (`pip install 'nbisolate[dask]' "
            f"dill=={_kernel_versions()['dill']}` in the workers' environment, same Python minor "
            "version)"
        )
    if not fixes:
        fixes.append("see the worker logs")
    return "To fix: " + "; ".join(fixes) + "."


class DaskJob:
    """The kernel side of one cell on the cluster: a :class:`~nbisolate.backends.RunHandle`."""

    _ids = itertools.count(1)

    def __init__(self, backend: DaskBackend, launch: Launch, deliver: Callable[[Event], None]) -> None:
        self.backend = backend
        self.launch = launch
        self.deliver = deliver
        self.id = f"d{next(self._ids)}-{os.getpid()}"
        self.run_id = uuid.uuid4().hex
        self.label = launch.label
        self.timeout = launch.options.timeout
        self.max_output = launch.options.max_output
        self.pid: RemotePid | None = None
        self.host = ""
        self.worker = ""
        self.started_at = time.time()
        self.future: Any = None
        self._lock = threading.Lock()
        self._next = 0  # the sequence number of the next live event to deliver
        self._pending: dict[int, dict[str, Any]] = {}
        self._over = threading.Event()
        self._stop_reason: str | None = None
        self._topic: _Topic | None = None

    @property
    def info(self) -> HandleInfo:
        return HandleInfo(
            id=self.id,
            label=self.label,
            pid=int(self.pid) if self.pid is not None else None,
            started=self.started_at,
            timeout=self.timeout,
            host=f"{self.host} (Dask worker {self.worker})" if self.host else "",
        )

    def start(self, workers: list[str] | None) -> None:
        launch = self.launch
        payload = dict(launch.payload)
        data = payload.pop("data")
        payload.pop("sys_path", None)  # decided on the node: see _remote_run
        parts = self.backend._parts(data, launch.buffers, workers)
        self._topic = _topic_for(self.backend.client)
        self._topic.jobs[self.run_id] = self
        try:
            self.future = self.backend.client.submit(
                _remote_run,
                self.run_id,
                self._topic.name,
                payload,
                parts,
                project_paths(sys.path),
                self.timeout,
                self.label,
                self.max_output,
                key=f"nbisolate-cell-{self.run_id}",
                pure=False,
                workers=workers,
                allow_other_workers=False,
                retries=0,
            )
        except BaseException:
            self._topic.jobs.pop(self.run_id, None)
            raise
        threading.Thread(target=self._wait, daemon=True, name=f"nbisolate-{self.id}").start()

    # -- events ------------------------------------------------------------------------
    def _emit(self, kind: str, data: Any) -> None:
        if kind in ("stream", "phase") and isinstance(data, list):
            data = tuple(data)
        if kind == "started":
            info = data if isinstance(data, dict) else {"pid": data}
            self.host = str(info.get("host", ""))
            self.worker = str(info.get("worker", ""))
            self.pid = RemotePid(int(info.get("pid") or 0), self.host, self.worker)
            self.started_at = time.time()
            data = self.pid
            self.deliver(Event("started", data))
            return
        self.deliver(Event(kind, data))

    def _live(self, msg: dict[str, Any]) -> None:
        """A live message (client's event loop thread): deliver in sequence order."""
        with self._lock:
            seq = msg.get("seq", -1)
            if self._over.is_set() or seq < self._next:
                return
            self._pending[seq] = msg
            while self._next in self._pending:
                item = self._pending.pop(self._next)
                self._next += 1
                self._emit(item["kind"], item["data"])

    def _wait(self) -> None:
        """Wait for the task, then deliver what the live path missed and the end of the run."""
        try:
            result = self.future.result()
        except BaseException as exc:
            self._finish_failed(exc)
        else:
            self._finish(result)
        finally:
            self._over.set()
            if self._topic is not None:
                self._topic.jobs.pop(self.run_id, None)
            self.future = None

    def _finish(self, result: dict[str, Any]) -> None:
        with self._lock:
            for seq, kind, data in result["events"]:
                if seq >= self._next:
                    self._next = seq + 1
                    self._emit(kind, data)
            self._pending.clear()
            self._over.set()
            if result["final"] is not None:
                kind, body, buffers = result["final"]
                # Dask hands frames over read-only; arrays rebuilt on them must be writable,
                # as they are after a local run.
                writable = [b if not memoryview(b).readonly else bytearray(b) for b in buffers]
                self.deliver(Event(kind, body, writable))
            info = dict(result["exit"] or {})
            if info.get("pid") is not None:
                info["pid"] = RemotePid(info["pid"], result.get("host", ""), result.get("worker", ""))
            self.deliver(Event("exit", info))

    def _finish_failed(self, exc: BaseException) -> None:
        with self._lock:
            self._over.set()
            cancelled = self.future is not None and getattr(self.future, "status", "") == "cancelled"
            stopped = cancelled or self._stop_reason is not None
            if not stopped:
                where = f"Dask worker {self.worker}" if self.worker else "the Dask cluster"
                self.deliver(
                    _error_event(
                        DaskBackendError(
                            f"the cell's task failed on {where} (scheduler {self.backend.address}) "
                            f"outside the cell: {type(exc).__name__}: {exc}. A KilledWorker means "
                            "the Dask worker process itself died (see its log; the cell may have "
                            "run more than once). No notebook variable was changed."
                        )
                    )
                )
            # Always last, as from every handle: whoever lists running workers drops this one.
            self.deliver(
                Event(
                    "exit",
                    {
                        "returncode": None,
                        "reason": (self._stop_reason or "interrupt") if stopped else "error",
                        "error": None if stopped else f"{type(exc).__name__}: {exc}",
                        "elapsed": time.time() - self.started_at,
                        "dropped": 0,
                        "max_output": self.max_output,
                        "pid": self.pid,
                    },
                )
            )

    # -- stopping ------------------------------------------------------------------------
    def stop(self, reason: str = "interrupt") -> None:
        """Stop the remote subprocess as ``Job.stop`` does; returns at once (signal-safe)."""
        if self._stop_reason is None:
            self._stop_reason = reason
        if self._over.is_set():
            return
        threading.Thread(target=self._stop_remote, daemon=True, name=f"nbisolate-stop-{self.id}").start()

    def _stop_remote(self) -> None:
        client = self.backend.client
        reason = self._stop_reason or "interrupt"
        try:
            client.run(
                _stop_job,
                self.run_id,
                reason,
                workers=[self.worker] if self.worker else None,
                on_error="ignore",
            )
        except Exception:
            pass
        future = self.future
        if not self.worker and future is not None:
            future.cancel()  # still queued: it never runs
            return
        # Normally the task reports the stopped subprocess within the grace period; if
        # it cannot (its worker is wedged), cancel it, which its watcher also obeys.
        if not self._over.wait(GRACE_SECONDS + 8.0) and future is not None:
            future.cancel()
