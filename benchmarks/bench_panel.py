"""What does the live status panel cost a cell, and does it keep the clock moving?

Everything is measured inside one real IPython kernel (started with
``jupyter_client``), so widget creation, every comm message and the display
updates go through ipykernel's real session and IOPub machinery:

* ``widget_ms``, ``text_ms``, ``quiet_ms``: the panel's own cost for one
  trivial cell: attaching it, building and displaying it, the updates a fast
  cell causes (plan, serialize, started, start, load, run, a tick, result),
  the final summary and closing every widget.  Measured as the median of a
  run's lifecycle with the panel minus the median without one (the same
  plan and serialization, no worker), over many interleaved repeats.  The
  target is under 5 ms.
* ``first_widget_ms``: the first panel of a kernel, which also imports
  ipywidgets.
* ``in_panel_per_real_cell_ms``: time spent inside the panel's listener calls
  during a real trivial ``%%isolate`` cell (median): the panel's cost where it
  happens, without the worker's noise.
* ``kernel_cell_panel_ms`` / ``kernel_cell_off_ms``: a trivial isolated cell
  (``x = 1``) timed inside the kernel, awaited as a transformed ``%%isolate``
  cell is, with the panel and with ``panel=off``; ``client_cell_*_ms``: the
  same from the client's side (request to reply), which also counts the
  client reading the panel's extra messages.  Informative: the worker
  dominates and the machine is shared.
* ``updates_*``: for cells of about 2 s, the number of widget update messages
  and the longest gap between two of them, for a cell that sleeps, a cell
  that prints ten lines a second, and an input that takes 1.5 s to
  serialize (the loop is blocked; the heartbeat thread keeps the clock
  moving).  Ticks come from the loop the cell awaits on every 0.25 s.

Run ``python benchmarks/bench_panel.py``; nothing here is asserted, the
numbers are for people.
"""

from __future__ import annotations

import json
import statistics
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.kernel import Kernel  # noqa: E402

REPEATS = 300

HARNESS = textwrap.dedent(
    """
    import gc, time, statistics, json
    from nbisolate.runner import CellRun
    from nbisolate.events import Event
    from nbisolate import panel as _P

    def _lifecycle(mode):
        ns = {"a": [1, 2, 3], "b": {"k": 1}}
        run = CellRun("x = sum(a) + b['k']", ns, available=set(ns))
        t0 = time.perf_counter()
        if mode != "none":
            _P.attach(run, mode=mode, interactive=True)
        run.prepare()
        run._notify(Event("started", 4711))
        for name, secs in (("start", 0.015), ("load", 0.0004), ("run", 0.0002)):
            run._notify(Event("phase", (name, secs)))
        run.tick()
        run._notify(Event("result", {}))
        run._notify(Event("phase", ("return", 0.0003)))
        run._notify(Event("applied", {"returned": ["x"], "skipped": {}}))
        run.done(None)
        return time.perf_counter() - t0
    """
)


def _measure_costs(k: Kernel, repeats: int) -> dict[str, float]:
    first = k.run(
        "import time as _t\n_t0 = _t.perf_counter(); _lifecycle('widget'); "
        "print(json.dumps((_t.perf_counter() - _t0) * 1000))"
    )
    code = textwrap.dedent(
        f"""
        _modes = ("none", "widget", "text", "quiet")
        _times = {{m: [] for m in _modes}}
        gc.disable()
        try:
            for _i in range({repeats}):
                for _m in _modes:
                    _times[_m].append(_lifecycle(_m))
        finally:
            gc.enable()
        _base = statistics.median(_times["none"])
        print(json.dumps({{m: (statistics.median(v) - _base) * 1000 for m, v in _times.items()}}))
        """
    )
    res = k.run(code, timeout=600)
    costs = json.loads(res.stdout.strip().splitlines()[-1])
    return {
        "first_widget_ms": round(json.loads(first.stdout.strip()), 2),
        "widget_ms": round(costs["widget"], 3),
        "text_ms": round(costs["text"], 3),
        "quiet_ms": round(costs["quiet"], 3),
        "messages_per_widget_cell": _messages_per_cell(res, repeats),
    }


def _messages_per_cell(res: Any, repeats: int) -> float:
    kinds = ("comm_open", "comm_msg", "comm_close", "display_data", "update_display_data")
    count = sum(1 for m in res.messages if m["msg_type"] in kinds)
    # widget cells send comm traffic and two displays; text cells one or two displays
    return round(count / repeats, 1)


def _updates(res: Any) -> tuple[int, float]:
    """Widget update messages of a cell and the longest gap between two of them (s)."""
    times = [
        t
        for m, t in zip(res.messages, res.times, strict=True)
        if m["msg_type"] == "comm_msg" and m["content"]["data"].get("method") == "update"
    ]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return len(times), round(max(gaps), 3) if gaps else float("nan")


def _cells(k: Kernel, repeats: int = 40) -> dict[str, Any]:
    inside = k.run(
        textwrap.dedent(
            f"""
            from nbisolate.magics import isolate_async as _isolate_async
            _spent = []
            _listen = _P.Panel.__call__
            def _timed(self, event):
                _t = time.perf_counter()
                try:
                    _listen(self, event)
                finally:
                    _spent.append(time.perf_counter() - _t)
            _P.Panel.__call__ = _timed
            _k = {{"auto": [], "off": [], "inside": []}}
            try:
                for _i in range({repeats}):
                    for _m in ("auto", "off"):
                        _P.settings["panel"] = _m
                        _spent.clear()
                        _t0 = time.perf_counter()
                        await _isolate_async("", "x = 1")
                        _k[_m].append(time.perf_counter() - _t0)
                        if _m == "auto":
                            _k["inside"].append(sum(_spent))
            finally:
                _P.Panel.__call__ = _listen
                _P.settings["panel"] = "auto"
            print(json.dumps({{m: statistics.median(v) * 1000 for m, v in _k.items()}}))
            """
        ),
        timeout=300,
    )
    kernel_side = json.loads(inside.stdout.strip().splitlines()[-1])
    panel, off = [], []
    for _ in range(repeats // 2):
        k.run("%isolate_config panel=auto")
        panel.append(k.run("%%isolate\nx = 1").reply_time)
        k.run("%isolate_config panel=off")
        off.append(k.run("%%isolate\nx = 1").reply_time)
    k.run("%isolate_config panel=auto")
    out: dict[str, Any] = {
        "in_panel_per_real_cell_ms": round(kernel_side["inside"], 2),
        "kernel_cell_panel_ms": round(kernel_side["auto"], 1),
        "kernel_cell_off_ms": round(kernel_side["off"], 1),
        "client_cell_panel_ms": round(statistics.median(panel) * 1000, 1),
        "client_cell_off_ms": round(statistics.median(off) * 1000, 1),
    }
    sleeping = k.run("%%isolate\nimport time\ntime.sleep(2)")
    printing = k.run("%%isolate\nimport time\nfor i in range(20):\n    print(i)\n    time.sleep(0.1)")
    k.run(
        textwrap.dedent(
            """
            import time as _time
            class SlowToPickle:
                def __reduce__(self):
                    _time.sleep(1.5)
                    return (SlowToPickle, ())
            slow = SlowToPickle()
            """
        )
    )
    blocked = k.run("%%isolate\nimport time\ntime.sleep(0.5)\nslow")
    for name, res in (("sleep", sleeping), ("print", printing), ("serialize", blocked)):
        n, gap = _updates(res)
        out[f"updates_{name}"] = n
        out[f"max_gap_{name}_s"] = gap
        out[f"seconds_{name}"] = round(res.reply_time, 2)
    return out


def run(repeats: int = REPEATS) -> dict[str, Any]:
    """Start a kernel, measure, shut it down; returns the numbers (see the module doc)."""
    k = Kernel()
    try:
        k.run("%load_ext nbisolate")
        k.run(HARNESS)
        results = _measure_costs(k, repeats)
        results.update(_cells(k))
    finally:
        k.shutdown()
    return results


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
