"""The one frame format (wire.py) and the message vocabulary (protocol.py), without a kernel."""

from __future__ import annotations

import os
import pickle
import socket

import pytest

from nbisolate import protocol, ship, template
from nbisolate.wire import SHM_THRESHOLD, Channel, ChannelClosed, recv_frame, send_frame


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 1 << 16)


def _temp_fd(tmp_path, name: str, text: bytes) -> int:
    path = tmp_path / name
    path.write_bytes(text)
    return os.open(path, os.O_RDONLY)


@pytest.mark.parametrize("size", [10, SHM_THRESHOLD + 5])
def test_a_frame_carries_body_buffers_and_descriptors_in_order(pair, tmp_path, size):
    a, b = pair
    passed = [_temp_fd(tmp_path, "one", b"first"), _temp_fd(tmp_path, "two", b"second")]
    payload = bytes(range(256)) * (size // 256 + 1)
    try:
        send_frame(a, "fork", {"env": {"X": "1"}}, [payload[:size], b"tail"], fds=passed)
        send_frame(a, "next", 42)
        kind, body, buffers, fds = recv_frame(b)
        try:
            assert (kind, body) == ("fork", {"env": {"X": "1"}})
            assert [bytes(buf) for buf in buffers] == [payload[:size], b"tail"]
            # The descriptors are new ones for the same open files, in the order sent.
            assert len(fds) == 2 and not set(fds) & set(passed)
            assert [_read_all(fd) for fd in fds] == [b"first", b"second"]
        finally:
            for fd in fds:
                os.close(fd)
        del buffers  # a shared-memory view must go before its mapping can
        assert recv_frame(b)[:2] == ("next", 42)
    finally:
        for fd in passed:
            os.close(fd)


def test_the_template_control_messages_use_the_same_frames(pair, tmp_path):
    a, b = pair
    fd = _temp_fd(tmp_path, "out", b"worker stdout")
    try:
        template.send(a, "fork", {"fresh": True}, [fd])
        kind, body, _, fds = recv_frame(b)  # the template's messages are ordinary frames
        assert (kind, body) == ("fork", {"fresh": True})
        assert [_read_all(got) for got in fds] == [b"worker stdout"]
        os.close(fds[0])
        send_frame(b, "forked", 1234)
        assert template.recv(a) == ("forked", 1234, [])
    finally:
        os.close(fd)


def test_a_channel_ends_with_channel_closed(pair):
    a, b = pair
    Channel(a).send("stream", ("stdout", "hi\n"))
    a.close()
    chan = Channel(b)
    assert chan.recv() == ("stream", ("stdout", "hi\n"), [])
    with pytest.raises(ChannelClosed):
        chan.recv()


def test_error_body_from_an_exception_keeps_the_keys_consumers_read():
    try:
        raise KeyError("missing")
    except KeyError as exc:
        shipped = ship.dumps({"exc": exc}, skip_failures=True)
        body = protocol.error_body(
            exc,
            traceback="Traceback ...",
            names=shipped.names,
            data=shipped.data,
            engine=shipped.engine,
            seconds=0.5,
            marked={"stdout": True, "stderr": False},
        )
    assert body["type"] == "builtins.KeyError"
    assert body["message"] == "'missing'"
    assert "stage" not in body  # the cell's own error has no stage
    assert body["seconds"] == 0.5 and body["marked"] == {"stdout": True, "stderr": False}
    rebuilt = ship.loads(body["names"], body["data"], shipped.buffers, body["engine"])["exc"]
    assert isinstance(rebuilt, KeyError) and rebuilt.args == ("missing",)
    pickle.dumps(body)  # a body is a plain dict on the wire


def test_error_body_from_a_type_name_for_failures_outside_the_cell():
    body = protocol.error_body("builtins.MemoryError", "no room", stage="receive")
    assert body == {
        "type": "builtins.MemoryError",
        "message": "no room",
        "traceback": "",
        "names": [],
        "data": b"",
        "engine": "pickle",
        "stage": "receive",
    }
    assert body["stage"] in protocol.STAGES


def test_sync_mark_is_distinct_per_token_and_never_plain_text():
    one, two = protocol.sync_mark("ab12"), protocol.sync_mark("cd34")
    assert one != two and one.startswith(b"\x1b[") and b"ab12" in one


def _kinds_sent(module_file: str) -> set[str]:
    """The message kinds a module passes to ``send``/``_send``, read from its source."""
    import ast

    def values(node: ast.expr) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.Name) and node.id.startswith("MSG_"):
            return [getattr(protocol, node.id)]
        if isinstance(node, ast.IfExp):
            return values(node.body) + values(node.orelse)
        return []  # a variable: a relay (super().send(kind, ...)), not a sender

    with open(module_file, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("send", "_send"):
                found.update(values(node.args[0]))
    return found


def test_every_kind_a_worker_sends_is_in_the_protocol():
    from nbisolate import display_worker, supervisor, sweep_leader, worker

    sent = _kinds_sent(worker.__file__) | _kinds_sent(display_worker.__file__)
    assert {"values", "result", "error"} <= _kinds_sent(sweep_leader.__file__) <= set(protocol.KINDS)
    assert {"stream", "phase", "result", "error", "sysexit", "display", "clear_output"} <= sent
    assert sent <= set(protocol.KINDS), sorted(sent - set(protocol.KINDS))
    assert _kinds_sent(supervisor.__file__) & set(protocol.KINDS) == {protocol.MSG_RUN, protocol.MSG_INPUTS}
