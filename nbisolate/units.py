"""Sizes in words and words in sizes, shared by the kernel side and the worker (stdlib only)."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """``512 B``, ``1.3 MB``, ``2.0 GB`` (binary units, as ``--mem`` and ``--max-result`` read them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover
