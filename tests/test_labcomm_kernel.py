"""The ``nbisolate.status`` comm, driven through a real kernel as JupyterLab drives it.

The client opens the comm with a ``comm_open`` shell message, runs ``%%isolate``
cells and reads the ``comm_msg`` messages the kernel publishes on IOPub.  The
front end's two requests are checked too: ``refresh``, and ``stop`` both on the
main shell and on a kernel subshell (JupyterLab 4.6 sends comm messages over a
subshell when the kernel supports them).
"""

from __future__ import annotations

import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from nbisolate import labcomm

from .kernel import Kernel

# The same call load_ipython_extension makes; repeating it is harmless.
LOAD = "%load_ext nbisolate\nfrom nbisolate import labcomm as _lc\n_lc.register(get_ipython())"
WORKER_KEYS = {"id", "label", "pid", "started", "timeout", "host", "cell"}


class StatusClient:
    """One status comm on a kernel, and the IOPub messages that came for it."""

    def __init__(self, kernel: Kernel, subshell_id: str | None = None) -> None:
        self.kernel = kernel
        self.kc = kernel.kc
        self.comm_id = uuid.uuid4().hex
        self.subshell_id = subshell_id
        self.seen: list[dict[str, Any]] = []
        self.other: list[dict[str, Any]] = []

    def _send(self, msg_type: str, content: dict[str, Any]) -> dict[str, Any]:
        msg = self.kc.session.msg(msg_type, content)
        if self.subshell_id is not None:
            msg["header"]["subshell_id"] = self.subshell_id
        self.kc.shell_channel.send(msg)
        return msg

    def open(self) -> dict[str, Any]:
        self._send(
            "comm_open", {"comm_id": self.comm_id, "target_name": labcomm.TARGET, "data": {}}
        )
        return self.wait(lambda data: True)

    def send(self, data: dict[str, Any]) -> None:
        self._send("comm_msg", {"comm_id": self.comm_id, "data": data})

    def close(self) -> None:
        self._send("comm_close", {"comm_id": self.comm_id, "data": {}})

    def wait(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15.0
    ) -> dict[str, Any]:
        """The first status message from now on for which ``predicate`` holds."""
        data = self._take(predicate, timeout)
        if data is None:
            raise AssertionError(f"no matching status message in {timeout} s; got {self.seen}")
        return data

    def drain(self, seconds: float) -> None:
        """Take in what comes for ``seconds``: status messages into ``seen``, the rest into ``other``."""
        self._take(lambda data: False, seconds)

    def _take(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(0.01, min(0.1, deadline - time.monotonic())))
            except queue.Empty:
                continue
            content = msg["content"]
            if msg["msg_type"] == "comm_msg" and content.get("comm_id") == self.comm_id:
                self.seen.append(content["data"])
                if predicate(content["data"]):
                    return content["data"]
            elif msg["msg_type"] == "comm_close" and content.get("comm_id") == self.comm_id:
                raise AssertionError("the kernel closed the status comm")
            else:
                self.other.append(msg)
        return None

    def reply(self, msg_id: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            reply = self.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply


def running(data: dict[str, Any]) -> bool:
    return bool(data["workers"])


def idle(data: dict[str, Any]) -> bool:
    return data["workers"] == []


@pytest.fixture(scope="module")
def status_kernel() -> Iterator[Kernel]:
    k = Kernel()
    try:
        k.run(LOAD)
        yield k
    finally:
        k.shutdown()


def create_subshell(kernel: Kernel) -> str:
    kc = kernel.kc
    msg = kc.session.msg("create_subshell_request", {})
    kc.control_channel.send(msg)
    deadline = time.monotonic() + 10
    while True:
        reply = kc.control_channel.get_msg(timeout=max(0.1, deadline - time.monotonic()))
        if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
            assert reply["content"]["status"] == "ok", reply["content"]
            return reply["content"]["subshell_id"]


def supports_subshells(kernel: Kernel) -> bool:
    kc = kernel.kc
    msg_id = kc.kernel_info()
    while True:
        reply = kc.get_shell_msg(timeout=10)
        if reply["parent_header"].get("msg_id") == msg_id:
            return "kernel subshells" in reply["content"].get("supported_features", [])


def test_open_sends_list_then_worker_then_empty(status_kernel: Kernel) -> None:
    client = StatusClient(status_kernel)
    first = client.open()
    assert first == {"workers": []}

    before = time.time()
    msg_id = client.kc.execute("%%isolate\nimport time; time.sleep(2)")
    data = client.wait(running)
    (worker,) = data["workers"]
    assert set(worker) == WORKER_KEYS
    assert isinstance(worker["id"], str) and worker["id"]
    assert isinstance(worker["pid"], int) and worker["pid"] != status_kernel.pid
    assert isinstance(worker["started"], float)
    assert before - 5 <= worker["started"] <= time.time() + 1
    assert worker["timeout"] is None
    assert isinstance(worker["label"], str) and isinstance(worker["host"], str)

    client.wait(idle, timeout=20)
    assert client.reply(msg_id)["content"]["status"] == "ok"
    client.close()


def test_a_worker_names_its_cell(status_kernel: Kernel) -> None:
    """The id JupyterLab sends with the request, the execution count and the request's id."""
    client = StatusClient(status_kernel)
    client.open()
    kc = client.kc
    content = {
        "code": "%%isolate\nimport time\ntime.sleep(1.5)",
        "silent": False,
        "store_history": True,
        "user_expressions": {},
        "allow_stdin": False,
        "stop_on_error": True,
    }
    msg = kc.session.msg("execute_request", content, metadata={"cellId": "cell-abc"})
    kc.shell_channel.send(msg)
    (worker,) = client.wait(running)["workers"]
    cell = worker["cell"]
    assert cell["id"] == "cell-abc" and cell["msg_id"] == msg["header"]["msg_id"], worker
    reply = client.reply(msg["header"]["msg_id"])
    assert cell["count"] == reply["content"]["execution_count"], (cell, reply["content"])
    assert worker["label"] == "import time"
    client.wait(idle)
    client.close()


def test_refresh_answers_with_the_list(status_kernel: Kernel) -> None:
    client = StatusClient(status_kernel)
    client.open()
    client.send({"action": "refresh"})
    assert client.wait(lambda data: True) == {"workers": []}
    client.close()


def test_timeout_is_reported(status_kernel: Kernel) -> None:
    client = StatusClient(status_kernel)
    client.open()
    msg_id = client.kc.execute("%%isolate --timeout 30\nimport time; time.sleep(1)")
    (worker,) = client.wait(running)["workers"]
    assert worker["timeout"] == 30.0
    client.wait(idle)
    client.reply(msg_id)
    client.close()


def _stop_running_cell(client: StatusClient) -> None:
    client.open()
    msg_id = client.kc.execute("%%isolate\nimport time; time.sleep(30)")
    (worker,) = client.wait(running)["workers"]
    # Let the worker get past its start-up, as a person clicking Stop would.
    time.sleep(1.0)
    sent = time.monotonic()
    client.send({"action": "stop", "id": worker["id"]})
    client.wait(idle, timeout=10)
    reply = client.reply(msg_id, timeout=10)
    took = time.monotonic() - sent
    assert reply["content"]["status"] == "error"
    assert took < 8, f"stopping took {took:.1f} s"
    client.close()


def test_stop_on_the_main_shell_while_the_cell_runs(status_kernel: Kernel) -> None:
    _stop_running_cell(StatusClient(status_kernel))


def test_stop_on_a_subshell_while_the_cell_runs(status_kernel: Kernel) -> None:
    if not supports_subshells(status_kernel):
        pytest.skip("this ipykernel has no kernel subshells")
    _stop_running_cell(StatusClient(status_kernel, subshell_id=create_subshell(status_kernel)))


def test_stop_of_unknown_worker_is_harmless(status_kernel: Kernel) -> None:
    client = StatusClient(status_kernel)
    client.open()
    client.send({"action": "stop", "id": "no-such-worker"})
    assert client.wait(lambda data: True) == {"workers": []}
    client.close()


# -- the publisher alone, with stand-ins for the registry and comms -------------------


class FakeRegistry:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jobs: dict[str, Any] = {}
        self.subscribers: list[Callable[[str, Any], None]] = []
        self.stopped: list[str] = []

    def subscribe(self, callback: Callable[[str, Any], None]) -> Callable[[], None]:
        self.subscribers.append(callback)
        return lambda: self.subscribers.remove(callback)

    def running(self) -> list[Any]:
        with self.lock:
            return list(self.jobs.values())

    def stop(self, job_id: str) -> bool:
        self.stopped.append(job_id)
        self.end(job_id)
        return True

    def start(self, job_id: str) -> None:
        from types import SimpleNamespace

        info = SimpleNamespace(
            id=job_id, label=f"cell {job_id}", pid=1000, started=time.time(), timeout=None, host="h"
        )
        # Events are emitted with the registry's lock held, as a registry may do.
        with self.lock:
            self.jobs[job_id] = info
            for callback in list(self.subscribers):
                callback("started", info)

    def end(self, job_id: str) -> None:
        with self.lock:
            info = self.jobs.pop(job_id, None)
            for callback in list(self.subscribers):
                callback("ended", info)


class FakeComm:
    def __init__(self) -> None:
        self.comm_id = uuid.uuid4().hex
        self.sent: list[dict[str, Any]] = []
        self.closed = False
        self.msg_cb: Callable[[dict[str, Any]], None] | None = None
        self.close_cb: Callable[[dict[str, Any]], None] | None = None

    def on_msg(self, cb: Callable[[dict[str, Any]], None]) -> None:
        self.msg_cb = cb

    def on_close(self, cb: Callable[[dict[str, Any]], None]) -> None:
        self.close_cb = cb

    def send(self, data: dict[str, Any]) -> None:
        self.sent.append(data)

    def close(self) -> None:
        self.closed = True

    def receive(self, data: dict[str, Any]) -> None:
        assert self.msg_cb is not None
        self.msg_cb({"content": {"comm_id": self.comm_id, "data": data}})


def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_publisher_last_message_matches_registry_after_bursts_from_threads() -> None:
    registry = FakeRegistry()
    publisher = labcomm._Publisher(lambda: registry)
    comm = FakeComm()
    publisher.open(comm, {})
    assert eventually(lambda: comm.sent == [{"workers": []}])

    def churn(n: int) -> None:
        for i in range(20):
            registry.start(f"{n}-{i}")
            if i % 2:
                registry.end(f"{n}-{i}")

    threads = [threading.Thread(target=churn, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = sorted(job.id for job in registry.running())
    assert len(expected) == 80
    assert eventually(lambda: sorted(w["id"] for w in comm.sent[-1]["workers"]) == expected)
    # Bursts are coalesced rather than sent once per event.
    assert len(comm.sent) < 160


def test_publisher_stop_and_refresh_and_close() -> None:
    registry = FakeRegistry()
    publisher = labcomm._Publisher(lambda: registry)
    comm = FakeComm()
    publisher.open(comm, {})
    registry.start("a")
    assert eventually(
        lambda: comm.sent and comm.sent[-1]["workers"] and comm.sent[-1]["workers"][0]["id"] == "a"
    )
    assert comm.sent[-1]["workers"][0] == {
        "cell": None,
        "id": "a",
        "label": "cell a",
        "pid": 1000,
        "started": pytest.approx(time.time(), abs=5),
        "timeout": None,
        "host": "h",
    }
    comm.receive({"action": "stop", "id": "a"})
    assert registry.stopped == ["a"]
    assert eventually(lambda: comm.sent[-1] == {"workers": []})
    count = len(comm.sent)
    comm.receive({"action": "refresh"})
    assert eventually(lambda: len(comm.sent) == count + 1)

    assert comm.close_cb is not None
    comm.close_cb({"content": {"comm_id": comm.comm_id}})
    assert eventually(lambda: publisher._thread is None)
    registry.start("b")
    time.sleep(0.1)
    assert len(comm.sent) == count + 1


def test_publisher_keeps_a_bounded_number_of_comms() -> None:
    registry = FakeRegistry()
    publisher = labcomm._Publisher(lambda: registry)
    comms = [FakeComm() for _ in range(labcomm.MAX_COMMS + 3)]
    for comm in comms:
        publisher.open(comm, {})
    assert [c.closed for c in comms[:3]] == [True, True, True]
    assert not any(c.closed for c in comms[3:])
    comm_ids = {c.comm_id for c in comms}
    for comm in comms:
        comm_ids.discard(comm.comm_id)
        comm.close_cb({"content": {"comm_id": comm.comm_id}})  # type: ignore[misc]
    assert eventually(lambda: publisher._thread is None)


def test_register_is_a_no_op_without_a_kernel() -> None:
    class TerminalShell:
        kernel = None

    labcomm.register(TerminalShell())
    labcomm.register(object())


def _execute_with_metadata(kernel: Kernel, code: str, metadata: dict[str, Any]) -> list[dict]:
    kc = kernel.kc
    content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
               "allow_stdin": False, "stop_on_error": True}
    msg = kc.session.msg("execute_request", content, metadata=metadata)
    kc.shell_channel.send(msg)
    msg_id = msg["header"]["msg_id"]
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            out = kc.get_iopub_msg(timeout=0.1)
        except queue.Empty:
            continue
        if out["parent_header"].get("msg_id") != msg_id:
            continue
        if out["msg_type"] == "status" and out["content"]["execution_state"] == "idle":
            return seen
        seen.append(out)
    raise AssertionError(f"no idle for {code!r}")


def test_a_cell_marked_isolated_runs_isolated_with_its_options(status_kernel: Kernel) -> None:
    """The mark "Run Cell Isolated" leaves in the cell metadata makes Shift+Enter run it isolated."""
    kernel_pid = status_kernel.pid
    code = "import os, time\nprint(os.getpid())\ntime.sleep(3)"
    mark = {"nbisolate": {"isolate": True, "options": "--timeout 1"}, "cellId": "c1"}
    seen = _execute_with_metadata(status_kernel, code, mark)
    text = "".join(m["content"].get("text", "") for m in seen if m["msg_type"] == "stream")
    errors = [m["content"] for m in seen if m["msg_type"] == "error"]
    assert str(kernel_pid) not in text and re.search(r"^\d+$", text.split("\n")[0]), text
    assert errors and "IsolateTimeout" in errors[0]["ename"], errors  # --timeout 1 held
    # Unmarked, or marked off: an ordinary cell.
    for metadata in ({}, {"nbisolate": {"isolate": False}}):
        seen = _execute_with_metadata(status_kernel, "import os; print(os.getpid())", metadata)
        text = "".join(m["content"].get("text", "") for m in seen if m["msg_type"] == "stream")
        assert text.strip() == str(kernel_pid), text
