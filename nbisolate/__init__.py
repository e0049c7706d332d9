"""nbisolate: run notebook cells in a clean, freshly spawned process.

``%load_ext nbisolate`` registers ``%%isolate`` and ``%pickle_check``.  The
package root stays import-light on purpose: the worker process imports
``nbisolate.worker`` through it, and a worker must start fast, so everything
heavier (IPython, widgets, the diagnosis engine) is loaded on first use.
"""

from __future__ import annotations

from typing import Any

from .errors import (
    IsolateError,
    IsolateTimeout,
    IsolateUsageError,
    RemoteError,
    ShipError,
    WorkerCrashed,
)

__version__ = "0.1.0"

__all__ = [
    "IsolateError",
    "IsolateTimeout",
    "IsolateUsageError",
    "RemoteError",
    "ShipError",
    "SweepError",
    "WorkerCrashed",
    "disable_multiprocessing",
    "enable_multiprocessing",
    "load_ipython_extension",
    "pickle_check",
    "run_isolated",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython: Any) -> None:
    """Called by ``%load_ext nbisolate``."""
    from .magics import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """Called by ``%unload_ext nbisolate``."""
    from .magics import unload

    unload(ipython)


def _pickle_check(obj: Any, name: str = "obj", **options: Any) -> Any:
    """:func:`nbisolate.diagnose.pickle_check`, checked as ``%pickle_check`` checks: loads
    happen in a fresh interpreter (never here), and the spawn trap is verified there too."""
    from .diagnose import pickle_check
    from .probe import spawn_loads

    options.setdefault("verify_spawn", spawn_loads)
    return pickle_check(obj, name, **options)


def __getattr__(name: str) -> Any:
    if name == "run_isolated":
        from .runner import run_isolated

        return run_isolated
    if name == "pickle_check":
        return _pickle_check
    if name in ("enable_multiprocessing", "disable_multiprocessing"):
        from . import pools

        return getattr(pools, name)
    if name == "SweepError":
        from .sweep import SweepError

        return SweepError
    raise AttributeError(f"module 'nbisolate' has no attribute {name!r}")
