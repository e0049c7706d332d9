"""The framed message channel between the kernel and one worker.

Both ends are the two halves of a ``socketpair`` the kernel created before
starting the worker, so the channel is local, needs no port, and nobody but
the worker the kernel started can write to the kernel's end: that is what
makes it safe to unpickle what arrives on it.

A message is a small pickled ``(kind, body)`` pair plus any number of raw
buffers (the out-of-band parts of a shipment), sent with one header that
gives every length, so large arrays go through the socket without ever being
copied into a pickle stream.  This module is shared by the worker and must
import nothing but the standard library.
"""

from __future__ import annotations

import pickle
import socket
import struct
import threading
from collections.abc import Sequence
from typing import Any

_HEAD = struct.Struct("!QI")
_LEN = struct.Struct("!Q")


class ChannelClosed(EOFError):
    """The other end went away."""


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ChannelClosed("the other end closed the channel")
        got += k
    return buf


class Channel:
    """Send and receive framed ``(kind, body, buffers)`` messages; sends are thread-safe."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, kind: str, body: Any = None, buffers: Sequence[Any] = ()) -> None:
        meta = pickle.dumps((kind, body), protocol=5)
        views = [memoryview(b).cast("B") for b in buffers]
        header = _HEAD.pack(len(meta), len(views)) + b"".join(_LEN.pack(v.nbytes) for v in views)
        with self._lock:
            self.sock.sendall(header + meta)
            for view in views:
                self.sock.sendall(view)

    def recv(self) -> tuple[str, Any, list[bytearray]]:
        size, nbuf = _HEAD.unpack(_recv_exact(self.sock, _HEAD.size))
        lengths = [_LEN.unpack(_recv_exact(self.sock, _LEN.size))[0] for _ in range(nbuf)]
        kind, body = pickle.loads(_recv_exact(self.sock, size))
        buffers = [_recv_exact(self.sock, n) for n in lengths]
        return kind, body, buffers

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
