"""The framing of every message between nbisolate's processes, and the worker's channel.

One frame format serves both sockets: the channel between the kernel and a
worker (:class:`Channel`) and the template's control socket
(:mod:`nbisolate.template`); :func:`send_frame` and :func:`recv_frame` are its
one implementation.  What the messages mean is :mod:`nbisolate.protocol`'s.

Both ends are the two halves of a ``socketpair`` the kernel created before
starting the worker, so the channel is local, needs no port, and nobody but
the worker the kernel started can write to the kernel's end: that is what
makes it safe to unpickle what arrives on it.

A message is a small pickled ``(kind, body)`` pair plus any number of raw
buffers (the out-of-band parts of a shipment), sent with one header that
gives every length, so large arrays never pass through a pickle stream.

Large buffers do not go through the socket either: a socket copies twice
(0.2-0.6 GB/s measured here), while a shared mapping costs one ``memcpy``.
When a message's buffers add up to :data:`SHM_THRESHOLD` or more, they are
copied into an anonymous ``memfd`` whose descriptor travels with the message
(``SCM_RIGHTS``); the receiver maps it and hands out zero-copy views.  An
anonymous memfd has no name in ``/dev/shm``, so a crash on either side cannot
leak a segment: the memory is gone when the last mapping is.  The sender may
pass an :class:`Arena` it keeps warm between messages, so the copy runs at
memory speed instead of paying page faults every time. Large inputs and
results of a cell the kernel waits on take another way (:func:`nbisolate.ship.place`
and :func:`nbisolate.ship.pull`: the kernel copies them straight into or out of
the worker); the memfd carries errors, ``--bg`` inputs and those paths' fallback.

This module is shared by the worker and imports only the standard library.
"""

from __future__ import annotations

import array
import mmap
import os
import pickle
import socket
import struct
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

_HEAD = struct.Struct("!QIB")
_LEN = struct.Struct("!Q")
SHM_THRESHOLD = 1 << 20
_ALIGN = 64
_MADV_POPULATE_WRITE = 23
HAVE_MEMFD = hasattr(os, "memfd_create")
MAX_FDS = 8  # descriptors a frame may carry besides its shared-memory one


class ChannelClosed(EOFError):
    """The other end went away."""


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _populate(mm: mmap.mmap) -> None:
    """Fault the pages in at once, much faster than one fault per page during the copy."""
    try:
        mm.madvise(_MADV_POPULATE_WRITE)
    except (OSError, ValueError, AttributeError):
        pass


class Arena:
    """A reusable, pre-touched memfd for outgoing buffers.

    Not thread-safe: one message at a time, and the owner must not reuse it
    while the receiver may still read the previous one (the supervisor gives
    each running job its own arena and takes it back when the worker exits).
    """

    def __init__(self) -> None:
        self.fd = -1
        self.size = 0
        self.map: mmap.mmap | None = None

    def reserve(self, size: int) -> tuple[int, mmap.mmap]:
        if size > self.size or self.map is None:
            self.close()
            self.size = max(size, 1 << 22)
            self.fd = os.memfd_create("nbisolate", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, self.size)
            self.map = mmap.mmap(self.fd, self.size)
            _populate(self.map)
        return self.fd, self.map

    def close(self) -> None:
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a view is still out there; the GC frees it with the view
                pass
            self.map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.size = 0


def read_some(fd: int) -> bytes | None:
    """What non-blocking pipe ``fd`` holds now (up to 64 KiB); ``b""`` at its end, None if nothing yet.

    A read error counts as the end: the writer is gone either way, and a
    reader of a dead process's output must not raise over it.
    """
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ChannelClosed("the other end closed the channel")
        got += k
    return buf


def recv_with_fds(sock: socket.socket, size: int, max_fds: int = 4) -> tuple[bytes, list[int]]:
    """Exactly ``size`` bytes, with any descriptors sent alongside them (``SCM_RIGHTS``).

    Every first read of a message must use ``recvmsg``: a plain ``recv``
    would silently drop a descriptor attached to those bytes.
    """
    fds: list[int] = []
    head = b""
    while len(head) < size:
        chunk, ancdata, _flags, _addr = sock.recvmsg(
            size - len(head), socket.CMSG_SPACE(max_fds * array.array("i").itemsize)
        )
        if not chunk:
            raise ChannelClosed("the other end closed the channel")
        head += chunk
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(data[: len(data) - (len(data) % got.itemsize)])
                fds.extend(got)
    return head, fds


def frame_bytes(kind: str, body: Any = None, buffers: Sequence[Any] = ()) -> bytes | None:
    """The whole frame of :func:`send_frame` as bytes, or None when it needs shared memory.

    For a sender that wants to put a small message into a socket without
    blocking (the kernel queues a cell's ``run`` message before its worker
    exists); :func:`recv_frame` reads it like any other frame.
    """
    views = [memoryview(b).cast("B") for b in buffers]
    if HAVE_MEMFD and sum(v.nbytes for v in views) >= SHM_THRESHOLD:
        return None
    meta = pickle.dumps((kind, body), protocol=5)
    header = _HEAD.pack(len(meta), len(views), 0) + b"".join(_LEN.pack(v.nbytes) for v in views)
    return b"".join([header, meta, *views])


def send_frame(
    sock: socket.socket,
    kind: str,
    body: Any = None,
    buffers: Sequence[Any] = (),
    *,
    fds: Sequence[int] = (),
    arena: Arena | None = None,
    lock: AbstractContextManager[Any] | None = None,
) -> None:
    """Send one framed ``(kind, body)`` message with its ``buffers`` and descriptors ``fds``.

    The frame is a header (pickle length, buffer count, shared flag), each
    buffer's length, the pickled pair, then the buffers themselves or, when
    they add up to :data:`SHM_THRESHOLD`, nothing: they go into a memfd whose
    descriptor is sent first among the frame's descriptors.  ``lock`` is held
    only while bytes go out, so the copy into shared memory runs outside it.
    """
    meta = pickle.dumps((kind, body), protocol=5)
    views = [memoryview(b).cast("B") for b in buffers]
    total = sum(v.nbytes for v in views)
    shared = HAVE_MEMFD and total >= SHM_THRESHOLD
    header = _HEAD.pack(len(meta), len(views), 1 if shared else 0) + b"".join(
        _LEN.pack(v.nbytes) for v in views
    )
    guard = lock if lock is not None else nullcontext()
    if not shared:
        with guard:
            if fds:
                sock.sendmsg(
                    [header + meta], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                )
            else:
                sock.sendall(header + meta)
            for view in views:
                sock.sendall(view)
        return
    size = sum(_aligned(v.nbytes) for v in views)
    own = arena is None
    if own:
        fd = os.memfd_create("nbisolate", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
        _populate(mm)
    else:
        assert arena is not None
        fd, mm = arena.reserve(size)
    try:
        offset = 0
        for view in views:
            mm[offset : offset + view.nbytes] = view
            offset += _aligned(view.nbytes)
        with guard:
            fdarray = array.array("i", [fd, *fds])
            sock.sendmsg([header + meta], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fdarray)])
    finally:
        if own:
            mm.close()
            os.close(fd)


def recv_frame(sock: socket.socket, max_fds: int = MAX_FDS) -> tuple[str, Any, list[Any], list[int]]:
    """Receive one frame of :func:`send_frame`: ``(kind, body, buffers, fds)``.

    ``fds`` are the descriptors the sender passed, now the caller's to close;
    shared-memory buffers are zero-copy views of a mapping that lives as long
    as they do.  Raises :class:`ChannelClosed` at the end of the stream.
    """
    head, fds = recv_with_fds(sock, _HEAD.size, max_fds + 1)
    keep = False
    try:
        size, nbuf, shared = _HEAD.unpack(head)
        lengths = [_LEN.unpack(recv_exact(sock, _LEN.size))[0] for _ in range(nbuf)]
        kind, body = pickle.loads(recv_exact(sock, size))
        if not shared:
            buffers: list[Any] = [recv_exact(sock, n) for n in lengths]
            keep = True
            return kind, body, buffers, fds
        if not fds:
            raise ChannelClosed("a shared-memory message arrived without its descriptor")
        memfd = fds.pop(0)
        try:
            total = sum(_aligned(n) for n in lengths)
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mm = mmap.mmap(memfd, total, flags=flags) if total else None
        finally:
            os.close(memfd)
        view = memoryview(mm) if mm is not None else memoryview(b"")
        buffers, offset = [], 0
        for n in lengths:
            buffers.append(view[offset : offset + n])
            offset += _aligned(n)
        keep = True
        return kind, body, buffers, fds
    finally:
        if not keep:
            for fd in fds:
                os.close(fd)


class Channel:
    """Send and receive framed ``(kind, body, buffers)`` messages; sends are thread-safe."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    def send(
        self, kind: str, body: Any = None, buffers: Sequence[Any] = (), arena: Arena | None = None
    ) -> None:
        send_frame(self.sock, kind, body, buffers, arena=arena, lock=self._lock)

    def recv(self) -> tuple[str, Any, list[Any]]:
        kind, body, buffers, fds = recv_frame(self.sock)
        for fd in fds:  # a channel message carries no descriptor of its own
            os.close(fd)
        return kind, body, buffers

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
