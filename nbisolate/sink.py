"""Where an isolated cell's output goes in the kernel: the kernel's own streams and displays.

The worker's ``stream`` and ``display`` messages arrive as events; a run hands
them to its sink.  :class:`StdSink` writes them where an ordinary cell's
output would go (``sys.stdout``/``sys.stderr``, IPython's display
publisher), so a front end cannot tell them apart.  Kept out of the runner,
which knows no UI (docs/architecture.md, wall 3).
"""

from __future__ import annotations

import sys
from typing import Any


def _shown(data: dict[str, Any]) -> BaseException:
    """An exception the worker's cell showed and went on (``error_output``), to show here: of a
    class named as its own was, its traceback the worker's."""
    lines = list(data.get("traceback") or ())
    kind = type(str(data.get("ename") or "Exception"), (Exception,), {"_render_traceback_": lambda self: lines})
    return kind(data.get("evalue", ""))


class StdSink:
    """Where a cell's output goes: the kernel's own streams and display machinery."""

    def comm(self, body: dict[str, Any], buffers: list[Any]) -> None:
        """A widget's comm message from the worker: sent on as the kernel's own
        (:func:`nbisolate.widgetrelay.relay`), so the front end shows the widget as it shows
        an ordinary cell's."""
        from .widgetrelay import relay

        relay(body, buffers)

    def stream(self, name: str, text: str) -> None:
        stream = sys.stdout if name == "stdout" else sys.stderr
        stream.write(text)
        # A kernel's stream publishes on its own within 0.2 s, and a flush there is a
        # round trip to its IO thread (about 1 ms): flush only real files.
        if getattr(stream, "pub_thread", None) is None:
            stream.flush()

    def display(self, kind: str, data: dict[str, Any]) -> None:
        # Text written before a display must show before it; in a kernel,
        # publishing a display flushes the streams itself.
        if getattr(sys.stdout, "pub_thread", None) is None:
            sys.stdout.flush()
            sys.stderr.flush()
        try:
            from IPython import get_ipython
            from IPython.display import clear_output, publish_display_data
        except ImportError:  # pragma: no cover - IPython is a dependency
            get_ipython = None  # type: ignore[assignment]
        if get_ipython is None or get_ipython() is None:
            if kind == "error_output":
                print("\n".join(data.get("traceback") or ()), file=sys.stderr)
            elif kind != "clear_output":
                print(data.get("data", {}).get("text/plain", ""))
            return
        if kind == "error_output":  # as IPython shows an exception the code showed and went on
            shown = _shown(data)
            get_ipython().showtraceback((type(shown), shown, None))
            return
        if kind == "clear_output":
            clear_output(wait=bool(data.get("wait")))
            return
        transient = data.get("transient") or {}
        publish_display_data(
            data=data.get("data", {}),
            metadata=data.get("metadata") or {},
            transient=transient or None,
            update=kind == "update_display",
        )
