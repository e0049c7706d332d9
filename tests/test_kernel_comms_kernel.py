"""Comm messages reach a kernel whose cell is awaiting, on every supported ipykernel.

An awaited ``%%isolate`` cell relies on this for its Stop button and the
JupyterLab status item's stop request.  ipykernel 7.4+ does it by itself; on
older kernels (all that Python 3.10 can have) ``nbisolate.kernel_comms`` does
it.  Checked through a real kernel: a front end's ``comm_open``/``comm_msg``
sent while a cell awaits must be handled before the cell ends, while an
``execute_request`` sent meanwhile still waits for the cell; the cell's own
output and status stay its own, and interrupting a later cell still works.
"""

from __future__ import annotations

import queue
import textwrap
import time
import uuid
from typing import Any

SETUP = textwrap.dedent(
    """
    import asyncio, comm as _comm
    seen = []
    def _probe_target(c, msg):
        seen.append(("open", msg["content"]["data"]))
        c.on_msg(lambda m: seen.append(("msg", m["content"]["data"])))
    _kernel = get_ipython().kernel
    (getattr(_kernel, "comm_manager", None) or _comm.get_comm_manager()).register_target(
        "nbisolate.test.probe", _probe_target
    )
    """
)

WAITING_CELL = textwrap.dedent(
    """
    import signal
    from nbisolate.kernel_comms import let_comms_through
    # An isolated cell's wait has a SIGINT handler of its own (it stops the worker).
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    release = let_comms_through()
    try:
        print("waiting", flush=True)
        for _ in range(400):
            if len(seen) >= 2:
                break
            await asyncio.sleep(0.025)
    finally:
        release()
        signal.signal(signal.SIGINT, previous)
    print("handled during the cell:", seen)
    print("next cell ran already:", "ran_next" in globals())
    """
)


def _send(kc: Any, msg_type: str, content: dict[str, Any]) -> str:
    msg = kc.session.msg(msg_type, content)
    kc.shell_channel.send(msg)
    return msg["header"]["msg_id"]


def test_comm_messages_are_handled_while_a_cell_awaits(fresh_kernel) -> None:
    kernel = fresh_kernel
    kernel.run(SETUP)
    kc = kernel.kc
    cell_id = kc.execute(WAITING_CELL)
    by_parent: dict[str, list[dict[str, Any]]] = {}
    deadline = time.monotonic() + 30

    def take() -> dict[str, Any]:
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        by_parent.setdefault(msg["parent_header"].get("msg_id", ""), []).append(msg)
        return msg

    while True:  # the cell is awaiting once it said so
        msg = take()
        if msg["msg_type"] == "stream" and "waiting" in msg["content"]["text"]:
            break
    next_id = kc.execute("ran_next = True\nprint('next cell', len(seen))")
    comm_id = uuid.uuid4().hex
    open_id = _send(kc, "comm_open", {"comm_id": comm_id, "target_name": "nbisolate.test.probe", "data": {"x": 1}})
    msg_id = _send(kc, "comm_msg", {"comm_id": comm_id, "data": {"y": 2}})

    idle: set[str] = set()
    while idle != {cell_id, next_id}:
        assert time.monotonic() < deadline, "the cells did not end"
        try:
            msg = take()
        except queue.Empty:
            continue
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            idle.add(msg["parent_header"].get("msg_id", ""))
            if msg["parent_header"].get("msg_id") == cell_id:
                # Handled during the cell: no busy/idle of their own before the cell's idle.
                assert not by_parent.get(open_id) and not by_parent.get(msg_id)

    def stdout(parent: str) -> str:
        return "".join(
            m["content"]["text"] for m in by_parent.get(parent, []) if m["msg_type"] == "stream"
        )

    out = stdout(cell_id)
    assert "handled during the cell: [('open', {'x': 1}), ('msg', {'y': 2})]" in out, out
    assert "next cell ran already: False" in out, out
    assert "next cell 2" in stdout(next_id)
    _send(kc, "comm_close", {"comm_id": comm_id, "data": {}})

    # The kernel's own SIGINT handling is intact: interrupting a plain cell still works.
    start = time.monotonic()
    sleeping = kc.execute("import time\ntime.sleep(30)")
    time.sleep(1.0)
    kernel.interrupt()
    while True:
        reply = kc.get_shell_msg(timeout=20)
        if reply["parent_header"].get("msg_id") == sleeping:
            break
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert time.monotonic() - start < 15
