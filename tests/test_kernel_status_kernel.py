"""The kernel status a front end shows while an isolated cell runs: "busy", until the cell ends.

A front end shows the last ``status`` message on IOPub, whatever request it was
about.  These tests replay the status messages as JupyterLab does, while comm
messages reach the kernel on the main shell, on a subshell (JupyterLab 4.6) and
with a fresh subshell created on the control channel, mid-run.
"""

from __future__ import annotations

import queue
import time
from typing import Any

import pytest

from .kernel import Kernel
from .test_labcomm_kernel import StatusClient, create_subshell, running, supports_subshells


class StatusView:
    """What the status bar shows: the ``execution_state`` of the last ``status`` message."""

    def __init__(self, kernel: Kernel) -> None:
        self.kc = kernel.kc
        self.state: str | None = None
        self.seen: list[tuple[str, str]] = []  # (state, parent msg_type)

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                msg = self.kc.get_iopub_msg(timeout=0.05)
            except queue.Empty:
                continue
            self.take(msg)

    def take(self, msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "status":
            self.state = msg["content"]["execution_state"]
            self.seen.append((self.state, msg["parent_header"].get("msg_type", "")))


def _status_stays_busy(kernel: Kernel, subshell_id: str | None) -> None:
    client = StatusClient(kernel, subshell_id=subshell_id)
    client.open()
    view = StatusView(kernel)
    msg_id = kernel.kc.execute("%%isolate\nimport time; time.sleep(4)")
    # The status client reads IOPub: let it hand the status messages over.
    original_wait = client.wait

    def wait(predicate: Any, timeout: float = 15.0) -> dict[str, Any]:
        found = original_wait(predicate, timeout)
        for msg in client.other:
            view.take(msg)
        client.other.clear()
        return found

    client.wait = wait  # type: ignore[method-assign]
    client.wait(running)
    for _ in range(3):  # as the popup does when it opens, while the cell runs
        client.send({"action": "refresh"})
        client.wait(lambda data: True)
        view.drain(0.3)
        assert view.state == "busy", f"the status read {view.state!r} mid-run: {view.seen}"
    assert any(parent == "comm_msg" for _, parent in view.seen) or subshell_id is None
    # The cell's own idle still ends it.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            msg = kernel.kc.get_iopub_msg(timeout=0.1)
        except queue.Empty:
            continue
        view.take(msg)
        if msg["msg_type"] == "status" and msg["parent_header"].get("msg_id") == msg_id:
            if msg["content"]["execution_state"] == "idle":
                break
    view.drain(0.3)
    assert view.state == "idle", view.seen
    client.close()


def test_status_stays_busy_with_comm_messages_on_the_main_shell(kernel: Kernel) -> None:
    _status_stays_busy(kernel, None)


def test_status_stays_busy_with_comm_messages_on_a_subshell(kernel: Kernel) -> None:
    if not supports_subshells(kernel):
        pytest.skip("this ipykernel has no kernel subshells")
    _status_stays_busy(kernel, create_subshell(kernel))


def test_a_subshell_created_mid_run_leaves_the_status_busy(kernel: Kernel) -> None:
    """JupyterLab creates a comm's subshell (a control request) when a widget first needs one."""
    if not supports_subshells(kernel):
        pytest.skip("this ipykernel has no kernel subshells")
    view = StatusView(kernel)
    msg_id = kernel.kc.execute("%%isolate\nimport time; time.sleep(3)")
    view.drain(1.5)
    assert view.state == "busy", view.seen
    kc = kernel.kc
    request = kc.session.msg("create_subshell_request", {})
    kc.control_channel.send(request)
    kc.control_channel.get_msg(timeout=10)
    view.drain(0.5)
    assert ("idle", "create_subshell_request") in view.seen, view.seen
    assert view.state == "busy", view.seen
    view.drain(4)
    assert view.state == "idle", view.seen
    reply = kc.get_shell_msg(timeout=10)
    assert reply["parent_header"]["msg_id"] == msg_id


def test_an_ordinary_cell_is_untouched(kernel: Kernel) -> None:
    """Only isolated cells get the extra "busy": an ordinary cell's statuses are ipykernel's."""
    view = StatusView(kernel)
    view.drain(1.0)  # what earlier tests' requests still say (ipykernel 6 answers late)
    view.seen.clear()
    kernel.kc.execute("1 + 1")
    view.drain(1.0)
    assert [state for state, kind in view.seen if kind == "execute_request"] == ["busy", "idle"], view.seen


def test_status_stays_busy_while_an_isolated_cell_runs_on_a_subshell(kernel: Kernel) -> None:
    """The cell itself on a subshell, a comm message handled on another: still busy."""
    if not supports_subshells(kernel):
        pytest.skip("this ipykernel has no kernel subshells")
    cell_shell = create_subshell(kernel)
    client = StatusClient(kernel, subshell_id=create_subshell(kernel))
    client.open()
    kc = kernel.kc
    content = {"code": "%%isolate\nimport time; time.sleep(3)", "silent": False,
               "store_history": True, "user_expressions": {}, "allow_stdin": False,
               "stop_on_error": True}
    msg = kc.session.msg("execute_request", content)
    msg["header"]["subshell_id"] = cell_shell
    kc.shell_channel.send(msg)
    view = StatusView(kernel)
    client.wait(running)
    for m in client.other:
        view.take(m)
    client.other.clear()
    client.send({"action": "refresh"})
    client.wait(lambda data: True)
    for m in client.other:
        view.take(m)
    view.drain(0.3)
    assert ("idle", "comm_msg") in view.seen, view.seen
    assert view.state == "busy", view.seen
    client.wait(lambda data: data["workers"] == [], timeout=20)
    for m in client.other:
        view.take(m)
    view.drain(1.0)
    assert view.state == "idle", str(view.seen[-8:])
    client.close()
