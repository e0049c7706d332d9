"""Short human-readable text for sizes and values, shared by the kernel side and the worker.

Standard library only: the worker imports it.
"""

from __future__ import annotations

from typing import Any


def format_bytes(n: float) -> str:
    """``512 B``, ``1.3 MB``, ``2.0 GB`` (binary units, as ``--mem`` and ``--max-result`` read them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


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
