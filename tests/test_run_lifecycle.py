"""The run lifecycle without a kernel: options, the run and sweep state machines, backends.

The kernel tests prove what a user sees; these pin the shape underneath:
options are validated once and cannot be dropped by a sweep, a run turns
events into an outcome, a sweep keeps order and failures, and a backend is
anything that implements the small interface in :mod:`nbisolate.backends`.
"""

from __future__ import annotations

import dataclasses
import os
import threading

import pytest

from nbisolate import backends, ship
from nbisolate.errors import IsolateTimeout, IsolateUsageError, WorkerCrashed
from nbisolate.events import KINDS, Event
from nbisolate.options import MIN_MEM, RunOptions
from nbisolate.runner import CellRun, run_isolated
from nbisolate.sweep import Sweep, SweepError


@pytest.fixture(scope="module", autouse=True)
def _template_closed():
    """Real runs below start this process's template; it must not outlive the module."""
    yield
    from nbisolate.supervisor import launcher

    launcher.close()


# -- RunOptions -------------------------------------------------------------------------


def test_options_normalize_sizes_and_names_once():
    opts = RunOptions(inputs=["a", "b"], outputs="c", timeout=5, mem="64M", max_result="1K")
    assert opts.inputs == ("a", "b") and opts.outputs == ("c",)
    assert opts.timeout == 5.0 and opts.mem == 64 * 1024**2 and opts.max_result == 1024
    assert opts == RunOptions(inputs=("a", "b"), outputs=["c"], timeout=5.0, mem=64 * 1024**2, max_result=1024)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.timeout = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"timeout": 0}, ["--timeout", "above zero", "nothing ran"]),
        ({"timeout": -1}, ["--timeout", "above zero"]),
        ({"timeout": float("nan")}, ["--timeout", "above zero"]),
        ({"timeout": "soon"}, ["--timeout", "above zero"]),
        ({"mem": "1K"}, ["--mem 1K is too small", "32M"]),
        ({"mem": "lots"}, ["cannot read size 'lots'", "500M or 2G"]),
        ({"max_result": "-3M"}, ["-3M", "more than zero"]),
        ({"outputs": ["ok", "not a name"]}, ["--out", "not a name", "identifiers"]),
    ],
)
def test_bad_options_say_which_and_what_to_do(values, words):
    with pytest.raises(IsolateUsageError) as info:
        RunOptions(**values)
    for word in words:
        assert word in str(info.value)


def test_derived_options_keep_every_option_and_are_checked_again():
    opts = RunOptions(timeout=2, mem=MIN_MEM, max_result="1M", max_output="1K", quiet=True)
    derived = dataclasses.replace(opts, inputs=("x",), outputs=("y",))
    for field in dataclasses.fields(RunOptions):
        if field.name not in ("inputs", "outputs"):
            assert getattr(derived, field.name) == getattr(opts, field.name), field.name
    with pytest.raises(IsolateUsageError):
        dataclasses.replace(opts, timeout=-1)
    assert "--timeout 2" in opts.describe() and "--max-result 1.0 MB" in opts.describe()


def test_backend_choice_comes_from_the_registry():
    assert set(backends.names()) >= {"local", "dask"}
    assert backends.chosen_name(RunOptions()) == "local"
    assert backends.chosen_name(RunOptions(scheduler="tcp://127.0.0.1:1")) == "dask"
    with pytest.raises(IsolateUsageError, match="not one of local, dask"):
        backends.chosen_name(RunOptions(backend="ray"))
    with pytest.raises(IsolateUsageError, match="--scheduler needs --backend dask"):
        backends.chosen_name(RunOptions(backend="local", scheduler="tcp://127.0.0.1:1"))
    with pytest.raises(IsolateUsageError):
        backends.set_default("nowhere")


# -- a backend that delivers what a script says ------------------------------------------


class ScriptedHandle:
    """A run handle whose worker "ran" the cell by the script, from its own thread."""

    def __init__(self, backend: ScriptedBackend, launch: backends.Launch, deliver) -> None:
        self.id = f"scripted-{len(backend.started)}"
        self.launch = launch
        self.deliver = deliver
        self.stopped: str | None = None
        self.pid = 10_000 + len(backend.started)
        self._go = threading.Event()

    @property
    def info(self) -> backends.HandleInfo:
        return backends.HandleInfo(self.id, self.launch.label, self.pid, 0.0, None, "here")

    def stop(self, reason: str = "interrupt") -> None:
        self.stopped = reason
        self._go.set()


class ScriptedBackend:
    """Each launch gets ``script(payload)``: a list of events; the handle delivers them in a thread.

    The payload is real (the run's plan and shipment); only the worker is a script, so
    what is tested is the run's and the sweep's handling of what a worker says.
    """

    name = "scripted"

    def __init__(self, script, limit: int = 2, wait_for_stop: bool = False) -> None:
        self.script = script
        self.limit = limit
        self.wait_for_stop = wait_for_stop
        self.started: list[ScriptedHandle] = []
        self.checked = 0
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def check(self, launch: backends.Launch) -> None:
        self.checked += 1

    def concurrency(self, runs: int) -> int:
        return min(self.limit, runs)

    def start(self, launch: backends.Launch, deliver) -> ScriptedHandle:
        handle = ScriptedHandle(self, launch, deliver)
        self.started.append(handle)
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)

        def play() -> None:
            deliver(Event("started", handle.pid))
            if self.wait_for_stop:
                handle._go.wait(10)
                deliver(Event("exit", _exit(handle.pid, handle.stopped or "crashed")))
            else:
                for event in self.script(launch.payload):
                    deliver(event)
            with self._lock:
                self.running -= 1

        threading.Thread(target=play, daemon=True).start()
        return handle


def _exit(pid: int, reason: str, returncode: int | None = 0) -> dict:
    return {"returncode": returncode, "reason": reason, "elapsed": 0.1, "dropped": 0,
            "max_output": 0, "pid": pid}


def _values(payload: dict) -> dict:
    return ship.loads(payload["inputs"], payload["data"], [], payload["engine"])


def _result(values: dict) -> Event:
    shipment = ship.dumps(values, skip_failures=True)
    body = {"names": shipment.names, "data": shipment.data, "engine": shipment.engine, "skipped": {}}
    return Event("result", body, list(shipment.buffers))


def test_a_run_applies_its_result_and_tells_listeners_in_order():
    def script(payload):
        n = _values(payload)["n"]
        return [Event("stream", ("stdout", "hi\n")), _result({"square": n * n}), Event("exit", _exit(1, "done"))]

    backend = ScriptedBackend(script)
    ns = {"n": 7}
    heard: list[Event] = []
    run = CellRun("square = n * n", ns, backend=backend, sink=_Sink())
    run.listeners.append(heard.append)
    run.prepare()
    assert run.run_sync() is None
    assert ns["square"] == 49 and run.returned == ["square"]
    kinds = [e.kind for e in heard]
    assert kinds[:3] == ["planned", "phase", "phase"] and kinds[-2:] == ["applied", "done"]
    assert "shipped" in kinds and "stream" in kinds and set(kinds) <= set(KINDS)
    assert heard[0].data["inputs"] == ["n"] and heard[0].data["types"] == {"n": "int"}
    assert backends.running.running() == []  # listed from started to exit, then gone


def test_a_run_that_timed_out_or_died_changes_nothing_and_says_how():
    ns = {"n": 1}
    run = CellRun("m = n", ns, RunOptions(timeout=1.5), backend=ScriptedBackend(
        lambda p: [Event("exit", _exit(42, "timeout", -15))]), sink=_Sink())
    with pytest.raises(IsolateTimeout, match="1.5"):
        run.run_sync()
    run = CellRun("m = n", ns, backend=ScriptedBackend(lambda p: [
        Event("sysexit", {"code": "3", "arg": 3, "status": 3}), Event("exit", _exit(43, "crashed", 3))]),
        sink=_Sink())
    with pytest.raises(SystemExit) as exited:  # as the same code raises in an ordinary cell
        run.run_sync()
    assert exited.value.code == 3
    run = CellRun("m = n", ns, backend=ScriptedBackend(lambda p: [Event("exit", _exit(44, "crashed", -9))]),
                  sink=_Sink())
    with pytest.raises(WorkerCrashed, match="SIGKILL"):
        run.run_sync()
    assert ns == {"n": 1}


def test_interrupt_stops_the_handle_and_binds_nothing():
    backend = ScriptedBackend(None, wait_for_stop=True)
    ns = {"n": 1}
    run = CellRun("m = n", ns, backend=backend, sink=_Sink())
    run.listeners.append(lambda e: e.kind == "started" and run.interrupt())
    with pytest.raises(KeyboardInterrupt, match="interrupted"):
        run.run_sync()
    assert backend.started[0].stopped == "interrupt" and "m" not in ns


# -- sweeps --------------------------------------------------------------------------------


class _Sink:
    def __init__(self) -> None:
        self.text: list[tuple[str, str]] = []

    def stream(self, name: str, text: str) -> None:
        self.text.append((name, text))

    def display(self, kind: str, data: dict) -> None:
        pass


def test_sweep_derives_every_run_from_the_cells_options():
    """--over with --max-result once ran every value with no result limit."""
    opts = RunOptions(timeout=9, max_result="1K", mem=MIN_MEM, max_output="2K")
    template = CellRun("y = x + base", {"base": 1}, opts, backend=ScriptedBackend(None))
    sweep = Sweep(template, "x", [1, 2, 3])
    sweep.prepare()
    assert sweep.runs[0].launch is not None
    assert all(run.launch is None for run in sweep.runs[1:])  # serialized as each starts
    for run in sweep.runs:
        assert run.options == dataclasses.replace(opts, inputs=None, outputs=("y",))
        if run.launch is None:
            run.prepare(check=False)
        assert run.launch is not None and run.launch.payload["max_result"] == 1024
        assert run.launch.payload["mem"] == MIN_MEM
    assert template.backend.checked == 1  # once for the whole sweep


def test_sweep_keeps_order_and_failures_and_honours_concurrency():
    def script(payload):
        x = _values(payload)["x"]
        if x == 2:
            exc = ship.dumps({"exc": ValueError("two")})
            body = {"type": "builtins.ValueError", "message": "two", "traceback": "ValueError: two\n",
                    "names": exc.names, "data": exc.data, "engine": exc.engine}
            return [Event("error", body), Event("exit", _exit(1, "done"))]
        return [_result({"y": x * 10}), Event("exit", _exit(1, "done"))]

    backend = ScriptedBackend(script, limit=2)
    ns: dict = {}
    sink = _Sink()
    template = CellRun("y = x * 10", ns, backend=backend, sink=sink)
    heard: list[Event] = []
    template.listeners.append(heard.append)
    sweep = Sweep(template, "x", [1, 2, 3, 4, 5])
    with pytest.raises(SweepError) as info:
        sweep.run_sync()
    assert ns["y"] == [10, None, 30, 40, 50]
    assert list(info.value.errors) == [1] and "x=2: ValueError: two" in str(info.value)
    assert backend.most_at_once <= 2 and len(backend.started) == 5
    progress = [e.data for e in heard if e.kind == "sweep"]
    assert progress[-1]["done"] == 5 and progress[-1]["failed"] == 1
    planned = next(e.data for e in heard if e.kind == "planned")
    assert planned["types"]["x"] == "int" and planned["over"] == {"name": "x", "count": 5}


def test_sweep_with_max_result_leaves_out_large_results_of_every_value(tmp_path):
    """A real sweep on the local backend, in this process (no kernel): each value's worker
    obeys --max-result."""
    ns: dict = {}
    template = CellRun(
        "small = x\nbig = bytes(4096) * x", ns, RunOptions(max_result="2K", timeout=60), sink=_Sink()
    )
    sweep = Sweep(template, "x", [1, 2])
    sweep.run_sync()
    assert ns["small"] == [1, 2]
    assert "big" not in ns  # over the limit for every value: left out, named
    skipped = [run.skipped for run in sweep.runs]
    assert all("big" in s for s in skipped), skipped


def test_run_isolated_takes_options_as_keywords():
    ns = {"a": 2}
    assert run_isolated("b = a ** 10\nb + 1", ns, timeout=60, max_result="1M") == 1025
    assert ns["b"] == 1024
    with pytest.raises(IsolateUsageError, match="--mem"):
        run_isolated("b = 1", ns, mem="1K")


def test_local_backend_reports_concurrency_by_cores():
    from nbisolate.backends.local import LocalBackend

    assert LocalBackend().concurrency(1000) == (os.cpu_count() or 1)
    assert LocalBackend().concurrency(1) == 1
    assert isinstance(LocalBackend(), backends.Backend)


class _Counted:
    """Counts how often it is serialized (in this process)."""

    dumps = 0

    def __init__(self, n: int) -> None:
        self.n = n

    def __reduce__(self):
        type(self).dumps += 1
        return (_Counted, (self.n,))


def test_sweep_serializes_the_shared_inputs_once():
    """--over with a large input once held one copy of it per value; now there is one."""
    _Counted.dumps = 0
    ns = {"big": _Counted(5), "base": list(range(1000))}
    template = CellRun("y = x * big.n + len(base)", ns, RunOptions(timeout=60), sink=_Sink())
    sweep = Sweep(template, "x", list(range(6)))
    sweep.run_sync()
    assert ns["y"] == [x * 5 + 1000 for x in range(6)]
    assert _Counted.dumps == 1
    shared = {id(run.shared) for run in sweep.runs}
    assert len(shared) == 1 and sweep.runs[0].shared.names == ["big", "base"]
