"""An open file travels as the same file, at the same place in it, and comes back moved on.

In a notebook, ``log = open("run.log", "w")`` then ``log.write(...)`` in a later
cell appends where the last write ended, and ``fh.readline()`` reads the line
after the one the last cell read: the file object keeps a position, and the
operating system keeps the file.  A worker cannot share the kernel's file
descriptor (it is forked from the template, not from the kernel), so the file
is opened again there.  Done naively, as dill does by default, that *truncates*
a file open for writing (``open(name, "w")``) and starts a reader at the top:
an isolated cell that wrote one line to the notebook's log would erase
everything the notebook had written before.  Here, both ways:

1. **Kernel, shipping** (:func:`reduce`): the file is flushed (what the notebook
   wrote is in the file before the worker opens it), and travels as its path,
   mode, encoding and position, with the device and inode it has open now.
2. **Worker, loading** (:func:`reopen`): the same path is opened with the same
   access but never created or truncated (``O_WRONLY`` without ``O_TRUNC``,
   ``O_APPEND`` for ``"a"``), the identity is checked (a log rotated or deleted
   since it was opened is another file, and the cell is told so rather than
   writing to it), and the file is moved to the notebook's position.
3. **Worker, after the cell** (:func:`settle`): every file that arrived is
   flushed, and its position (or that the cell closed it) goes back.
4. **Kernel, after the cell** (:func:`catch_up`): the notebook's own file object
   moves to where the worker left it, or is closed, unless the notebook moved it
   meanwhile (a background job's file the notebook went on writing to).  A file
   the cell hands back (``f = log``) is the notebook's own object (it travels
   back by token, :mod:`nbisolate.byvalue`); a file the cell opened comes back
   opened again the same way, so its contents are never truncated by the trip.

A closed file arrives closed (:func:`closed_file`), its path never touched:
dill would open it again with ``open(name, "w")`` to close it, truncating it.
Only files known by a path and able to tell their position take this road: a
pipe, a terminal or ``sys.stdout`` cannot be opened again by a name, and keep
the serializers' own handling.

Standard library only: the worker imports it.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable, Mapping
from typing import Any

FILE_TYPES: frozenset[type] = frozenset({
    io.TextIOWrapper, io.BufferedReader, io.BufferedWriter, io.BufferedRandom, io.FileIO,
})
"""The kinds of object ``open()`` returns: text, buffered binary, and raw (``buffering=0``)."""


class Unreachable(pickle.PicklingError):
    """The file cannot be opened again by its path: it was deleted, replaced or never had one."""


def _raw(f: Any) -> Any:
    buffered = getattr(f, "buffer", f)
    return getattr(buffered, "raw", buffered)


_PROC_FD = "/proc/self/fd"


def _where(f: Any) -> tuple[str, os.stat_result]:
    """A path that opens ``f``'s open file, and that file's identity.

    Its own name while that still names the same file; else, on Linux, the
    kernel's ``/proc/<pid>/fd/<n>``, which opens the very file the descriptor
    has open even when it was deleted, renamed or never had a name
    (``tempfile.TemporaryFile``), for as long as the notebook keeps it open.
    """
    fd = f.fileno()
    opened = os.fstat(fd)
    name = f.name
    if isinstance(name, str):
        path = os.path.abspath(name)
        try:
            there = os.stat(path)
        except OSError:
            there = None
        if there is not None and (there.st_dev, there.st_ino) == (opened.st_dev, opened.st_ino):
            return path, opened
    if os.path.isdir(_PROC_FD):
        return f"/proc/{os.getpid()}/fd/{fd}", opened
    if isinstance(name, str):
        what = f"the file {name!r} it has open was deleted or replaced at that path since it was opened"
    else:
        what = "the file it has open has no path (a temporary file)"
    raise Unreachable(f"{what}, and this system gives no other way for another process to open it")


def reduce(f: Any, token: str | None) -> tuple[Any, tuple[Any, ...]]:
    """How ``f`` travels: flushed, as ``reopen(token, path, ...)``; :class:`Unreachable` when it
    cannot (no path, deleted, replaced), ``pickle.PicklingError`` when it is not a file that a
    path and a position describe (a pipe, a terminal)."""
    if f.closed:  # a closed file, never opened again (dill's re-opener would truncate its path)
        text = getattr(f, "mode", "r") if isinstance(f, io.TextIOWrapper) else None
        return closed_file, (f.name, _raw(f).mode, not isinstance(f, io.FileIO), text)
    if not f.seekable() or f.isatty():
        raise pickle.PicklingError("a file that cannot seek (a pipe, a terminal) has no position to carry")
    if f.writable():
        f.flush()  # the notebook's writes land in the file before the worker opens it
    path, opened = _where(f)
    try:
        position = f.tell()
    except OSError as exc:  # a text file read by `for line in f`, stopped early, has none
        raise Unreachable(
            f"its position in the file cannot be told ({exc}): a `for line in file` loop that "
            "stopped early leaves none; read it with readline() instead, or seek() it first"
        ) from None
    text = isinstance(f, io.TextIOWrapper)
    buffered = not isinstance(f, io.FileIO)
    details = (f.encoding, f.errors, f.line_buffering, getattr(f, "mode", "r")) if text else None
    return reopen, (
        token, path, f.name, _raw(f).mode, position, buffered, details,
        opened.st_dev, opened.st_ino,
    )


def closed_file(name: Any, mode: str, buffered: bool, text: str | None) -> Any:
    """A closed file object of the same kind, name and mode (``text``: a text file's own mode),
    made without touching the file."""
    raw = io.FileIO(os.devnull, "rb+" if "+" in mode else "rb" if "r" in mode else "wb")
    raw.name = name
    f: Any = raw
    if buffered:
        kind = io.BufferedRandom if "+" in mode else io.BufferedReader if "r" in mode else io.BufferedWriter
        f = kind(raw)
    if text is not None:
        f = io.TextIOWrapper(f)
        f.mode = text
    f.close()
    return f


_ARRIVED: list[tuple[str, Any, int]] = []
"""(token, the file opened here, its position on arrival): what :func:`settle` reports on."""


def _flags(mode: str) -> int:
    if "+" in mode:
        flags = os.O_RDWR
    elif "r" in mode:
        flags = os.O_RDONLY
    else:
        flags = os.O_WRONLY
    if "a" in mode:
        flags |= os.O_APPEND
    return flags  # never O_CREAT nor O_TRUNC: the notebook's file exists, and keeps its contents


def _check(path: str, name: str, dev: int, ino: int) -> None:
    try:
        there = os.stat(path)
    except OSError as exc:
        raise FileNotFoundError(
            exc.errno, f"the notebook's open file {name!r} is not at {path!r} in this process "
            "(another machine, or it was deleted): open it inside the cell instead", path,
        ) from None
    if (there.st_dev, there.st_ino) != (dev, ino):
        raise FileNotFoundError(
            f"{path!r} is no longer the file the notebook's {name!r} has open (it was replaced "
            "since): open it inside the cell instead"
        )


def reopen(
    token: str | None, path: str, name: str, mode: str, position: int, buffered: bool,
    details: tuple[str, str, bool, str] | None, dev: int, ino: int,
) -> Any:
    """The same file, opened again here with the same access and moved to the same place."""
    _check(path, name, dev, ino)
    fd = os.open(path, _flags(mode))  # looked up when called: the loader process guards it
    try:
        raw = io.FileIO(fd, _raw_mode(mode))
    except BaseException:
        os.close(fd)
        raise
    raw.name = name
    f: Any = raw
    if buffered:
        kind = io.BufferedRandom if "+" in mode else io.BufferedWriter if raw.writable() else io.BufferedReader
        f = kind(raw)
    if details is not None:
        encoding, errors, line_buffering, text_mode = details
        f = io.TextIOWrapper(f, encoding=encoding, errors=errors, line_buffering=line_buffering)
        f.mode = text_mode  # as open() sets it: `log.mode` reads "w", not the raw file's "wb"
    if "a" not in mode:  # (appending writes at the end wherever it stands)
        f.seek(position)
    if token is not None:
        _ARRIVED.append((token, f, position))
    return f


def _raw_mode(mode: str) -> str:
    """The mode for ``FileIO`` over a descriptor opened by :func:`_flags` (no ``x``: the file is
    there; ``w`` over a descriptor does not truncate)."""
    if "a" in mode:
        return "ab+" if "+" in mode else "ab"
    if "+" in mode:
        return "rb+"
    return "rb" if "r" in mode else "wb"


def arrived(f: Any) -> str | None:
    """The token of a file that arrived here from the notebook (so it goes back as the notebook's own)."""
    for token, mine, _ in _ARRIVED:
        if mine is f:
            return token
    return None


def check_reopen(
    token: str | None, path: str, name: str, mode: str, position: int, buffered: bool,
    details: tuple[str, str, bool, str] | None, dev: int, ino: int,
) -> Any:
    """:func:`reopen` for a check that must change nothing (``%pickle_check``): the file is
    looked at (there, the same, accessible as the mode needs), never opened."""
    _check(path, name, dev, ino)
    need = os.R_OK if "+" in mode or "r" in mode else 0
    need |= os.W_OK if _flags(mode) & (os.O_WRONLY | os.O_RDWR) else 0
    if need and not os.access(path, need):
        raise PermissionError(f"[Errno 13] Permission denied: {path!r}")
    return io.StringIO() if details is not None else io.BytesIO()


def settle() -> dict[str, tuple[int, int | None]]:
    """After the cell: each arrived file flushed, and ``token -> (position on arrival, position
    now)``, ``None`` for a file the cell closed. Files that did not move are left out."""
    report: dict[str, tuple[int, int | None]] = {}
    for token, f, start in _ARRIVED:
        try:
            if f.closed:
                report[token] = (start, None)
                continue
            if f.writable():
                f.flush()
            now = f.tell()
        except (OSError, ValueError):  # the cell left it in a state that has no position
            continue
        if now != start:
            report[token] = (start, now)
    return report


def catch_up(report: Mapping[str, tuple[int, int | None]], find: Callable[[str], Any]) -> None:
    """The notebook's files move to where the worker left them (``find``: token -> the
    notebook's file, or None). A file the notebook moved since it was sent keeps its place."""
    for token, (start, now) in report.items():
        f = find(token)
        if f is None or f.closed:
            continue
        try:
            if f.writable():
                f.flush()
            if f.tell() != start:
                continue
            if now is None:
                f.close()
            else:
                f.seek(now)
        except (OSError, ValueError):  # it cannot seek any more: it keeps its place
            continue
