"""The live status panel of %%isolate, through a real kernel: the messages a front end gets.

The widget panel is checked the way JupyterLab's widget manager sees it:
``comm_open``/``comm_msg``/``comm_close`` messages on IOPub rebuild each
model's state, the ``display_data`` with a widget view shows it, and a click
on Stop is a ``comm_msg`` sent on the shell channel (ipywidgets 8 protocol).
Text mode is checked in a kernel (``%isolate_config panel=text``), with
``--quiet``, in a plain ``InteractiveShell`` in a subprocess (no kernel), and
through the Python API in this process.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from .conftest import wait_until

ROOT = Path(__file__).resolve().parents[1]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
SUMMARY_OK = re.compile(r"^nbisolate: ran [\d.]+ m?s in pid \d+; \d+ in( \([\d.]+ [KMG]?B\))?, \d+ out")


def cell(code: str) -> str:
    return textwrap.dedent(code).strip("\n")


def fresh_widgets(kernel: Any) -> None:
    """Close the kernel's idle panel widgets, so the next panel's models open in its own cell."""
    kernel.run("from nbisolate import panel as _panel\n_panel.release_widgets()")


class Models:
    """Widget models as a front end rebuilds them from one cell's IOPub messages."""

    def __init__(self, res: Any) -> None:
        self.state: dict[str, dict[str, Any]] = {}
        self.closed: set[str] = set()
        for msg in res.messages:
            content = msg["content"]
            if msg["msg_type"] == "comm_open" and content.get("target_name") == "jupyter.widget":
                self.state[content["comm_id"]] = dict(content["data"]["state"])
            elif msg["msg_type"] == "comm_msg":
                data = content["data"]
                if data.get("method") == "update" and content["comm_id"] in self.state:
                    self.state[content["comm_id"]].update(data["state"])
            elif msg["msg_type"] == "comm_close":
                self.closed.add(content["comm_id"])

    def with_class(self, cls: str) -> list[str]:
        return [cid for cid, st in self.state.items() if cls in st.get("_dom_classes", ())]

    def of_model(self, name: str) -> list[str]:
        return [cid for cid, st in self.state.items() if st.get("_model_name") == name]


def panel_display(res: Any) -> dict[str, Any]:
    shown = [d for d in res.displays if WIDGET_VIEW in d["data"]]
    assert len(shown) == 1, res.displays
    return shown[0]


def final(res: Any) -> dict[str, Any]:
    """The update that replaces the panel with its summary (same display id); for a cell
    that was over before the live widgets were drawn, the summary displayed alone."""
    if not any(WIDGET_VIEW in d["data"] for d in res.displays):
        alone = [d for d in res.displays if "nbisolate" in d.get("metadata", {})]
        assert len(alone) == 1, res.displays
        assert alone[0]["metadata"]["nbisolate"]["live"] is False
        assert not res.of("comm_open") and not res.of("update_display_data"), res.messages
        return alone[0]["data"]
    display_id = panel_display(res)["transient"]["display_id"]
    updates = [m["content"] for m in res.of("update_display_data")]
    mine = [u for u in updates if u["transient"]["display_id"] == display_id]
    assert len(mine) == 1, updates
    return mine[0]["data"]


def rows(html: str) -> dict[str, list[str]]:
    """Variable rows of the panel's table: name -> [name, type, size, how, seconds]."""
    found = {}
    for name, body in re.findall(r"<tr class='nbisolate-var' data-name='([^']+)'>(.*?)</tr>", html):
        found[name] = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", body)]
    return found


# -- the widget panel -----------------------------------------------------------------


def test_panel_comes_first_then_updates_spread_over_the_run(kernel):
    fresh_widgets(kernel)
    kernel.run("a = [1, 2, 3]")
    res = kernel.run(
        cell(
            """
            %%isolate
            import time
            print("begin", flush=True)
            time.sleep(2)
            total = sum(a)
            """
        )
    )
    kinds = [m["msg_type"] for m in res.messages]
    shown = panel_display(res)
    at_display = next(
        i for i, m in enumerate(res.messages) if m["msg_type"] == "display_data" and m["content"] is shown
    )
    assert kinds.index("comm_open") < at_display < kinds.index("stream"), kinds[:30]
    models = Models(res)
    root = shown["data"][WIDGET_VIEW]["model_id"]
    assert "nbisolate-panel" in models.state[root]["_dom_classes"]
    assert len(models.with_class("nbisolate-elapsed")) == 1
    assert shown["data"]["text/plain"].startswith("nbisolate: isolated cell starting: 1 in (a)")

    # Updates (the ticking clock) come all through the run, not in a burst at the end.
    end = next(i for i, m in enumerate(res.messages) if m["msg_type"] == "update_display_data")
    ticks = [
        t
        for m, t in zip(res.messages[at_display:end], res.times[at_display:end], strict=True)
        if m["msg_type"] == "comm_msg" and m["content"]["data"].get("method") == "update"
    ]
    windows = {int(t / 0.5) for t in ticks}
    assert len(windows) >= 3, ticks
    assert len(ticks) >= 5, ticks

    # At the end the panel collapses to its summary line and the Stop button goes away.
    data = final(res)
    assert SUMMARY_OK.match(data["text/plain"]), data["text/plain"]
    assert "1 in (" in data["text/plain"] and "2 out" in data["text/plain"]
    assert "class='nbisolate-panel nbisolate-done'" in data["text/html"]
    assert "class='nbisolate-elapsed'" in data["text/html"]
    assert WIDGET_VIEW not in data
    buttons = models.of_model("ButtonModel")
    assert len(buttons) == 1 and buttons[0] in models.closed
    assert kernel.value("total") == 6


def test_rows_give_name_type_size_and_how_each_input_travels(kernel):
    fresh_widgets(kernel)
    kernel.run(
        cell(
            """
            import json as vendor
            prices = [101.5, 99.0] * 500
            def score(x):
                return x * 2
            """
        )
    )
    res = kernel.run(
        cell(
            """
            %%isolate
            import time
            time.sleep(0.6)
            best = max(score(p) for p in prices)
            report = vendor.dumps(best)
            """
        )
    )
    # The live widget's state holds the rows once the inputs are serialized ...
    models = Models(res)
    (main,) = models.with_class("nbisolate-main")
    live = rows(models.state[main]["value"])
    assert set(live) == {"prices", "score", "vendor"}
    assert live["prices"][1:2] == ["list"] and live["prices"][3] == "pickle"
    assert re.fullmatch(r"[\d.]+ KB", live["prices"][2]), live["prices"]
    assert live["score"][1] == "function" and live["score"][3] == "by value"
    assert live["vendor"][1] == "module" and live["vendor"][3] == "module (re-imported)"
    # ... and so does the summary it collapses to, with every phase timed.
    html = final(res)["text/html"]
    assert {name: row[:4] for name, row in rows(html).items()} == {
        name: row[:4] for name, row in live.items()
    }
    for phase in ("plan", "serialize", "start", "load", "run", "return"):
        assert re.search(rf"{phase}&nbsp;<b>[\d.]+ m?s</b>", html), (phase, html)


def test_unshippable_input_shows_member_path_type_and_fix(kernel):
    kernel.run(
        cell(
            """
            import sqlite3
            class Store:
                def __init__(self):
                    self.db = sqlite3.connect(":memory:")
            class Experiment:
                def __init__(self):
                    self.store = Store()
                    self.runs = 3
            e = Experiment()
            """
        )
    )
    res = kernel.execute("%%isolate\nprint('never', e.runs)")
    assert res.error is not None and res.error["ename"] == "ShipError"
    assert "never" not in res.stdout
    data = final(res)
    html, text = data["text/html"], data["text/plain"]
    assert "nothing ran: input 'e' cannot be sent to the worker (e.store.db: sqlite3.Connection)" in text
    # Said in full once, by the error; the panel folds to its summary and lists the problems.
    assert "fix:" not in text and "✗ e.store.db: sqlite3.Connection" in text
    assert "Fix:" in res.error["evalue"] or "fix" in res.error["evalue"].lower()
    problem = re.search(r"<tr class='nbisolate-problem' data-name='e' data-path='e.store.db'>(.*?)</tr>", html)
    assert problem, html
    assert "sqlite3.Connection" in problem.group(1) and "fix:" in problem.group(1)
    assert "<details class='nbisolate-panel nbisolate-done' style" in html
    assert "cannot be sent" in rows(html)["e"][3]


def test_stop_button_click_interrupts_the_worker(kernel):
    """A click sent as JupyterLab sends it, while the cell awaits its worker."""
    kernel.run("marker = 'before'")
    kc = kernel.kc
    msg_id = kc.execute(
        cell(
            """
            %%isolate
            import os, time
            print("pid", os.getpid(), flush=True)
            time.sleep(30)
            marker = "after"
            """
        )
    )
    button = pid = None
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while button is None or pid is None:
        assert time.monotonic() < deadline, [m["msg_type"] for m in seen]
        msg = kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        seen.append(msg)
        content = msg["content"]
        if msg["msg_type"] == "comm_open" and content["data"]["state"].get("_model_name") == "ButtonModel":
            button = content["comm_id"]
            assert content["data"]["state"]["description"] == "Stop"
        elif msg["msg_type"] == "stream" and content["text"].startswith("pid "):
            pid = int(content["text"].split()[1])
    time.sleep(0.3)  # the worker is asleep in time.sleep(30)
    click = kc.session.msg(
        "comm_msg",
        {"comm_id": button, "data": {"method": "custom", "content": {"event": "click"}}},
    )
    kc.shell_channel.send(click)
    clicked = time.monotonic()
    error = summary = None
    while True:
        remaining = clicked + 30 - time.monotonic()
        assert remaining > 0, "the cell did not end after the click"
        msg = kc.get_iopub_msg(timeout=remaining)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        content = msg["content"]
        if msg["msg_type"] == "error":
            error = content
        elif msg["msg_type"] == "update_display_data":
            summary = content["data"]["text/plain"]
        elif msg["msg_type"] == "status" and content["execution_state"] == "idle":
            break
    took = time.monotonic() - clicked
    while kc.get_shell_msg(timeout=10)["parent_header"].get("msg_id") != msg_id:
        pass
    assert took < 5, f"the cell took {took:.1f} s to end after Stop"
    assert error is not None and error["ename"] == "KeyboardInterrupt", error
    assert summary is not None and "stopped (Stop button)" in summary, summary
    assert wait_until(lambda: not psutil.pid_exists(pid), 10)
    assert kernel.value("marker") == "before"


def test_clock_moves_while_a_large_input_is_still_serializing(kernel):
    """The loop is blocked in pickling; the heartbeat keeps the clock moving, in the cell's output."""
    fresh_widgets(kernel)
    kernel.run(
        cell(
            """
            import time as _time
            class SlowToPickle:
                def __reduce__(self):
                    _time.sleep(1.2)
                    return (int, (7,))
            slow = SlowToPickle()
            """
        )
    )
    res = kernel.run("%%isolate\nprint('started', slow)")
    assert res.stdout.strip() == "started 7"
    models = Models(res)
    (elapsed,) = models.with_class("nbisolate-elapsed")
    at_display = next(i for i, m in enumerate(res.messages) if m["msg_type"] == "display_data")
    first_stream = next(i for i, m in enumerate(res.messages) if m["msg_type"] == "stream")
    during = [
        m
        for m in res.messages[at_display:first_stream]
        if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == elapsed
    ]
    assert len(during) >= 3, len(during)
    (main,) = models.with_class("nbisolate-main")
    opened = next(m for m in res.of("comm_open") if m["content"]["comm_id"] == main)
    assert opened  # built in this cell (fresh widgets)


def test_a_cell_over_within_a_moment_shows_its_summary_alone(kernel):
    """No widget is drawn for a cell that ends before the first tick: one display, no comm."""
    res = kernel.run("%%isolate\nx = 1")
    assert [m["msg_type"] for m in res.messages] == ["execute_input", "display_data"], res.messages
    data = final(res)
    assert SUMMARY_OK.match(data["text/plain"]), data["text/plain"]
    assert "class='nbisolate-panel nbisolate-done'" in data["text/html"]
    assert kernel.value("x") == 1


def test_idle_widgets_are_reused_and_only_the_button_is_new(kernel):
    # Cells that run past the first tick, so the live widgets are drawn.
    first = kernel.run("%%isolate\nimport time\ntime.sleep(0.4)\nx = 1")
    second = kernel.run("%%isolate\nimport time\ntime.sleep(0.4)\ny = 2")
    root1 = panel_display(first)["data"][WIDGET_VIEW]["model_id"]
    root2 = panel_display(second)["data"][WIDGET_VIEW]["model_id"]
    assert root1 == root2
    opened = [m["content"]["data"]["state"]["_model_name"] for m in second.of("comm_open")]
    assert sorted(opened) == ["ButtonModel", "ButtonStyleModel"]
    assert len(second.of("comm_close")) == 2


def test_no_panel_for_a_usage_error(kernel):
    res = kernel.execute("%%isolate no_such_name\nprint(1)")
    assert "UsageError: %%isolate: no notebook variable named 'no_such_name'" in res.stderr
    assert not res.displays and not res.of("comm_open")


def test_worker_never_imports_the_panel_or_widgets(kernel):
    kernel.run(
        cell(
            """
            %%isolate
            import sys
            loaded = sorted(m for m in sys.modules
                            if m.split(".")[0] in ("ipywidgets", "comm") or m == "nbisolate.panel")
            """
        )
    )
    assert kernel.value("loaded") == []


# -- text: --quiet, panel=text, no kernel, the API -----------------------------------------


def test_quiet_shows_only_the_summary_line(kernel):
    kernel.run("a = [1, 2, 3]")
    res = kernel.run("%%isolate --quiet\nprint('out', sum(a))\nb = 1")
    assert not res.of("comm_open")
    assert res.stdout == "out 6\n"
    (shown,) = res.displays
    assert list(shown["data"]) == ["text/plain"]
    assert SUMMARY_OK.match(shown["data"]["text/plain"]), shown
    kinds = [m["msg_type"] for m in res.messages]
    assert kinds.index("stream") < kinds.index("display_data")  # at the end


def test_panel_text_and_off_settings(kernel):
    try:
        kernel.run("%isolate_config panel=text")
        assert "panel=text" in kernel.run("%isolate_config").stdout.split()
        kernel.run("a = 5")
        res = kernel.run("%%isolate\nprint('hi')\nz = a")
        assert not res.of("comm_open")
        start, end = (d["data"]["text/plain"] for d in res.displays)
        assert start == "nbisolate: isolated cell starting: 1 in (a), 1 out (z)"
        assert SUMMARY_OK.match(end), end
        kernel.run("%isolate_config panel=off")
        res = kernel.run("%%isolate\nprint('hi')")
        assert not res.displays and not res.of("comm_open") and res.stdout == "hi\n"
        bad = kernel.execute("%isolate_config panel=fancy")
        assert "panel='fancy' is not one of auto, widget, text, off" in bad.stderr
        bad = kernel.execute("%isolate_config colour=red")
        assert "the setting is panel=auto|widget|text|off" in bad.stderr
    finally:
        kernel.run("%isolate_config panel=auto")


SCRIPT = r"""
import sqlite3, sys
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
shell.run_line_magic("load_ext", "nbisolate")
shell.user_ns.update(prices=[1.5, 2.5], holder={"db": sqlite3.connect(":memory:")})
shell.run_cell_magic("isolate", "", "print('total', sum(prices))\nbest = max(prices)")
print("best", shell.user_ns["best"])
try:
    shell.run_cell_magic("isolate", "", "print(holder)")
except Exception as exc:
    print("raised", type(exc).__name__)
shell.run_cell_magic("isolate", "--quiet", "q = 1")
"""


def test_text_lines_without_a_kernel_in_a_plain_interactive_shell(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    # The cell's own output stays on stdout; the panel's lines go to stderr.
    assert proc.stdout.splitlines() == ["total 4.0", "best 2.5", "raised ShipError"]
    lines = proc.stderr.splitlines()
    assert lines[0] == "nbisolate: isolated cell starting: 1 in (prices), 1 out (best)"
    assert SUMMARY_OK.match(lines[1]), lines
    assert lines[2] == "nbisolate: isolated cell starting: 1 in (holder), 0 out"
    assert lines[3] == (
        "nbisolate: nothing ran: input 'holder' cannot be sent to the worker "
        "(holder['db']: sqlite3.Connection)"
    )
    assert lines[4].startswith("  ✗ holder['db']: sqlite3.Connection: ")
    assert lines[5].startswith("    fix: ")
    assert SUMMARY_OK.match(lines[6]) and "0 in" in lines[6], lines  # --quiet: the summary only
    assert len(lines) == 7, lines


def test_text_panel_on_the_python_api(capsys):
    """The API attaches no panel by itself; a caller can attach one to a CellRun."""
    from nbisolate import panel
    from nbisolate.runner import CellRun
    from nbisolate.supervisor import launcher

    ns: dict[str, Any] = {"n": 4}
    run = CellRun("import sqlite3\nconn = sqlite3.connect(':memory:')\nsquare = n * n", ns)
    attached = panel.attach(run, mode="text")
    assert isinstance(attached, panel.TextPanel)
    try:
        run.prepare()
        run.run_sync()
    finally:
        launcher.close()  # the template process this test process started
    assert ns["square"] == 16 and "conn" not in ns
    err = capsys.readouterr().err
    assert "nbisolate: isolated cell starting: 1 in (n), 3 out (sqlite3, conn, square)" in err
    summary = [ln for ln in err.splitlines() if ln.startswith("nbisolate: ran")]
    assert len(summary) == 1 and SUMMARY_OK.match(summary[0]), err
    assert summary[0].endswith("; 1 result skipped: conn (sqlite3.Connection)"), summary


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0004, "0.4 ms"), (0.085, "85 ms"), (3.21, "3.2 s"), (902, "15 min 02 s"), (7300, "2 h 01 min")],
)
def test_durations_read_well(seconds, text):
    from nbisolate.panel import fmt_seconds

    assert fmt_seconds(seconds) == text


def test_unloading_the_extension_closes_the_idle_widgets(fresh_kernel):
    first = fresh_kernel.run("%%isolate\nimport time\ntime.sleep(0.4)\nx = 1")
    models = Models(first)
    kept = set(models.state) - models.closed
    assert kept, "the panel keeps its widgets for the next cell"
    res = fresh_kernel.run("%unload_ext nbisolate")
    assert {m["content"]["comm_id"] for m in res.of("comm_close")} == kept


class OutputArea:
    """A cell's output area as JupyterLab keeps it: clear_output(wait=True) clears on the next output."""

    def __init__(self, res: Any) -> None:
        self.outputs: list[dict[str, Any]] = []
        pending = False
        for msg in res.messages:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "clear_output":
                if content.get("wait"):
                    pending = True
                else:
                    self.outputs = []
                continue
            if kind not in ("stream", "display_data", "update_display_data", "execute_result"):
                continue
            if kind == "update_display_data":
                display_id = content["transient"]["display_id"]
                for out in self.outputs:
                    if out.get("transient", {}).get("display_id") == display_id:
                        out["data"] = content["data"]
                continue
            if pending:
                self.outputs, pending = [], False
            self.outputs.append({"type": kind, **content})

    def panels(self) -> list[dict[str, Any]]:
        return [
            o for o in self.outputs if "nbisolate" in o.get("data", {}).get("text/plain", "")
        ]


def test_clear_output_in_the_cell_never_clears_the_panel(kernel):
    """The usual progress loop: clear_output(wait=True) clears the cell's output, not the panel."""
    res = kernel.run(
        cell(
            """
            %%isolate --timeout 60
            import time
            from IPython.display import clear_output
            for epoch in range(4):
                clear_output(wait=True)
                print("epoch", epoch)
                time.sleep(0.3)
            clear_output()
            print("trained")
            """
        )
    )
    display_id = panel_display_id(res)
    # Live: after every clear, the panel (with its Stop button) is shown again, first.
    after_clear = []
    for i, msg in enumerate(res.messages):
        if msg["msg_type"] == "clear_output":
            following = [
                m for m in res.messages[i + 1 :] if m["msg_type"] in ("display_data", "stream")
            ]
            after_clear.append(following[0])
    assert len(after_clear) == 5
    for msg in after_clear:
        assert msg["msg_type"] == "display_data", msg
        assert msg["content"]["transient"]["display_id"] == display_id
        assert WIDGET_VIEW in msg["content"]["data"]
    # At the end: the summary where the panel was, then only the last output of the cell.
    area = OutputArea(res)
    (summary,) = area.panels()
    assert SUMMARY_OK.match(summary["data"]["text/plain"]), summary
    assert area.outputs[0] is summary
    assert [o.get("text") for o in area.outputs[1:]] == ["trained\n"], area.outputs


def panel_display_id(res: Any) -> str:
    ids = {d["transient"]["display_id"] for d in res.displays if WIDGET_VIEW in d["data"]}
    assert len(ids) == 1, res.displays
    return ids.pop()
