"""Short human-readable text for sizes and values, and reading sizes back, in one place.

Shared by the kernel side and the worker, so a size reads the same in the
panel, in ``%pickle_check`` and in an error message (binary units throughout:
``--mem 500M`` and ``95.4 MB`` mean the same megabyte). Standard library and
:mod:`nbisolate.errors` only: the worker imports it.
"""

from __future__ import annotations

import functools
from typing import Any

from .errors import IsolateUsageError

_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def format_bytes(n: float) -> str:
    """``512 B``, ``1.3 MB``, ``2.0 GB`` (binary units, as ``--mem`` and ``--max-result`` read them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


@functools.lru_cache(maxsize=64)
def parse_size(text: str) -> int:
    """``2G``, ``500M``, ``1.5GB``, ``1024`` (bytes) -> bytes; :class:`IsolateUsageError` otherwise.

    Binary units, like :func:`format_bytes` prints them, so a limit read here
    is printed back as the number the user typed. ``KiB``-style suffixes and
    lower case are accepted; a number of zero or less is refused, because every
    size we read is a limit and a limit of nothing would kill the cell at once.
    """
    raw = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    number = raw.rstrip("KMGT")
    unit = raw[len(number) :]
    try:
        value = float(number) * _UNITS[unit]
        if value != value or value == float("inf"):  # "nan", "inf": float() reads them
            raise ValueError(number)
    except (ValueError, KeyError):
        raise IsolateUsageError(
            f"cannot read size {text!r}: use a number with K, M, G or T, like 500M or 2G; nothing ran."
        ) from None
    if value <= 0:
        raise IsolateUsageError(f"size {text!r} must be more than zero; nothing ran.")
    return int(value)


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in ``...`` when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_repr(value: Any, limit: int, fallback: str | None = None) -> str:
    """A bounded ``repr`` that never raises (a broken ``__repr__`` gives ``fallback``)."""
    try:
        text = repr(value)
    except Exception:
        text = fallback or f"<{type(value).__qualname__}>"
    return shorten(text, limit)
